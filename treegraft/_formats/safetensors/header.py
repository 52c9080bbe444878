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
import reprlib
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from treegraft._errors import CheckpointError, first_line, suggest_path
from treegraft._storage.errors import stalled
from treegraft._storage.location import Location
from treegraft._storage.reads import read_value

__all__ = [
    "DTYPES", "INDEX_NAME", "MAX_HEADER", "TensorInfo", "file_path", "read_headers",
    "read_result", "tensor_info",
]

INDEX_NAME = "model.safetensors.index.json"
# safetensors itself refuses headers above 100 MB; a larger length means the
# file is not a safetensors file (or its first 8 bytes are damaged).
MAX_HEADER = 100_000_000
# The largest file offset (and axis length) there can be: file offsets are
# signed 64-bit integers. safetensors writes its offsets as u64.
MAX_OFFSET = 2**63 - 1
# Digits of the longest integer a header or index holds as a number: 2**64 has
# 20. Python refuses to parse integers of more than 4300 digits (ValueError).
_MAX_DIGITS = 20
# numpy's (and so jax's) limit on the number of axes of an array.
_MAX_AXES = 64

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
                        f"but the header of {f} has no such tensor{suggest_path(name, list(held))}"
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


def read_result(
    future: Any,
    file: str,
    location: Location,
    what: str,
    *,
    bytes_wanted: int | None = None,
    generations: dict[str, bytes] | None = None,
) -> bytes:
    """The bytes of a kvstore read of a file of the checkpoint (`reads.read_value`).

    A file rewritten since its header was read (its generation changed) is
    read again only through a new checkpoint object.

    Raises:
      CheckpointError: the read failed or stalled, the file is missing,
        truncated or rewritten; the message names the file.
    """
    return read_value(
        future, file, location, what, bytes_wanted=bytes_wanted, generations=generations,
        changed_since="its header was read",
        changed_fix="open a new SafetensorsCheckpoint to read the new file",
    )


def _read_index(
    kv: Any, index: str, location: Location, check: Callable[[list[str]], None]
) -> dict[str, str]:
    raw = read_result(kv.read(index), index, location, "the index")
    folder = str(location)
    where = file_path(folder, index)
    doc = load_json(raw, where)
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
    header = load_json(raw, f"the header of {where}")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"the header of {where} is a JSON {type(header).__name__}, not an object of tensors"
        )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        # safetensors refuses other values too (its metadata is string -> string).
        raise CheckpointError(
            f"the __metadata__ of {where} is not a JSON object of strings: got {_short(meta)}"
        )
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
    return infos, dict(meta)


def tensor_info(name: str, entry: Any, file: str, where: str, data_start: int) -> TensorInfo:
    """The `TensorInfo` of one header entry, checked.

    Raises:
      CheckpointError: the entry is not a valid tensor entry; names the file.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} in the header of {where}: {why}")

    if not isinstance(entry, dict):
        raise bad(
            f"expected an object with dtype, shape and data_offsets, got {_short(entry)}"
        )
    code = entry.get("dtype")
    if not isinstance(code, str):
        raise bad(f"dtype must be a string such as 'F32', got {_short(code)}")
    if code not in DTYPES:
        raise bad(
            f"unknown dtype {_short(code)}; treegraft reads {', '.join(DTYPES)} (upgrade treegraft "
            "if the file was written by a newer safetensors)"
        )
    dtype = DTYPES[code]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        type(d) is int and 0 <= d <= MAX_OFFSET for d in shape
    ):
        raise bad(f"shape must be a list of non-negative ints, got {_short(shape)}")
    if len(shape) > _MAX_AXES:
        raise bad(f"shape has {len(shape)} axes; numpy and jax hold at most {_MAX_AXES}")
    if math.prod(d for d in shape if d) > MAX_OFFSET:
        # An empty axis makes it 0 bytes, but no array library takes such a shape.
        raise bad(f"shape {_short(shape)} has more elements than any array can (2**63 - 1)")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(
            f"data_offsets must be [begin, end] with 0 <= begin <= end, got {_short(offsets)}"
        )
    if data_start + offsets[1] > MAX_OFFSET:
        raise bad(
            f"data_offsets {_short(offsets)} end beyond the largest offset a file can have "
            f"(2**63 - 1 bytes)"
        )
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


class _DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (raised inside json.loads)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _LongIntegerError(ValueError):
    """A JSON integer has more digits than any size or offset (raised inside json.loads)."""

    def __init__(self, digits: int):
        super().__init__(digits)
        self.digits = digits


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key that appears twice.

    A plain `json.loads` keeps the last of two equal keys, so two entries for
    one tensor would silently read one of them; safetensors refuses the file.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    """A JSON integer, refused when longer than any size or offset can be."""
    digits = len(text.lstrip("-"))
    if digits > _MAX_DIGITS:
        raise _LongIntegerError(digits)
    return int(text)


def load_json(raw: bytes, what: str) -> Any:
    """Parses a header or index, or raises a CheckpointError saying what is wrong.

    Refuses what `json.loads` accepts but safetensors does not (a key twice in
    one object), and turns what `json.loads` raises untyped (an integer of
    more than 4300 digits, nesting deeper than the recursion limit) into
    typed errors.

    Args:
      raw: the bytes of the JSON document.
      what: how messages name the document ("the header of <file>").

    Raises:
      CheckpointError: the bytes are not the JSON of one document, as above.
    """
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except _DuplicateKeyError as e:
        raise CheckpointError(
            f"{what} names {e.key!r} twice in one JSON object; safetensors refuses such a "
            "file (a JSON parser would keep one of the two silently): re-save or re-download it"
        ) from None
    except _LongIntegerError as e:
        raise CheckpointError(
            f"{what} holds an integer of {e.digits} digits; a size or offset has at most "
            f"{_MAX_DIGITS}: the file is damaged"
        ) from None
    except RecursionError:
        raise CheckpointError(
            f"{what} nests JSON arrays or objects too deeply to parse (a header or index "
            "nests 3 levels): the file is damaged"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{what} is not valid JSON: {first_line(e)[1]}") from e


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 4


def _short(value: Any) -> str:
    """A short repr of a parsed JSON value, however large or deep."""
    return _REPR.repr(value)
