"""A lazy source over Hugging Face safetensors files.

A `.safetensors` file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}}`, optionally `"__metadata__"`),
then the tensors' bytes, each C-ordered, at its `data_offsets` from the end of
the header. A sharded model is a folder with `model.safetensors.index.json`,
whose `weight_map` names the file that holds each tensor.

Metadata comes from the headers alone. A read fetches, for each target shard,
only the bytes of its box: a range of rows of a C-ordered tensor is one
contiguous byte range; any other box is read as the smallest such range that
covers it, then sliced. Boxes that overlap are read once.

Headers are read through a tensorstore kvstore (`_kvstore`), and so is tensor
data wherever the checkpoint is not a local folder, so that `gs://` and `s3://`
work through the storage layer. Local tensor data is read with `os.preadv`
straight into the result's buffer: tensorstore's file driver returns each read
as a new `bytes` object, which costs two more copies (measured 2-3x slower than
`safetensors.safe_open` on a 1 GiB model; `benchmarks/safetensors_case.py`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from treegraft._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    GraftError,
    PathNotFoundError,
    PathSyntaxError,
    first_line,
    suggest,
)
from treegraft._parse.paths import Part, Path, parse_path, render_parts
from treegraft._read.source import ReadRequest, Source
from treegraft._read.storage import Location

__all__ = ["SafetensorsCheckpoint", "TensorInfo"]

INDEX_NAME = "model.safetensors.index.json"
_SUFFIX = ".safetensors"
# safetensors itself refuses headers above 100 MB; a larger length means the
# file is not a safetensors file (or its first 8 bytes are damaged).
_MAX_HEADER = 100_000_000
# Bytes of reads issued ahead of the tensor being assembled (a tensor's own
# ranges are always issued): bounds the host memory a read needs beyond its
# results.
_WINDOW_BYTES = 64 * 2**20
# Largest single kvstore read. tensorstore's file driver reads a 96 MiB range in
# 0.3 s but the same bytes as 1 MiB reads in 0.075 s (measured, warm page cache).
_CHUNK_BYTES = 2**20

# The dtypes safetensors writes, with the names jax and ml_dtypes give them.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}


Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


class TensorInfo:
    """Metadata of one stored tensor: shape, dtype, and where its bytes are.

    Attributes:
      name: the tensor's name in the file header.
      shape: its shape.
      dtype: its numpy dtype (bf16 and fp8 as ml_dtypes name them).
      file: the file that holds it (a name in the checkpoint's folder).
      begin: the offset of its first byte in that file.
      end: the offset just past its last byte.
    """

    __slots__ = ("name", "shape", "dtype", "file", "begin", "end")

    def __init__(
        self, name: str, shape: tuple[int, ...], dtype: np.dtype, file: str, begin: int, end: int
    ):
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.file = file
        self.begin = begin
        self.end = end

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in the file."""
        return self.end - self.begin

    def __repr__(self) -> str:
        dims = ", ".join(map(str, self.shape))
        return f"TensorInfo({self.dtype}[{dims}] in {self.file})"


def _kvstore(location: Location) -> Any:
    """Opens the kvstore of a folder (local, gs://, s3://); keys are the file names in it."""
    import tensorstore as ts

    context = ts.Context(location.context_spec())
    return location.wait(ts.KvStore.open(location.kvstore(), context=context), "opening")


def _local_folder(location: Location) -> str | None:
    """The local folder of location, whose tensor data is read with `os.preadv`;
    None to read it through `_kvstore` (remote locations)."""
    return location.os_path if location.is_local else None


class SafetensorsCheckpoint(Source):
    """A lazy source over Hugging Face safetensors weights.

    Tensor names are paths: `model.layers.0.mlp.up_proj.weight` is the leaf
    `('model', 'layers', 0, 'mlp', 'up_proj', 'weight')` of the metadata tree
    (nested dicts; an all-digit segment is an int key). Metadata comes from the
    file headers alone. Each target shard then reads only its byte range of
    each tensor, in the stored dtype; a tensor is read once per read call even
    when several shards hold the same rows. Reading never writes: the files
    are byte-identical afterwards.

    Args:
      path: a `.safetensors` file, or a folder holding
        `model.safetensors.index.json` and the shards its `weight_map` names
        (or a folder holding a single `.safetensors` file). `~` is expanded.

    Raises:
      CheckpointNotFoundError: path does not exist.
      CheckpointError: path is not a str or PathLike, or a folder without an
        index and not exactly one `.safetensors` file.

    Example:
      >>> import treegraft as tg
      >>> src = tg.SafetensorsCheckpoint('/models/llama')               # doctest: +SKIP
      >>> src.metadata()['model']['layers'][0]['mlp']['up_proj']['weight']  # doctest: +SKIP
      TensorInfo(bfloat16[11008, 4096] in model-00001-of-00002.safetensors)
      >>> mapping = {'embed.embedding': 'model.embed_tokens.weight'}
      >>> state = tg.graft(state, src, mapping)                         # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]):
        if not isinstance(path, str | os.PathLike):
            raise CheckpointError(
                f"a safetensors path must be a str or os.PathLike, got {type(path).__name__}"
            )
        location = Location.parse(path, what="a safetensors path")
        self.path = str(location)
        kind = location.kind("safetensors checkpoint")
        if kind is None:
            raise CheckpointNotFoundError(f"safetensors checkpoint {self.path!r} does not exist")
        if kind == "dir":
            self.folder = self.path
            self._loc = location
            self._index: str | None = None
            self._single: str | None = None
            names = location.listdir("safetensors folder")
            if INDEX_NAME in names:
                self._index = INDEX_NAME
            else:
                files = sorted(f for f in names if f.endswith(_SUFFIX))
                if len(files) != 1:
                    listed = ", ".join(files[:10]) or "none"
                    raise CheckpointError(
                        f"{self.path!r} has no {INDEX_NAME} and holds {len(files)} "
                        f"{_SUFFIX} files ({listed}): pass one file, or add the index "
                        "that Hugging Face writes beside sharded weights"
                    )
                self._single = files[0]
        else:
            self.folder, self._single = self.path.rstrip("/").rsplit("/", 1)
            self._loc = Location.parse(self.folder, what="a safetensors folder")
            self._index = None
        self._kv: Any = None
        self._fds: dict[str, int] = {}  # local files opened for reading data
        weakref.finalize(self, _close_fds, self._fds)
        self._stats: dict[str, tuple[int, int, int]] = {}  # (inode, size, mtime) at header read
        self._closed = False
        self._tree: dict[Any, Any] | None = None
        self._by_parts: dict[tuple[Part, ...], TensorInfo] = {}
        self._file_metadata: dict[str, dict[str, str]] = {}
        self._generations: dict[str, bytes] = {}  # of each file when its header was read

    # -- the Source interface ---------------------------------------------------

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({self.path!r})"

    def describe(self) -> str:
        return f"the safetensors checkpoint {self.path}"

    def metadata(self) -> Any:
        """The tensors as a tree of nested dicts whose leaves are `TensorInfo`s.

        Reads only the headers (and, per file, one byte at the end of its data
        to check that the file is whole). Cached after the first call.

        Raises:
          CheckpointError: a header or the index is damaged; the message names
            the file and what is wrong.
        """
        if self._tree is None:
            infos = self._read_headers()
            self._tree, self._by_parts = _build_tree(infos, self.describe())
        return self._tree

    @property
    def header_metadata(self) -> dict[str, dict[str, str]]:
        """Each file's `__metadata__` (free-form strings), by file name."""
        self.metadata()
        return dict(self._file_metadata)

    def read(self, requests: Sequence[ReadRequest]) -> list[Any]:
        """Reads the requested tensors, each placed like its `like`, in order.

        A `like` that is a `jax.Array` or a `jax.ShapeDtypeStruct` gives a
        `jax.Array` with its sharding (one device if it has none), built shard
        by shard from the bytes that shard needs; any other like gives a numpy
        array. Values keep the stored dtype (the caller casts) and own their
        memory.

        Raises:
          PathNotFoundError: a requested path is not a tensor of this checkpoint.
          CheckpointError: the file cannot be read or has changed.
        """
        if not requests:
            return []
        jobs: list[tuple[TensorInfo, list[Box], Any]] = []
        for req in requests:
            info = self._info(req.path)
            like = req.like
            if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
                sharding = like.sharding
                if sharding is None:
                    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                indices = sharding.addressable_devices_indices_map(info.shape)
                boxes = list(
                    dict.fromkeys(_box(index or (), info.shape) for index in indices.values())
                )
                jobs.append((info, boxes, sharding))
            else:
                jobs.append((info, [_full_box(info.shape)], None))
        out: list[Any] = []
        for (info, boxes, sharding), pieces in zip(
            jobs, self._fetch([(info, boxes) for info, boxes, _ in jobs]), strict=True
        ):
            if sharding is None:
                out.append(pieces[boxes[0]])
                continue
            out.append(_assemble(info, sharding, pieces))
        return out

    def read_boxes(self, requests: Sequence[Any]) -> list[np.ndarray]:
        """Reads boxes of tensors to host arrays: `tensor[box]` for each request.

        Args:
          requests: objects with `.path` (a `Path` or path string naming a
            tensor) and `.box` (a tuple of slices, one per axis, step 1).

        Returns:
          One numpy array per request, in order, in the stored dtype, each
          owning its memory. Only the smallest range of rows covering each box
          is read; boxes of one tensor that overlap are read once.

        Raises:
          GraftError: a box is not one slice per axis with step 1 inside the shape.
          PathNotFoundError, CheckpointError: as `read`.
        """
        by_tensor: dict[int, tuple[TensorInfo, list[Box]]] = {}
        wanted: list[tuple[int, Box]] = []
        for req in requests:
            info = self._info(req.path)
            box = _check_box(req.box, info)
            entry = by_tensor.setdefault(id(info), (info, []))
            if box not in entry[1]:
                entry[1].append(box)
            wanted.append((id(info), box))
        keys = list(by_tensor)
        fetched = dict(zip(keys, self._fetch([by_tensor[k] for k in keys]), strict=True))
        out, given = [], set()
        for k, box in wanted:
            piece = fetched[k][box]
            # The same box asked twice: each request gets its own array.
            out.append(piece.copy() if (k, box) in given else piece)
            given.add((k, box))
        return out

    def box_nbytes(self, path: Path | str, box: tuple[slice, ...]) -> int:
        """Bytes that reading `box` of the tensor at path alone really reads.

        The smallest range of rows that covers the box; boxes of one tensor read
        in one `read_boxes` call share the bytes of their overlapping ranges.

        Raises:
          GraftError: the box is not one slice per axis with step 1 inside the shape.
          PathNotFoundError: path is not a tensor of this checkpoint.
        """
        info = self._info(path)
        begin, end = _covering(info, _check_box(box, info))[:2]
        return end - begin

    def close(self) -> None:
        """Closes the files and the kvstore; later reads raise `CheckpointError`."""
        _close_fds(self._fds)
        self._kv = None
        self._closed = True

    # -- internals --------------------------------------------------------------

    def _store(self) -> Any:
        if self._closed:
            raise CheckpointError(
                f"{self.describe()} is closed: open a new SafetensorsCheckpoint to read from it"
            )
        if self._kv is None:
            self._kv = _kvstore(self._loc)
        return self._kv

    def _info(self, path: Path | str) -> TensorInfo:
        self.metadata()
        parts = parse_path(path).parts if isinstance(path, str) else tuple(path.parts)
        info = self._by_parts.get(parts)
        if info is None:
            loose = tuple(str(p) if type(p) is int else p for p in parts)
            for key, candidate in self._by_parts.items():
                if tuple(str(p) if type(p) is int else p for p in key) == loose:
                    return candidate
            names = [render_parts(k) for k in self._by_parts]
            raise PathNotFoundError(
                f"{render_parts(parts)!r} is not a tensor of {self.describe()}"
                f"{suggest(render_parts(parts), names)}"
            )
        return info

    def _read_headers(self) -> list[TensorInfo]:
        kv = self._store()
        if self._index is not None:
            names = _read_index(kv, self._index, self.folder)
            files = sorted(set(names.values()))
        else:
            names = None
            files = [str(self._single)]
        gens: dict[str, bytes] = {}
        lengths = {f: kv.read(f, byte_range=slice(0, 8)) for f in files}
        sizes: dict[str, int] = {}
        for f, future in lengths.items():
            raw = _result(
                future, f, self.folder, "its header length", bytes_wanted=8, generations=gens
            )
            if len(raw) < 8:
                raise CheckpointError(
                    f"{_where(self.folder, f)} is truncated: it has {len(raw)} byte(s), fewer than "
                    "the 8 of a safetensors header length"
                )
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise CheckpointError(
                    f"{_where(self.folder, f)} is not a safetensors file: its first 8 bytes give "
                    f"a header of {n} bytes (at most {_MAX_HEADER} allowed)"
                )
            sizes[f] = n
        headers = {f: kv.read(f, byte_range=slice(8, 8 + sizes[f])) for f in files}
        infos: list[TensorInfo] = []
        ends: dict[str, int] = {}
        for f, future in headers.items():
            raw = _result(
                future,
                f,
                self.folder,
                f"its {sizes[f]}-byte header",
                bytes_wanted=8 + sizes[f],
                generations=gens,
            )
            parsed, meta = _parse_header(raw, f, self.folder, 8 + sizes[f])
            if meta:
                self._file_metadata[f] = meta
            ends[f] = max((i.end for i in parsed), default=8 + sizes[f])
            if names is None:
                infos.extend(parsed)
            else:
                held = {i.name: i for i in parsed}
                for name in [n for n, file in names.items() if file == f]:
                    if name not in held:
                        raise CheckpointError(
                            f"{_where(self.folder, INDEX_NAME)} maps tensor {name!r} to {f}, "
                            f"but the header of {f} has no such tensor{_close(name, held)}"
                        )
                    infos.append(held[name])
        # The last data byte of each file must exist: else the file is truncated.
        probes = {
            f: kv.read(f, byte_range=slice(end - 1, end)) for f, end in ends.items() if end > 0
        }
        for f, future in probes.items():
            _result(
                future,
                f,
                self.folder,
                "the end of its data",
                bytes_wanted=ends[f],
                generations=gens,
            )
        self._generations = gens
        local = _local_folder(self._loc)
        if local is not None:
            for f in files:
                st = os.stat(os.path.join(local, f))
                self._stats[f] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return infos

    def _pread(self, info: TensorInfo, begin: int, buffer: np.ndarray) -> None:
        """Fills buffer with the local file's bytes from begin (one read syscall, or a few)."""
        where = _where(self.folder, info.file)
        fd = self._fds.get(info.file)
        try:
            if fd is None:
                fd = self._fds[info.file] = os.open(where, os.O_RDONLY)
            st = os.fstat(fd)
        except OSError as e:
            raise CheckpointError(
                f"cannot read tensor {info.name!r} from {where}: {type(e).__name__}: {e}"
            ) from e
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stats.get(info.file):
            raise CheckpointError(
                f"{where} has changed since its header was read (reading tensor "
                f"{info.name!r}): open a new SafetensorsCheckpoint to read the new file"
            )
        view = buffer.data
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], begin + done)
            except OSError as e:
                raise CheckpointError(
                    f"cannot read tensor {info.name!r} from {where}: {type(e).__name__}: {e}"
                ) from e
            if n == 0:
                raise CheckpointError(
                    f"{where} is truncated or damaged: reading tensor {info.name!r} needs "
                    f"{begin + len(view)} bytes but the file has {st.st_size}"
                )
            done += n

    def _fetch(
        self, jobs: Sequence[tuple[TensorInfo, list[Box]]]
    ) -> Iterator[dict[Box, np.ndarray]]:
        """Yields, per job, its boxes as host arrays that own their memory.

        Each job's boxes are grouped into byte ranges (overlapping ones merged).
        Through tensorstore, a range is read as sub-reads of at most
        `_CHUNK_BYTES`, issued ahead within a window of `_WINDOW_BYTES` in
        flight; locally, with one `os.preadv`. A box that is a whole range is
        that range's new buffer; other boxes are copied out of a scratch buffer
        kept for the whole call (allocating and freeing a large buffer per
        tensor costs more than reading it: measured 10x slower reads).
        """
        kv = self._store()
        local = _local_folder(self._loc)
        plans = [_merge(info, boxes) for info, boxes in jobs]
        order = [(j, k) for j, (ranges, _) in enumerate(plans) for k in range(len(ranges))]
        pending: dict[tuple[int, int], list[tuple[int, Any]]] = {}
        scratch = np.empty(0, np.uint8)
        in_flight = 0
        issued = 0
        for j, ((info, _), (ranges, where)) in enumerate(zip(jobs, plans, strict=True)):
            # Issue this job's ranges, and later ones while the window allows.
            while issued < len(order):
                jj, kk = order[issued]
                b, e = plans[jj][0][kk]
                if jj > j and in_flight + (e - b) > _WINDOW_BYTES:
                    break
                file = jobs[jj][0].file
                reads = (
                    []
                    if local is not None
                    else [
                        (o, kv.read(file, byte_range=slice(b + o, min(e, b + o + _CHUNK_BYTES))))
                        for o in range(0, e - b, _CHUNK_BYTES)
                    ]
                )
                pending[(jj, kk)] = reads
                in_flight += e - b
                issued += 1
            stored = _stored(info.dtype)
            pieces: dict[Box, np.ndarray] = {}
            for k, (b, e) in enumerate(ranges):
                reads = pending.pop((j, k))
                in_flight -= e - b
                boxes = [(box, w) for box, w in where.items() if w[0] == k]
                if any(_nbytes(w[4], info) == e - b for _, w in boxes):
                    buffer = _aligned(e - b)  # a box is this whole range: it keeps the buffer
                else:
                    if len(scratch) < e - b:
                        scratch = _aligned(e - b)
                    buffer = scratch[: e - b]
                if local is not None:
                    self._pread(info, b, buffer)
                for o, future in reads:
                    raw = _result(
                        future,
                        info.file,
                        self.folder,
                        f"tensor {info.name!r}",
                        bytes_wanted=min(e, b + o + _CHUNK_BYTES),
                        generations=self._generations,
                    )
                    if len(raw) != min(e - b - o, _CHUNK_BYTES):
                        raise CheckpointError(
                            f"reading tensor {info.name!r} from "
                            f"{_where(self.folder, info.file)} gave {len(raw)} bytes instead "
                            f"of {min(e - b - o, _CHUNK_BYTES)}: has the file changed since it "
                            "was opened? Open a new SafetensorsCheckpoint"
                        )
                    buffer[o : o + len(raw)] = np.frombuffer(raw, np.uint8)
                buf = buffer.view(stored)
                # Every box of this range is taken out before the scratch is reused.
                for box, (_, offset, sub_shape, inner, shape) in boxes:
                    piece = buf[offset : offset + math.prod(sub_shape)].reshape(sub_shape)[inner]
                    piece = np.asarray(piece).reshape(shape)
                    if piece.nbytes != buf.nbytes:
                        # A copy, aligned as the buffer is: never keep a larger buffer alive.
                        copy = _aligned(piece.nbytes).view(piece.dtype).reshape(piece.shape)
                        copy[...] = piece
                        piece = copy
                    pieces[box] = piece if piece.dtype == info.dtype else piece.astype(info.dtype)
            yield pieces


