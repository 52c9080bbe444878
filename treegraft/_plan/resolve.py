"""Rule resolution: which rule covers each target leaf, and which source leaves feed it.

docs/design.md section 4: the longest matched new prefix wins, then the rule with
more literal segments; still equal is a tie. `resolve` pairs each winner's
leaf with its source leaf (for a stack, its source leaves; for an unstack,
one index of one leaf), completes the rule instances from both sides
(`instances`), and records what found no partner. It judges nothing: the
checks (`checks`, `coverage`) turn its `Resolution` into problems.
"""

from __future__ import annotations

import itertools
import operator
import typing
from collections.abc import Sequence
from typing import Any, NamedTuple

from treegraft._parse.paths import Part
from treegraft._plan.context import Inputs, as_index, same_index
from treegraft._plan.instances import (
    outranked_instances,
    source_instances,
    strays,
    unmatched_instances,
)
from treegraft._plan.record import Pair
from treegraft._plan.resolution import Resolution, Unpaired
from treegraft._tree.index import TreeIndex

Parts = tuple[Part, ...]


class Assignment(NamedTuple):
    """Per target leaf, the most specific rule covering it (`_assign_rules`).

    Attributes:
      winner: per target leaf, the winning rule's index, or -1.
      prefix_len: per target leaf, the length of the winner's matched new prefix.
      hits: per rule, how many target leaves it matched (won or not).
      captures: per target leaf, the winner's captures.
      ties: (rule, rule, target leaf) for rules tied on a leaf, once per pair of rules.
      outranked: (rule, target leaf, prefix length) where a more specific rule won.
    """

    winner: list[int]
    prefix_len: list[int]
    hits: list[int]
    captures: list[tuple[Any, ...]]
    ties: list[tuple[int, int, int]]
    outranked: list[tuple[int, int, int]]


class Pairing(NamedTuple):
    """Each covered target leaf paired with its source leaves, or why not (`_pair_leaves`).

    Attributes:
      instances: (rule, new prefix) -> old prefix, or None when it is not in the source.
      pairs: the pairs made.
      unpaired: the covered target leaves that found no source leaf.
      bad_unstacks: (rule, new prefix, capture) where an unstack's index capture is
        not an integer.
      stack_instances: (rule, new prefix, old prefix) of each stacked source subtree.
      index_clashes: (unstack rule, new prefix, why) where two new prefixes spell
        one index differently.
    """

    instances: dict[tuple[int, Parts], Parts | None]
    pairs: list[Pair]
    unpaired: list[Unpaired]
    bad_unstacks: list[tuple[int, Parts, Any]]
    stack_instances: list[tuple[int, Parts, Parts]]
    index_clashes: list[tuple[int, Parts, str]]


def resolve(inputs: Inputs) -> Resolution:
    """Resolves the rules against both trees: winners, pairs, instances, strays.

    Reads only paths (and, for unexpected-leaf checks, which source nodes
    exist): no shape or dtype, so nothing of a lazy source's metadata.
    """
    assigned = _assign_rules(inputs)
    winner, prefix_len, hits, captures, ties, outranked = assigned
    paired = _pair_leaves(inputs, winner, prefix_len, captures)
    instances, pairs, unpaired, bad_unstacks, stack_instances, index_clashes = paired
    outranked_unfound = outranked_instances(inputs, winner, outranked, instances)
    unmatched = unmatched_instances(inputs, hits, instances)
    source_instances(inputs, instances, stack_instances)
    found_strays = strays(inputs, instances, stack_instances, pairs, unpaired)
    return Resolution(
        inputs=inputs,
        winner=tuple(winner),
        prefix_len=tuple(prefix_len),
        hits=tuple(hits),
        ties=tuple(ties),
        pairs=tuple(pairs),
        unpaired=tuple(unpaired),
        bad_unstacks=tuple(bad_unstacks),
        bad_stacks=tuple(inputs.bad_stacks()) + tuple(index_clashes),
        instances=instances,
        stack_instances=tuple(stack_instances),
        outranked_unfound=outranked_unfound,
        unmatched=tuple(unmatched),
        strays=tuple(found_strays),
    )


