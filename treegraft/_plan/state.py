"""The state one planning run shares between its steps, and its look-ups.

`PlanState` holds the rules, both trees' indexes and the tables the steps
fill (problems, instances of glob rules, stack members). The steps are
classes on top of it, each a stage of the run: `leaves.LeafChecks`,
`resolve.Resolve`, `coverage.Coverage`; `planner` runs them in order.
"""

from __future__ import annotations

from typing import Any

from treegraft._parse.paths import Part, Path, render_parts
from treegraft._parse.patterns import Pattern
from treegraft._parse.rules import Rule
from treegraft._plan.problems import Problem, _ranges
from treegraft._read.source import Source
from treegraft._tree.index import TreeIndex

Parts = tuple[Part, ...]


class PlanState:
    """One planning run's inputs and tables, and the look-ups every step shares."""

    def __init__(
        self,
        rules: list[Rule],
        ignore_model: list[Pattern],
        ignore_restored: list[Pattern],
        tgt: TreeIndex,
        src: TreeIndex,
        *,
        cast: bool | str,
    ):
        self.rules = rules
        self.ignore_model = ignore_model
        self.ignore_restored = ignore_restored
        self.tgt = tgt
        self.src = src
        self.cast = cast
        self.lazy: Source | None = None
        self.problems: list[Problem] = []
        self.used_model = [False] * len(ignore_model)
        self.used_restored = [False] * len(ignore_restored)
        self._structure_seen: set[tuple[Parts, Parts]] = set()
        # (rule, target leaf, prefix length) where a rule matched but a more
        # specific one took the leaf: usually few, only with overlapping rules.
        self._outranked: list[tuple[int, int, int]] = []
        # Per stack rule: {captures of new: [(index capture, old prefix)]}.
        self._stack_groups: dict[int, dict[tuple[Any, ...], list[tuple[Any, Parts]]]] = {}
        # (rule, new prefix, old prefix) of each stacked source subtree.
        self._stack_instances: list[tuple[int, Parts, Parts]] = []
        self._members: dict[tuple[int, Parts], dict[int, Parts] | None] = {}
        self._literal: dict[int, Parts] = {}
        # (rule, target subtree) -> [leaves, index of its problem, source subtree].
        self._missing_groups: dict[tuple[int, Parts], list[Any]] = {}
        self._captures: list[tuple[Any, ...]] = []

    def _old_of(self, r: int, new_prefix: Parts, caps: tuple[Any, ...] | None = None) -> Parts:
        """The old path a rule's new side, matched at new_prefix, points to.

        `caps` are new's captures at new_prefix, when already known. For a
        stack rule, the literal part of its old side (before the index).
        """
        rule = self.rules[r]
        assert rule.old is not None
        if rule.gather == "stack":
            return rule.old.literal_prefix()
        if rule.old.is_literal:
            return self._literal_old(r)
        if caps is None:
            caps = rule.new.match(new_prefix) or ()
        return rule.old.substitute_parts(rule.old_captures(caps))

    def _literal_old(self, r: int) -> Parts:
        old = self._literal.get(r)
        if old is None:
            old = self._literal[r] = self.rules[r].old.as_path().parts  # type: ignore[union-attr]
        return old

    def _old_prefix(
        self, r: int, new_prefix: Parts, caps: tuple[Any, ...] | None = None
    ) -> Parts | None:
        if self.rules[r].gather == "stack":
            group = self._stack_members(r, new_prefix)
            return next(iter(group.values())) if group else None
        old = self._old_of(r, new_prefix, caps)
        return old if self.src.node_exists(old) else None

    def _stack_members(self, r: int, new_prefix: Parts) -> dict[int, Parts] | None:
        """{index: old prefix} of a stack rule at new_prefix, or None if it has none.

        The indices must run 0..N-1; a gap or a capture that is not an integer
        is reported once (and {} returned).
        """
        key = (r, new_prefix)
        if key not in self._members:
            self._members[key] = self._find_members(r, new_prefix)
        return self._members[key]

    def _find_members(self, r: int, new_prefix: Parts) -> dict[int, Parts] | None:
        rule = self.rules[r]
        caps = rule.new.match(new_prefix) or ()
        groups = self._stack_groups.get(r)
        if groups is None:
            groups = self._stack_groups[r] = {}
            assert rule.old is not None
            for prefix, found in _source_prefixes(rule.old, self.src).items():
                groups.setdefault(found[:-1], []).append((found[-1], prefix))
        group = groups.get(tuple(caps))
        if not group:
            return None
        indices: dict[int, Parts] = {}
        bad = []
        for cap, prefix in group:
            index = _as_index(cap)
            if index is None:
                bad.append(repr(render_parts(prefix)))
            else:
                indices[index] = prefix
        ordered = dict(sorted(indices.items()))
        gaps = [k for k in range(max(ordered, default=-1) + 1) if k not in ordered]
        if bad or gaps:
            why = []
            if bad:
                why.append(f"{', '.join(bad[:5])} captured no integer index")
            if gaps:
                shown = ", ".join(map(str, gaps[:10]))
                why.append(
                    f"indices found {_ranges(list(ordered))}, missing {shown}: a stack needs "
                    "exactly 0..N-1"
                )
            self.problems.append(
                Problem(
                    "structure",
                    f"{render_parts(new_prefix)!r}: the source subtrees matching "
                    f"{rule.old.text if rule.old else ''!r} cannot be stacked: "
                    f"{'; '.join(why)} [rule {rule}]",
                    target=Path(new_prefix),
                    rule=str(rule),
                )
            )
            return {}
        return ordered

    def _unstack_index(self, r: int, new_prefix: Parts) -> int | None:
        rule = self.rules[r]
        caps = rule.new.match(new_prefix) or ()
        index = _as_index(caps[-1]) if caps else None
        if index is None:
            self.problems.append(
                Problem(
                    "structure",
                    f"{render_parts(new_prefix)!r}: the last '*' of {rule.new.text!r} captured "
                    f"{caps[-1] if caps else None!r}, not an integer index to unstack "
                    f"[rule {rule}]",
                    target=Path(new_prefix),
                    rule=str(rule),
                )
            )
        return index

    def _ignored_model(self, parts: Parts, n: int) -> bool:
        return _ignored(self.ignore_model, self.used_model, parts, n)

    def _ignored_restored(self, parts: Parts, n: int) -> bool:
        return _ignored(self.ignore_restored, self.used_restored, parts, n)


