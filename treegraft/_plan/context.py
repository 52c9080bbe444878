"""One planning run's inputs, and the look-ups every step of it shares.

`Inputs` holds the rules, the ignore patterns, both trees' indexes and the
options. Its look-ups are pure functions of those inputs; the few that are
costly (a literal rule's old path, the members of a stack) are memoized.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from treegraft._parse.keys import loose
from treegraft._parse.paths import Part, render_parts
from treegraft._parse.patterns import Pattern
from treegraft._parse.rules import Rule
from treegraft._read.source import Source
from treegraft._tree.index import TreeIndex

Parts = tuple[Part, ...]


class StackGroup(NamedTuple):
    """The source subtrees one stack rule gathers at one new prefix.

    Attributes:
      members: {index: old prefix}, indices 0..N-1 in order (for nested
        stacks, index tuples in row-major order); None when no subtree of the
        source matches; {} when the ones that match cannot be stacked (`why`
        says why).
      why: what is wrong with the indices, or "".
      grid: the size of each stacked level, outer first (`(N,)` for one).
    """

    members: dict[Any, Parts] | None
    why: str = ""
    grid: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class Inputs:
    """The inputs of one planning run: rules, ignore patterns, both trees, options.

    Attributes:
      rules: the compiled rules, in the mapping's order.
      ignore_model: patterns of target leaves that may lack a source leaf.
      ignore_restored: patterns of source leaves that may lack a target leaf.
      tgt: the state, indexed.
      src: the source's metadata tree, indexed.
      cast: the `cast` option.
      lazy: the lazy source the plan reads from, or None for a pytree.
    """

    rules: tuple[Rule, ...]
    ignore_model: tuple[Pattern, ...]
    ignore_restored: tuple[Pattern, ...]
    tgt: TreeIndex
    src: TreeIndex
    cast: bool | str
    lazy: Source | None = None
    # Memos of pure look-ups; the key is the look-up's arguments.
    _literal: dict[tuple[int, int], Parts] = field(default_factory=dict, repr=False)
    _groups: dict[tuple[int, int], dict[tuple[Any, ...], list[tuple[Any, Parts]]]] = field(
        default_factory=dict, repr=False
    )
    _positions: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict, repr=False)
    _stacks: dict[tuple[int, Parts, int], StackGroup] = field(default_factory=dict, repr=False)

    def old_of(
        self, r: int, new_prefix: Parts, caps: tuple[Any, ...] | None = None, ref: int = 0
    ) -> Parts:
        """The old path a rule's new side, matched at new_prefix, points to.

        `caps` are new's captures at new_prefix, when already known; `ref`
        picks one of the rule's source references. For a stacked reference,
        the literal part of its pattern (before the first wildcard).
        """
        rule = self.rules[r]
        assert rule.old is not None
        pattern = rule.refs[ref].pattern if rule.refs else rule.old
        if self.levels(r, ref):
            return pattern.literal_prefix()
        if pattern.is_literal:
            old = self._literal.get((r, ref))
            if old is None:
                old = self._literal[(r, ref)] = pattern.as_path().parts
            return old
        if caps is None:
            caps = rule.new.match(new_prefix) or ()
        return pattern.substitute_parts(rule.old_captures(caps, ref))

    def levels(self, r: int, ref: int = 0) -> int:
        """How many captures a rule's source reference stacks (0 for none)."""
        rule = self.rules[r]
        if rule.refs:
            return rule.refs[ref].levels
        return 1 if rule.gather == "stack" else 0

    def old_prefix(
        self, r: int, new_prefix: Parts, caps: tuple[Any, ...] | None = None, ref: int = 0
    ) -> Parts | None:
        """The old prefix a rule instance reads from, or None if the source lacks it."""
        if self.levels(r, ref):
            members = self.stack(r, new_prefix, ref).members
            return next(iter(members.values())) if members else None
        old = self.old_of(r, new_prefix, caps, ref)
        return old if self.src.node_exists(old) else None

    def stack(self, r: int, new_prefix: Parts, ref: int = 0) -> StackGroup:
        """The source subtrees a stacked reference gathers at new_prefix (memoized)."""
        key = (r, new_prefix, ref)
        found = self._stacks.get(key)
        if found is None:
            found = self._stacks[key] = self._find_stack(r, new_prefix, ref)
        return found

    def bad_stacks(self) -> list[tuple[int, Parts, str]]:
        """(rule, new prefix, why) of every stack looked up that cannot be stacked."""
        return [(r, prefix, s.why) for (r, prefix, _), s in self._stacks.items() if s.why]

    def carried(self, r: int, caps: tuple[Any, ...], ref: int = 0) -> tuple[Any, ...]:
        """A stacked reference's captures less the stacked ones: the new side's captures."""
        stacked = set(self.stacked_positions(r, ref))
        return tuple(c for k, c in enumerate(caps) if k not in stacked)

    def stacked_positions(self, r: int, ref: int = 0) -> tuple[int, ...]:
        """Which captures of a reference's pattern its stacks take, outer first.

        The last `levels` '*' that capture integer indices in the source,
        among those whose removal leaves the new side's wildcards; the last
        ones when no match decides (docs/design.md section 16).
        """
        key = (r, ref)
        found = self._positions.get(key)
        if found is None:
            found = self._positions[key] = self._choose_positions(r, ref)
        return found

    def _choose_positions(self, r: int, ref: int) -> tuple[int, ...]:
        rule = self.rules[r]
        assert rule.old is not None
        pattern = rule.refs[ref].pattern if rule.refs else rule.old
        kinds, wanted = pattern.wildcards(), rule.new.wildcards()
        k = self.levels(r, ref)
        if not stack_choices(kinds, wanted, k):
            return choose_stacked(kinds, wanted, k, ())
        return choose_stacked(kinds, wanted, k, source_prefixes(pattern, self.src).values())

    def _find_stack(self, r: int, new_prefix: Parts, ref: int) -> StackGroup:
        rule = self.rules[r]
        assert rule.old is not None
        pattern = rule.refs[ref].pattern if rule.refs else rule.old
        caps = rule.new.match(new_prefix) or ()
        positions = self.stacked_positions(r, ref)
        groups = self._groups.get((r, ref))
        if groups is None:
            groups = self._groups[(r, ref)] = {}
            for prefix, found in source_prefixes(pattern, self.src).items():
                index = tuple(found[p] for p in positions)
                carried = tuple(c for p, c in enumerate(found) if p not in positions)
                # Loose, as every look-up by path (docs/design.md section 3): a
                # state's '0' finds a source's int key 0.
                groups.setdefault(loose(carried), []).append((index, prefix))
        group = groups.get(loose(tuple(caps)))
        if not group:
            return StackGroup(None)
        if len(positions) == 1:
            return _one_level([(cap[0], prefix) for cap, prefix in group])
        return _levels(group, len(positions))

    def ignored_model(self, parts: Parts, n: int) -> tuple[int, ...]:
        """Which ignore_model_keys patterns cover a target leaf (rule prefix n long)."""
        return _hits(self.ignore_model, parts, n)

    def ignored_restored(self, parts: Parts, n: int) -> tuple[int, ...]:
        """Which ignore_restored_keys patterns cover a source leaf (rule prefix n long)."""
        return _hits(self.ignore_restored, parts, n)


