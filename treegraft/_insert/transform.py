"""Transformed leaves, built shard by shard: the insert step of rule operations.

A leaf under a rule operation (stack, unstack, concat, cast, transpose, slice,
...) is built per device of its target's sharding: each device's box is pulled
back through the rule's tree to the boxes of the source leaves it needs
(`treegraft._parse.ops`),
read (`Blocks`: the source's box reads, the boxes of one block in one call
that the source may stream, or one host copy per in-memory leaf),
and put on that device in a buffer of its own. A stacked or unstacked array is
never assembled whole on one host, except through `reshape`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from treegraft._errors import GraftError
from treegraft._insert.copies import SHARED_FROM, place_shared
from treegraft._insert.placement import Box, aligned_empty, array_from_blocks
from treegraft._insert.pullback import reshape_box
from treegraft._insert.sharding import overflow_error, weakly_typed
from treegraft._parse.ops import Node
from treegraft._parse.paths import Path, render_parts
from treegraft._plan import Pair, PlanRecord
from treegraft._plan.specs import pair_inputs
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

    def lend(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        """A box of a source leaf that the caller only reads and copies, never keeps or writes.

        From a source that lends (`lend_boxes`: the safetensors reader's kept
        rows), a read-only view, with no copy made here; from any other, a
        fresh array as `fetch` gives.
        """
        rec = self.rec
        lend = getattr(rec.lazy, "lend_boxes", None)
        if lend is None:
            return self.fetch(si, box)
        request = BoxRequest(Path(rec.source.paths[si]), box)
        return np.asarray(_next_part(iter(lend([request])), request, rec.lazy))

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


Fetch = Callable[[tuple[slice, ...]], np.ndarray]


def leaf_fetch(rec: PlanRecord, pair: Pair, blocks: Blocks, *, lend: bool = False) -> Fetch:
    """A fetch of boxes of one pair's value: the rule's tree, on host arrays.

    The insert step places the boxes on devices (`build`); the write step
    writes them to a file, chunk by chunk (docs/design.md section 15). Each
    fetched box is a fresh array in the rule's output dtype (before any cast
    to the target's dtype). A box is pulled back through the tree's nodes
    (`treegraft._parse.ops.Node`) to the boxes of the source leaves it needs.

    Args:
      lend: a fetched box may instead be a read-only view of the source's
        memory (`Blocks.lend`), which the caller must copy before it keeps it:
        a transpose or a reshape then copies nothing, and the one copy is the
        caller's (the device put). A box that is not read-only is fresh.
    """
    rule = rec.rules[pair.rule]
    refs = pair_inputs(pair)
    specs = [_leaves.spec_of(rec.source.leaves[leaves[0]]) for _, leaves in refs]
    assert rule.tree is not None
    return _node_fetch(rule.tree, _Context(refs, specs, pair.layer, blocks, lend), ())[0]


class _Context(NamedTuple):
    """What a tree's nodes fetch from: each reference's leaves, their specs, the unstack index."""

    refs: list[tuple[tuple[int, ...], tuple[int, ...]]]
    specs: list[Any]
    layer: int | None
    blocks: Blocks
    lend: bool = False


def _flat(grid: tuple[int, ...], bound: tuple[int, ...]) -> int:
    """The row-major position of index `bound` in a grid."""
    k = 0
    for size, i in zip(grid, bound, strict=True):
        k = k * size + i
    return k


def _node_fetch(node: Node, ctx: _Context, bound: tuple[int, ...]) -> tuple[Fetch, Any]:
    """A node's fetch and spec; `bound` holds the indices its enclosing stacks chose."""
    if node.kind == "source":
        grid, leaves = ctx.refs[node.slot]
        si = leaves[_flat(grid, bound)]
        get = ctx.blocks.lend if ctx.lend else ctx.blocks.fetch
        return (lambda box: get(si, box)), ctx.specs[node.slot]
    if node.kind == "concat":
        return _concat_fetch(node, ctx, bound)
    if node.kind == "stack_list":
        kids = [_node_fetch(child, ctx, bound) for child in node.children]
        spec = kids[0][1]
        shape = tuple(spec[0])
        axis = _axis(node.axis, len(shape) + 1)
        made = (shape[:axis] + (len(kids),) + shape[axis:], spec[1])
        return _stacked([f for f, _ in kids], axis, made), made
    if node.kind == "stack":
        child = node.children[0]
        grid, leaves = ctx.refs[node.inputs_below()[0]]
        count = grid[len(bound)]
        spec = _node_fetch(child, ctx, bound + (0,))[1]
        shape = tuple(spec[0])
        axis = _axis(node.axis, len(shape) + 1)
        made = (shape[:axis] + (count,) + shape[axis:], spec[1])
        if child.kind == "source":
            members = [leaves[_flat(grid, bound + (k,))] for k in range(count)]
            return _stack_fetch(ctx.blocks, members, axis), made
        fetches = [_node_fetch(child, ctx, bound + (k,))[0] for k in range(count)]
        return _stacked(fetches, axis, made), made
    fetch, spec = _node_fetch(node.children[0], ctx, bound)
    if node.kind == "step":
        assert node.step is not None
        after = node.step.spec(spec)[0]
        if node.step.kind == "reshape":
            return _reshape_pull(fetch, node.step.pull(fetch, spec), spec, after), after
        return node.step.pull(fetch, spec), after
    # unstack: the new side's index along the axis
    shape = tuple(spec[0])
    axis = _axis(node.axis, len(shape))
    index = ctx.layer
    assert index is not None

    def unstacked(box: tuple[slice, ...]) -> np.ndarray:
        full = box[:axis] + (slice(index, index + 1),) + box[axis:]
        return np.squeeze(np.asarray(fetch(full)), axis=axis)

    return unstacked, (shape[:axis] + shape[axis + 1 :], spec[1])


