"""The open files of a safetensors checkpoint, and the reads of tensor bytes from them.

Tensor data is read through a tensorstore kvstore (`_kvstore`) wherever the
checkpoint is not a local folder, so that `gs://` and `s3://` work through the
storage layer. Local tensor data is read with `os.preadv` straight into the
result's buffer: tensorstore's file driver returns each read as a new `bytes`
object, which costs two more copies (measured 2-3x slower than
`safetensors.safe_open` on 1 GiB of weights; `benchmarks/safetensors_case.py`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from treegraft._errors import CheckpointError, describe_leaf
from treegraft._formats.safetensors.boxes import Box, merge, nbytes
from treegraft._formats.safetensors.header import (
    DTYPES,
    INDEX_NAME,
    MAX_HEADER,
    TensorInfo,
    file_path,
    read_result,
    tensor_info,
)
from treegraft._formats.safetensors.preads import copy_in_two, read_range
from treegraft._storage.local import local_kind, mode_kind, not_regular
from treegraft._storage.location import Location, check_text

__all__ = ["Files", "RowArena"]

# Bytes of reads issued ahead of the tensor being assembled (a tensor's own
# ranges are always issued): bounds the host memory a read needs beyond its
# results.
_WINDOW_BYTES = 64 * 2**20
# Largest single kvstore read. tensorstore's file driver reads a 96 MiB range in
# 0.3 s but the same bytes as 1 MiB reads in 0.075 s (measured, warm page cache).
_CHUNK_BYTES = 2**20


def _kvstore(location: Location) -> Any:
    """Opens the kvstore of a folder (local, gs://, s3://); keys are the file names in it."""
    return location.open_kvstore()


def _local_folder(location: Location) -> str | None:
    """The local folder of location, whose tensor data is read with `os.preadv`;
    None to read it through `_kvstore` (remote locations)."""
    return location.os_path if location.is_local else None


class Files:
    """The kvstore and local files of one checkpoint folder, and what each file was.

    Args:
      location: the folder.
      folder: the folder as messages name it.
      name: how messages name the checkpoint ("the safetensors checkpoint ...").
    """

    def __init__(self, location: Location, folder: str, name: str):
        self.location = location
        self.folder = folder
        self._name = name
        self._kv: Any = None
        self._fds: dict[str, int] = {}  # local files opened for reading data
        weakref.finalize(self, _close_fds, self._fds)
        self._stats: dict[str, tuple[int, int, int]] = {}  # (inode, size, mtime) at header read
        # The header bytes last read by check_unchanged, parsed: (bytes, header, data start).
        self._headers: dict[str, tuple[bytes, dict[str, Any], int]] = {}
        self.generations: dict[str, bytes] = {}  # of each file when its header was read
        self._closed = False

    def kvstore(self) -> Any:
        """The folder's kvstore, opened on first use.

        Raises:
          CheckpointError: the files were closed.
        """
        if self._closed:
            raise CheckpointError(
                f"{self._name} is closed: open a new SafetensorsCheckpoint to read from it"
            )
        if self._kv is None:
            self._kv = _kvstore(self.location)
        return self._kv

    def check(self, names: Sequence[str]) -> None:
        """Refuses local files of the checkpoint that are not regular files.

        tensorstore would open a FIFO and wait for a writer forever, read a
        device without end, or call a folder missing.

        Raises:
          CheckpointError: a file is a folder, FIFO, device, socket or loop of
            symbolic links; the message says which.
        """
        for name in names:
            check_text(name, "the file name")  # listed locally: may not be UTF-8
        local = _local_folder(self.location)
        if local is None:
            return
        for name in names:
            path = os.path.join(local, name)
            what = "the index" if name == INDEX_NAME else "safetensors file"
            found = local_kind(path, what)
            if found not in ("file", "missing", "broken symlink"):  # missing: the read says so
                raise not_regular(path, found, what, "a file")

    def remember(self, files: Sequence[str], generations: dict[str, bytes]) -> None:
        """Records what the files are now, just after their headers were read."""
        self.generations = generations
        local = _local_folder(self.location)
        if local is not None:
            for f in files:
                st = os.stat(os.path.join(local, f))
                self._stats[f] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        """Closes the local files and forgets the kvstore; later reads raise."""
        _close_fds(self._fds)
        self._kv = None
        self._closed = True

    def _open(self, info: TensorInfo) -> int:
        """The open local file holding info (opened once)."""
        fd = self._fds.get(info.file)
        if fd is None:
            where = file_path(self.folder, info.file)
            try:
                # O_NONBLOCK: a FIFO put in the file's place opens at once (and then
                # fails the check of what the file is) instead of waiting for a writer.
                fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK)
                kind = mode_kind(os.fstat(fd).st_mode)
            except OSError as e:
                raise CheckpointError(
                    f"cannot read tensor {info.name!r} from {where}: {type(e).__name__}: {e}"
                ) from e
            if kind != "file":
                os.close(fd)
                raise not_regular(where, kind, "safetensors file", "a file")
            self._fds[info.file] = fd
        return fd

    def check_unchanged(self, infos: Sequence[TensorInfo]) -> None:
        """Refuses local tensors whose header entry differs from the one the plan read.

        The file's inode, size and mtime can stay the same when it is rewritten
        in place (within one tick of the clock, or with its mtime restored):
        its header is read again and each tensor's dtype, shape and offsets
        compared, so that its bytes are never read as what they were.

        Raises:
          CheckpointError: a tensor changed; names the file, the tensor and both sides.
        """
        by_file: dict[str, list[TensorInfo]] = {}
        for info in infos:
            by_file.setdefault(info.file, []).append(info)
        for file, group in by_file.items():
            header, start = self._header_now(file, self._open(group[0]))
            for info in group:
                if _same_entry(header.get(info.name), info, start):
                    continue
                where = file_path(self.folder, file)
                now = _entry_now(header, info, where, start)
                was = _show(info, info.begin, info.end)
                if now != was:
                    raise CheckpointError(
                        f"{where} changed since the plan: tensor {info.name!r} was {was}, it "
                        f"is now {now}; nothing was grafted: open a new SafetensorsCheckpoint "
                        "and plan again to read the new file"
                    )

    def _header_now(self, file: str, fd: int) -> tuple[dict[str, Any], int]:
        """The file's header as it is now, parsed again only when its bytes differ.

        The rows kept for one tensor are checked before each use (once per
        device box): one read of the header's bytes, compared with the bytes
        parsed last time, instead of a JSON parse each time.
        """
        last = self._headers.get(file)
        if last is not None:
            try:
                same = os.pread(fd, len(last[0]), 0) == last[0]
            except OSError:
                same = False  # _header_now below says what is wrong
            if same:
                return last[1], last[2]
        header, start, raw = _header_now(fd, file_path(self.folder, file))
        self._headers[file] = (raw, header, start)
        return header, start

    def pread(self, info: TensorInfo, begin: int, buffer: np.ndarray) -> None:
        """Fills buffer with the local file's bytes from begin (`preads.read_range`)."""
        where = file_path(self.folder, info.file)
        fd = self._open(info)
        try:
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
        read_range(fd, buffer.data, begin, f"tensor {info.name!r}", where, st.st_size)

    def fetch(
        self,
        jobs: Sequence[tuple[TensorInfo, list[Box]]],
        alloc: Callable[[int], np.ndarray] | None = None,
    ) -> Iterator[dict[Box, np.ndarray]]:
        """Yields, per job, its boxes as host arrays that own their memory.

        Each job's boxes are grouped into byte ranges (overlapping ones merged).
        Through tensorstore, a range is read as sub-reads of at most
        `_CHUNK_BYTES`, issued ahead within a window of `_WINDOW_BYTES` in
        flight; locally, with one `os.preadv`. A box that is a whole range is
        that range's new buffer; other boxes are copied out of a scratch buffer
        kept for the whole call (allocating and freeing a large buffer per
        tensor costs more than reading it: measured 10x slower reads).

        Args:
          alloc: gives the buffer (uint8, 64-byte aligned) of a range that is a
            whole box; a new one by default (`RowArena.take` for rows kept
            between calls).
        """
        kv = self.kvstore()
        local = _local_folder(self.location)
        if local is not None:  # remote files: their storage generation is checked instead
            self.check_unchanged([info for info, _ in jobs])
        plans = [merge(info, boxes) for info, boxes in jobs]
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
                if any(nbytes(w[4], info) == e - b for _, w in boxes):
                    # A box is this whole range: it keeps the buffer.
                    buffer = (alloc or _aligned)(e - b)
                else:
                    if len(scratch) < e - b:
                        scratch = _aligned(e - b)
                    buffer = scratch[: e - b]
                if local is not None:
                    self.pread(info, b, buffer)
                for o, future in reads:
                    raw = read_result(
                        future,
                        info.file,
                        self.location,
                        f"tensor {info.name!r}",
                        bytes_wanted=min(e, b + o + _CHUNK_BYTES),
                        generations=self.generations,
                    )
                    if len(raw) != min(e - b - o, _CHUNK_BYTES):
                        raise CheckpointError(
                            f"reading tensor {info.name!r} from "
                            f"{file_path(self.folder, info.file)} gave {len(raw)} bytes instead "
                            f"of {min(e - b - o, _CHUNK_BYTES)}: has the file changed since it "
                            "was opened? Open a new SafetensorsCheckpoint"
                        )
                    buffer[o : o + len(raw)] = np.frombuffer(raw, np.uint8)
                buf = buffer.view(stored)
                # Every box of this range is taken out before the scratch is reused.
                cut: list[tuple[np.ndarray, np.ndarray]] = []
                for box, (_, offset, sub_shape, inner, shape) in boxes:
                    piece = buf[offset : offset + math.prod(sub_shape)].reshape(sub_shape)[inner]
                    piece = np.asarray(piece).reshape(shape)
                    if piece.nbytes != buf.nbytes:
                        # A copy, aligned as the buffer is: never keep a larger buffer alive.
                        copy = _aligned(piece.nbytes).view(piece.dtype).reshape(piece.shape)
                        cut.append((copy, piece))
                        piece = copy
                    pieces[box] = piece
                copy_in_two(cut)
                for box, piece in pieces.items():
                    if piece.dtype != info.dtype:
                        pieces[box] = piece.astype(info.dtype)
            yield pieces