def stack_choices(
    kinds: tuple[str, ...], wanted: tuple[str, ...], k: int
) -> list[tuple[int, ...]]:
    """The sets of k '*' positions a stack could take: those whose removal leaves `wanted`.

    Last ones first (a stack takes the last '*' when nothing else decides).
    """
    stars = [p for p, kind in enumerate(kinds) if kind == "*"]
    return [
        combo
        for combo in itertools.combinations(reversed(stars), k)
        if tuple(kind for p, kind in enumerate(kinds) if p not in combo) == wanted
    ]


def choose_stacked(
    kinds: tuple[str, ...], wanted: tuple[str, ...], k: int, found: Iterable[tuple[Any, ...]]
) -> tuple[int, ...]:
    """The k '*' positions a stack takes, given the captures its pattern found.

    The last ones that capture integer indices among `stack_choices`; the last
    ones when no match decides (docs/design.md section 16). The planner and
    `invert` decide with this one rule.
    """
    stars = [p for p, kind in enumerate(kinds) if kind == "*"]
    fits = stack_choices(kinds, wanted, k)
    if not fits:
        return tuple(stars[-k:])
    found = list(found)
    if found:
        # A '*' that captures an integer anywhere is an index (a stray
        # non-integer among its matches is then reported, not skipped over).
        indexed = [p for p in stars if any(as_index(caps[p]) is not None for caps in found)]
        for combo in fits:
            if all(p in indexed for p in combo):
                return tuple(sorted(combo))
    return tuple(sorted(fits[0]))


def _one_level(group: list[tuple[Any, Parts]]) -> StackGroup:
    """The members of a one-level stack: indices exactly 0..N-1, or why not."""
    indices: dict[int, list[Parts]] = {}
    bad = []
    for cap, prefix in group:
        index = as_index(cap)
        if index is None:
            bad.append(repr(render_parts(prefix)))
        else:
            indices.setdefault(index, []).append(prefix)
    ordered = sorted(indices)
    why = []
    if bad:
        why.append(f"{', '.join(bad[:5])} captured no integer index")
    same = same_index(indices, "the source")
    if same:
        why.append(same)
    if ordered and ordered[-1] + 1 != len(ordered):
        why.append(f"{index_gaps(ordered)}: a stack needs exactly 0..N-1")
    if why:
        return StackGroup({}, "; ".join(why))
    return StackGroup({k: indices[k][0] for k in ordered}, grid=(len(ordered),))


