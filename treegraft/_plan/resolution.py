"""The immutable result of resolving a mapping: `Resolution`, `Unpaired` and `Stray`.

`resolve` makes it; every check is a pure function of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from treegraft._parse.paths import Part
from treegraft._plan.context import Inputs
from treegraft._plan.record import Pair, source_indices

Parts = tuple[Part, ...]
# A target node an unmatched rule names: its path, its old path, whether the source has it.
Node = tuple[Parts, Parts | None, bool]


class Unpaired(NamedTuple):
    """A target leaf a rule covers that found no source leaf, and why.

    Attributes:
      target: the leaf's index in the state.
      rule: the covering rule's index.
      prefix_len: the length of the rule's matched new prefix.
      old_prefix: the old prefix the rule points to, or None when the source
        has no such node (`why` is then "prefix").
      why: "prefix" (the rule's source is absent), "subtree" (the source has a
        subtree where the target is a leaf), "leaf_above" (the source has a
        leaf at `old_prefix + suffix[:above]`, where the target has a
        subtree), "absent" (the source stops before the leaf).
      ignored: the ignore_model_keys patterns covering the leaf (consulted
        unless `why` is "subtree": a structure error is never ignored).
      above: for "leaf_above", how many parts of the source path lead to the leaf.
      source_leaf: for "leaf_above", that source leaf's index; else -1.
    """

    target: int
    rule: int
    prefix_len: int
    old_prefix: Parts | None
    why: str
    ignored: tuple[int, ...] = ()
    above: int = 0
    source_leaf: int = -1


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
      bad_stacks: (rule, new prefix, why) where found subtrees cannot be stacked,
        or where an unstack rule's new prefixes spell one index twice.
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
        """Every source leaf whose spec a check shows, for one prefetch.

        The paired leaves, in pair order, and the leaves the source has where
        the state has a subtree (their spec is in the structure message).
        """
        leaves = self.inputs.src.leaves
        out = list(map(leaves.__getitem__, source_indices(self.pairs)))
        out += [
            leaves[u.source_leaf]
            for u in self.unpaired
            if u.why == "leaf_above" and not u.ignored
        ]
        return out
