"""A mapping `{new: old}` turned into validated rules, and ignore patterns.

This is the parse step of a graft: it checks the mapping itself (its type, the
syntax of every path, that both sides of each rule have the same wildcards) and
reports every problem in one `MappingError`, before any tree is looked at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias

from treegraft._errors import GraftError, MappingError, PathSyntaxError, Problem, count
from treegraft._parse.ops import Node, Operation, Step, compile_operation
from treegraft._parse.paths import Path
from treegraft._parse.patterns import Pattern, parse_pattern

__all__ = ["Rule", "Ref", "parse_mapping", "parse_ignore", "MappingLike", "CastOption"]

# What a mapping may hold, as the public signatures say it (docs/design.md
# section 10): keys are path strings, `Path`s or `Pattern`s; values are those,
# None (keep) or an operation. Mapping is invariant in its key type, so a union
# of key types would refuse a plain dict[str, str]: keys are typed Any here and
# checked by `parse_mapping`.
RuleValue: TypeAlias = str | Path | Pattern | Operation | None
MappingLike: TypeAlias = Mapping[Any, RuleValue]
# The `cast=` option: False, True (same-kind casts that keep every value) or "unsafe".
CastOption: TypeAlias = bool | Literal["unsafe"]


class Ref(NamedTuple):
    """One source reference of a rule: its pattern and how its leaves are gathered.

    Attributes:
      pattern: the source pattern, filled with the new side's captures.
      levels: how many of its integer captures are stacked (0: none).
      unstack: whether the new side's last capture indexes it.
    """

    pattern: Pattern
    levels: int = 0
    unstack: bool = False


@dataclass(frozen=True, eq=False)
class Rule:
    """One entry `new ← old` of a mapping, compiled.

    Attributes:
      new: the pattern matched against the state (the target).
      old: the (first) pattern filled with `new`'s captures to find the
        source; None for a keep rule (`{new: None}`).
      index: the rule's position in the mapping (for stable reports).
      gather: how source leaves feed a target leaf: "copy" (one leaf),
        "keep" (none: the target keeps its value), "stack" (one per index of
        old's stacked captures), "unstack" (one leaf, indexed by new's last
        `*`) or "join" (several source references: concat, stack of a list).
      axis: the axis of "stack" and "unstack" in the plain form (a gather on
        a path, then steps); 0 otherwise.
      steps: in the plain form, the per-leaf changes (cast, transpose,
        reshape, ...) in the order they apply; () otherwise.
      shown: the rule's value as the user wrote it, for messages.
      tree: the compiled value (`treegraft._parse.ops.Node`); None to keep.
      refs: the source references, in the tree's order (`Ref`).
      plain_form: whether the value is a gather on a path followed by steps
        (so `axis` and `steps` say everything the tree says).
    """

    new: Pattern
    old: Pattern | None
    index: int
    gather: str = "copy"
    axis: int = 0
    steps: tuple[Step, ...] = ()
    shown: str = ""
    tree: Node | None = None
    refs: tuple[Ref, ...] = ()
    plain_form: bool = True

    @property
    def is_copy(self) -> bool:
        """Whether each target leaf is its one source leaf as is."""
        return self.old is not None and (self.tree is None or self.tree.kind == "source")

    def old_captures(self, captures: tuple[Any, ...], ref: int = 0) -> tuple[Any, ...]:
        """The captures of new that fill a reference's pattern (an unstack's index left out)."""
        unstacked = self.refs[ref].unstack if self.refs else self.gather == "unstack"
        return captures[:-1] if unstacked else captures

    def __str__(self) -> str:
        if self.old is None:
            return f"{self.new.text!r} <- None (keep)"
        return f"{self.new.text!r} <- {self.shown or repr(self.old.text)}"


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Path | Pattern):
        return str(value)
    return None


def _a(value: Any) -> str:
    """'an int', 'a float': a value's type with its article."""
    name = type(value).__name__
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _compile(new: Any, new_text: str, old: Any, index: int) -> Rule:
    new_pat = parse_pattern(new if isinstance(new, Pattern | Path) else new_text)
    if old is None:
        return Rule(new_pat, None, index, gather="keep")
    if isinstance(old, Operation):
        tree, inputs = compile_operation(old)
        shown = old.describe()
    else:
        source_text = _as_text(old)
        if source_text is None:
            raise MappingError(
                f"the value {old!r} is {_a(old)}; a value is a path string, None (keep the "
                "target's value) or an operation such as tg.stack(...)"
            )
        tree, inputs = compile_operation(source_text)
        shown = ""
    refs = []
    for k, ref in enumerate(inputs):
        given = old if k == 0 and isinstance(old, Pattern | Path) else ref.text
        pattern = parse_pattern(given)
        _check_ref(new_pat, pattern, ref.levels, ref.unstack)
        refs.append(Ref(pattern, ref.levels, ref.unstack))
    gather, axis, steps, plain = _plain_form(tree, refs)
    return Rule(new_pat, refs[0].pattern, index, gather=gather, axis=axis, steps=steps,
                shown=shown, tree=tree, refs=tuple(refs), plain_form=plain)


