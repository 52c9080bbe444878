"""Array bytes read straight from tensorstore: each target shard reads its own slice.

orbax saves each array as a zarr (v2 or v3) array in its OCDBT store. For a
checkpoint whose metadata `metadata.lazy_metadata` could read, this module
opens those arrays with tensorstore over the location's own kvstore and reads,
for every addressable device of the target's sharding, exactly the slice that
device holds, then places it there. Every array and shard of a read call is
read in one tensorstore context, a child of the checkpoint store's: the OCDBT
index and headers the plan read are in its bounded cache; decoded chunks are
never kept. The arrays of a call are opened all at once. Shards that share
chunks and tile a box are one read of it into an overlay of their own buffers
(no buffer in between, no copy); slices with gaps between them read the
chunk-aligned region and are cut from it on the host. Either way a chunk that
several shards need is fetched and decoded once; boxes read for operations
(`read_boxes`) keep such a region for the next boxes that cut from it
(`Regions`).

Anything this reader does not know (typed PRNG keys, a layout its metadata did
not come from) is left to orbax's restore: `takes` says which requests
it takes.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, describe_leaf
from treegraft._formats.orbax.headers import LazyLeaf, store_context
from treegraft._insert.placement import (
    Box,
    aligned_empty,
    assemble,
    devices_by_box,
    put_block,
    sharding_of,
)
from treegraft._parse.paths import render_parts
from treegraft._read.source import ReadRequest
from treegraft._storage.errors import reason, stalled

__all__ = ["DirectReader", "chunk_shape", "box_nbytes"]

# Bytes of reads in flight at once (at least one request's): the slices read
# are the bytes grafted, but each read in flight also holds the chunks it
# decodes, which the allocator keeps once freed; 64 MiB keeps two cores busy.
# One 16 MiB chunk at a time (a 16 MiB window) grew peak RSS by 1.08-1.10x the
# 1 GiB grafted into 8 devices instead of 1.15-1.22x, but took 0.29 s instead
# of 0.21 s: glibc keeps up to twice a chunk's bytes in each thread arena a
# chunk buffer was allocated in, and tensorstore reads and decodes on
# whichever pool thread is free (benchmarks/run.py --cases sharded).
_WINDOW_BYTES = 64 << 20
# Box bytes a `read_boxes` stream keeps in flight (at least one box): host
# memory then holds the consumer's block and what the reads in flight decode.
# Each read in flight decodes on a thread of its own, and the allocator keeps
# what each thread freed: a 32-layer stack of 8 MiB layers into 8 devices
# peaked at 1.23-1.25x the bytes grafted with two layers in flight, 1.10-1.17x
# with one (rule_ops stack benchmark).
_BOX_WINDOW_BYTES = 8 << 20
# Bytes of chunk-aligned regions `Regions` keeps between `read_boxes` calls.
_REGION_BYTES = 64 << 20


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def takes(leaf: Any, req: ReadRequest) -> bool:
    """Whether the direct reader can read this request (else orbax does)."""
    if type(leaf) is not LazyLeaf:
        return False
    like = req.like
    if _is_key_dtype(getattr(like, "dtype", None)) or _is_key_dtype(req.dtype):
        return False
    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        sharding = like.sharding
        return sharding is None or isinstance(sharding, jax.sharding.Sharding)
    return True


def chunk_shape(array: Any) -> tuple[int, ...]:
    """The shape of the chunks tensorstore reads for this array."""
    shape = array.chunk_layout.read_chunk.shape
    if shape is None:
        return tuple(array.shape)
    return tuple(int(c) if c else int(s) for c, s in zip(shape, array.shape, strict=True))


def box_nbytes(shape: Sequence[int], chunks: Sequence[int], itemsize: int,
               box: Sequence[slice]) -> int:
    """Bytes of the chunks that hold box (each chunk clipped to the array's bounds)."""
    total = itemsize
    for n, c, s in zip(shape, chunks, box, strict=True):
        start, stop, _ = s.indices(n)
        if stop <= start:
            return 0
        first, last = start // c, (stop - 1) // c
        covered = min((last + 1) * c, n) - first * c
        total *= covered
    return total


def check_unchanged(leaf: LazyLeaf, array: Any, req: ReadRequest, location: Any) -> None:
    """Refuses an array whose header differs from the one the plan saw.

    A checkpoint rewritten between plan and execute would otherwise be read
    and cast to the planned dtype without a word (float64 1e300 to float32
    inf, int64 2**40 + 1 to int32 1; docs/design.md section 4: casting is
    never implicit).

    Raises:
      CheckpointError: the shape or dtype changed; names the path and both sides.
    """
    planned = leaf.stored
    found = (tuple(array.shape), np.dtype(array.dtype.numpy_dtype))
    if found != planned:
        path = render_parts(req.path.parts)
        saved = "" if leaf.name == path else f" (saved as {leaf.name!r})"
        raise CheckpointError(
            f"{path!r}{saved} in {location} changed "
            f"since the plan: the plan saw {describe_leaf(*planned)}, the checkpoint now holds "
            f"{describe_leaf(*found)}; nothing was grafted: plan again to read the new "
            "checkpoint"
        )


def _slices(like: Any, shape: tuple[int, ...]) -> dict[tuple[tuple[int, int], ...], list[Any]]:
    """{box: devices} of the slices a target needs: its addressable shards, replicas
    grouped; [None] for a host (numpy or Python) target, which gets the whole array."""
    if not isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        return {tuple((0, n) for n in shape): [None]}
    return devices_by_box(sharding_of(like), shape)


class _Job:
    """One request being read: its device buffers, or its host value."""

    __slots__ = ("leaf", "req", "buffers", "host")

    def __init__(self, leaf: LazyLeaf, req: ReadRequest):
        self.leaf = leaf
        self.req = req
        self.buffers: dict[Any, Any] = {}
        self.host: np.ndarray | None = None

    def result(self) -> Any:
        like = self.req.like
        if not isinstance(like, jax.Array | jax.ShapeDtypeStruct):
            return self.host
        return assemble(tuple(like.shape), sharding_of(like), self.buffers)


class _Unit:
    """One read in flight: straight into the pieces that tile its source box
    (`pieces`: each piece and the devices that hold it), or a chunk-aligned region
    that several slices cut from (`members`: each slice's box and devices)."""

    __slots__ = ("job", "pieces", "future", "nbytes", "out", "region", "members")

    def __init__(self, job: _Job, future: Any, nbytes: int, *,
                 pieces: list[tuple[np.ndarray, list[Any]]] | None = None,
                 out: np.ndarray | None = None, region: Box | None = None,
                 members: list[tuple[Box, list[Any]]] | None = None):
        self.job = job
        self.future = future
        self.nbytes = nbytes
        self.pieces = pieces or []
        self.out = out
        self.region = region
        self.members = members or []


def region_of(box: Box, chunks: Sequence[int], shape: Sequence[int]) -> Box:
    """The chunk-aligned box that covers box: what a read of box decodes."""
    out = []
    for (a, b), c, n in zip(box, chunks, shape, strict=True):
        if b <= a:
            out.append((a, b))
            continue
        out.append(((a // c) * c, min(-(-b // c) * c, n)))
    return tuple(out)


def _boxes_by_region(slices: dict[Box, list[Any]], chunks: Sequence[int],
                     shape: Sequence[int]) -> dict[Box, list[tuple[Box, list[Any]]]]:
    """{region: [(box, devices)]}: the slices grouped by the chunks they decode."""
    out: dict[Box, list[tuple[Box, list[Any]]]] = {}
    for box, devices in slices.items():
        out.setdefault(region_of(box, chunks, shape), []).append((box, devices))
    return out


def tiled_box(boxes: Sequence[Box]) -> Box | None:
    """The box that boxes tile exactly (no gap, no overlap), or None.

    The distinct boxes of a sharding's shards form a grid: along each axis
    their intervals partition the axis' span, and every combination is a box.
    Such boxes are read with one read of the box they tile, each written
    straight into its own buffer. An empty box tiles nothing but itself.

    >>> tiled_box([((0, 2), (0, 4)), ((2, 4), (0, 4))])
    ((0, 4), (0, 4))
    >>> tiled_box([((0, 2), (0, 4)), ((3, 4), (0, 4))]) is None
    True
    """
    if len(boxes) == 1:
        return boxes[0]
    if any(b <= a for box in boxes for a, b in box):
        return None
    count = 1
    span = []
    for axis in range(len(boxes[0])):
        cuts = sorted({box[axis] for box in boxes})
        if any(left[1] != right[0] for left, right in zip(cuts, cuts[1:], strict=False)):
            return None  # a gap or an overlap along this axis
        count *= len(cuts)
        span.append((cuts[0][0], cuts[-1][1]))
    # Distinct boxes built from the per-axis cuts, as many as their combinations: all of them.
    return tuple(span) if count == len(set(boxes)) else None


def _plan_reads(slices: dict[Box, list[Any]], chunks: Sequence[int], shape: Sequence[int]
                ) -> list[tuple[Box, list[tuple[Box, list[Any]]], bool]]:
    """The reads a request's slices take: [(source box, [(box, devices)], cut)].

    The slices that decode the same chunks (one region) are one read: when
    they tile a box, that box is read straight into their buffers (cut False),
    each chunk decoded once and nothing allocated beyond the slices
    themselves; otherwise (a process holding every other shard of a chunk)
    the chunk-aligned region is read into a buffer of its own and each slice
    cut from it (cut True).
    """
    out = []
    for region, members in _boxes_by_region(slices, chunks, shape).items():
        box = tiled_box([b for b, _ in members])
        if box is None:
            out.append((region, members, True))
        else:
            out.append((box, members, False))
    return out


def _relative(box: Box, region: Box) -> tuple[slice, ...]:
    return tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(box, region, strict=True))


class Regions:
    """Chunk-aligned regions read for boxes that cut through chunks, kept for the next boxes.

    An operation's leaf is built shard by shard, one `read_boxes` call per
    shard: each shard's box of a one-chunk layer would decode the whole chunk
    again. The first such box reads the region (the chunks it decodes
    anyway) and leaves it here; the next boxes are cut from it. A region is
    dropped once as many elements as it holds were cut from it, when a call
    needs none of the regions kept, and by `clear`; at most `limit` bytes are
    kept (a larger region is not kept: its boxes decode it again).
    """

    def __init__(self, limit: int = _REGION_BYTES):
        self.limit = limit
        self._held: dict[Any, list[Any]] = {}  # key -> [region array, elements left]
        self._lock = threading.Lock()

    def cut(self, key: Any, rel: tuple[slice, ...], out: np.ndarray | None) -> np.ndarray | None:
        """A copy of region[rel] (into out if given), or None if the region is not kept."""
        with self._lock:
            entry = self._held.get(key)
            if entry is None:
                return None
            view = entry[0][rel]
            piece = out if out is not None else aligned_empty(view.shape, view.dtype)
            piece[...] = view
            entry[1] -= piece.size
            if entry[1] <= 0:
                del self._held[key]
            return piece

    def keep(self, key: Any, region: np.ndarray) -> None:
        """Keeps region under key, dropping the oldest while over the limit."""
        if region.nbytes > self.limit:
            return
        with self._lock:
            self._held[key] = [region, region.size]
            while sum(e[0].nbytes for e in self._held.values()) > self.limit:
                del self._held[next(iter(self._held))]

    def has(self, key: Any) -> bool:
        with self._lock:
            return key in self._held

    def keep_only(self, keys: set[Any]) -> None:
        """Drops the regions none of keys names."""
        with self._lock:
            for key in [k for k in self._held if k not in keys]:
                del self._held[key]

    def clear(self) -> None:
        with self._lock:
            self._held.clear()

    def nbytes(self) -> int:
        """Bytes of the regions kept."""
        with self._lock:
            return sum(e[0].nbytes for e in self._held.values())


class _BoxRead:
    """One box of a `read_boxes` call: read straight, or cut from its chunk-aligned region."""

    __slots__ = ("leaf", "view", "out", "regions", "key", "rel", "region_view", "region",
                 "nbytes")

    def __init__(self, leaf: LazyLeaf, array: Any, view: Any, out: np.ndarray | None,
                 regions: Regions | None):
        self.leaf = leaf
        self.view = view
        self.out = out
        self.regions = regions
        itemsize = np.dtype(view.dtype.numpy_dtype).itemsize
        shape = tuple(array.shape)
        box = tuple(zip(view.domain.inclusive_min, view.domain.exclusive_max, strict=True))
        region = region_of(box, chunk_shape(array), shape)
        region_bytes = itemsize * math.prod(b - a for a, b in region)
        self.key: Any = None
        self.rel: tuple[slice, ...] = ()
        self.region_view: Any = None
        self.region: np.ndarray | None = None
        if regions is not None and region != box and region_bytes <= regions.limit:
            self.key = (leaf.name, region)
            self.rel = _relative(box, region)
            self.region_view = array[tuple(slice(a, b) for a, b in region)]
            self.nbytes = region_bytes
        else:
            self.nbytes = itemsize * math.prod(view.shape)

    def start(self, pending: set[Any]) -> Any:
        """Starts the read this box needs, if any (None: its region is kept or coming)."""
        import tensorstore as ts

        if self.key is None:
            # Into the caller's block when it gave one: no part in between.
            if self.out is None:
                return self.view.read()
            return ts.array(self.out, copy=False, write=True).write(self.view)
        if self.key in pending or self.regions.has(self.key):  # type: ignore[union-attr]
            return None
        pending.add(self.key)
        self.region = aligned_empty(tuple(self.region_view.shape),
                                    self.region_view.dtype.numpy_dtype)
        return ts.array(self.region, copy=False, write=True).write(self.region_view)

    def finish(self, got: Any, reader: DirectReader) -> np.ndarray:
        """The box's array, once its read (if it started one) is done."""
        if self.key is None:
            return self.out if self.out is not None else np.asarray(got)
        regions = self.regions
        assert regions is not None
        if self.region is not None:
            regions.keep(self.key, self.region)
            self.region = None
        piece = regions.cut(self.key, self.rel, self.out)
        if piece is not None:
            return piece
        # The region was dropped meanwhile (other regions took its room): the box alone.
        value = np.asarray(reader.location.wait(self.view.read(),
                                                f"reading array {self.leaf.name!r} of"))
        if self.out is None:
            return value
        self.out[...] = value
        return self.out


def _start(job: _Job, array: Any, box: Box, members: list[tuple[Box, list[Any]]],
           cut: bool, dtype: Any, nbytes: int) -> _Unit:
    """Starts the read of array[box]: into the members' own buffers, or into a region to cut."""
    import tensorstore as ts

    source = array[tuple(slice(a, b) for a, b in box)]
    if cut:
        out = aligned_empty(tuple(b - a for a, b in box), dtype)
        future = ts.array(out, copy=False, write=True).write(source)
        return _Unit(job, future, nbytes, out=out, region=box, members=members)
    # Aligned buffers of ours: on CPU, device_put adopts each without a copy, so
    # peak memory stays at the bytes grafted.
    pieces = [(aligned_empty(tuple(b - a for a, b in m), dtype), devices)
              for m, devices in members]
    if len(pieces) == 1:
        return _Unit(job, ts.array(pieces[0][0], copy=False, write=True).write(source), nbytes,
                     pieces=pieces)
    # Each piece's part of the box is written straight into that piece's buffer.
    target = ts.overlay([
        ts.array(piece, copy=False, write=True).translate_to[tuple(a for a, _ in m)]
        for (piece, _), (m, _) in zip(pieces, members, strict=True)
    ])
    # tensorstore reads the source once per piece; in one batch those reads
    # are one read of each chunk, decoded once. Unbatched, a piece whose read
    # starts after another's has finished reads and decodes the chunk again
    # (no decoded chunk is kept): 3 to 12 % more bytes, at random.
    with ts.Batch() as batch:
        future = target.write(source, batch=batch)
    return _Unit(job, future, nbytes, pieces=pieces)


class DirectReader:
    """Reads arrays of one checkpoint store with a shared bounded cache.

    Args:
      store: the checkpoint's metadata store (`headers.OrbaxStore`).
    """

    def __init__(self, store: Any):
        self.store = store
        self.location = store.location
        # A child of the store's context: the OCDBT manifest, index nodes and
        # headers the plan read are in its cache and are not read again, only
        # revalidated (tensorstore rechecks the manifest at each open and read).
        self.context = _child_context(store.context())
        self._own_context = False  # True once the checkpoint was found written anew
        self._open: dict[str, Any] = {}
        self._opening: dict[str, Any] = {}  # opens started, not waited for yet

    def start_opens(self, names: Iterable[str]) -> None:
        """Starts opening the arrays saved under names, all at once; `open` waits for each.

        A call reading many arrays then waits for the slowest open, not the
        sum of them (each open is a round trip to remote storage).
        """
        for name in names:
            if name not in self._open and name not in self._opening:
                self._opening[name] = self._start_open(name, self.context)

    def cancel_opens(self) -> None:
        """Cancels the opens started and not waited for (a failed call stops them)."""
        opening, self._opening = self._opening, {}
        for future in opening.values():
            future.cancel()

    def open(self, name: str) -> Any:
        """The tensorstore array saved under name (opened once per reader).

        Raises:
          CheckpointError: the array cannot be opened (in the store's context,
            nor in a context of its own).
        """
        array = self._open.get(name)
        if array is not None:
            return array
        future = self._opening.pop(name, None)
        if future is None:
            future = self._start_open(name, self.context)
        try:
            array = self._wait_open(name, future)
        except CheckpointError as e:
            if stalled(e):  # a context of its own would wait on the same storage
                raise
            # The store's context holds the OCDBT database the plan read; a
            # checkpoint written anew at the same path since (another
            # database) fails there on its uuid. In a context of its own it
            # is opened as it now is, and check_unchanged compares its header
            # with the plan's (docs/design.md section 4).
            if not self._own_context:
                self._own_context = True
                self.context = _child_context(store_context(self.location))
            array = self._wait_open(name, self._start_open(name, self.context))
        self._open[name] = array
        return array

    def _start_open(self, name: str, context: Any) -> Any:
        import tensorstore as ts

        spec = dict(self.store.spec(name), fill_missing_data_reads=self.store.fill_missing)
        # No chunk cache: a read decodes every chunk it needs once (slices that
        # share chunks are read as one region), and decoded chunks kept for
        # nothing would only raise peak memory.
        spec["cache_pool"] = "cache_pool#chunks"
        # Each read revalidates the manifest (tensorstore's default): a step
        # deleted after the open is named so, even for an array small enough
        # to live in an index node the cache holds (tests/test_plan_record.py).
        return ts.open(spec, open=True, read=True, context=context)

    def _wait_open(self, name: str, future: Any) -> Any:
        return self.location.wait(future, f"opening array {name!r} of")

    def read(self, leaves: Sequence[LazyLeaf], requests: Sequence[ReadRequest]) -> list[Any]:
        """The requested leaves, each placed like its target, in the source dtype.

        The distinct slices (a target shard; replicas read theirs once) are
        grouped by the chunk-aligned region they decode. The slices of a region
        that tile a box (every shard of one process does) are one read of that
        box, each slice's part written straight into its own buffer; slices
        that leave gaps read the region into a buffer of its own and are cut
        from it on the host. Either way a chunk is decoded once however many
        shards need it. Before a request starts, the oldest reads are moved to
        their devices until less than a window of bytes (64 MiB, or the
        request) is in flight; each host slice is dropped once placed, so peak
        memory stays near the bytes grafted plus the window.
        """
        units: collections.deque[_Unit] = collections.deque()
        try:
            self.start_opens(leaf.name for leaf in leaves)
            return self._read(leaves, requests, units)
        except BaseException:
            self.cancel_opens()
            for unit in units:  # nothing keeps reading after a failure
                if unit.future is not None:
                    unit.future.cancel()
            raise

    def _read(self, leaves: Sequence[LazyLeaf], requests: Sequence[ReadRequest],
              units: collections.deque[_Unit]) -> list[Any]:
        jobs = []
        in_flight = 0
        for leaf, req in zip(leaves, requests, strict=True):
            array = self.open(leaf.name)
            check_unchanged(leaf, array, req, self.location)
            job = _Job(leaf, req)
            jobs.append(job)
            dtype = array.dtype.numpy_dtype
            itemsize = np.dtype(dtype).itemsize
            shape = tuple(array.shape)
            reads = _plan_reads(_slices(req.like, shape), chunk_shape(array), shape)
            sizes = [itemsize * math.prod(b - a for a, b in box) for box, _, _ in reads]
            while units and in_flight + sum(sizes) > _WINDOW_BYTES:
                in_flight -= self._place(units.popleft())
            for (box, members, cut), nbytes in zip(reads, sizes, strict=True):
                units.append(_start(job, array, box, members, cut, dtype, nbytes))
                in_flight += nbytes
        while units:
            self._place(units[0])
            units.popleft()
        return [job.result() for job in jobs]

    def _place(self, unit: _Unit) -> int:
        """Waits for one read and puts its slices on their devices; returns its bytes."""
        job = unit.job
        future, unit.future = unit.future, None
        host, unit.out = unit.out, None
        try:
            self.location.wait(future, f"reading array {job.leaf.name!r} of")
        except CheckpointError as e:
            raise _LeafError(job.leaf.name, e) from e.__cause__
        del future
        if unit.region is None:
            pieces, unit.pieces = unit.pieces, []
        else:
            assert host is not None
            region = unit.region
            pieces = []
            for box, devices in unit.members:
                # Each slice in a buffer of its own (docs/design.md section 12).
                piece = aligned_empty(tuple(b - a for a, b in box), host.dtype)
                piece[...] = host[_relative(box, region)]
                pieces.append((piece, devices))
            host = None
        for piece, devices in pieces:
            piece = _as_dtype(piece, job.req.dtype)
            if devices == [None]:
                job.host = piece
                continue
            with jax.transfer_guard("allow"):
                # Replicas get their own buffers (docs/design.md section 12); the
                # first adopts the piece.
                placed = put_block(piece, devices)
                job.buffers.update(zip(devices, placed, strict=True))
        return unit.nbytes

    def read_box(self, leaf: LazyLeaf, box: tuple[slice, ...]) -> np.ndarray:
        """leaf[box] as a host numpy array in the source dtype."""
        (value,) = self.read_boxes([leaf], [box])
        return value

    def read_boxes(self, leaves: Sequence[LazyLeaf], boxes: Sequence[tuple[slice, ...]],
                   outs: Sequence[np.ndarray | None] | None = None,
                   regions: Regions | None = None) -> Iterator[np.ndarray]:
        """leaf[box] of each pair, as host numpy arrays in the source dtype, in order.

        The arrays are opened (and the boxes checked against them) now; the
        reads stream: at most `_BOX_WINDOW_BYTES` of boxes are in flight (at
        least one box), each part is handed over as soon as it and those before
        it are read, and the next reads start as the consumer asks for more.

        Args:
          outs: per box, None or a writable array of the box's shape and the
            array's dtype (a view into the caller's block): the box is read
            straight into it and it is handed back, so no part of the box's
            size is ever allocated here. One that does not fit is not used.
          regions: where a box that cuts through chunks finds the chunk-aligned
            region an earlier box read (and leaves the one it reads), so that
            a chunk is decoded once for all the target shards that need it.
        """
        reads = []
        self.start_opens(leaf.name for leaf in leaves)
        try:
            opened = [self.open(leaf.name) for leaf in leaves]
        except BaseException:
            self.cancel_opens()
            raise
        for k, (leaf, box, array) in enumerate(zip(leaves, boxes, opened, strict=True)):
            view = array[box]
            out = outs[k] if outs is not None else None
            reads.append(_BoxRead(leaf, array, view, out if _fits(out, view) else None, regions))
        if regions is not None:
            regions.keep_only({r.key for r in reads if r.key is not None})
        return self._stream(reads)

    def _stream(self, reads: list[_BoxRead]) -> Iterator[np.ndarray]:
        """The reads, in order, a window of `_BOX_WINDOW_BYTES` in flight."""
        flight: collections.deque[tuple[_BoxRead, Any]] = collections.deque()
        pending: set[Any] = set()  # regions being read by a read in flight
        in_flight = 0
        started = 0
        try:
            while started < len(reads) or flight:
                # Refill only when asked for a part: the part handed over last is
                # the consumer's until then, and counts against its block, not here.
                while started < len(reads) and (
                        not flight or in_flight + reads[started].nbytes <= _BOX_WINDOW_BYTES):
                    read = reads[started]
                    future = read.start(pending)
                    flight.append((read, future))
                    in_flight += read.nbytes if future is not None else 0
                    started += 1
                read, future = flight[0]
                got = None
                if future is not None:
                    got = self.location.wait(future, f"reading array {read.leaf.name!r} of")
                    in_flight -= read.nbytes
                flight.popleft()
                del future
                value = read.finish(got, self)
                del got, read
                yield value
                del value
        finally:
            # A failed read or a consumer that stopped early (the generator closed):
            # nothing keeps reading.
            for _, future in flight:
                if future is not None:
                    future.cancel()
            flight.clear()

    def box_nbytes(self, leaf: LazyLeaf, box: tuple[slice, ...]) -> int:
        """Bytes of the chunks that hold box (what a read of it decodes)."""
        array = self.open(leaf.name)
        itemsize = np.dtype(array.dtype.numpy_dtype).itemsize
        return box_nbytes(tuple(array.shape), chunk_shape(array), itemsize, box)


def _child_context(parent: Any) -> Any:
    """A tensorstore context under parent whose decoded chunks are never cached."""
    import tensorstore as ts

    return ts.Context({"cache_pool#chunks": {"total_bytes_limit": 0}}, parent=parent)


class _LeafError(CheckpointError):
    """A read of one array failed: the caller names the checkpoint and the count."""

    def __init__(self, name: str, error: CheckpointError):
        why = reason(error)
        super().__init__(f"array {name!r}: {why}")
        self.reason = why


def _fits(out: np.ndarray | None, view: Any) -> bool:
    """Whether out can take a read of view: a writable array of its shape and dtype."""
    return (isinstance(out, np.ndarray) and out.flags.writeable
            and tuple(out.shape) == tuple(view.shape)
            and out.dtype == np.dtype(view.dtype.numpy_dtype))


def _as_dtype(value: np.ndarray, dtype: Any) -> np.ndarray:
    if isinstance(dtype, np.dtype) and value.dtype != dtype:
        return value.astype(dtype)
    return value