def _reshape_pull(fetch: Fetch, general: Fetch, before: Any, after: Any) -> Fetch:
    """A reshape's fetch that reads only the input box holding the output box, where one does.

    The general pull (`Step.pull`) fetches the whole input for every box and
    reshapes it (a copy of the whole leaf per device). When the reshape only
    splits and merges axes in a way that keeps the box one box of the input
    (`reshape_box`: a head range of `[D, N * H] -> [D, N, H]`), that box is
    fetched and reshaped alone (a view where numpy can make one); otherwise
    the general pull.
    """
    shape_in, shape_out = tuple(before[0]), tuple(after[0])

    def pulled(box: tuple[slice, ...]) -> np.ndarray:
        inner = reshape_box(shape_in, shape_out, box)
        if inner is None:
            return general(box)
        return np.asarray(fetch(inner)).reshape(tuple(s.stop - s.start for s in box))

    return pulled


def _stack_fetch(blocks: Blocks, sources: Sequence[int], axis: int) -> Fetch:
    """A stack of source leaves along a new axis: one `read_boxes` call per box."""
    dtype = _leaves.spec_of(blocks.rec.source.leaves[sources[0]])[1]

    def fetch(box: tuple[slice, ...]) -> np.ndarray:
        inner = box[:axis] + box[axis + 1 :]
        layers = range(box[axis].start, box[axis].stop)
        # The block first, then every layer's box asked of the source in one
        # call, each written straight into its slot (by the source itself
        # when it can; docs/design.md section 12: the block is the caller's
        # own): host memory holds the block and the source's reads in flight,
        # never a part beside the block. Aligned, so that jax's CPU client
        # adopts it as the device buffer.
        out = aligned_empty(tuple(s.stop - s.start for s in box), dtype)
        slot = (slice(None),) * axis
        # `...` keeps a 0-d slot a view (a plain index would give a scalar copy).
        blocks.fill([(sources[k], inner) for k in layers],
                    [out[slot + (j, Ellipsis)] for j in range(len(layers))])
        return out

    return fetch


