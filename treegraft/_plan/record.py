"""`PlanRecord`: what the execute and insert steps run on, fixed when the plan is made.

A `GraftPlan` holds one record (as jax's `Lowered` holds its lowering): the
indexes of both trees, the pairs, the lazy source and the options. The only
byte counts that cost storage I/O (the chunks an unstacked layer's box
touches) are measured while planning; the rest is shape arithmetic, done once
on the first look and kept. Looking at a plan (`str(plan)`, `plan.nbytes`,
`plan.entries`) reads nothing from storage, and planning does no per-leaf
arithmetic nobody asked for (0.25 s for 100,000 leaves).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from treegraft._parse.paths import Path
from treegraft._parse.rules import Rule
from treegraft._plan.specs import index_box, pair_inputs
from treegraft._read.source import Source, reads_boxes
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import TreeIndex

__all__ = ["Pair", "PlanRecord", "make_record", "pair_inputs", "source_indices"]


class Pair(NamedTuple):
    """One grafted target leaf and the source leaves that feed it (leaf indices).

    Attributes:
      target: the target leaf's index in the state's leaves.
      source: the (first) source leaf's index in the source's leaves.
      rule: the rule's index in the mapping.
      sources: for a stack rule, every source leaf, in index order (row-major
        for nested stacks); for a rule of several source references (concat,
        a stack of a list), every reference's leaves one after the other; else ().
      layer: for an unstack, the index taken along its axis; else None.
      grids: per source reference, the sizes of its stacked levels (() for a
        reference of one leaf): `sources` splits into one run per reference,
        each `prod(grid)` long. () for a rule of one reference without stacks.
    """

    target: int
    source: int
    rule: int
    sources: tuple[int, ...] = ()
    layer: int | None = None
    grids: tuple[tuple[int, ...], ...] = ()


def source_indices(pairs: Sequence[Pair]) -> list[int]:
    """Every source leaf index the pairs read, pair by pair (a stack's leaves in order).

    Example:
      >>> source_indices([Pair(0, 4, 0), Pair(1, 5, 0, sources=(5, 6))])
      [4, 5, 6]
    """
    if not any(map(_SOURCES, pairs)):
        # Pairs of one source leaf each (copies, casts): no Python step per pair.
        return list(map(_SOURCE, pairs))
    return [si for pair in pairs for si in (pair.sources or (pair.source,))]


_SOURCE, _SOURCES = operator.itemgetter(1), operator.itemgetter(3)


# A read of the source: (source leaf index, what of it): None for the whole leaf,
# an int for the layer an unstack takes along its axis, or ((start, stop), ...)
# for the box a take or slice on the leaf itself reads.
ReadKey = tuple[int, Any]


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
      box_nbytes: the bytes of each (source leaf, layer or box) read, as the
        lazy source measured them while planning (unstack, take and slice
        rules on a path, over a source that reads boxes).
    """

    rules: tuple[Rule, ...]
    target: TreeIndex
    source: TreeIndex
    lazy: Source | None
    pairs: tuple[Pair, ...]
    cast: bool | str
    box_nbytes: Mapping[ReadKey, int]

    @property
    def pair_nbytes(self) -> tuple[int, ...]:
        """Per pair, the bytes of the reads it needs (a read two pairs share counted for each)."""
        return self._sizes[0]

    @property
    def nbytes(self) -> int:
        """The bytes of every distinct read: what executing the plan reads."""
        return self._sizes[1]

    @functools.cached_property
    def _sizes(self) -> tuple[tuple[int, ...], int]:
        boxes = self.lazy is None or reads_boxes(self.lazy)
        sizes: dict[ReadKey, int] = {}
        by_spec: dict[Any, int] = {}
        per_pair = []
        for pair in self.pairs:
            total = 0
            for key in _read_keys(pair, boxes, self.rules[pair.rule], self.source):
                n = sizes.get(key)
                if n is None:
                    n = self.box_nbytes.get(key)
                    if n is None:
                        n = _read_nbytes(self.rules[pair.rule], self.source, key, by_spec)
                    sizes[key] = n
                total += n
            per_pair.append(total)
        whole = {si for si, layer in sizes if layer is None}
        nbytes = sum(n for (si, layer), n in sizes.items() if layer is None or si not in whole)
        return tuple(per_pair), nbytes

    def is_copy(self, pair: Pair) -> bool:
        """Whether a pair's value is its source leaf as is (no gather, no steps)."""
        return self.rules[pair.rule].is_copy


def make_record(
    *,
    rules: Sequence[Rule],
    target: TreeIndex,
    source: TreeIndex,
    lazy: Source | None,
    pairs: Sequence[Pair],
    cast: bool | str,
) -> PlanRecord:
    """The record of a plan, with the byte counts that cost I/O measured now.

    For an unstack rule over a lazy source that reads boxes, a box's bytes are
    the chunks that hold it (`Source.box_nbytes`): asked here once per distinct
    box. A source that does not read boxes reads the whole leaf once for all
    its boxes, which is shape arithmetic, left for the first look.
    """
    rules = tuple(rules)
    measured: dict[ReadKey, int] = {}
    # Only an unstack, take or slice reads a box: pairs of other rules measure nothing.
    boxed = [_boxed_unstack(rule) or _box_step(rule) is not None for rule in rules]
    if lazy is not None and any(boxed) and reads_boxes(lazy):
        for pair in pairs:
            if not boxed[pair.rule]:
                continue
            rule = rules[pair.rule]
            if pair.sources:
                continue
            if pair.layer is not None and _boxed_unstack(rule):
                key: ReadKey = (pair.source, pair.layer)
                if key not in measured:
                    measured[key] = _box_nbytes(rule, source, lazy, pair.source, pair.layer)
                continue
            bounds = _step_box(rule, source, pair.source)
            if bounds is not None and (pair.source, bounds) not in measured:
                box = tuple(slice(a, b) for a, b in bounds)
                measured[(pair.source, bounds)] = int(
                    lazy.box_nbytes(Path(source.paths[pair.source]), box)
                )
    return PlanRecord(
        rules=rules,
        target=target,
        source=source,
        lazy=lazy,
        pairs=tuple(pairs),
        cast=cast,
        box_nbytes=measured,
    )


def _boxed_unstack(rule: Rule) -> bool:
    """Whether a rule unstacks a path directly, so that a layer's box is its read."""
    return rule.gather == "unstack" and rule.plain_form


def _read_keys(pair: Pair, boxes: bool, rule: Rule, source: TreeIndex) -> Sequence[ReadKey]:
    """The reads a pair needs: each stacked leaf, the whole leaf, or one layer's box.

    An unstack, take or slice on the leaf itself reads its box; other
    operations count their source leaves whole: an upper bound of what their
    boxes read.
    """
    if pair.sources:
        return [(si, None) for si in pair.sources]
    if boxes and pair.layer is not None and _boxed_unstack(rule):
        return ((pair.source, pair.layer),)
    bounds = _step_box(rule, source, pair.source) if boxes else None
    if bounds is not None:
        return ((pair.source, bounds),)
    return ((pair.source, None),)  # read whole once, sliced for every box


def _box_step(rule: Rule) -> Any:
    """The take or slice a rule applies to its one source leaf itself, or None."""
    tree = rule.tree
    if tree is None or len(rule.refs) != 1 or rule.refs[0].levels or rule.refs[0].unstack:
        return None
    node = tree
    while node.kind == "step" and node.children[0].kind != "source":
        node = node.children[0]
    step = node.step
    if node.kind != "step" or step is None or step.kind not in ("take", "slice"):
        return None
    return step


def _step_box(rule: Rule, source: TreeIndex, si: int) -> tuple[tuple[int, int], ...] | None:
    """The box of a leaf a take or slice applied to the leaf itself reads, as bounds.

    None for any other rule (or a take or slice out of range: the plan refuses it).
    """
    step = _box_step(rule)
    if step is None:
        return None
    shape = _leaves.spec_of(source.leaves[si])[0]
    if shape is None:
        return None
    bounds = [(0, d) for d in shape]
    axis = step.arg[1] if step.kind == "take" else step.arg[2]
    if not -len(shape) <= axis < len(shape):
        return None
    a = axis % len(shape)
    if step.kind == "take":
        index = step.arg[0] + shape[a] if step.arg[0] < 0 else step.arg[0]
        bounds[a] = (index, index + 1)
    else:
        bounds[a] = (step.arg[0], step.arg[1])
    if not 0 <= bounds[a][0] < bounds[a][1] <= shape[a]:
        return None
    return tuple(bounds)


def _box_nbytes(rule: Rule, source: TreeIndex, lazy: Source, si: int, layer: int) -> int:
    """The bytes of the chunks holding one layer of a source leaf, as the source says."""
    shape = _leaves.spec_of(source.leaves[si])[0] or ()
    axis = rule.axis + len(shape) if rule.axis < 0 else rule.axis
    return int(lazy.box_nbytes(Path(source.paths[si]), index_box(shape, axis, layer)))


def _read_nbytes(rule: Rule, source: TreeIndex, key: ReadKey, by_spec: dict[Any, int]) -> int:
    """The bytes one read costs without I/O: the whole leaf, or one layer of it in memory."""
    si, layer = key
    leaf = source.leaves[si]
    if layer is None:
        return _whole_nbytes(leaf, by_spec)
    spec = _leaves.spec_of(leaf)
    if isinstance(layer, tuple):  # a take's or slice's box
        size = 1
        for a, b in layer:
            size *= b - a
        return _leaves.nbytes(spec) * size // max(_count_of(spec[0] or ()), 1)
    shape = spec[0] or ()
    axis = rule.axis + len(shape) if rule.axis < 0 else rule.axis
    return _leaves.nbytes(spec) // max(shape[axis], 1)


def _whole_nbytes(leaf: Any, by_spec: dict[Any, int]) -> int:
    """A leaf's bytes, remembered by shape and dtype: most leaves of a model share a few."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return _leaves.nbytes(_leaves.spec_of(leaf))
    try:
        spec_key = (tuple(shape), dtype)
        n = by_spec.get(spec_key)
    except TypeError:  # an unhashable dtype
        return _leaves.nbytes(_leaves.spec_of(leaf))
    if n is None:
        n = by_spec[spec_key] = _leaves.nbytes(_leaves.spec_of(leaf))
    return n


def _count_of(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
