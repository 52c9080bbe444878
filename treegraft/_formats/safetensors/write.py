"""Writes leaves as Hugging Face safetensors files, streamed (docs/design.md sections 14, 15).

What is written, and why:

* Names are the leaves' paths joined with `.` (an int index as its decimal):
  `('model', 'layers', 0, 'mlp', 'w')` is `model.layers.0.mlp.w`, the names
  Hugging Face uses and `SafetensorsCheckpoint` parses back into the same
  paths. A path that would not come back as itself (a key holding a `.`, an
  empty key, two paths with one name) is refused at plan time (`problems`).
* Each file's `__metadata__` is `{"format": "pt"}`, as transformers writes it.
* A folder destination gets `model.safetensors` when the data fits in
  `max_shard_bytes`; else `model-00001-of-0000n.safetensors`, ... and
  `model.safetensors.index.json` (`metadata.total_size` and
  `total_parameters`, `weight_map`), written last. Tensors go to the shards in
  leaf order and are never split; a tensor larger than `max_shard_bytes` has a
  shard of its own, as transformers does. Sizes count tensor bytes only, as
  transformers' `max_shard_size` does.
* A destination named `*.safetensors` is one file: `tmp` is then that file
  (not a folder), and data larger than `max_shard_bytes` is refused.
* Within a file, tensors are laid out by item size, largest first (leaf order
  among equals), and the header is padded to 8 bytes, as safetensors does, so
  that each tensor starts at a multiple of its item size.
* Streamed: every header is computed from shapes and dtypes before the first
  box is fetched. Locally each tensor is then fetched as contiguous slabs of
  at most `max_host_bytes` (`interface.slabs`), each written to the file and
  dropped. On gs:// and s3://, an object cannot be appended to, so a file is
  assembled in host memory and written in one request; while sending it,
  tensorstore's gcs and s3 drivers hold two more copies of it (measured: the
  peak is three times the object), so there each file holds at most
  `min(max_shard_bytes, max_host_bytes // 3)` bytes of data (a limit: see
  docs/limits.md), and one tensor larger than that is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft._errors import CheckpointError
from treegraft._formats.safetensors.header import DTYPES, INDEX_NAME, MAX_HEADER
from treegraft._formats.safetensors.tree import MAX_DEPTH, name_to_parts
from treegraft._parse.keys import loose
from treegraft._parse.paths import render_parts
from treegraft._storage.location import Location
from treegraft._write.interface import BoxFetch, Budget, OutLeaf, Writer, slabs

__all__ = ["SafetensorsWriter", "tensor_name", "name_problems", "dtype_problem", "plan_files"]

SINGLE_NAME = "model.safetensors"
FILE_METADATA = {"format": "pt"}
# safetensors aligns the data to 8 bytes by padding its header with spaces.
_ALIGN = 8
_CODES: dict[np.dtype[Any], str] = {dtype: code for code, dtype in DTYPES.items()}
# The slowest upload a remote write waits for, on top of the storage timeout,
# so that a large shard on a slow link is not taken for a stalled server.
_SLOWEST_UPLOAD = 16 * 2**20  # bytes per second
# S3 takes at most 5 GiB in one PUT, the only write tensorstore's s3 kvstore makes.
_S3_MAX_OBJECT = 5 * 2**30
# Copies of an object in host memory while tensorstore's gcs or s3 kvstore writes
# it: the caller's bytes, and two of its own (measured on fake-gcs-server and moto).
_SEND_COPIES = 3


def tensor_name(path: Sequence[Any]) -> str:
    """The safetensors name of a leaf: its path parts joined with `.`.

    Example:
      >>> tensor_name(('model', 'layers', 0, 'mlp', 'w'))
      'model.layers.0.mlp.w'
    """
    return ".".join(str(p) for p in path)


def _shown(path: Sequence[Any]) -> str:
    return repr(render_parts(path)) if path else "the root leaf"


def _key_problem(path: tuple[Any, ...]) -> str | None:
    """Why one path has no safetensors name that reads back as itself, or None."""
    where = _shown(path)
    fix = "give it another name with a mapping rule ({'<new name>': '<its source path>'})"
    if not path:
        return f"{where} has no name: safetensors names tensors by their paths; {fix}"
    for part in path:
        if type(part) is not str and type(part) is not int:
            return (f"{where} has the key {part!r} ({type(part).__name__}): safetensors names "
                    f"are strings of str keys and int indices; {fix}")
        if part == "":
            return f"{where} has an empty key: its safetensors name would drop it; {fix}"
        if type(part) is str and "." in part:
            return (f"{where} has the key {part!r}, which holds a '.': its safetensors name "
                    f"{tensor_name(path)!r} would read back as other keys; {fix}")
    name = tensor_name(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where} is not valid UTF-8, which safetensors names must be; {fix}"
    if name == "__metadata__":
        return f"{where} is named '__metadata__', which safetensors keeps for file metadata; {fix}"
    back = name_to_parts(name)
    if loose(back) != loose(path):
        return (f"{where} would be named {name!r}, which reads back as "
                f"{render_parts(back)!r}; {fix}")
    if len(path) > MAX_DEPTH:
        return (f"{where} has {len(path)} parts; treegraft reads names of at most {MAX_DEPTH} "
                f"back; {fix}")
    return None


def name_problems(paths: Sequence[tuple[Any, ...]]) -> list[str]:
    """Why leaves cannot be written under names that read back as their paths: one line each.

    Example:
      >>> for line in name_problems([('a', 0), ('a', '0'), ('b', None)]):
      ...     print(line)  # doctest: +ELLIPSIS
      'a[0]' and "a['0']" would both be named 'a.0'; rename one with a mapping rule
      'b[None]' has the key None (NoneType): safetensors names are strings ...
    """
    out: list[str] = []
    first: dict[str, tuple[Any, ...]] = {}
    named: list[tuple[str, tuple[Any, ...]]] = []
    for path in paths:
        problem = _key_problem(tuple(path))
        if problem is not None:
            out.append(problem)
            continue
        name = tensor_name(path)
        if name in first:
            out.append(f"{render_parts(first[name])!r} and {render_parts(path)!r} would both be "
                       f"named {name!r}; rename one with a mapping rule")
            continue
        first[name] = tuple(path)
        named.append((name, tuple(path)))
    for name, path in named:
        parts = name.split(".")
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            if prefix in first:
                out.append(
                    f"{render_parts(path)!r} would be named {name!r}, under the tensor "
                    f"{prefix!r} of {render_parts(first[prefix])!r}; a name cannot be both a "
                    "tensor and a prefix of others: rename one with a mapping rule")
                break
    return out


def dtype_problem(path: tuple[Any, ...], dtype: Any) -> str | None:
    """Why a leaf's dtype has no safetensors code, with what to do, or None.

    Example:
      >>> dtype_problem(('w',), np.dtype(np.complex128))[:52]
      "'w' is complex128, which safetensors cannot hold: ca"
    """
    where = _shown(path)
    codes = ", ".join(DTYPES)
    cast = f"cast it in the mapping (tg.cast(...)) to a dtype safetensors holds ({codes})"
    if _is_prng_key(dtype):
        return (f"{where} is a typed PRNG key ({dtype}), which safetensors cannot hold: put "
                "jax.random.key_data(key) (uint32) in the tree instead, or leave it out of the "
                "mapping")
    try:
        found = np.dtype(dtype)
    except TypeError:
        return f"{where} has dtype {dtype!r}, which safetensors cannot hold: {cast}"
    if found in _CODES:
        return None
    if found.kind in "OUSMm":
        return (f"{where} is {found} ({_kind_text(found)}), which safetensors cannot hold: it "
                "holds numeric arrays only; leave it out of the mapping")
    if found != found.newbyteorder("<"):
        return (f"{where} is big-endian ({found.str}); safetensors is little-endian: cast it to "
                f"{found.newbyteorder('<')}")
    if found == np.complex128:
        cast = "cast it in the mapping (tg.cast(..., np.complex64)) to complex64 (C64)"
    return f"{where} is {found}, which safetensors cannot hold: {cast}"


def _is_prng_key(dtype: Any) -> bool:
    import jax

    try:
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except Exception:  # not a dtype jax knows: np.dtype() below says what it is
        return False


def _kind_text(dtype: np.dtype[Any]) -> str:
    return {"O": "Python objects", "U": "strings", "S": "bytes", "M": "datetimes",
            "m": "timedeltas"}[dtype.kind]


# -- the files: which tensors, in what order, with what header ---------------


@dataclass(frozen=True)
class FilePlan:
    """One file to write: its name, its tensors in data order, its header bytes.

    Attributes:
      name: the file name in the folder ('' when the destination is this file).
      leaves: indices of the leaves it holds, in the order of their bytes.
      header: the 8-byte length and the padded JSON header.
      data_bytes: the bytes of its tensors.
    """

    name: str
    leaves: tuple[int, ...]
    header: bytes
    data_bytes: int

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


def shard_groups(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Indices grouped into shards in order, each at most cap bytes unless one tensor is larger.

    Example:
      >>> shard_groups([4, 4, 4, 10, 1], 8)
      [[0, 1], [2], [3], [4]]
    """
    groups: list[list[int]] = [[]]
    held = 0
    for i, size in enumerate(sizes):
        if groups[-1] and held + size > cap:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += size
    return groups


