"""Transformed leaves, built shard by shard: the insert step of rule operations.

A leaf under a stack, unstack, cast, transpose or reshape rule is built per
device of its target's sharding: each device's box is pulled back through the
rule's steps to the boxes of the source leaves it needs (`treegraft._parse.ops`),
read (`Blocks`: the source's box reads, or one host copy per in-memory leaf),
and put on that device in a buffer of its own. A stacked or unstacked array is
never assembled whole on one host, except through `reshape`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import GraftError
from treegraft._insert.placement import array_from_blocks
from treegraft._insert.sharding import overflow_error, weakly_typed
from treegraft._parse.paths import Path, render_parts
from treegraft._plan import GraftPlan, Pair, gathered_spec
from treegraft._read.source import BoxRequest, ReadRequest, reads_boxes
from treegraft._tree import leaves as _leaves

__all__ = ["Blocks", "build"]


class Blocks:
    """Boxes of source leaves, for the rules that transform them.

    A source that can read boxes (`read_boxes`) reads only the chunks each box
    needs; for any other, each leaf is read whole once and kept for this graft.
    """

    def __init__(self, p: GraftPlan):
        self.p = p
        self._whole: dict[int, np.ndarray] = {}

    def fetch(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        return self.fetch_many([(si, box)])[0]

    def fetch_many(self, wanted: Sequence[tuple[int, tuple[slice, ...]]]) -> list[np.ndarray]:
        """Boxes of several source leaves, read in one batch where the source can.

        Each returned array is fresh: the caller owns it (no view of a source
        leaf or of a cached read).
        """
        p = self.p
        if p._lazy is not None and reads_boxes(p._lazy):
            requests = [BoxRequest(Path(p._source.paths[si]), box) for si, box in wanted]
            return [np.asarray(x) for x in p._lazy.read_boxes(requests)]
        return [self._fetch_one(si, box) for si, box in wanted]

    def _fetch_one(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        p = self.p
        leaf = p._source.leaves[si]
        if p._lazy is None:
            # Never abstract here: the plan reports abstract source leaves, and
            # execute refuses such a plan before it reads anything.
            whole = self._whole.get(si)
            if whole is None:
                # One host copy per source leaf: slicing a sharded jax.Array
                # per target shard would gather it once per shard instead.
                if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                    raise GraftError(
                        f"the in-memory source leaf {render_parts(p._source.paths[si])!r} spans "
                        "several processes; a stack, unstack, cast, transpose or reshape rule "
                        "cannot read it: save it and graft from the checkpoint"
                    )
                whole = self._whole[si] = np.asarray(leaf)
            return np.array(whole[box] if box else whole)
        whole = self._whole.get(si)
        if whole is None:
            shape, dtype = _leaves.spec_of(leaf)
            like = np.broadcast_to(np.zeros((), dtype), shape or ())
            request = ReadRequest(Path(p._source.paths[si]), like, dtype)
            whole = self._whole[si] = np.asarray(p._lazy.read([request])[0])
        return np.array(whole[box] if box else whole)  # the caller's own copy


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def build(p: GraftPlan, pair: Pair, blocks: Blocks, like: Any) -> Any:
    """The value of one target leaf under a transforming rule, placed like it."""
    rule = p._rules[pair.rule]
    spec = _leaves.spec_of(p._source.leaves[pair.source])
    shape = tuple(spec[0] or ())
    fetch: Callable[[tuple[slice, ...]], np.ndarray]
    if rule.gather == "stack":
        axis = _axis(rule.axis, len(shape) + 1)
        sources = pair.sources

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            inner = box[:axis] + box[axis + 1 :]
            layers = range(box[axis].start, box[axis].stop)
            # Layer by layer into one block: host memory holds the block and
            # one layer's slice, not every slice and then their stack.
            out: np.ndarray | None = None
            for j, k in enumerate(layers):
                part = blocks.fetch(sources[k], inner)
                if out is None:
                    out = np.empty(part.shape[:axis] + (len(layers),) + part.shape[axis:],
                                   part.dtype)
                out[(slice(None),) * axis + (j,)] = part
                del part
            assert out is not None
            return out

    elif rule.gather == "unstack":
        axis = _axis(rule.axis, len(shape))
        si, index = pair.source, pair.layer
        assert index is not None

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            full = box[:axis] + (slice(index, index + 1),) + box[axis:]
            return np.squeeze(blocks.fetch(si, full), axis=axis)

    else:
        si = pair.source

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            return blocks.fetch(si, box)

    current: Any = gathered_spec(rule, spec, len(pair.sources), pair.layer)[0]
    for step in rule.steps:
        fetch = step.pull(fetch, current)
        current = step.spec(current)[0]
    dtype = _leaves.spec_of(like)[1]
    path = render_parts(p._target.paths[pair.target])
    value = _place_blocks(fetch, like, dtype, cast=p.cast, path=path)
    if getattr(like, "weak_type", False) and isinstance(value, jax.Array):
        value = weakly_typed(value)  # the target's weak type stays (as `place` keeps it)
    return value


def _place_blocks(
    fetch: Callable[[tuple[slice, ...]], np.ndarray],
    like: Any,
    dtype: Any,
    *,
    cast: bool | str = False,
    path: str = "",
) -> Any:
    """Builds a value like `like` from a fetch of its boxes: shard by shard if sharded.

    A block cast to the target's dtype under `cast=True` is checked: a finite
    value made inf is a `MismatchError` naming `path` (`values_checked`).
    """
    shape: tuple[int, ...] = tuple(getattr(like, "shape", ()))
    whole = tuple(slice(0, d) for d in shape)

    def block(box: tuple[slice, ...]) -> np.ndarray:
        # Fetches return arrays of their own (DESIGN section 12), so a block is
        # copied only to change its dtype.
        value = np.asarray(fetch(box))
        if isinstance(dtype, type) or value.dtype == dtype:
            return value
        with np.errstate(invalid="ignore", over="ignore"):  # checked below, or unsafe
            got = value.astype(dtype, copy=False)
        if _leaves.values_checked(value.dtype, np.dtype(dtype), cast):
            found = _leaves.first_overflow(value, got)
            if found is not None:
                index = tuple(b.start + i for b, i in zip(box, found[0], strict=True))
                raise overflow_error(repr(path), value.dtype, got.dtype, index, found[1].item())
        return got

    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        sharding = like.sharding
        if sharding is None:
            return jax.device_put(block(whole))
        # Every device gets a buffer of its own (docs/design.md section 12); a
        # block is read once for its replicas, one block at a time.
        return array_from_blocks(
            shape, sharding, lambda box: block(tuple(slice(a, b) for a, b in box)), adopt=False
        )
    value = block(whole)
    if isinstance(like, np.ndarray):
        return np.array(value, dtype=like.dtype)
    if isinstance(like, np.generic):
        return np.array(value, dtype=like.dtype)[()]
    return type(like)(value.item())
