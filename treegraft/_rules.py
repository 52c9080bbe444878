"""A mapping `{new: old}` turned into validated rules, and ignore patterns.

This is the parse step of a graft: it checks the mapping itself (its type, the
syntax of every path, that both sides of each rule have the same wildcards) and
reports every problem in one `MappingError`, before any tree is looked at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from treegraft._errors import MappingError, PathSyntaxError
from treegraft._paths import Path
from treegraft._patterns import Pattern, parse_pattern

__all__ = ["Rule", "parse_mapping", "parse_ignore"]


@dataclass(frozen=True, eq=False)
class Rule:
    """One entry `new ← old` of a mapping, compiled.

    Attributes:
      new: the pattern matched against the state (the target).
      old: the pattern filled with `new`'s captures to find the source.
      index: the rule's position in the mapping (for stable reports).
    """

    new: Pattern
    old: Pattern
    index: int

    def __str__(self) -> str:
        return f"{self.new.text!r} <- {self.old.text!r}"


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Path | Pattern):
        return str(value)
    return None


def parse_mapping(mapping: Any) -> list[Rule]:
    """Validates a `{new: old}` mapping and compiles it into rules.

    Args:
      mapping: a mapping from new (target) paths or patterns to old (source)
        ones; keys and values are strings, `Path`s or `Pattern`s.

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
    problems: list[str] = []
    rules: list[Rule] = []
    for index, (new, old) in enumerate(mapping.items()):
        new_text, old_text = _as_text(new), _as_text(old)
        bad = False
        for side, raw, text in (("key", new, new_text), ("value", old, old_text)):
            if text is None:
                problems.append(
                    f"  entry {index}: the {side} {raw!r} is a {type(raw).__name__}, "
                    "not a path string"
                )
                bad = True
        if bad:
            continue
        assert new_text is not None and old_text is not None
        try:
            new_pat = parse_pattern(new if isinstance(new, Pattern | Path) else new_text)
            old_pat = parse_pattern(old if isinstance(old, Pattern | Path) else old_text)
            new_pat.check_corresponds(old_pat)
        except (PathSyntaxError, MappingError) as e:
            problems.append(f"  entry {new_text!r}: " + str(e).replace("\n", "\n    "))
            continue
        rules.append(Rule(new_pat, old_pat, index))
    if problems:
        raise MappingError(
            f"invalid mapping ({len(problems)} problem(s)):\n" + "\n".join(problems),
            problems=problems,
        )
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
    problems: list[str] = []
    for item in items:
        text = _as_text(item)
        if text is None:
            problems.append(f"  {item!r} is a {type(item).__name__}, not a pattern string")
            continue
        try:
            out.append(parse_pattern(item if isinstance(item, Pattern | Path) else text))
        except PathSyntaxError as e:
            problems.append("  " + str(e).replace("\n", "\n    "))
    if problems:
        raise MappingError(
            f"invalid {name} ({len(problems)} problem(s)):\n" + "\n".join(problems),
            problems=problems,
        )
    return out