def _stacked(fetches: Sequence[Fetch], axis: int, made: Any) -> Fetch:
    """A stack of values, each fetched by its own fetch, along a new axis."""

    def fetch(box: tuple[slice, ...]) -> np.ndarray:
        inner = box[:axis] + box[axis + 1 :]
        out = np.empty(tuple(s.stop - s.start for s in box), made[1])
        for j, k in enumerate(range(box[axis].start, box[axis].stop)):
            out[(slice(None),) * axis + (j,)] = fetches[k](inner)
        return out

    return fetch


def _concat_fetch(node: Node, ctx: _Context, bound: tuple[int, ...]) -> tuple[Fetch, Any]:
    """A concat: each box split along the axis among the values it overlaps."""
    kids = [_node_fetch(child, ctx, bound) for child in node.children]
    shape0 = tuple(kids[0][1][0])
    axis = _axis(node.axis, len(shape0))
    starts = [0]
    for _, spec in kids:
        starts.append(starts[-1] + spec[0][axis])
    made = (shape0[:axis] + (starts[-1],) + shape0[axis + 1 :], kids[0][1][1])

    def fetch(box: tuple[slice, ...]) -> np.ndarray:
        out = np.empty(tuple(s.stop - s.start for s in box), made[1])
        b = box[axis]
        for (child, _), lo, hi in zip(kids, starts, starts[1:], strict=False):
            a, z = max(b.start, lo), min(b.stop, hi)
            if a >= z:
                continue  # this value lies outside the box: not read
            inner = box[:axis] + (slice(a - lo, z - lo),) + box[axis + 1 :]
            out[(slice(None),) * axis + (slice(a - b.start, z - b.start),)] = child(inner)
        return out

    return fetch, made


def build(rec: PlanRecord, pair: Pair, blocks: Blocks, like: Any) -> Any:
    """The value of one target leaf under a transforming rule, placed like it."""
    # Lent boxes: the device put below is the one copy (a read-only block is never adopted).
    fetch = leaf_fetch(rec, pair, blocks, lend=True)
    dtype = _leaves.spec_of(like)[1]
    path = render_parts(rec.target.paths[pair.target])
    value = _place_blocks(fetch, like, dtype, cast=rec.cast, path=path)
    if getattr(like, "weak_type", False) and isinstance(value, jax.Array):
        value = weakly_typed(value)  # the target's weak type stays (as `place` keeps it)
    return value


def _owned(value: np.ndarray) -> np.ndarray:
    """value, copied if it is lent (read-only) and C-ordered: jax would adopt its memory.

    A lent strided view is put as it is: jax copies it into a buffer of its
    own (one transposing copy, where numpy's would be slower and a second one).
    """
    if value.flags.writeable or not value.flags.c_contiguous:
        return value
    copy = aligned_empty(value.shape, value.dtype)
    copy[...] = value
    return copy


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
        # Fetches return arrays of their own or lent read-only views (docs/design.md
        # section 12): a block is copied only to change its dtype, or when it is lent.
        value = np.asarray(fetch(box))
        if isinstance(dtype, type) or value.dtype == dtype:
            return _owned(value)
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
            with jax.transfer_guard("allow"):
                return jax.device_put(block(whole))
        # Every device gets a buffer of its own (docs/design.md section 12); a
        # block is read once for its replicas, one block at a time.
        def block_of(box: Box) -> np.ndarray:
            return block(tuple(slice(a, b) for a, b in box))

        if _leaves.nbytes((shape, dtype)) >= SHARED_FROM:
            return place_shared(shape, sharding, block_of)  # lent blocks: two threads copy
        return array_from_blocks(shape, sharding, block_of, adopt=False)
    value = block(whole)
    if isinstance(like, np.ndarray):
        return np.array(value, dtype=like.dtype)
    if isinstance(like, np.generic):
        return np.array(value, dtype=like.dtype)[()]
    return type(like)(value.item())