def _assign_rules(inputs: Inputs) -> Assignment:
    """Per target leaf, the most specific rule covering it, and its captures."""
    tgt, rules = inputs.tgt, inputs.rules
    n = len(tgt)
    winner = [-1] * n
    prefix_len = [0] * n
    rank: list[tuple[int, int]] = [(-1, -1)] * n
    hits = [0] * len(rules)
    # (rule, target leaf, prefix length) where a rule matched but a more
    # specific one took the leaf: usually few, only with overlapping rules.
    outranked: list[tuple[int, int, int]] = []
    # Per leaf, the rules tied with its current winner; a more specific rule
    # found later clears them, so the result does not depend on rule order.
    tied: dict[int, list[int]] = {}
    paths = tgt.paths
    everything = range(n)
    # The winning rule's captures, so that pairing need not match again.
    captures: list[tuple[Any, ...]] = [()] * n
    for r, rule in enumerate(rules):
        match = rule.new.prefix_matcher()
        literals = rule.new.literal_count
        # Only the leaves under a rule's literal prefix can match it: with
        # one rule per subtree, planning stays linear in rules + leaves.
        head = rule.new.literal_prefix()
        members = tgt.under(head) if head else everything
        run = fresh_run(inputs, r, members, winner)
        if run is not None:
            # Every leaf of the run matches, at the same length, and none has
            # a rule yet: the loop below would give each what this gives all.
            a, b = run
            hits[r] += b - a
            winner[a:b] = [r] * (b - a)
            prefix_len[a:b] = [len(head)] * (b - a)
            rank[a:b] = [(len(head), literals)] * (b - a)
            continue
        for i in members:
            m = match(paths[i])
            if m is None:
                continue
            hits[r] += 1
            key = (m[0], literals)
            if key > rank[i]:
                if winner[i] >= 0:
                    outranked.append((winner[i], i, prefix_len[i]))
                rank[i], winner[i], prefix_len[i] = key, r, m[0]
                captures[i] = m[1]
                tied.pop(i, None)
            elif key == rank[i]:
                tied.setdefault(i, []).append(r)
            else:
                outranked.append((r, i, m[0]))
    first: dict[tuple[int, int], int] = {}
    for i, others in tied.items():
        for b in others:
            first.setdefault((winner[i], b), i)
    ties = [(a, b, i) for (a, b), i in first.items()]
    return Assignment(winner, prefix_len, hits, captures, ties, outranked)


def fresh_run(inputs: Inputs, r: int, members: Any, winner: list[int]) -> tuple[int, int] | None:
    """The leaves a literal rule matches, as one run (start, stop) no rule has taken; else None.

    A literal rule's new path matches every leaf `under` it at its own
    length with no captures when the state's paths hold str parts only (then
    `under` gives exactly the leaves the rule's matcher takes, int parts of
    the rule finding their digits either way); leaves under one node are
    neighbours in leaf order.
    """
    rule = inputs.rules[r]
    if not members or not rule.new.is_literal or not inputs.tgt.str_only():
        return None
    a, b = members[0], members[-1] + 1
    if b - a != len(members) or winner[a:b].count(-1) != b - a:
        return None
    return a, b


