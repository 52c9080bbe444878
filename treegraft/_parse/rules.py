"""A mapping `{new: old}` turned into validated rules, and ignore patterns.

This is the parse step of a graft: it checks the mapping itself (its type, the
syntax of every path, that both sides of each rule have the same wildcards) and
reports every problem in one `MappingError`, before any tree is looked at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from treegraft._errors import GraftError, MappingError, PathSyntaxError, Problem, count
from treegraft._parse.ops import Operation, Step, flatten_operation
from treegraft._parse.paths import Path
from treegraft._parse.patterns import Pattern, parse_pattern

__all__ = ["Rule", "parse_mapping", "parse_ignore", "MappingLike", "CastOption"]

# What a mapping may hold, as the public signatures say it (docs/design.md
# section 10): keys are path strings, `Path`s or `Pattern`s; values are those,
# None (keep) or an operation. Mapping is invariant in its key type, so a union
# of key types would refuse a plain dict[str, str]: keys are typed Any here and
# checked by `parse_mapping`.
RuleValue: TypeAlias = str | Path | Pattern | Operation | None
MappingLike: TypeAlias = Mapping[Any, RuleValue]
# The `cast=` option: False, True (same-kind casts that keep every value) or "unsafe".
CastOption: TypeAlias = bool | Literal["unsafe"]


@dataclass(frozen=True, eq=False)
class Rule:
    """One entry `new ← old` of a mapping, compiled.

    Attributes:
      new: the pattern matched against the state (the target).
      old: the pattern filled with `new`'s captures to find the source; None
        for a keep rule (`{new: None}`).
      index: the rule's position in the mapping (for stable reports).
      gather: how source leaves feed a target leaf: "copy" (one leaf),
        "keep" (none: the target keeps its value), "stack" (one per index of
        old's last `*`) or "unstack" (one leaf, indexed by new's last `*`).
      axis: the axis of "stack" and "unstack".
      steps: per-leaf changes (cast, transpose, reshape), in the order they apply.
      shown: the rule's value as the user wrote it, for messages.
    """

    new: Pattern
    old: Pattern | None
    index: int
    gather: str = "copy"
    axis: int = 0
    steps: tuple[Step, ...] = ()
    shown: str = ""

    def old_captures(self, captures: tuple[Any, ...]) -> tuple[Any, ...]:
        """The captures of new that fill old (unstack's extra index left out)."""
        return captures[:-1] if self.gather == "unstack" else captures

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
        gather, source, axis, steps = flatten_operation(old)
        shown = old.describe()
    else:
        source_text = _as_text(old)
        if source_text is None:
            raise MappingError(
                f"the value {old!r} is {_a(old)}; a value is a path string, None (keep the "
                "target's value) or an operation such as tg.stack(...)"
            )
        gather, source, axis, steps, shown = "copy", source_text, 0, (), ""
    old_pat = parse_pattern(old if isinstance(old, Pattern | Path) else source)
    if gather == "copy":
        new_pat.check_corresponds(old_pat)
    elif gather == "stack":
        _check_one_more(old_pat, new_pat, "stack", "source")
    else:
        _check_one_more(new_pat, old_pat, "unstack", "new side")
    return Rule(new_pat, old_pat, index, gather=gather, axis=axis, steps=steps, shown=shown)


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
