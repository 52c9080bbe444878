"""Stacks over a `*` that is not the pattern's last, bound before inverting (section 15).

A stack takes the last `*` whose matches are integers (docs/design.md section
16), so `stack("model.layers.*.mlp.*_proj.weight")` stacks the layers and
carries `*_proj` over to the new side. Its inverse is an `unstack`, which
indexes the *last* `*` of its new side: written as it is, the inverse would
put the layer index where `*_proj` stands. So each such rule is first split
into one rule per value the later wildcards take in `like` (`up_proj`,
`down_proj`), whose stacked `*` is then the last; without `like`, which `*` the
stack took is unknown, and the rule is refused with what to pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from treegraft._errors import MappingError, PathSyntaxError, Problem
from treegraft._parse.ops import Operation, Stack
from treegraft._parse.patterns import Pattern
from treegraft._parse.rules import Rule, RuleValue
from treegraft._parse.scan import scan
from treegraft._plan.context import choose_stacked, stack_choices

__all__ = ["bind_later_wildcards"]

Parts = tuple[Any, ...]
LikeLeaf = tuple[Parts, tuple[int, ...], Any]


def bind_later_wildcards(
    rules: Sequence[Rule], mapping: dict[Any, RuleValue], leaves: Sequence[LikeLeaf] | None
) -> tuple[dict[Any, RuleValue], list[Problem]]:
    """The mapping with each stack over a non-last `*` split per value of the later ones.

    Returns:
      The bound mapping, without the rules that cannot be bound, and one
      problem per such rule (to be listed with the inversion's others): without
      leaves, a stack whose pattern has a `*` the stack might not have taken;
      with leaves, such a rule of several sources.
    """
    out: dict[Any, RuleValue] = {}
    problems: list[Problem] = []
    for rule, (key, value) in zip(rules, mapping.items(), strict=True):
        stacked = [ref for ref in rule.refs if ref.levels == 1]
        if rule.old is None or not stacked or not _has_choice(rule, stacked[0].pattern):
            out[key] = value
            continue
        if leaves is None:
            problems.append(Problem(
                "mapping",
                f"rule {rule}: which '*' of {stacked[0].pattern.text!r} the stack takes "
                "depends on the source (the last one whose matches are integers); pass "
                "like= (the original source's metadata, e.g. the checkpoint) to invert it",
                rule=str(rule),
            ))
            continue
        if len(rule.refs) != 1:
            problems.append(Problem(
                "mapping",
                f"rule {rule}: a stack over a '*' that is not its pattern's last, among "
                "several sources, cannot be inverted; write one rule per value of the "
                "later '*'",
                rule=str(rule),
            ))
            continue
        split = _split(rule, key, value, stacked[0].pattern, leaves)
        if split is None:
            out[key] = value
        else:
            out.update(split)
    return out, problems


def _has_choice(rule: Rule, pattern: Pattern) -> bool:
    """Whether a one-level stack of pattern could take a `*` other than its last."""
    return len(stack_choices(pattern.wildcards(), rule.new.wildcards(), 1)) > 1


def _split(
    rule: Rule, key: Any, value: RuleValue, pattern: Pattern, leaves: Sequence[LikeLeaf]
) -> dict[Any, RuleValue] | None:
    """One rule per value of the wildcards after the stacked one (None: nothing after it)."""
    match = pattern.prefix_matcher()
    found = [m[1] for parts, _, _ in leaves if (m := match(parts)) is not None]
    if not found:
        return None
    (p,) = choose_stacked(pattern.wildcards(), rule.new.wildcards(), 1, found)
    later = [q for q in range(p + 1, len(pattern.wildcards()))]
    if not later:
        return None
    # the new side's wildcards are the pattern's, less the stacked one, in order
    carried = [q for q in range(len(pattern.wildcards())) if q != p]
    out: dict[Any, RuleValue] = {}
    for values in dict.fromkeys(tuple(caps[q] for q in later) for caps in found):
        old_text = _bind_text(pattern.text, dict(zip(later, values, strict=True)))
        new_text = _bind_text(rule.new.text, {carried.index(q): v
                                              for q, v in zip(later, values, strict=True)})
        out[new_text] = _replace_source(value, pattern.text, old_text, str(rule.old))
    return out


def _bind_text(text: str, bound: dict[int, Any]) -> str:
    """A pattern's text with the wildcards numbered in bound filled with their captures."""
    segments = scan(text, wildcards=True)
    out: list[tuple[str, Any]] = []
    seen = 0
    for kind, value in segments:
        if kind == "part":
            out.append((kind, value))
        elif value == "**":
            if seen in bound:
                out.extend(("part", part) for part in bound[seen])
            else:
                out.append((kind, value))
            seen += 1
        else:
            pieces = value.split("*")
            piece_text, glob = pieces[0], False
            for piece in pieces[1:]:
                if seen in bound:
                    piece_text += str(bound[seen])
                else:
                    piece_text, glob = piece_text + "*", True
                seen += 1
                piece_text += piece
            out.append(("glob", piece_text) if glob else ("part", piece_text))
    rendered = str(Pattern("", _segments=out))
    try:
        if scan(rendered, wildcards=True) == out:
            return rendered
    except PathSyntaxError:
        pass
    raise MappingError(
        f"cannot write the captures {tuple(bound.values())!r} into {text!r} to invert it; "
        "name those leaves in rules of their own"
    )


def _replace_source(value: Any, old: str, new: str, shown: str) -> Any:
    """value with every stack of the source text old made a stack of new."""
    if isinstance(value, Stack) and isinstance(value.source, str):
        return dataclasses.replace(value, source=new) if value.source == old else value
    if isinstance(value, Operation) and dataclasses.is_dataclass(value):
        changes = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if isinstance(item, Operation):
                changes[field.name] = _replace_source(item, old, new, shown)
            elif isinstance(item, tuple) and any(isinstance(v, Operation) for v in item):
                changes[field.name] = tuple(_replace_source(v, old, new, shown) for v in item)
        return dataclasses.replace(value, **changes) if changes else value
    return value