def _as_index(capture: Any) -> int | None:
    """A capture as a layer index: an int, or a string of ASCII digits."""
    if type(capture) is int:
        return capture if capture >= 0 else None
    if isinstance(capture, str) and capture.isascii() and capture.isdigit():
        return int(capture)
    return None


def _source_prefixes(
    pattern: Pattern, index: TreeIndex, skip: set[Parts] | frozenset[Parts] = frozenset()
) -> dict[Parts, tuple[Any, ...]]:
    """Each distinct prefix of the index's leaf paths that pattern matches, with captures.

    Prefixes in `skip` (already known) are left out without being matched.
    """
    found: dict[Parts, tuple[Any, ...]] = {}
    head = pattern.literal_prefix()
    paths = [index.paths[i] for i in index.under(head)] if head else index.paths
    n = pattern.length
    if n is not None:  # match each distinct prefix once, in leaf order
        for prefix in dict.fromkeys(p[:n] for p in paths if len(p) >= n):
            if prefix in skip:
                continue
            caps = pattern.match(prefix)
            if caps is not None:
                found[prefix] = caps
        return found
    match = pattern.prefix_matcher()
    for parts in paths:
        m = match(parts)
        if m is not None and parts[: m[0]] not in skip:
            found.setdefault(parts[: m[0]], m[1])
    return found


def _ignored(patterns: list[Pattern], used: list[bool], parts: Parts, n: int) -> bool:
    hit = False
    rel = parts[n:]
    for k, pat in enumerate(patterns):
        if pat.match_prefix(rel) is not None or pat.match_prefix(parts) is not None:
            used[k] = True
            hit = True
    return hit