def _close_fds(fds: dict[str, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


def _assemble(info: TensorInfo, sharding: Any, pieces: dict[Box, np.ndarray]) -> jax.Array:
    """A jax.Array in sharding whose every device shard is its piece."""

    def shard(index: tuple[slice, ...] | None) -> np.ndarray:
        return pieces[_box(index or (), info.shape)]

    return jax.make_array_from_callback(info.shape, sharding, shard, dtype=info.dtype)


def _aligned(n: int, align: int = 64) -> np.ndarray:
    """A new uint8 buffer of n bytes whose address is a multiple of align.

    jax on CPU then adopts it as a device buffer without copying it.
    """
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + n]


def _nbytes(shape: tuple[int, ...], info: TensorInfo) -> int:
    return math.prod(shape) * info.dtype.itemsize


def _stored(dtype: np.dtype) -> np.dtype:
    # safetensors stores little-endian whatever the machine.
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


# -- boxes and byte ranges ---------------------------------------------------------


def _full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, d) for d in shape)


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """A device's index (slices, maybe open-ended) as (start, stop) per axis."""
    out = []
    for k, dim in enumerate(shape):
        s = index[k] if k < len(index) else slice(None)
        start, stop, _ = s.indices(dim)
        out.append((start, max(start, stop)))
    return tuple(out)