_ROUND = 2 * 2**20  # arenas are a whole number of huge pages


class RowArena:
    """Host memory for the rows of one tensor at a time, used again once no view of it lives.

    The rows a reader keeps for a tensor's device boxes are lent as views
    and copied by the device put. New memory for each tensor's rows costs
    more than reading them: the kernel zeroes each new page (numpy asks for
    2 MiB pages) as the read first writes it (measured: a quarter of the
    tunix case's time). The rows of a later tensor are read into the same
    memory instead, but only when nothing holds a view of it any more (its
    reference count says so): a view still alive, in a caller or in a device
    copy still in flight (jax holds the last one until it is done), keeps
    its memory. Two arenas take turns, so that the one just left has time to
    be let go; a new one takes the place of one too small before one still
    held, and is a whole number of huge pages (`_ROUND`).
    """

    _TURNS = 2

    def __init__(self) -> None:
        self._roots: list[np.ndarray] = []  # each owns its memory
        self._current: int | None = None  # the arena of the tensor being read
        self._used = 0
        self._wanted = 0  # bytes the current tensor's rows took
        self._size = 0  # the most any tensor's rows took: each arena's size
        self.reused = 0  # how many tensors were read into memory used before (for tests)

    def restart(self) -> None:
        """Starts a new tensor: the earlier tensor's rows are no longer read by the reader."""
        self._size = max(self._size, self._wanted)
        self._used = self._wanted = 0
        left, self._current = self._current, None
        if not self._size:
            return
        # An arena is free when only the list and this call's argument refer to it.
        free = [k for k in range(len(self._roots)) if sys.getrefcount(self._roots[k]) == 2]
        fits = [k for k in free if self._roots[k].nbytes >= self._size]
        pick = next((k for k in fits if k != left), fits[0] if fits else None)
        if pick is not None:
            self.reused += 1
        else:  # a new arena, in place of one that is too small, else of one still held
            # Rounded up: tensors of one size want a few bytes more or less (the
            # alignment of each take), and an arena a few bytes short is not reused.
            root = np.empty(-(-self._size // _ROUND) * _ROUND, np.uint8)
            if len(self._roots) < self._TURNS:
                self._roots.append(root)
                pick = len(self._roots) - 1
            else:
                others = [k for k in range(len(self._roots)) if k != left]
                pick = next((k for k in others if k in free), others[0])
                self._roots[pick] = root  # its holders keep the old memory alive
        self._current = pick

    def take(self, n: int) -> np.ndarray:
        """n bytes at a 64-byte aligned address: from the arena, or new when it is full."""
        self._wanted += n + 64  # with room to align it
        if self._current is not None:
            root = self._roots[self._current]
            start = self._used + (-(root.ctypes.data + self._used) % 64)
            if start + n <= root.nbytes:
                self._used = start + n
                return root[start : start + n]
        return _aligned(n)


def _header_now(fd: int, where: str) -> tuple[dict[str, Any], int, bytes]:
    """The header of an open local file as it is now, where its data starts, and its bytes.

    Raises:
      CheckpointError: the file no longer starts with a safetensors header.
    """
    try:
        raw = os.pread(fd, 8, 0)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        text = os.pread(fd, n, 8) if 0 <= n <= MAX_HEADER else b""
    except OSError as e:
        raise CheckpointError(f"cannot read the header of {where}: {e}") from e
    try:
        header = json.loads(text) if n >= 0 and len(text) == n else None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{where} changed since the plan: it no longer starts with a safetensors header; "
            "nothing was grafted: open a new SafetensorsCheckpoint and plan again"
        )
    return header, 8 + n, raw + text


def _same_entry(entry: Any, info: TensorInfo, start: int) -> bool:
    """Whether a header entry still says what info says (the fast path: no message built)."""
    try:
        begin, end = entry["data_offsets"]
        return (
            DTYPES.get(entry["dtype"]) == info.dtype
            and tuple(entry["shape"]) == info.shape
            and (start + begin, start + end) == (info.begin, info.end)
        )
    except (KeyError, TypeError, ValueError):
        return False


def _entry_now(header: dict[str, Any], info: TensorInfo, where: str, start: int) -> str:
    """How the header shows info's tensor now (as `_show` does), or why it cannot."""
    if info.name not in header:
        return "no longer in the file"
    try:
        now = tensor_info(info.name, header[info.name], info.file, where, start)
    except CheckpointError:
        return f"a damaged entry {header[info.name]!r:.80}"
    return _show(now, now.begin, now.end)


def _show(info: TensorInfo, begin: int, end: int) -> str:
    return f"{describe_leaf(info.shape, info.dtype)} at bytes {begin}..{end}"


def _close_fds(fds: dict[str, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


def _aligned(n: int, align: int = 64) -> np.ndarray:
    """A new uint8 buffer of n bytes whose address is a multiple of align.

    jax on CPU then adopts it as a device buffer without copying it.
    """
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + n]


def _stored(dtype: np.dtype) -> np.dtype:
    # safetensors stores little-endian whatever the machine.
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
