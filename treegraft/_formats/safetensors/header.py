"""Parses safetensors headers and the Hugging Face shard index into `TensorInfo`s.

A `.safetensors` file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}}`, optionally `"__metadata__"`),
then the tensors' bytes, each C-ordered, at its `data_offsets` from the end of
the header. Sharded weights are a folder with `model.safetensors.index.json`,
whose `weight_map` names the file that holds each tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from treegraft._errors import PATH_CUTOFF, CheckpointError, first_line, suggest
from treegraft._storage.location import Location, stalled

__all__ = [
    "DTYPES", "INDEX_NAME", "MAX_HEADER", "TensorInfo", "file_path", "read_headers",
    "read_result", "tensor_info",
]

INDEX_NAME = "model.safetensors.index.json"
# safetensors itself refuses headers above 100 MB; a larger length means the
# file is not a safetensors file (or its first 8 bytes are damaged).
MAX_HEADER = 100_000_000

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


def read_headers(
    kv: Any,
    location: Location,
    index: str | None,
    single: str | None,
    check: Callable[[list[str]], None] | None = None,
) -> tuple[list[TensorInfo], dict[str, dict[str, str]], dict[str, bytes]]:
    """Reads the index (if any) and the header of every file a checkpoint needs.

    Args:
      kv: the folder's kvstore.
      location: the folder: messages name it, and each read waits at most its
        timeout.
      index: the index file's name, or None for one file...
      single: ...the name of that one file.
      check: called with file names before they are opened; raises for a
        name that is not a regular file (a FIFO would block the read).

    Returns:
      The tensors; each file's `__metadata__` (those that have one); each
      file's storage generation, which later reads must match.

    Raises:
      CheckpointError: the index or a header is damaged, a file is truncated,
        or the storage fails or stalls.
    """
    folder = str(location)
    file_metadata: dict[str, dict[str, str]] = {}
    check = check or (lambda names: None)
    if index is not None:
        check([index])
        names = _read_index(kv, index, location, check)
        files = sorted(set(names.values()))
    else:
        names = None
        files = [str(single)]
        check(files)
    gens: dict[str, bytes] = {}
    lengths = {f: kv.read(f, byte_range=slice(0, 8)) for f in files}
    sizes: dict[str, int] = {}
    for f, future in lengths.items():
        raw = read_result(
            future, f, location, "its header length", bytes_wanted=8, generations=gens
        )
        if len(raw) < 8:
            raise CheckpointError(
                f"{file_path(folder, f)} is truncated: it has {len(raw)} byte(s), fewer than "
                "the 8 of a safetensors header length"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise CheckpointError(
                f"{file_path(folder, f)} is not a safetensors file: its first 8 bytes give "
                f"a header of {n} bytes (at most {MAX_HEADER} allowed)"
            )
        sizes[f] = n
    headers = {f: kv.read(f, byte_range=slice(8, 8 + sizes[f])) for f in files}
    infos: list[TensorInfo] = []
    ends: dict[str, int] = {}
    for f, future in headers.items():
        raw = read_result(
            future,
            f,
            location,
            f"its {sizes[f]}-byte header",
            bytes_wanted=8 + sizes[f],
            generations=gens,
        )
        parsed, meta = _parse_header(raw, f, folder, 8 + sizes[f])
        if meta:
            file_metadata[f] = meta
        ends[f] = max((i.end for i in parsed), default=8 + sizes[f])
        if names is None:
            infos.extend(parsed)
        else:
            held = {i.name: i for i in parsed}
            for name in [n for n, file in names.items() if file == f]:
                if name not in held:
                    raise CheckpointError(
                        f"{file_path(folder, INDEX_NAME)} maps tensor {name!r} to {f}, "
                        f"but the header of {f} has no such tensor{_close(name, held)}"
                    )
                infos.append(held[name])
    # The last data byte of each file must exist: else the file is truncated.
    probes = {
        f: kv.read(f, byte_range=slice(end - 1, end)) for f, end in ends.items() if end > 0
    }
    for f, future in probes.items():
        read_result(
            future,
            f,
            location,
            "the end of its data",
            bytes_wanted=ends[f],
            generations=gens,
        )
    return infos, file_metadata, gens


def file_path(folder: str, name: str) -> str:
    return os.path.join(folder, name)


def _close(name: str, names: Any) -> str:
    # Tensor names are whole dotted paths: the path cutoff.
    return suggest(name, list(names), cutoff=PATH_CUTOFF)


_SIZE = re.compile(r"value of size (\d+)")


def read_result(
    future: Any,
    file: str,
    location: Location,
    what: str,
    *,
    bytes_wanted: int | None = None,
    generations: dict[str, bytes] | None = None,
) -> bytes:
    """The bytes of a kvstore read of file in the folder location, or a CheckpointError.

    The wait is bounded by the location's timeout (`Location.wait`). With
    `generations`, the file's storage generation is recorded on its first
    read and must be the same on every later one: a file rewritten since its
    header was read would otherwise give bytes that do not match the header.

    Raises:
      CheckpointError: the read failed or stalled, the file is missing,
        truncated or rewritten; the message names the file.
    """
    where = location.join(file)

    def explain(e: Exception) -> CheckpointError | None:
        message = str(e)
        size = _SIZE.search(message)
        if "OUT_OF_RANGE" in message and size is not None and bytes_wanted is not None:
            return CheckpointError(
                f"{where} is truncated or damaged: reading {what} needs "
                f"{bytes_wanted} bytes but the file has {size.group(1)}"
            )
        if not location.is_local:
            return None  # the storage layer's message: credentials, endpoint, bucket
        name, line = first_line(e)
        return CheckpointError(f"cannot read {what} from {where}: {name}: {line}")

    result = location.wait(future, f"reading {what} from", shown=where, explain=explain)
    if result.state != "value":
        raise CheckpointError(
            f"{where} does not exist (reading {what}); was it moved or deleted?"
        )
    if generations is not None:
        seen = generations.setdefault(file, result.stamp.generation)
        if seen != result.stamp.generation:
            raise CheckpointError(
                f"{where} has changed since its header was read (reading "
                f"{what}): open a new SafetensorsCheckpoint to read the new file"
            )
    return bytes(result.value)


def _read_index(
    kv: Any, index: str, location: Location, check: Callable[[list[str]], None]
) -> dict[str, str]:
    raw = read_result(kv.read(index), index, location, "the index")
    folder = str(location)
    where = file_path(folder, index)
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
    check(sorted(listed))
    missing = _missing(kv, sorted(listed), location)
    if missing:
        raise CheckpointError(
            f"{where} names {len(missing)} shard(s) that do not exist in {folder}: "
            + ", ".join(missing[:10])
        )
    return weight_map


def _missing(kv: Any, names: list[str], location: Location) -> list[str]:
    """The names of files that do not exist in the folder, probed together.

    A 0-byte range read tells whether a key exists without reading it. A
    failed probe counts as existing (the header read then reports it); a
    stalled one raises at once.
    """
    probes = [(name, kv.read(name, byte_range=slice(0, 0))) for name in names]
    missing = []
    for name, future in probes:
        try:
            found = location.wait(future, "looking for", shown=location.join(name))
        except CheckpointError as e:
            if stalled(e):
                raise
            continue
        if found.state != "value":
            missing.append(name)
    return missing


def _parse_header(
    raw: bytes, file: str, folder: str, data_start: int
) -> tuple[list[TensorInfo], dict[str, str]]:
    where = file_path(folder, file)
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
        infos.append(tensor_info(name, entry, file, where, data_start))
    ordered = sorted(infos, key=lambda i: (i.begin, i.end))
    for prev, nxt in zip(ordered, ordered[1:], strict=False):
        if nxt.begin < prev.end:
            raise CheckpointError(
                f"{where} is damaged: tensors {prev.name!r} (bytes {prev.begin - data_start}.."
                f"{prev.end - data_start}) and {nxt.name!r} (bytes {nxt.begin - data_start}.."
                f"{nxt.end - data_start}) overlap"
            )
    return infos, {str(k): str(v) for k, v in meta.items()}


def tensor_info(name: str, entry: Any, file: str, where: str, data_start: int) -> TensorInfo:
    """The `TensorInfo` of one header entry, checked.

    Raises:
      CheckpointError: the entry is not a valid tensor entry; names the file.
    """
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