def _check_box(box: Any, info: TensorInfo) -> Box:
    shape = info.shape
    ok = isinstance(box, tuple) and len(box) == len(shape)
    out = []
    if ok:
        for s, dim in zip(box, shape, strict=True):
            if not isinstance(s, slice) or s.step not in (None, 1):
                ok = False
                break
            start = 0 if s.start is None else s.start
            stop = dim if s.stop is None else s.stop
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= dim):
                ok = False
                break
            out.append((start, stop))
    if not ok:
        raise GraftError(
            f"box {box!r} for tensor {info.name!r} of shape {tuple(shape)} must be a tuple of "
            f"{len(shape)} slice(s) with step 1 and 0 <= start <= stop <= the axis length"
        )
    return tuple(out)


def _covering(info: TensorInfo, box: Box) -> tuple[int, int, tuple[int, ...], tuple[slice, ...]]:
    """The smallest range of rows that holds box, as absolute file offsets.

    Leading axes where the box takes one index are fixed; the rows are then
    taken along the next axis. Returns `(begin, end, sub_shape, inner)`: the
    bytes `[begin, end)` viewed as `sub_shape` and indexed by `inner` give the
    box (with the fixed axes dropped).
    """
    shape = info.shape
    itemsize = info.dtype.itemsize
    if not shape:
        return info.begin, info.end, (), ()
    if any(stop == start for start, stop in box):
        return info.begin, info.begin, (0,), (slice(None),)
    strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
    d = 0
    while d < len(shape) - 1 and box[d][1] - box[d][0] == 1:
        d += 1
    first = sum(box[k][0] * strides[k] for k in range(d)) + box[d][0] * strides[d]
    rows = box[d][1] - box[d][0]
    count = rows * strides[d]
    sub_shape = (rows, *shape[d + 1 :])
    inner = (slice(None), *(slice(a, b) for a, b in box[d + 1 :]))
    begin = info.begin + first * itemsize
    return begin, begin + count * itemsize, sub_shape, inner


