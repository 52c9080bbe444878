"""Transformed leaves, built shard by shard: the insert step of rule operations.

A leaf under a stack, unstack, cast, transpose or reshape rule is built per
device of its target's sharding: each device's box is pulled back through the
rule's steps to the boxes of the source leaves it needs (`treegraft._parse.ops`),
read (`Blocks`: the source's box reads, the boxes of one block in one call
that the source may stream, or one host copy per in-memory leaf),
and put on that device in a buffer of its own. A stacked or unstacked array is
never assembled whole on one host, except through `reshape`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import GraftError
from treegraft._insert.placement import aligned_empty, array_from_blocks
from treegraft._insert.sharding import overflow_error, weakly_typed
from treegraft._parse.paths import Path, render_parts
from treegraft._plan import Pair, PlanRecord, gathered_spec
from treegraft._read.source import BoxRequest, ReadRequest, reads_boxes
from treegraft._tree import leaves as _leaves

__all__ = ["Blocks", "build", "leaf_fetch"]


class Blocks:
    """Boxes of source leaves, for the rules that transform them.

    A source that can read boxes (`read_boxes`) reads only the chunks each box
    needs, the boxes of one block in one call; for any other, each leaf is read
    whole once and kept for this graft.
    """

    def __init__(self, rec: PlanRecord):
        self.rec = rec
        self._whole: dict[int, np.ndarray] = {}

    def fetch(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        return next(self.fetch_many([(si, box)]))

    def fetch_many(self, wanted: Sequence[tuple[int, tuple[slice, ...]]]) -> Iterator[np.ndarray]:
        """Boxes of several source leaves, in order, read in one call where the source can.

        A source that reads boxes gets all of them in one `read_boxes` call: a
        32-layer stack is one call, not 32, and the source opens each array
        once for all of them. The source may stream its parts (the orbax
        reader keeps a bounded window of reads in flight), so each part is
        handed over as soon as it is asked for and no name here keeps it: a
        caller that copies it into its block frees it before the next is
        read. Closing this generator closes the source's. Each returned array
        is fresh: the caller owns it (no view of a source leaf or of a cached
        read).
        """
        rec = self.rec
        if rec.lazy is None or not reads_boxes(rec.lazy):
            for si, box in wanted:
                yield self._fetch_one(si, box)
            return
        requests = [BoxRequest(Path(rec.source.paths[si]), box) for si, box in wanted]
        parts = iter(rec.lazy.read_boxes(requests))
        try:
            for request in requests:
                yield np.asarray(_next_part(parts, request, rec.lazy))
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # cancels the source's reads still in flight

    def fill(self, wanted: Sequence[tuple[int, tuple[slice, ...]]],
             into: Sequence[np.ndarray]) -> None:
        """Writes each wanted box into its array of into, in one source call where it can.

        As `fetch_many`, but each request carries its destination
        (`BoxRequest.out`): a source that reads boxes may write it there
        itself; any other part is checked (shape, dtype) and copied in.
        """
        rec = self.rec
        if rec.lazy is None or not reads_boxes(rec.lazy):
            for (si, box), out in zip(wanted, into, strict=True):
                _copy_into(out, self._fetch_one(si, box), Path(rec.source.paths[si]), rec.lazy)
            return
        requests = [BoxRequest(Path(rec.source.paths[si]), box, out)
                    for (si, box), out in zip(wanted, into, strict=True)]
        parts = iter(rec.lazy.read_boxes(requests))
        try:
            for request in requests:
                part = _next_part(parts, request, rec.lazy)
                if part is not request.out:
                    assert request.out is not None
                    _copy_into(request.out, np.asarray(part), request.path, rec.lazy)
                del part
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # cancels the source's reads still in flight

    def _fetch_one(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        rec = self.rec
        leaf = rec.source.leaves[si]
        if rec.lazy is None:
            # Never abstract here: the plan reports abstract source leaves, and
            # execute refuses such a plan before it reads anything.
            whole = self._whole.get(si)
            if whole is None:
                # One host copy per source leaf: slicing a sharded jax.Array
                # per target shard would gather it once per shard instead.
                if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                    raise GraftError(
                        f"the in-memory source leaf {render_parts(rec.source.paths[si])!r} spans "
                        "several processes; a stack, unstack, cast, transpose or reshape rule "
                        "cannot read it: save it and graft from the checkpoint"
                    )
                whole = self._whole[si] = np.asarray(leaf)
            return np.array(whole[box] if box else whole)
        whole = self._whole.get(si)
        if whole is None:
            shape, dtype = _leaves.spec_of(leaf)
            like = np.broadcast_to(np.zeros((), dtype), shape or ())
            request = ReadRequest(Path(rec.source.paths[si]), like, dtype)
            whole = self._whole[si] = np.asarray(rec.lazy.read([request])[0])
        return np.array(whole[box] if box else whole)  # the caller's own copy


def _next_part(parts: Iterator[np.ndarray], request: BoxRequest, source: Any) -> np.ndarray:
    """The next part of a `read_boxes` result, which must have one per request."""
    part = next(parts, None)
    if part is None:
        raise GraftError(
            f"{source.describe()} returned fewer boxes than asked for: none for "
            f"{render_parts(request.path.parts)!r}; its read_boxes must give one array "
            "per request, in order"
        )
    return part


def _copy_into(out: np.ndarray, part: np.ndarray, path: Path, source: Any) -> None:
    """Copies a part a source returned into its slot, which it must fit exactly."""
    if part.shape != out.shape or part.dtype != out.dtype:
        where = "the source" if source is None else source.describe()
        raise GraftError(
            f"{where} returned {part.dtype}{list(part.shape)} for a box of "
            f"{render_parts(path.parts)!r} that holds {out.dtype}{list(out.shape)}; its "
            "read_boxes must give each box in its shape and the source dtype"
        )
    out[...] = part


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def leaf_fetch(
    rec: PlanRecord, pair: Pair, blocks: Blocks
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A fetch of boxes of one pair's value: the rule's gather and steps, on host arrays.

    The insert step places the boxes on devices (`build`); the write step
    writes them to a file, chunk by chunk (docs/design.md section 15). Each
    fetched box is a fresh array in the rule's output dtype (before any cast
    to the target's dtype).
    """
    rule = rec.rules[pair.rule]
    spec = _leaves.spec_of(rec.source.leaves[pair.source])
    shape = tuple(spec[0] or ())
    fetch: Callable[[tuple[slice, ...]], np.ndarray]
    if rule.gather == "stack":
        axis = _axis(rule.axis, len(shape) + 1)
        sources = pair.sources

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            inner = box[:axis] + box[axis + 1 :]
            layers = range(box[axis].start, box[axis].stop)
            # The block first, then every layer's box asked of the source in one
            # call, each written straight into its slot (by the source itself
            # when it can, docs/design.md section 12: the block is the caller's
            # own): host memory holds the block and the source's reads in
            # flight, never a part beside the block.
            # Aligned, so that jax's CPU client adopts it as the device buffer.
            out = aligned_empty(tuple(s.stop - s.start for s in box), spec[1])
            slot = (slice(None),) * axis
            blocks.fill([(sources[k], inner) for k in layers],
                         [out[slot + (j,)] for j in range(len(layers))])
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
    return fetch


def build(rec: PlanRecord, pair: Pair, blocks: Blocks, like: Any) -> Any:
    """The value of one target leaf under a transforming rule, placed like it."""
    fetch = leaf_fetch(rec, pair, blocks)
    dtype = _leaves.spec_of(like)[1]
    path = render_parts(rec.target.paths[pair.target])
    value = _place_blocks(fetch, like, dtype, cast=rec.cast, path=path)
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
        # Fetches return arrays of their own (docs/design.md section 12), so a block is
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
