"""Rule instances from both sides, and the source leaves no target leaf mirrors.

An instance is a rule matched at one new prefix, with the old prefix it
points to. Pairing finds those of the target leaves each rule wins; these
functions add the rest (rules outranked on a leaf, rules matching no target
leaf, glob instances only the source has) and list the source leaves under
any instance that no target leaf mirrors, for the unexpected check.
"""

from __future__ import annotations

import itertools
from typing import Any

from treegraft._errors import GraftError
from treegraft._parse.keys import loose
from treegraft._parse.paths import Part
from treegraft._plan.context import Inputs, source_prefixes
from treegraft._plan.record import Pair, source_indices
from treegraft._plan.resolution import Node, Stray, Unpaired

Parts = tuple[Part, ...]


def outranked_instances(
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


def unmatched_instances(
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
            if rule.old is None or rule.gather in ("stack", "join"):
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


def source_instances(
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
    for k, _, known_old in stack_instances:
        by_rule.setdefault(k, set()).add(known_old)
    for r, rule in enumerate(inputs.rules):
        if rule.old is None:
            continue  # a keep rule reads nothing
        known = by_rule.get(r, set())
        for j, ref in enumerate(rule.refs or (None,)):
            pattern = rule.old if ref is None else ref.pattern
            if pattern.is_literal or (ref.unstack if ref else rule.gather == "unstack"):
                # An unstack takes the layers it is asked for; a literal
                # reference's one instance is known when it matched.
                continue
            stacked = inputs.levels(r, j) > 0
            for old_prefix, caps in source_prefixes(pattern, inputs.src, known).items():
                try:
                    new_prefix = rule.new.substitute_parts(
                        inputs.carried(r, caps, j) if stacked else caps
                    )
                except GraftError:  # a capture the new side cannot take
                    continue
                if stacked or rule.gather == "join":
                    if (r, new_prefix) not in instances:
                        stack_instances.append((r, new_prefix, old_prefix))
                else:
                    instances.setdefault((r, new_prefix), old_prefix)


def strays(
    inputs: Inputs,
    instances: dict[tuple[int, Parts], Parts | None],
    stack_instances: list[tuple[int, Parts, Parts]],
    pairs: list[Pair],
    unpaired: list[Unpaired],
) -> list[Stray]:
    """Source leaves under a rule's old prefix that mirror no target leaf."""
    src, tgt = inputs.src, inputs.tgt
    paired = set(source_indices(pairs))
    # A source subtree already named by a structure problem is not listed
    # again, leaf by leaf. Compared loosely: those paths are built from the
    # state's int keys, where a checkpoint holds their strings.
    accounted = set()
    for u in unpaired:
        if u.why == "subtree" or (u.why == "leaf_above" and not u.ignored):
            assert u.old_prefix is not None
            sparts = u.old_prefix + tgt.paths[u.target][u.prefix_len :]
            accounted.add(loose(sparts if u.why == "subtree" else sparts[: u.above]))
    every = [(r, new, old) for (r, new), old in instances.items()] + stack_instances
    out = []
    for r, new_prefix, old_prefix in dict.fromkeys(every):
        if old_prefix is None or inputs.rules[r].old is None:
            continue
        k = len(old_prefix)
        # Most leaves under a rule's prefix are paired: those skipped with no Python step each.
        for si in itertools.filterfalse(paired.__contains__, src.under(old_prefix)):
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
