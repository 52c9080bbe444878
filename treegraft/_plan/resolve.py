"""Rule resolution: which rule covers each target leaf, and which source leaves feed it.

DESIGN section 4: the longest matched new prefix wins, then the rule with
more literal segments; still equal is a tie. `resolve` pairs each winner's
leaf with its source leaf (for a stack, its source leaves; for an unstack,
one index of one leaf), finds every rule instance (the new prefix a rule
matched and the old prefix it points to), and records what found no partner
on either side. It judges nothing: the checks (`leaves`, `coverage`) turn its
`Resolution` into problems.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from treegraft._errors import GraftError
from treegraft._parse.paths import Part
from treegraft._plan.context import Inputs, as_index, source_prefixes
from treegraft._plan.result import Pair

Parts = tuple[Part, ...]
# A target node an unmatched rule names: its path, its old path, whether the source has it.
Node = tuple[Parts, Parts | None, bool]


class Unpaired(NamedTuple):
    """A target leaf a rule covers that found no source leaf, and why.

    Attributes:
      target: the leaf's index in the state.
      rule: the covering rule's index.
      n: the length of the rule's matched new prefix.
      old_prefix: the old prefix the rule points to, or None when the source
        has no such node (`why` is then "prefix").
      why: "prefix" (the rule's source is absent), "subtree" (the source has a
        subtree where the target is a leaf), "leaf_above" (the source has a
        leaf at `old_prefix + suffix[:above]`, where the target has a
        subtree), "absent" (the source stops before the leaf).
      ignored: the ignore_model_keys patterns covering the leaf (consulted
        unless `why` is "subtree": a structure error is never ignored).
      above: for "leaf_above", how many parts of the source path lead to the leaf.
    """

    target: int
    rule: int
    n: int
    old_prefix: Parts | None
    why: str
    ignored: tuple[int, ...] = ()
    above: int = 0


class Stray(NamedTuple):
    """A source leaf under a rule's old prefix that no target leaf mirrors.

    Attributes:
      source: the leaf's index in the source.
      rule: the rule's index.
      new_prefix: the rule instance's new prefix.
      k: the length of its old prefix.
      ignored: the ignore_restored_keys patterns covering the leaf.
    """

    source: int
    rule: int
    new_prefix: Parts
    k: int
    ignored: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Resolution:
    """What resolving a mapping found, before any judgement.

    Attributes:
      inputs: the run's inputs.
      winner: per target leaf, the index of the rule that covers it, or -1.
      prefix_len: per target leaf, the length of its winner's matched prefix.
      hits: per rule, how many target leaves it matched (won or not).
      ties: (rule a, rule b, target leaf) per pair of tied rules, once.
      pairs: every target leaf paired with its source leaves, in target order.
      unpaired: covered target leaves without a source leaf, in target order.
      bad_unstacks: (rule, new prefix, capture) where an unstack rule's last
        capture is no index.
      bad_stacks: (rule, new prefix, why) where found subtrees cannot be stacked.
      instances: {(rule, new prefix): old prefix or None}: every rule instance
        found from either side.
      stack_instances: (rule, new prefix, old prefix) per stacked subtree.
      outranked_unfound: {rule: new prefix} of rules that win no leaf and
        whose instances all lack a source.
      unmatched: per rule matching no target leaf, the target nodes its new
        side names, each with its old path and whether the source has it.
      strays: source leaves under an instance that no target leaf mirrors.
    """

    inputs: Inputs
    winner: tuple[int, ...]
    prefix_len: tuple[int, ...]
    hits: tuple[int, ...]
    ties: tuple[tuple[int, int, int], ...]
    pairs: tuple[Pair, ...]
    unpaired: tuple[Unpaired, ...]
    bad_unstacks: tuple[tuple[int, Parts, Any], ...]
    bad_stacks: tuple[tuple[int, Parts, str], ...]
    instances: Mapping[tuple[int, Parts], Parts | None]
    stack_instances: tuple[tuple[int, Parts, Parts], ...]
    outranked_unfound: Mapping[int, Parts]
    unmatched: tuple[tuple[int, tuple[Node, ...]], ...]
    strays: tuple[Stray, ...]

    def source_leaves(self) -> list[Any]:
        """Every paired source leaf (metadata), in pair order, for one prefetch."""
        leaves = self.inputs.src.leaves
        return [leaves[si] for pair in self.pairs for si in (pair.sources or (pair.source,))]


def resolve(inputs: Inputs) -> Resolution:
    """Resolves the rules against both trees: winners, pairs, instances, strays.

    Reads only paths (and, for unexpected-leaf checks, which source nodes
    exist): no shape or dtype, so nothing of a lazy source's metadata.
    """
    winner, prefix_len, hits, captures, ties, outranked = _assign_rules(inputs)
    instances, pairs, unpaired, bad_unstacks, stack_instances = _pair_leaves(
        inputs, winner, prefix_len, captures
    )
    outranked_unfound = _outranked_instances(inputs, winner, outranked, instances)
    unmatched = _unmatched_instances(inputs, hits, instances)
    _source_instances(inputs, instances, stack_instances)
    strays = _strays(inputs, instances, stack_instances, pairs, unpaired)
    return Resolution(
        inputs=inputs,
        winner=tuple(winner),
        prefix_len=tuple(prefix_len),
        hits=tuple(hits),
        ties=tuple(ties),
        pairs=tuple(pairs),
        unpaired=tuple(unpaired),
        bad_unstacks=tuple(bad_unstacks),
        bad_stacks=tuple(inputs.bad_stacks()),
        instances=instances,
        stack_instances=tuple(stack_instances),
        outranked_unfound=outranked_unfound,
        unmatched=tuple(unmatched),
        strays=tuple(strays),
    )


def _assign_rules(
    inputs: Inputs,
) -> tuple[
    list[int], list[int], list[int], list[tuple[Any, ...]], list[tuple[int, int, int]],
    list[tuple[int, int, int]],
]:
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
        for i in tgt.under(head) if head else everything:
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
    return winner, prefix_len, hits, captures, ties, outranked


def _pair_leaves(
    inputs: Inputs, winner: list[int], prefix_len: list[int], captures: list[tuple[Any, ...]]
) -> tuple[
    dict[tuple[int, Parts], Parts | None], list[Pair], list[Unpaired],
    list[tuple[int, Parts, Any]], list[tuple[int, Parts, Parts]],
]:
    """Pairs each covered target leaf with its source leaves, or records why not."""
    tgt, src, rules = inputs.tgt, inputs.src, inputs.rules
    # (rule, new prefix) -> old prefix, or None when it is not in the source.
    instances: dict[tuple[int, Parts], Parts | None] = {}
    stacks: dict[tuple[int, Parts], dict[int, Parts] | None] = {}
    # (rule, new prefix) -> the index an unstack rule takes.
    taken: dict[tuple[int, Parts], int | None] = {}
    pairs: list[Pair] = []
    unpaired: list[Unpaired] = []
    bad_unstacks: list[tuple[int, Parts, Any]] = []
    for i, r in enumerate(winner):
        if r < 0:
            continue
        rule = rules[r]
        if rule.old is None:
            continue  # a keep rule: the leaf keeps its value
        parts = tgt.paths[i]
        n = prefix_len[i]
        new_prefix = parts[:n]
        key = (r, new_prefix)
        if rule.gather == "stack":
            if key not in stacks:
                stacks[key] = inputs.stack(r, new_prefix).members
            group = stacks[key]
            if not group:
                instances.setdefault(key, None)
                if group is None:  # {} is a bad stack, a structure problem of its own
                    unpaired.append(
                        Unpaired(i, r, n, None, "prefix", inputs.ignored_model(parts, n))
                    )
                continue
            found = [src.find(op + parts[n:]) for op in group.values()]
            if any(si is None for si in found):
                op = next(op for op, si in zip(group.values(), found, strict=True) if si is None)
                unpaired.append(_unpaired_leaf(inputs, i, r, n, op))
                continue
            pairs.append(Pair(i, found[0], r, tuple(found)))  # type: ignore[arg-type]
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
    for key, group in stacks.items():
        for op in (group or {}).values():
            stack_instances.append((key[0], key[1], op))
        if group:
            instances[key] = next(iter(group.values()))
    return instances, pairs, unpaired, bad_unstacks, stack_instances


def _unpaired_leaf(inputs: Inputs, i: int, r: int, n: int, old_prefix: Parts) -> Unpaired:
    """Why the source has no leaf at `old_prefix + suffix` for target leaf i."""
    src = inputs.src
    parts = inputs.tgt.paths[i]
    sparts = old_prefix + parts[n:]
    if src.under(sparts):
        return Unpaired(i, r, n, old_prefix, "subtree")
    ignored = inputs.ignored_model(parts, n)
    for j in range(len(old_prefix), len(sparts)):
        if src.find(sparts[:j]) is not None:
            return Unpaired(i, r, n, old_prefix, "leaf_above", ignored, j)
    return Unpaired(i, r, n, old_prefix, "absent", ignored)


def _outranked_instances(
    inputs: Inputs,
    winner: list[int],
    outranked: list[tuple[int, int, int]],
    instances: dict[tuple[int, Parts], Parts | None],
) -> dict[int, Parts]:
    """Adds the instances of rules outranked on a leaf; returns those that name nothing.

    Their source subtree still counts for the unexpected check; and a rule
    that wins no leaf at all must still name something in the source, or a
    typo in it would pass silently.
    """
    if not outranked:
        return {}
    won = {r for r, _ in instances}
    missing: dict[int, Parts] = {}
    for r, i, n in outranked:
        new_prefix = inputs.tgt.paths[i][:n]
        if (r, new_prefix) in instances or inputs.rules[r].old is None:
            continue
        old_prefix = inputs.old_prefix(r, new_prefix)
        instances[(r, new_prefix)] = old_prefix
        if old_prefix is None and r not in won:
            missing.setdefault(r, new_prefix)
    found = {r for (r, _), old in instances.items() if old is not None}
    return {r: prefix for r, prefix in missing.items() if r not in found}


def _unmatched_instances(
    inputs: Inputs, hits: list[int], instances: dict[tuple[int, Parts], Parts | None]
) -> list[tuple[int, tuple[Node, ...]]]:
    """Per rule matching no target leaf: the nodes it names, and their instances.

    Such a rule grafts nothing, but the source leaves under its old side
    still have no target: its instances are added for the unexpected check.
    """
    out: list[tuple[int, tuple[Node, ...]]] = []
    for r, rule in enumerate(inputs.rules):
        if hits[r]:
            continue
        nodes: list[Node] = []
        for parts in matching_nodes(rule.new, inputs.tgt):
            if rule.old is None or rule.gather == "stack":
                # A keep rule needs no source; a stack finds its members.
                nodes.append((parts, None, True))
                continue
            old = inputs.old_of(r, parts)
            exists = inputs.src.node_exists(old)
            if exists:
                instances.setdefault((r, parts), old)
            nodes.append((parts, old, exists))
        out.append((r, tuple(nodes)))
    return out


def _source_instances(
    inputs: Inputs,
    instances: dict[tuple[int, Parts], Parts | None],
    stack_instances: list[tuple[int, Parts, Parts]],
) -> None:
    """Adds the instances of glob rules that only the source has.

    A glob rule's instances come from the target leaves it covers. Where
    the source has one more (`enc.layers_5` for `dec.layers_* <- enc.layers_*`
    and a state without `dec.layers_5`), its leaves mirror no target leaf.
    """
    by_rule: dict[int, set[Parts]] = {}
    for (k, _), known_old in instances.items():
        if known_old is not None:
            by_rule.setdefault(k, set()).add(known_old)
    for r, rule in enumerate(inputs.rules):
        if rule.old is None or rule.old.is_literal or rule.gather == "unstack":
            # A keep rule reads nothing; an unstack takes the layers it is
            # asked for; a literal rule's one instance is known when it matched.
            continue
        known = by_rule.get(r, set())
        for old_prefix, caps in source_prefixes(rule.old, inputs.src, known).items():
            try:
                new_prefix = rule.new.substitute_parts(
                    caps[:-1] if rule.gather == "stack" else caps
                )
            except GraftError:  # a capture the new side cannot take
                continue
            if rule.gather == "stack":
                if (r, new_prefix) not in instances:
                    stack_instances.append((r, new_prefix, old_prefix))
            else:
                instances.setdefault((r, new_prefix), old_prefix)


def _strays(
    inputs: Inputs,
    instances: dict[tuple[int, Parts], Parts | None],
    stack_instances: list[tuple[int, Parts, Parts]],
    pairs: list[Pair],
    unpaired: list[Unpaired],
) -> list[Stray]:
    """Source leaves under a rule's old prefix that mirror no target leaf."""
    from treegraft._tree.index import loose

    src, tgt = inputs.src, inputs.tgt
    paired: set[int] = set()
    for pair in pairs:
        paired.update(pair.sources or (pair.source,))
    # A source subtree already named by a structure problem is not listed
    # again, leaf by leaf. Compared loosely: those paths are built from the
    # state's int keys, where a checkpoint holds their strings.
    accounted = set()
    for u in unpaired:
        if u.why == "subtree" or (u.why == "leaf_above" and not u.ignored):
            assert u.old_prefix is not None
            sparts = u.old_prefix + tgt.paths[u.target][u.n :]
            accounted.add(loose(sparts if u.why == "subtree" else sparts[: u.above]))
    every = [(r, new, old) for (r, new), old in instances.items()] + stack_instances
    out = []
    for r, new_prefix, old_prefix in dict.fromkeys(every):
        if old_prefix is None or inputs.rules[r].old is None:
            continue
        k = len(old_prefix)
        for si in src.under(old_prefix):
            if si in paired:
                continue
            sparts = src.paths[si]
            if tgt.find(new_prefix + sparts[k:]) is not None:
                continue  # taken by a more specific rule, or reported already
            if accounted and any(
                loose(sparts[:j]) in accounted for j in range(1, len(sparts) + 1)
            ):
                continue
            out.append(Stray(si, r, new_prefix, k, inputs.ignored_restored(sparts, k)))
    return out


def matching_nodes(pattern: Any, index: Any) -> list[Parts]:
    """The nodes (leaves or subtrees) of an index that a pattern matches whole."""
    if pattern.is_literal:
        parts = pattern.as_path().parts
        return [parts] if index.node_exists(parts) else []
    return [p for p in index.node_paths() if pattern.match(p) is not None]