def _merge(
    info: TensorInfo, boxes: Sequence[Box]
) -> tuple[
    list[tuple[int, int]],
    dict[Box, tuple[int, int, tuple[int, ...], tuple[slice, ...], tuple[int, ...]]],
]:
    """Byte ranges to read for boxes (overlapping ranges merged), and where each box is.

    Returns the ranges, and per box `(range index, element offset in it,
    sub_shape, inner, box shape)`.
    """
    itemsize = info.dtype.itemsize
    covers = {box: _covering(info, box) for box in boxes}
    spans = sorted({(b, e) for b, e, _, _ in covers.values()})
    ranges: list[tuple[int, int]] = []
    for b, e in spans:
        if ranges and b < ranges[-1][1]:  # overlaps the previous range: widen it
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], e))
        else:
            ranges.append((b, e))
    where = {}
    for box, (b, e, sub_shape, inner) in covers.items():
        k = next(i for i, (rb, re_) in enumerate(ranges) if rb <= b and e <= re_)
        shape = tuple(stop - start for start, stop in box)
        where[box] = (k, (b - ranges[k][0]) // itemsize, sub_shape, inner, shape)
    return ranges, where


# -- headers --------------------------------------------------------------------------


def _where(folder: str, name: str) -> str:
    return os.path.join(folder, name)


def _close(name: str, names: Any) -> str:
    return suggest(name, list(names))


_SIZE = re.compile(r"value of size (\d+)")


def _result(
    future: Any,
    file: str,
    folder: str,
    what: str,
    *,
    bytes_wanted: int | None = None,
    generations: dict[str, bytes] | None = None,
) -> bytes:
    """The bytes of a kvstore read, or a CheckpointError naming the file.

    With `generations`, the file's storage generation is recorded on its first
    read and must be the same on every later one: a file rewritten since its
    header was read would otherwise give bytes that do not match the header.
    """
    try:
        result = future.result()
    except Exception as e:  # tensorstore raises ValueError with a status code
        message = str(e)
        size = _SIZE.search(message)
        if "OUT_OF_RANGE" in message and size is not None and bytes_wanted is not None:
            raise CheckpointError(
                f"{_where(folder, file)} is truncated or damaged: reading {what} needs "
                f"{bytes_wanted} bytes but the file has {size.group(1)}"
            ) from e
        name, line = first_line(e)
        raise CheckpointError(
            f"cannot read {what} from {_where(folder, file)}: {name}: {line}"
        ) from e
    if result.state != "value":
        raise CheckpointError(
            f"{_where(folder, file)} does not exist (reading {what}); was it moved or deleted?"
        )
    if generations is not None:
        seen = generations.setdefault(file, result.stamp.generation)
        if seen != result.stamp.generation:
            raise CheckpointError(
                f"{_where(folder, file)} has changed since its header was read (reading "
                f"{what}): open a new SafetensorsCheckpoint to read the new file"
            )
    return bytes(result.value)


def _read_index(kv: Any, index: str, folder: str) -> dict[str, str]:
    raw = _result(kv.read(index), index, folder, "the index")
    where = _where(folder, index)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where} is not valid JSON: {e}") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f'{where} has no "weight_map" object of tensor name -> file name, as Hugging '
            "Face writes it"
        )
    listed = set(weight_map.values())
    for f in sorted(listed):
        if "/" in f or f in ("", ".", ".."):
            raise CheckpointError(
                f"{where} names shard {f!r}, which is not a file name in {folder}"
            )
    missing = sorted(f for f in listed if not _exists(kv, f))
    if missing:
        raise CheckpointError(
            f"{where} names {len(missing)} shard(s) that do not exist in {folder}: "
            + ", ".join(missing[:10])
        )
    return weight_map


