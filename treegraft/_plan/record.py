"""`PlanRecord`: what the execute and insert steps run on, fixed when the plan is made.

A `GraftPlan` holds one record (as jax's `Lowered` holds its lowering): the
indexes of both trees, the pairs, the lazy source and the options. Every byte
count a plan shows is computed here, once, while planning: looking at a plan
(`str(plan)`, `plan.nbytes`, `plan.entries`) reads nothing from storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from treegraft._parse.paths import Path
from treegraft._parse.rules import Rule
from treegraft._plan.specs import index_box
from treegraft._read.source import Source, reads_boxes
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import TreeIndex

__all__ = ["Pair", "PlanRecord", "ReadKey", "make_record"]


class Pair(NamedTuple):
    """One grafted target leaf and the source leaves that feed it (leaf indices).

    Attributes:
      target: the target leaf's index in the state's leaves.
      source: the (first) source leaf's index in the source's leaves.
      rule: the rule's index in the mapping.
      sources: for a stack rule, every source leaf, in index order; else ().
      layer: for an unstack rule, the index taken along its axis; else None.
    """

    target: int
    source: int
    rule: int
    sources: tuple[int, ...] = ()
    layer: int | None = None

# A read of the source: (source leaf index, layer taken along the rule's axis or None).
ReadKey = tuple[int, int | None]
# The reads of one pair, each with the bytes it costs.
Reads = tuple[tuple[ReadKey, int], ...]


@dataclass(frozen=True, eq=False)
class PlanRecord:
    """A plan's internals: the trees, the pairs and their byte counts, the options.

    Attributes:
      rules: the parsed rules, in the mapping's order.
      target: the index of the state.
      source: the index of the source (its metadata tree, for a lazy source).
      lazy: the lazy source (a checkpoint), or None for an in-memory pytree.
      pairs: each grafted target leaf with its source leaves (`Pair`).
      cast: the `cast` option.
      reads: per pair, the reads it needs, each as (key, bytes); equal keys
        are one read.
      nbytes: the bytes of every distinct read: what executing the plan reads.
    """

    rules: tuple[Rule, ...]
    target: TreeIndex
    source: TreeIndex
    lazy: Source | None
    pairs: tuple[Pair, ...]
    cast: bool | str
    reads: tuple[Reads, ...]
    nbytes: int

    def is_copy(self, pair: Pair) -> bool:
        """Whether a pair's value is its source leaf as is (no gather, no steps)."""
        rule = self.rules[pair.rule]
        return rule.gather == "copy" and not rule.steps

    def pair_nbytes(self, k: int) -> int:
        """The bytes the k-th pair reads (shared reads counted for each pair)."""
        return sum(n for _, n in self.reads[k])


def make_record(
    *,
    rules: Sequence[Rule],
    target: TreeIndex,
    source: TreeIndex,
    lazy: Source | None,
    pairs: Sequence[Pair],
    cast: bool | str,
) -> PlanRecord:
    """The record of a plan, its byte counts computed now (the only I/O: box sizes).

    For an unstack rule over a source that reads boxes, a box's bytes are the
    chunks that hold it (`Source.box_nbytes`): asked here once per distinct box.
    """
    rules = tuple(rules)
    sizes: dict[ReadKey, int] = {}
    reads = tuple(
        _pair_reads(rules, source, lazy, pair, sizes) for pair in pairs
    )
    whole = {si for si, layer in sizes if layer is None}
    nbytes = sum(n for (si, layer), n in sizes.items() if layer is None or si not in whole)
    return PlanRecord(
        rules=rules,
        target=target,
        source=source,
        lazy=lazy,
        pairs=tuple(pairs),
        cast=cast,
        reads=reads,
        nbytes=nbytes,
    )


def _pair_reads(
    rules: tuple[Rule, ...],
    source: TreeIndex,
    lazy: Source | None,
    pair: Pair,
    sizes: dict[ReadKey, int],
) -> Reads:
    """The reads a pair needs, each as (key, bytes); sizes caches each key's bytes."""
    if pair.sources:
        keys: list[ReadKey] = [(si, None) for si in pair.sources]
    elif pair.layer is None or (lazy is not None and not reads_boxes(lazy)):
        keys = [(pair.source, None)]  # read whole once, sliced for every box
    else:
        keys = [(pair.source, pair.layer)]
    out = []
    for key in keys:
        if key not in sizes:
            sizes[key] = _read_nbytes(rules[pair.rule], source, lazy, key)
        out.append((key, sizes[key]))
    return tuple(out)


def _read_nbytes(rule: Rule, source: TreeIndex, lazy: Source | None, key: ReadKey) -> int:
    """The bytes one read costs: the whole leaf, or the chunks holding one layer."""
    si, layer = key
    spec = _leaves.spec_of(source.leaves[si])
    whole = _leaves.nbytes(spec)
    if layer is None:
        return whole
    shape = spec[0] or ()
    axis = rule.axis + len(shape) if rule.axis < 0 else rule.axis
    if lazy is None:
        return whole // max(shape[axis], 1)
    box = index_box(shape, axis, layer)
    return int(lazy.box_nbytes(Path(source.paths[si]), box))
