"""Array bytes read straight from tensorstore: each target shard reads its own slice.

orbax saves each array as a zarr (v2 or v3) array in its OCDBT store. For a
checkpoint whose metadata `metadata.lazy_metadata` could read, this module
opens those arrays with tensorstore over the location's own kvstore and reads,
for every addressable device of the target's sharding, exactly the slice that
device holds, then places it there. One tensorstore context per read call
holds a bounded chunk cache shared by every array and shard of that call, so
a chunk that several shards need is fetched and decoded once.

Anything this reader does not know (typed PRNG keys, a layout its metadata did
not come from) is left to orbax's restore: `plan_direct` says which requests
it takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, first_line
from treegraft._read.metadata import LazyLeaf
from treegraft._source import ReadRequest

__all__ = ["DirectReader", "chunk_shape", "box_nbytes"]

_CACHE_MIN_BYTES = 64 << 20
_CACHE_MAX_BYTES = 1 << 30
_WINDOW_BYTES = 256 << 20  # bytes of reads in flight at once, at least


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


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for s, n in zip(index, shape, strict=False):
        start, stop, step = s.indices(n)
        if step != 1:
            raise CheckpointError("a shard index with a step is not a box")
        out.append((start, stop))
    out += [(0, n) for n in shape[len(out):]]
    return tuple(out)


class DirectReader:
    """Reads arrays of one checkpoint store with a shared bounded cache.

    Args:
      store: the checkpoint's metadata store (`metadata._Store`).
      chunk_bytes: a bound on the largest chunk the reads will touch (the
        largest array), so that the cache can hold it; the cache never grows
        past 1 GiB.
    """

    def __init__(self, store: Any, chunk_bytes: int = 0):
        import tensorstore as ts

        self.store = store
        self.location = store.location
        limit = min(max(_CACHE_MIN_BYTES, 2 * chunk_bytes), _CACHE_MAX_BYTES)
        self.context = ts.Context(
            {"cache_pool": {"total_bytes_limit": limit}, **self.location.context_spec()}
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

        Reads are started request by request and collected oldest first once
        more than a window of bytes (256 MB, or the largest request) is in
        flight, so peak memory stays near the bytes grafted.
        """
        pending: list[tuple[int, list[tuple[Any, Any]], int]] = []
        try:
            return self._read(leaves, requests, pending)
        except BaseException:
            for _, parts, _ in pending:  # nothing keeps reading after a failure
                for _, future in parts:
                    future.cancel()
            raise

    def _read(self, leaves: Sequence[LazyLeaf], requests: Sequence[ReadRequest],
              pending: list[tuple[int, list[tuple[Any, Any]], int]]) -> list[Any]:
        out: list[Any] = [None] * len(requests)
        in_flight = 0
        for i, (leaf, req) in enumerate(zip(leaves, requests, strict=True)):
            array = self.open(leaf.name)
            if tuple(array.shape) != tuple(leaf.shape):
                raise CheckpointError(
                    f"array {leaf.name!r} of {self.location} has shape {tuple(array.shape)} in "
                    f"its header but {tuple(leaf.shape)} in the metadata"
                )
            parts, nbytes = self._submit(array, req)
            pending.append((i, parts, nbytes))
            in_flight += nbytes
            while in_flight > _WINDOW_BYTES and len(pending) > 1:
                j, parts0, nbytes0 = pending[0]
                out[j] = self._finish(requests[j], leaves[j], parts0)
                pending.pop(0)
                in_flight -= nbytes0
        while pending:
            j, parts, _ = pending[0]
            out[j] = self._finish(requests[j], leaves[j], parts)
            pending.pop(0)
        return out

    def _submit(self, array: Any, req: ReadRequest) -> tuple[list[tuple[Any, Any]], int]:
        """Starts the reads of one request: ([(device or None, future)], bytes read)."""
        like = req.like
        shape = tuple(array.shape)
        itemsize = np.dtype(array.dtype.numpy_dtype).itemsize
        if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
            sharding = like.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            index_map = sharding.addressable_devices_indices_map(shape)
            futures: dict[tuple[tuple[int, int], ...], Any] = {}
            parts = []
            nbytes = 0
            for device, index in index_map.items():
                box = _normalize(tuple(index or ()), shape) if shape else ()
                future = futures.get(box)
                if future is None:  # replicated shards read their slice once
                    future = futures[box] = array[tuple(slice(a, b) for a, b in box)].read()
                    nbytes += itemsize * math.prod(b - a for a, b in box)
                parts.append((device, future))
            return parts, nbytes
        return [(None, array.read())], itemsize * math.prod(shape)

    def _finish(self, req: ReadRequest, leaf: LazyLeaf, parts: list[tuple[Any, Any]]) -> Any:
        like = req.like
        seen: set[int] = set()
        hosts = []
        for device, future in parts:
            try:
                value = self.location.wait(future, f"reading array {leaf.name!r} of")
            except CheckpointError as e:
                raise _LeafError(leaf.name, e) from e.__cause__
            value = np.asarray(value)
            if id(future) in seen:  # replicas must not share a host buffer (DESIGN 12)
                value = value.copy()
            seen.add(id(future))
            value = _as_dtype(value, req.dtype)
            hosts.append((device, value))
        if parts[0][0] is None:
            return hosts[0][1]
        shape = tuple(like.shape)
        sharding = like.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with jax.transfer_guard("allow"):
            buffers = [jax.device_put(value, device) for device, value in hosts]
            return jax.make_array_from_single_device_arrays(shape, sharding, buffers)

    def read_box(self, leaf: LazyLeaf, box: tuple[slice, ...]) -> np.ndarray:
        """leaf[box] as a host numpy array in the source dtype."""
        array = self.open(leaf.name)
        return np.asarray(
            self.location.wait(array[box].read(), f"reading array {leaf.name!r} of")
        )

    def box_nbytes(self, leaf: LazyLeaf, box: tuple[slice, ...]) -> int:
        """Bytes of the chunks that hold box (what a read of it decodes)."""
        array = self.open(leaf.name)
        itemsize = np.dtype(array.dtype.numpy_dtype).itemsize
        return box_nbytes(tuple(array.shape), chunk_shape(array), itemsize, box)


class _LeafError(CheckpointError):
    """A read of one array failed: the caller names the checkpoint and the count."""

    def __init__(self, name: str, error: CheckpointError):
        cause = error.__cause__
        if cause is None or isinstance(cause, TimeoutError):
            reason = str(error)
        else:
            kind, line = first_line(cause)
            reason = f"{kind}: {line}"
        super().__init__(f"array {name!r}: {reason}")
        self.reason = reason


def _as_dtype(value: np.ndarray, dtype: Any) -> np.ndarray:
    if isinstance(dtype, np.dtype) and value.dtype != dtype:
        return value.astype(dtype)
    return value