def _exists(kv: Any, name: str) -> bool:
    # A 0-byte range read tells whether the key exists without reading it.
    try:
        return kv.read(name, byte_range=slice(0, 0)).result().state == "value"
    except Exception:  # noqa: BLE001  (a read error: let the header read report it)
        return True


def _parse_header(
    raw: bytes, file: str, folder: str, data_start: int
) -> tuple[list[TensorInfo], dict[str, str]]:
    where = _where(folder, file)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"the header of {where} is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"the header of {where} is a JSON {type(header).__name__}, not an object of tensors"
        )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"the __metadata__ of {where} is not a JSON object of strings")
    infos = []
    for name, entry in header.items():
        infos.append(_tensor_info(name, entry, file, where, data_start))
    ordered = sorted(infos, key=lambda i: (i.begin, i.end))
    for prev, nxt in zip(ordered, ordered[1:], strict=False):
        if nxt.begin < prev.end:
            raise CheckpointError(
                f"{where} is damaged: tensors {prev.name!r} (bytes {prev.begin - data_start}.."
                f"{prev.end - data_start}) and {nxt.name!r} (bytes {nxt.begin - data_start}.."
                f"{nxt.end - data_start}) overlap"
            )
    return infos, {str(k): str(v) for k, v in meta.items()}