def header_bytes(entries: Sequence[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The start of a safetensors file: 8-byte little-endian length, then the padded JSON.

    Args:
      entries: (name, dtype code, shape, nbytes) of each tensor, in data order.

    Example:
      >>> head = header_bytes([('w', 'F32', (2,), 8)])
      >>> int.from_bytes(head[:8], 'little')
      88
      >>> print(head[8:].decode() + '|')
      {"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   |
    """
    doc: dict[str, Any] = {"__metadata__": FILE_METADATA}
    offset = 0
    for name, code, shape, nbytes in entries:
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return len(text).to_bytes(8, "little") + text


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_files(leaves: Sequence[OutLeaf], *, single_file: bool, cap: int) -> list[FilePlan]:
    """The files that hold the leaves, their headers computed from shapes and dtypes alone.

    Args:
      leaves: the output leaves (their names and dtypes already checked).
      single_file: one file whatever the size (the destination names a file).
      cap: the data bytes of one shard (a folder destination).

    Returns:
      One plan per file, in the order of their first leaf.
    """
    sizes = [leaf.nbytes for leaf in leaves]
    groups = [list(range(len(leaves)))] if single_file else shard_groups(sizes, cap)
    plans = []
    for k, group in enumerate(groups):
        # Largest items first: then every tensor starts at a multiple of its item size.
        ordered = sorted(group, key=lambda i: -leaves[i].dtype.itemsize)
        entries = [(tensor_name(leaves[i].path), _CODES[np.dtype(leaves[i].dtype)],
                    tuple(leaves[i].shape), sizes[i]) for i in ordered]
        if single_file:
            name = ""
        elif len(groups) == 1:
            name = SINGLE_NAME
        else:
            name = _shard_name(k, len(groups))
        plans.append(FilePlan(name, tuple(ordered), header_bytes(entries),
                              sum(sizes[i] for i in group)))
    return plans


def index_bytes(leaves: Sequence[OutLeaf], plans: Sequence[FilePlan]) -> bytes:
    """`model.safetensors.index.json` as transformers writes it (sorted keys, indent 2)."""
    weight_map = {tensor_name(leaves[i].path): p.name for p in plans for i in p.leaves}
    doc = {
        "metadata": {
            "total_size": sum(p.data_bytes for p in plans),
            "total_parameters": sum(math.prod(leaf.shape) for leaf in leaves),
        },
        "weight_map": weight_map,
    }
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _remote_cap(location_scheme: str, budget: Budget) -> int:
    """Data bytes of one file on object storage: built in host memory, copied twice to send."""
    cap = min(budget.max_shard_bytes, budget.max_host_bytes // _SEND_COPIES)
    return min(cap, _S3_MAX_OBJECT - MAX_HEADER) if location_scheme == "s3" else cap


def size_problems(
    leaves: Sequence[OutLeaf], budget: Budget, *, single_file: bool, scheme: str
) -> list[str]:
    """What the budget and the destination forbid: a file too large for one write or request."""
    total = sum(leaf.nbytes for leaf in leaves)
    if scheme == "file":
        if single_file and total > budget.max_shard_bytes:
            return [f"the leaves take {total} bytes, more than max_shard_bytes="
                    f"{budget.max_shard_bytes} that one file may hold: write to a folder (then "
                    "shards and model.safetensors.index.json are written), or raise "
                    "max_shard_bytes"]
        return []
    cap = _remote_cap(scheme, budget)
    why = (f"on {scheme}:// a file is built in host memory and sent in one request, so it "
           f"holds at most {cap} bytes of data (min(max_shard_bytes, max_host_bytes // 3)"
           + (", and S3 takes at most 5 GiB in one request" if scheme == "s3" else "") + ")")
    fix = "raise max_host_bytes, or write to a local folder and upload it"
    if single_file and total > cap:
        return [f"the leaves take {total} bytes in one file; {why}: write to a folder (then it "
                f"is sharded), or {fix}"]
    return [f"{_shown(leaf.path)} takes {leaf.nbytes} bytes; {why}: {fix}"
            for leaf in leaves if leaf.nbytes > cap]


def header_problems(plans: Sequence[FilePlan]) -> list[str]:
    """A header larger than safetensors reads (too many tensors in one file)."""
    return [f"the header of {p.name or 'the file'} would take {len(p.header) - 8} bytes, more "
            f"than the {MAX_HEADER} safetensors reads: lower max_shard_bytes (fewer tensors "
            "per file)" for p in plans if len(p.header) - 8 > MAX_HEADER]


# -- the writer ----------------------------------------------------------------


class SafetensorsWriter(Writer):
    """Writes leaves as Hugging Face safetensors: one file, or numbered shards and their index.

    See the module docstring for the names, files and layout written.

    Args:
      dest: the destination the caller will make `tmp` appear as. A name
        ending in `.safetensors` means one file (and `tmp` is that file);
        anything else, or None, a folder (and `tmp` is that folder). Its
        scheme (local, gs://, s3://) decides the size limits.
      budget: when given, `problems` also checks the sizes against it (a
        single file larger than `max_shard_bytes`; on object storage, a file
        larger than the memory it is built in). `write` checks them always,
        before the first box is fetched.

    Example:
      >>> import numpy as np
      >>> from treegraft._write.interface import OutLeaf
      >>> leaves = [OutLeaf(('a', 'b.c'), (2,), np.dtype(np.complex128))]
      >>> for line in SafetensorsWriter().problems(leaves): print(line[:60])
      "a['b.c']" has the key 'b.c', which holds a '.': its safeten
      "a['b.c']" is complex128, which safetensors cannot hold: cas
    """

    format = "safetensors"

    def __init__(self, dest: Any = None, *, budget: Budget | None = None):
        where = None if dest is None else Location.parse(dest, what="a destination")
        self.single_file = where is not None and where.name.endswith(".safetensors")
        self.scheme = "file" if where is None else where.scheme
        self.budget = budget

    def problems(self, leaves: Sequence[OutLeaf]) -> list[str]:
        """Why the leaves cannot be written as safetensors: names, dtypes, then sizes."""
        return checked_files(leaves, self.budget, single_file=self.single_file,
                             scheme=self.scheme)[0]

    def write(self, tmp: Any, leaves: Sequence[OutLeaf], fetch: BoxFetch, budget: Budget) -> None:
        """Writes the files under tmp (the file itself for a `.safetensors` destination).

        A local tmp is written with plain file I/O (the folder is made; the
        folder a single file goes in must exist); a remote one with one
        tensorstore write per file, the index last. Files already there are
        never overwritten: locally that is an error.

        Raises:
          CheckpointError: the leaves cannot be written (`problems`, checked
            again with tmp's storage and this budget, before anything is
            fetched); a write failed or stalled (names the file); the fetch
            gave an array of the wrong shape or dtype.
        """
        tmp = Location.parse(tmp, what="a temporary destination")
        found, plans = checked_files(leaves, budget, single_file=self.single_file,
                                     scheme=tmp.scheme)
        if found:
            raise CheckpointError(
                f"cannot write {tmp} as safetensors: {len(found)} problem(s)\n  "
                + "\n  ".join(found))
        if tmp.is_local:
            _write_local(tmp, leaves, plans, fetch, budget.max_host_bytes, self.single_file)
        else:
            _write_remote(tmp, leaves, plans, fetch, _cap(budget, tmp.scheme), self.single_file)


def checked_files(
    leaves: Sequence[OutLeaf], budget: Budget | None, *, single_file: bool, scheme: str
) -> tuple[list[str], list[FilePlan]]:
    """The problems of writing the leaves, else (no problems, the files to write).

    Names and dtypes first; then, with a budget, the sizes and the headers.
    """
    found = name_problems([leaf.path for leaf in leaves])
    found += [p for leaf in leaves if (p := dtype_problem(tuple(leaf.path), leaf.dtype))]
    if found or budget is None:
        return found, []
    found = size_problems(leaves, budget, single_file=single_file, scheme=scheme)
    if found:
        return found, []
    plans = plan_files(leaves, single_file=single_file, cap=_cap(budget, scheme))
    found = header_problems(plans)
    return found, ([] if found else plans)


def _cap(budget: Budget, scheme: str) -> int:
    return budget.max_shard_bytes if scheme == "file" else _remote_cap(scheme, budget)


# -- boxes -------------------------------------------------------------------------


def _boxes(
    leaves: Sequence[OutLeaf], i: int, fetch: BoxFetch, max_bytes: int, file: str
) -> Iterator[np.ndarray]:
    """Leaf i's bytes in C order, as uint8 arrays of at most max_bytes, each fetched once.

    The caller drops each before asking for the next, so that one box at a
    time is in memory.
    """
    leaf = leaves[i]
    for box in slabs(leaf.shape, leaf.dtype.itemsize, max_bytes):
        arr = fetch(i, box)
        want = tuple(s.stop - s.start for s in box)
        if not isinstance(arr, np.ndarray) or arr.shape != want or arr.dtype != leaf.dtype:
            got = (f"{arr.dtype}{list(arr.shape)}" if isinstance(arr, np.ndarray)
                   else type(arr).__name__)
            raise CheckpointError(
                f"writing {file}: the box {_box_text(box)} of {_shown(leaf.path)} came as "
                f"{got}, not {np.dtype(leaf.dtype)}{list(want)} (a bug in the caller of the "
                "writer: please report it)")
        chunk = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        del arr
        yield chunk
        del chunk  # before the next fetch: one box in memory at a time


def _box_text(box: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in box) + "]"


# -- local: plain file I/O ---------------------------------------------------


def _write_local(
    tmp: Location, leaves: Sequence[OutLeaf], plans: Sequence[FilePlan], fetch: BoxFetch,
    max_bytes: int, single_file: bool,
) -> None:
    if not single_file:
        with _io(tmp.os_path):
            os.makedirs(tmp.os_path, exist_ok=True)
    for plan in plans:
        path = tmp.os_path if single_file else os.path.join(tmp.os_path, plan.name)
        _write_file(path, _file_chunks(leaves, plan, fetch, max_bytes, path))
    if len(plans) > 1:
        path = os.path.join(tmp.os_path, INDEX_NAME)
        _write_file(path, iter([index_bytes(leaves, plans)]))


def _file_chunks(
    leaves: Sequence[OutLeaf], plan: FilePlan, fetch: BoxFetch, max_bytes: int, path: str
) -> Iterator[Any]:
    """A file's bytes in order: its header, then its tensors' slabs."""
    yield plan.header
    for i in plan.leaves:
        yield from _boxes(leaves, i, fetch, max_bytes, path)  # binds no name: one box at a time


def _write_file(path: str, chunks: Iterator[Any]) -> None:
    """Writes chunks to a new file (never over one) and syncs it to the disk.

    An `OSError` of the file is a `CheckpointError` naming it; what making the
    chunks raises (the fetch reading its source) passes through as it is.
    """
    with _io(path):
        f = open(path, "xb")
    try:
        for chunk in chunks:
            with _io(path):
                f.write(chunk)
            del chunk
        with _io(path):
            f.flush()
            os.fsync(f.fileno())
    finally:
        with _io(path):
            f.close()


@contextlib.contextmanager
def _io(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _local_error(e, path) from e


_LOCAL_FIXES = {
    errno.EACCES: "check the permissions of its folder (treegraft needs to write there)",
    errno.EPERM: "check the permissions of its folder (treegraft needs to write there)",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOSPC: "the disk is full: free space, or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space, or write elsewhere",
    errno.EEXIST: "a file is already there: the temporary destination must be empty",
    errno.ENOENT: "its folder does not exist",
}


def _local_error(e: OSError, path: str) -> CheckpointError:
    fix = _LOCAL_FIXES.get(e.errno or 0, "check the disk")
    return CheckpointError(f"writing {path} failed: {e.strerror or type(e).__name__}; {fix}")


# -- gs:// and s3://: one request per file -------------------------------------


def _write_remote(
    tmp: Location, leaves: Sequence[OutLeaf], plans: Sequence[FilePlan], fetch: BoxFetch,
    cap: int, single_file: bool,
) -> None:
    kv = tmp.open_kvstore(folder=not single_file)
    for plan in plans:
        shown = tmp if single_file else tmp.join(plan.name)
        # The assembled file is only an argument: freed once tensorstore has copied it.
        future = kv.write("" if single_file else plan.name,
                          _assembled(leaves, plan, fetch, cap, str(shown)))
        _wait_written(tmp, future, plan.size, shown)
    if len(plans) > 1:
        # Last: a folder with its index is complete (SafetensorsCheckpoint reads the index).
        index = index_bytes(leaves, plans)
        _wait_written(tmp, kv.write(INDEX_NAME, index), len(index), tmp.join(INDEX_NAME))


def _assembled(
    leaves: Sequence[OutLeaf], plan: FilePlan, fetch: BoxFetch, max_bytes: int, file: str
) -> bytearray:
    """A whole file's bytes, its tensors fetched in slabs of at most max_bytes."""
    data = bytearray(plan.size)
    view = np.frombuffer(data, np.uint8)  # writable: copies each box in without a temporary
    view[: len(plan.header)] = np.frombuffer(plan.header, np.uint8)
    at = len(plan.header)
    for i in plan.leaves:
        for chunk in _boxes(leaves, i, fetch, max_bytes, file):
            view[at: at + chunk.size] = chunk
            at += chunk.size
            del chunk
    del view
    return data


def _wait_written(tmp: Location, future: Any, size: int, shown: Location) -> None:
    """Waits for one object's write: the storage timeout, plus the time a slow upload takes."""
    # Whole seconds: a small file waits exactly the timeout the user set (and messages say it).
    slack = size // _SLOWEST_UPLOAD
    tmp.with_timeout(tmp.timeout + slack).wait(future, "writing", shown=shown)