def _runs(winner: list[int], prefix_len: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each run of neighbouring leaves with one rule at one prefix length."""
    n = len(winner)
    if not n:
        return []
    # Where either list changes, compared as ints (no pair made per leaf).
    changes = map(
        operator.or_,
        map(operator.ne, itertools.islice(winner, 1, None), winner),
        map(operator.ne, itertools.islice(prefix_len, 1, None), prefix_len),
    )
    starts = [0, *itertools.compress(range(1, n), changes)]
    return list(zip(starts, [*starts[1:], n], strict=True))


def _copy_run(
    inputs: Inputs,
    a: int,
    b: int,
    r: int,
    n: int,
    caps: tuple[Any, ...],
    instances: dict[tuple[int, Parts], Parts | None],
) -> list[Pair] | None:
    """The pairs of target leaves a..b-1, all copied by literal rule r; None when one is unpaired.

    The per-leaf loop of `_pair_leaves` would make the same pairs one by
    one; here the source look-ups are one batch (`TreeIndex.find_all`).
    """
    paths = inputs.tgt.paths
    new_prefix = paths[a][:n]
    key = (r, new_prefix)
    if key in instances:
        old_prefix = instances[key]
    else:
        old_prefix = instances[key] = inputs.old_prefix(r, new_prefix, caps)
    if old_prefix is None:
        return None
    run = paths[a:b]
    sources: Sequence[int] | None = _same_suffixes(inputs.src, old_prefix, run, n)
    if sources is None:
        wanted = run if old_prefix == new_prefix else [old_prefix + p[n:] for p in run]
        found = inputs.src.find_all(wanted)
        if None in found:
            return None
        sources = typing.cast(list[int], found)
    # Pair(i, si, r) for each leaf, made as tuples with no Python call per leaf.
    fields = zip(range(a, b), sources, itertools.repeat(r), *_PAIR_DEFAULTS)
    return list(map(tuple.__new__, itertools.repeat(Pair), fields))


def _same_suffixes(src: TreeIndex, old_prefix: Parts, run: list[Parts], n: int) -> range | None:
    """The source leaves of a run when they are the leaves under old_prefix, in order; else None.

    Both trees' paths are str parts in sorted order: the source leaves under
    old_prefix are one range, and when their suffixes are the run's suffixes
    (compared whole, with no look-up per leaf), leaf k of the run reads leaf
    k of the range, as `find_all` would find it. Otherwise `find_all` decides.
    """
    if not src.sorted_str():
        return None
    under = src.under(old_prefix)
    if len(under) != len(run) or not under:
        return None
    first, stop = under[0], under[0] + len(run)
    mine = src.paths[first:stop]
    if old_prefix == run[0][:n]:
        same = mine == run  # equal prefixes: the whole paths compare as the suffixes do
    else:
        same = _suffixes(mine, len(old_prefix)) == _suffixes(run, n)
    return range(first, stop) if same else None


def _suffixes(paths: list[Parts], k: int) -> list[Parts]:
    return list(map(operator.itemgetter(slice(k, None)), paths))


# The fields of a Pair after (target, source, rule), at their defaults, for `_copy_run`.
_PAIR_DEFAULTS = tuple(map(itertools.repeat, Pair._field_defaults.values()))


def _pair_leaves(
    inputs: Inputs, winner: list[int], prefix_len: list[int], captures: list[tuple[Any, ...]]
) -> Pairing:
    """Pairs each covered target leaf with its source leaves, or records why not.

    Also returns (unstack rule, new prefix, why) where two new prefixes of one
    unstack rule spell one index differently.
    """
    tgt, src, rules = inputs.tgt, inputs.src, inputs.rules
    # (rule, new prefix) -> old prefix, or None when it is not in the source.
    instances: dict[tuple[int, Parts], Parts | None] = {}
    # (rule, new prefix) -> every old prefix a stack or join instance reads.
    gathered: dict[tuple[int, Parts], list[Parts]] = {}
    # (rule, new prefix) -> the index an unstack rule takes.
    taken: dict[tuple[int, Parts], int | None] = {}
    # (unstack rule, its other captures) -> {index: the new prefixes taking it}:
    # 'layers_1' and 'layers_01' are both index 1.
    spelt: dict[tuple[int, tuple[Any, ...]], dict[int, list[Parts]]] = {}
    pairs: list[Pair] = []
    unpaired: list[Unpaired] = []
    bad_unstacks: list[tuple[int, Parts, Any]] = []
    index_clashes: list[tuple[int, Parts, str]] = []
    literal_copies = inputs.tgt.str_only()
    for a, b in _runs(winner, prefix_len):
        r = winner[a]
        if r < 0:
            continue
        rule = rules[r]
        if rule.old is None:
            continue  # a keep rule: the leaf keeps its value
        if literal_copies and rule.gather == "copy" and rule.new.is_literal:
            batch = _copy_run(inputs, a, b, r, prefix_len[a], captures[a], instances)
            if batch is not None:
                pairs.extend(batch)
                continue
        for i in range(a, b):
            parts = tgt.paths[i]
            n = prefix_len[i]
            new_prefix = parts[:n]
            key = (r, new_prefix)
            if rule.gather in ("stack", "join"):
                made = _gather(inputs, i, r, n, captures[i], gathered)
                if isinstance(made, Unpaired):
                    unpaired.append(made)
                elif made is not None:
                    pairs.append(made)
                elif rule.refs and any(ref.unstack for ref in rule.refs):
                    caps = captures[i]
                    if key not in instances and (not caps or as_index(caps[-1]) is None):
                        bad_unstacks.append((r, new_prefix, caps[-1] if caps else None))
                instances.setdefault(key, None)
                continue
            if key in instances:
                old_prefix = instances[key]
            else:
                old_prefix = instances[key] = inputs.old_prefix(r, new_prefix, captures[i])
                if rule.gather == "unstack":
                    caps = rule.new.match(new_prefix) or ()
                    index = as_index(caps[-1]) if caps else None
                    taken[key] = index
                    if index is None:
                        bad_unstacks.append((r, new_prefix, caps[-1] if caps else None))
                    else:
                        spelt.setdefault((r, tuple(caps[:-1])), {}).setdefault(index, []).append(
                            new_prefix
                        )
            if old_prefix is None:
                unpaired.append(Unpaired(i, r, n, None, "prefix", inputs.ignored_model(parts, n)))
                continue
            si = src.find(parts if old_prefix == new_prefix else old_prefix + parts[n:])
            if si is None:
                unpaired.append(_unpaired_leaf(inputs, i, r, n, old_prefix))
                continue
            if rule.gather == "unstack":
                index = taken[key]
                if index is None:
                    continue  # a bad unstack, recorded once per instance
                pairs.append(Pair(i, si, r, (), index))
            else:
                pairs.append(Pair(i, si, r))
    stack_instances = []
    for key, olds in gathered.items():
        for op in olds:
            stack_instances.append((key[0], key[1], op))
        if olds:
            instances[key] = olds[0]
    for (r, _), by_index in spelt.items():
        why = same_index(by_index, "the state")
        if why:
            clash = next(paths for _, paths in sorted(by_index.items()) if len(paths) > 1)
            index_clashes.append((r, clash[0], why))
    return Pairing(instances, pairs, unpaired, bad_unstacks, stack_instances, index_clashes)


def _gather(
    inputs: Inputs,
    i: int,
    r: int,
    n: int,
    caps: tuple[Any, ...],
    gathered: dict[tuple[int, Parts], list[Parts]],
) -> Pair | Unpaired | None:
    """Target leaf i's source leaves under a stack or several references, or why not.

    None when a stack cannot be stacked or an unstack's index is no integer:
    problems recorded once per instance elsewhere (`Inputs.bad_stacks`,
    `bad_unstacks`). Records in `gathered` every old prefix the instance reads.
    """
    src, rule = inputs.src, inputs.rules[r]
    parts = inputs.tgt.paths[i]
    new_prefix = parts[:n]
    suffix = parts[n:]
    olds = gathered.setdefault((r, new_prefix), [])
    record = not olds
    refs = rule.refs or (None,)
    sources: list[int] = []
    grids: list[tuple[int, ...]] = []
    layer = None
    for j, ref in enumerate(refs):
        if ref is not None and ref.unstack:
            layer = as_index(caps[-1]) if caps else None
            if layer is None:
                return None
        if inputs.levels(r, j):
            group = inputs.stack(r, new_prefix, j)
            if not group.members:
                if group.members is None:
                    return Unpaired(i, r, n, None, "prefix", inputs.ignored_model(parts, n))
                return None
            members = list(group.members.values())
            if record:
                olds.extend(members)
            found = [src.find(op + suffix) for op in members]
            missing = next((op for op, si in zip(members, found, strict=True) if si is None), None)
            if missing is not None:
                return _unpaired_leaf(inputs, i, r, n, missing)
            sources.extend(found)  # type: ignore[arg-type]
            grids.append(group.grid)
            continue
        old = inputs.old_of(r, new_prefix, caps, j)
        if record:
            olds.append(old)
        si = src.find(old + suffix)
        if si is None:
            if j == 0 and not src.node_exists(old):
                return Unpaired(i, r, n, None, "prefix", inputs.ignored_model(parts, n))
            return _unpaired_leaf(inputs, i, r, n, old)
        sources.append(si)
        grids.append(())
    keep_grids = tuple(grids) if rule.gather == "join" or any(len(g) > 1 for g in grids) else ()
    return Pair(i, sources[0], r, tuple(sources), layer, keep_grids)


def _unpaired_leaf(inputs: Inputs, i: int, r: int, n: int, old_prefix: Parts) -> Unpaired:
    """Why the source has no leaf at `old_prefix + suffix` for target leaf i."""
    src = inputs.src
    parts = inputs.tgt.paths[i]
    sparts = old_prefix + parts[n:]
    if src.under(sparts):
        return Unpaired(i, r, n, old_prefix, "subtree")
    ignored = inputs.ignored_model(parts, n)
    for j in range(len(old_prefix), len(sparts)):
        at = src.find(sparts[:j])
        if at is not None:
            return Unpaired(i, r, n, old_prefix, "leaf_above", ignored, j, at)
    return Unpaired(i, r, n, old_prefix, "absent", ignored)