def _levels(group: list[tuple[tuple[Any, ...], Parts]], n: int) -> StackGroup:
    """The members of nested stacks: every index tuple of a full 0..N-1 grid, or why not."""
    found: dict[tuple[int, ...], list[Parts]] = {}
    bad = []
    for caps, prefix in group:
        index = tuple(as_index(c) for c in caps)
        if any(i is None for i in index):
            bad.append(repr(render_parts(prefix)))
        else:
            found.setdefault(index, []).append(prefix)  # type: ignore[arg-type]
    why = []
    if bad:
        why.append(f"{', '.join(bad[:5])} captured no integer index")
    clashes = [
        f"{' and '.join(repr(render_parts(p)) for p in paths[:3])} are all index {k}"
        for k, paths in sorted(found.items())
        if len(paths) > 1
    ]
    if clashes:
        why.append(f"in the source, {'; '.join(clashes[:5])}: keep one key per index")
    grid = tuple(max(index[level] for index in found) + 1 for level in range(n)) if found else ()
    if found and len(found) != _product(grid):
        size = " x ".join(map(str, grid))
        if _product(grid) <= 100_000:  # listed; a grid of 10**12 is only counted
            everything = itertools.product(*(range(n) for n in grid))
            missing = [index for index in everything if index not in found]
            gaps = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            shown = f"missing {gaps} ({len(missing)} in all)"
        else:
            shown = f"found {len(found)} of {_product(grid)}"
        why.append(f"nested stacks need every index 0..N-1 at each level ({size}); {shown}")
    if why:
        return StackGroup({}, "; ".join(why))
    return StackGroup({k: found[k][0] for k in sorted(found)}, grid=grid)


def _product(sizes: tuple[int, ...]) -> int:
    out = 1
    for size in sizes:
        out *= size
    return out


def as_index(capture: Any) -> int | None:
    """A capture as a layer index: an int, or a string of ASCII digits."""
    if type(capture) is int:
        return capture if capture >= 0 else None
    if isinstance(capture, str) and capture.isascii() and capture.isdigit():
        try:
            return int(capture)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            return None
    return None


_SHOWN = 10  # at most this many indices or ranges of indices in a message


def same_index(found: dict[int, list[Parts]], where: str = "the source") -> str:
    """Says which paths count as one index ('l_1' and 'l_01'), or "" if none do.

    `where` names the tree the paths are in, for the remedy.
    """
    clashes = [(k, paths) for k, paths in sorted(found.items()) if len(paths) > 1]
    if not clashes:
        return ""
    shown = []
    for k, paths in clashes[:_SHOWN]:
        names = [repr(render_parts(p)) for p in paths[:5]] + (["..."] if len(paths) > 5 else [])
        both = "both" if len(paths) == 2 else "all"
        shown.append(f"{', '.join(names[:-1])} and {names[-1]} are {both} index {k}")
    more = f" (and {len(clashes) - _SHOWN} more indices)" if len(clashes) > _SHOWN else ""
    return (
        f"in {where}, {'; '.join(shown)}{more}: leading zeros do not make another index, "
        f"so one of them would be dropped or taken twice; keep one key per index in {where}"
    )


def index_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct indices as (first, last) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for k in indices:
        if runs and runs[-1][1] + 1 == k:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def render_runs(runs: list[tuple[int, int]]) -> str:
    """'0, 1, 2, 5' or '0..41, 1000000000000': short runs listed, long ones as ranges."""
    items: list[str] = []
    for first, last in runs:
        if last - first < 3:
            items.extend(map(str, range(first, last + 1)))
        else:
            items.append(f"{first}..{last}")
        if len(items) > _SHOWN:
            break
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


def index_gaps(indices: list[int]) -> str:
    """Which indices are found and which are missing below the largest, as ranges.

    Computed from the runs of the sorted distinct indices, never by counting
    up to the largest: an index read from a file may be 10**12 (constant
    memory in the gap's size).
    """
    runs = index_runs(indices)
    gaps = [(0, runs[0][0] - 1)] if runs and runs[0][0] > 0 else []
    gaps += [(a[1] + 1, b[0] - 1) for a, b in zip(runs, runs[1:], strict=False)]
    count = indices[-1] + 1 - len(indices)
    missing = render_runs(gaps)
    if ".." in missing:  # some indices not listed one by one: say how many
        missing += f" ({count} indices)"
    return f"indices found {render_runs(runs)}, missing {missing}"


def source_prefixes(
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


def _hits(patterns: tuple[Pattern, ...], parts: Parts, n: int) -> tuple[int, ...]:
    """Indices of the patterns matching a prefix of parts, relative (after n) or absolute."""
    if not patterns:
        return ()
    rel = parts[n:]
    return tuple(
        k
        for k, pat in enumerate(patterns)
        if pat.match_prefix(rel) is not None or pat.match_prefix(parts) is not None
    )