def _tensor_info(name: str, entry: Any, file: str, where: str, data_start: int) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} in the header of {where}: {why}")

    if not isinstance(entry, dict):
        raise bad(f"expected an object with dtype, shape and data_offsets, got {entry!r:.80}")
    code = entry.get("dtype")
    if code not in DTYPES:
        raise bad(
            f"unknown dtype {code!r}; treegraft reads {', '.join(DTYPES)} (upgrade treegraft "
            "if the file was written by a newer safetensors)"
        )
    dtype = DTYPES[code]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r:.80}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.80}")
    needed = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != needed:
        dims = ", ".join(map(str, shape))
        raise bad(
            f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but "
            f"{code}[{dims}] takes {needed}"
        )
    return TensorInfo(
        name, tuple(shape), dtype, file, data_start + offsets[0], data_start + offsets[1]
    )


def name_to_parts(name: str) -> tuple[Part, ...]:
    """A tensor name as path parts: treegraft's parser, else a split on dots.

    `model.layers.0.mlp.up_proj.weight` -> `('model', 'layers', 0, 'mlp',
    'up_proj', 'weight')`. A name the path grammar refuses (`a-b.c`) is split
    on dots, all-digit segments becoming ints.
    """
    try:
        parts = parse_path(name).parts
    except PathSyntaxError:
        parts = tuple(int(s) if s.isdigit() else s for s in name.split("."))
    return parts


