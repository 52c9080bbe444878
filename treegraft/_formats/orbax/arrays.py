"""Array bytes read straight from tensorstore: each target shard reads its own slice.

orbax saves each array as a zarr (v2 or v3) array in its OCDBT store. For a
checkpoint whose metadata `metadata.lazy_metadata` could read, this module
opens those arrays with tensorstore over the location's own kvstore and reads,
for every addressable device of the target's sharding, exactly the slice that
device holds, then places it there. One tensorstore context per read call,
with a bounded cache (64 MiB: the OCDBT index and headers), serves every array
and shard of that call; the slices of one array are read together, so a chunk
that several shards need is fetched and decoded once (tensorstore joins the
reads of a chunk in flight).

Anything this reader does not know (typed PRNG keys, a layout its metadata did
not come from) is left to orbax's restore: `takes` says which requests
it takes.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, describe_leaf
from treegraft._formats.orbax.headers import LazyLeaf
from treegraft._insert.placement import assemble, devices_by_box, put_block, sharding_of
from treegraft._parse.paths import render_parts
from treegraft._read.source import ReadRequest
from treegraft._storage.errors import reason

__all__ = ["DirectReader", "chunk_shape", "box_nbytes"]

_CACHE_BYTES = 64 << 20
_WINDOW_BYTES = 256 << 20  # bytes of reads in flight at once, at least
# Box bytes a `read_boxes` stream keeps in flight: host memory then holds the
# consumer's block and at most this much of its parts. 16 MiB of reads keep the
# storage busy; a wider window only raises the peak (rule_ops stack benchmark).
_BOX_WINDOW_BYTES = 16 << 20


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
    """One slice being read, for the devices that hold it."""

    __slots__ = ("job", "devices", "future", "nbytes", "out")

    def __init__(self, job: _Job, devices: list[Any], future: Any, nbytes: int,
                 out: np.ndarray):
        self.job = job
        self.devices = devices
        self.future = future
        self.nbytes = nbytes
        self.out: np.ndarray | None = out


class DirectReader:
    """Reads arrays of one checkpoint store with a shared bounded cache.

    Args:
      store: the checkpoint's metadata store (`headers.OrbaxStore`).
    """

    def __init__(self, store: Any):
        import tensorstore as ts

        self.store = store
        self.location = store.location
        # The cache keeps the OCDBT index and zarr headers, not array chunks: a
        # chunk several slices need is shared by reads in flight together.
        self.context = ts.Context(
            {"cache_pool": {"total_bytes_limit": _CACHE_BYTES}, **self.location.context_spec()}
        )
        self._open: dict[str, Any] = {}

    def open(self, name: str) -> Any:
        """The tensorstore array saved under name (opened once per reader)."""
        import tensorstore as ts

        array = self._open.get(name)
        if array is None:
            spec = dict(self.store.spec(name), fill_missing_data_reads=self.store.fill_missing)
            array = self._open[name] = self.location.wait(
                ts.open(spec, open=True, read=True, context=self.context),
                f"opening array {name!r} of",
            )
        return array

    def read(self, leaves: Sequence[LazyLeaf], requests: Sequence[ReadRequest]) -> list[Any]:
        """The requested leaves, each placed like its target, in the source dtype.

        Every distinct slice (a target shard; replicas read theirs once) is one
        read; a request's slices start together. Before a request starts, the
        oldest slices are moved to their devices until less than a window of
        bytes (256 MB, or the request) is in flight; each host slice is dropped
        once placed, so peak memory stays near the bytes grafted plus the window.
        """
        units: collections.deque[_Unit] = collections.deque()
        try:
            return self._read(leaves, requests, units)
        except BaseException:
            for unit in units:  # nothing keeps reading after a failure
                if unit.future is not None:
                    unit.future.cancel()
            raise

    def _read(self, leaves: Sequence[LazyLeaf], requests: Sequence[ReadRequest],
              units: collections.deque[_Unit]) -> list[Any]:
        import tensorstore as ts

        jobs = []
        in_flight = 0
        for leaf, req in zip(leaves, requests, strict=True):
            array = self.open(leaf.name)
            check_unchanged(leaf, array, req, self.location)
            job = _Job(leaf, req)
            jobs.append(job)
            itemsize = np.dtype(array.dtype.numpy_dtype).itemsize
            slices = _slices(req.like, tuple(array.shape))
            sizes = [itemsize * math.prod(b - a for a, b in box) for box in slices]
            # A request's slices start together: slices sharing a chunk then share
            # one fetch and decode of it (tensorstore joins reads of a chunk in flight).
            while units and in_flight + sum(sizes) > _WINDOW_BYTES:
                in_flight -= self._place(units.popleft())
            for (box, devices), nbytes in zip(slices.items(), sizes, strict=True):
                source = array[tuple(slice(a, b) for a, b in box)]
                # Read into an aligned buffer of ours: on CPU, device_put then adopts
                # it without a copy, so peak memory stays at the bytes grafted.
                out = _aligned_empty(tuple(b - a for a, b in box), array.dtype.numpy_dtype)
                future = ts.array(out, copy=False, write=True).write(source)
                units.append(_Unit(job, devices, future, nbytes, out))
                in_flight += nbytes
        while units:
            self._place(units[0])
            units.popleft()
        return [job.result() for job in jobs]

    def _place(self, unit: _Unit) -> int:
        """Waits for one slice and puts it on its devices; returns its bytes."""
        job = unit.job
        future, unit.future = unit.future, None
        host, unit.out = unit.out, None
        try:
            self.location.wait(future, f"reading array {job.leaf.name!r} of")
        except CheckpointError as e:
            raise _LeafError(job.leaf.name, e) from e.__cause__
        del future
        assert host is not None
        host = _as_dtype(host, job.req.dtype)
        if unit.devices == [None]:
            job.host = host
            return unit.nbytes
        with jax.transfer_guard("allow"):
            # Replicas get their own buffers (docs/design.md section 12); the first adopts host.
            placed = put_block(host, unit.devices)
            job.buffers.update(zip(unit.devices, placed, strict=True))
        return unit.nbytes

    def read_box(self, leaf: LazyLeaf, box: tuple[slice, ...]) -> np.ndarray:
        """leaf[box] as a host numpy array in the source dtype."""
        (value,) = self.read_boxes([leaf], [box])
        return value

    def read_boxes(self, leaves: Sequence[LazyLeaf],
                   boxes: Sequence[tuple[slice, ...]]) -> Iterator[np.ndarray]:
        """leaf[box] of each pair, as host numpy arrays in the source dtype, in order.

        The arrays are opened (and the boxes checked against them) now; the
        reads stream: at most `_BOX_WINDOW_BYTES` of boxes are in flight (at
        least one box), each part is handed over as soon as it and those before
        it are read, and the next reads start as the consumer asks for more.
        The boxes of one call (a stack's layers) go through this reader's one
        context, so a chunk two boxes in flight share is fetched and decoded once.
        """
        views = [self.open(leaf.name)[box] for leaf, box in zip(leaves, boxes, strict=True)]
        sizes = [math.prod(view.shape) * np.dtype(view.dtype.numpy_dtype).itemsize
                 for view in views]
        return self._stream(list(leaves), views, sizes)

    def _stream(self, leaves: list[LazyLeaf], views: list[Any],
                sizes: list[int]) -> Iterator[np.ndarray]:
        """The reads of views, in order, a window of `_BOX_WINDOW_BYTES` in flight."""
        flight: collections.deque[tuple[LazyLeaf, Any, int]] = collections.deque()
        in_flight = 0
        started = 0
        try:
            while started < len(views) or flight:
                # Refill only when asked for a part: the part handed over last is
                # the consumer's until then, and counts against its block, not here.
                while started < len(views) and (
                        not flight or in_flight + sizes[started] <= _BOX_WINDOW_BYTES):
                    flight.append((leaves[started], views[started].read(), sizes[started]))
                    in_flight += sizes[started]
                    started += 1
                leaf, future, nbytes = flight[0]
                value = np.asarray(self.location.wait(future, f"reading array {leaf.name!r} of"))
                flight.popleft()
                in_flight -= nbytes
                del future
                yield value
                del value
        finally:
            # A failed read or a consumer that stopped early (the generator closed):
            # nothing keeps reading.
            for _, future, _ in flight:
                future.cancel()
            flight.clear()

    def box_nbytes(self, leaf: LazyLeaf, box: tuple[slice, ...]) -> int:
        """Bytes of the chunks that hold box (what a read of it decodes)."""
        array = self.open(leaf.name)
        itemsize = np.dtype(array.dtype.numpy_dtype).itemsize
        return box_nbytes(tuple(array.shape), chunk_shape(array), itemsize, box)


class _LeafError(CheckpointError):
    """A read of one array failed: the caller names the checkpoint and the count."""

    def __init__(self, name: str, error: CheckpointError):
        why = reason(error)
        super().__init__(f"array {name!r}: {why}")
        self.reason = why


_ALIGN = 64  # what XLA's CPU client needs to adopt a host buffer without copying


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = max(int(math.prod(shape)) * dtype.itemsize, 1)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset:offset + nbytes][: int(math.prod(shape)) * dtype.itemsize].view(
        dtype).reshape(shape)


def _as_dtype(value: np.ndarray, dtype: Any) -> np.ndarray:
    if isinstance(dtype, np.dtype) and value.dtype != dtype:
        return value.astype(dtype)
    return value