def _plain_form(tree: Node, refs: list[Ref]) -> tuple[str, int, tuple[Step, ...], bool]:
    """(gather, axis, steps, whether the tree is a gather on a path followed by steps)."""
    if len(refs) > 1:
        gather = "join"
    elif refs[0].levels:
        gather = "stack"
    elif refs[0].unstack:
        gather = "unstack"
    else:
        gather = "copy"
    steps: list[Step] = []
    node = tree
    while node.kind == "step":
        assert node.step is not None
        steps.append(node.step)
        node = node.children[0]
    steps.reverse()
    if node.kind == "source":
        return gather, 0, tuple(steps), True
    if node.kind in ("stack", "unstack") and node.children[0].kind == "source":
        return gather, node.axis, tuple(steps), True
    return gather, 0, (), False


def _check_ref(new: Pattern, old: Pattern, levels: int, unstack: bool) -> None:
    """Checks that new's captures fill old: as they are, less an unstack's, plus stacked ones."""
    if unstack:
        _check_one_more(new, old, "unstack", "new side")
        return
    if levels == 0:
        new.check_corresponds(old)
        return
    mine, theirs = old.wildcards(), new.wildcards()
    if not _embeds(theirs, mine, levels):
        extra = "one last '*' for the layer index" if levels == 1 else (
            f"{levels} '*' for the stacked indices")
        raise MappingError(
            f"stack: the source {old.text!r} ({' '.join(mine) or 'no wildcards'}) must have "
            f"the wildcards of {new.text!r} ({' '.join(theirs) or 'none'}) plus {extra} "
            "(a '*' that captures integer indices, wherever it stands)"
        )


def _embeds(fewer: tuple[str, ...], more: tuple[str, ...], extra: int) -> bool:
    """Whether removing `extra` '*' from more leaves fewer."""
    if len(more) != len(fewer) + extra:
        return False
    j = 0
    for kind in more:
        if j < len(fewer) and kind == fewer[j]:
            j += 1
        elif kind != "*":
            return False
    return j == len(fewer)


def _check_one_more(more: Pattern, fewer: Pattern, what: str, side: str) -> None:
    """Checks that more has fewer's wildcards plus one last '*' (the layer index)."""
    mine, theirs = more.wildcards(), fewer.wildcards()
    if mine[:-1] != theirs or not mine or mine[-1] != "*":
        raise MappingError(
            f"{what}: the {side} {more.text!r} ({' '.join(mine) or 'no wildcards'}) must have "
            f"the wildcards of {fewer.text!r} ({' '.join(theirs) or 'none'}) plus one last "
            "'*' for the layer index"
        )


def parse_mapping(mapping: Any) -> list[Rule]:
    """Validates a `{new: old}` mapping and compiles it into rules.

    Args:
      mapping: a mapping from new (target) paths or patterns to old (source)
        ones; keys are strings, `Path`s or `Pattern`s; values are those,
        `None` (keep the target's value) or an operation (`tg.stack`, ...).

    Returns:
      The rules, in the mapping's order.

    Raises:
      MappingError: listing every problem: not a mapping, empty, a key or
        value that is not a path string, a syntax error, or wildcards that do
        not correspond between the two sides of a rule.
    """
    if not isinstance(mapping, Mapping):
        raise MappingError(
            f"the mapping must be a dict {{new_path: old_path}}, got {type(mapping).__name__}"
            + (": did you mean {x: x}?" if isinstance(mapping, str) else "")
        )
    if not mapping:
        raise MappingError(
            "the mapping is empty: nothing would be grafted; give at least one "
            "{new_path: old_path} entry"
        )
    problems: list[Problem] = []
    rules: list[Rule] = []
    for index, (new, old) in enumerate(mapping.items()):
        new_text = _as_text(new)
        name = repr(new_text) if new_text is not None else f"{index} (key {new!r})"
        if new_text is None:
            problems.append(
                Problem("mapping", f"entry {name}: the key is {_a(new)}, not a path string")
            )
            if not (old is None or isinstance(old, Operation) or _as_text(old) is not None):
                problems.append(
                    Problem("mapping", f"entry {name}: the value {old!r} is {_a(old)}, not a path")
                )
            continue
        try:
            rules.append(_compile(new, new_text, old, index))
        except (PathSyntaxError, MappingError) as e:
            problems.append(Problem("mapping", f"entry {name}: {e}", pattern=new_text))
    _raise(problems, "invalid mapping")
    return rules


def parse_ignore(patterns: Any, *, name: str) -> list[Pattern]:
    """Compiles ignore patterns (`ignore_model_keys` / `ignore_restored_keys`).

    A single string is taken as one pattern, not as a sequence of characters.

    Raises:
      MappingError: listing each entry that is not a valid pattern string.
    """
    if patterns is None:
        return []
    items: Iterable[Any] = (patterns,) if isinstance(patterns, str | Path | Pattern) else patterns
    try:
        items = list(items)
    except TypeError:
        raise MappingError(
            f"{name} must be a sequence of path patterns, got {type(patterns).__name__}"
        ) from None
    out: list[Pattern] = []
    problems: list[Problem] = []
    for item in items:
        text = _as_text(item)
        if text is None:
            problems.append(Problem("ignore", f"{item!r} is {_a(item)}, not a pattern string"))
            continue
        try:
            out.append(parse_pattern(item if isinstance(item, Pattern | Path) else text))
        except PathSyntaxError as e:
            problems.append(Problem("ignore", str(e), pattern=text))
    _raise(problems, f"invalid {name}")
    return out


def _raise(problems: list[Problem], what: str) -> None:
    """Raises the MappingError listing problems under the header `what (N problems):`."""
    if problems:
        header = f"{what} ({count(len(problems), 'problem')}):"
        raise GraftError.from_problems(problems, header=header)