def _build_tree(
    infos: Sequence[TensorInfo], what: str
) -> tuple[dict[Any, Any], dict[tuple[Part, ...], TensorInfo]]:
    root: dict[Any, Any] = {}
    by_parts: dict[tuple[Part, ...], TensorInfo] = {}
    names: dict[tuple[Part, ...], str] = {}
    for info in infos:
        parts = name_to_parts(info.name)
        if not parts:
            raise CheckpointError(f"{what} has a tensor with an empty name")
        if parts in names:
            raise CheckpointError(
                f"{what}: tensors {names[parts]!r} and {info.name!r} are the same path "
                f"{render_parts(parts)!r}"
            )
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(
                    f"{what}: tensor {info.name!r} lies under tensor {child.name!r}; a name "
                    "cannot be both a tensor and a prefix of other tensors"
                )
            node = child
        if parts[-1] in node:
            other = next(n for p, n in names.items() if p[: len(parts)] == parts)
            raise CheckpointError(
                f"{what}: tensor {other!r} lies under tensor {info.name!r}; a name cannot be "
                "both a tensor and a prefix of other tensors"
            )
        node[parts[-1]] = info
        by_parts[parts] = info
        names[parts] = info.name
    if _unify_keys(root):
        by_parts = {}
        _leaf_parts(root, (), by_parts)
    return root, by_parts


def _unify_keys(node: dict[Any, Any]) -> bool:
    """Makes int keys strings in dicts that mix them with names; True if any changed.

    jax cannot flatten a dict whose keys do not sort (`{0: ..., 'norm': ...}`);
    an int path part still finds the string key `'0'`, as for orbax.
    """
    changed = False
    if len({type(k) for k in node}) > 1:
        for k in [k for k in node if type(k) is not str]:
            node[str(k)] = node.pop(k)
        changed = True
    for child in node.values():
        if isinstance(child, dict):
            changed = _unify_keys(child) or changed
    return changed


def _leaf_parts(
    node: dict[Any, Any], prefix: tuple[Part, ...], out: dict[tuple[Part, ...], TensorInfo]
) -> None:
    for k, child in node.items():
        if isinstance(child, dict):
            _leaf_parts(child, (*prefix, k), out)
        else:
            out[(*prefix, k)] = child


SafetensorsCheckpoint.__module__ = "treegraft"
