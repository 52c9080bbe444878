"""A lazy source over Hugging Face safetensors files (the `Source` class).

Metadata comes from the headers alone (`header`). A read fetches,
for each target shard, only the bytes of its box: a range of rows of a
C-ordered tensor is one contiguous byte range; any other box is read as the
smallest such range that covers it, then sliced (`boxes`). Boxes
that overlap are read once (`files`), and so are the boxes of one tensor
asked for device by device, in calls of their own (`_kept_rows`): copied out
(`read_boxes`), or lent as read-only views for the device put to copy
(`lend_boxes`, the insert step's one copy of each byte).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    PathNotFoundError,
    suggest_path,
)
from treegraft._formats.safetensors.boxes import (
    Box,
    box_of,
    check_box,
    covering,
    first_bad_bool,
    full_box,
    row_box,
)
from treegraft._formats.safetensors.files import Files, RowArena, _aligned, _local_folder
from treegraft._formats.safetensors.header import INDEX_NAME, TensorInfo, file_path, read_headers
from treegraft._formats.safetensors.tree import MAX_DEPTH, build_tree
from treegraft._insert.placement import array_from_blocks, sharding_of
from treegraft._parse.keys import loose
from treegraft._parse.paths import Part, Path, parse_path, render_parts
from treegraft._read.source import ReadRequest, Source
from treegraft._storage.location import Location

__all__ = ["SafetensorsCheckpoint", "TensorInfo"]

_SUFFIX = ".safetensors"
# Hugging Face's shard names: `model-00002-of-00004.safetensors`.
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
# A tensor at most this large, asked for box by box, keeps the rows read for one box
# for the next boxes of it (`_rows_of`); a larger one is read box by box.
_RECENT_BYTES = 256 * 2**20


class SafetensorsCheckpoint(Source):
    """A lazy source over Hugging Face safetensors weights.

    Tensor names are paths: `model.layers.0.mlp.up_proj.weight` is the leaf
    `('model', 'layers', 0, 'mlp', 'up_proj', 'weight')` of the metadata tree
    (nested dicts; an all-digit segment is an int key). Metadata comes from the
    file headers alone. Each target shard then reads only its byte range of
    each tensor, in the stored dtype; a tensor is read once per read call even
    when several shards hold the same rows, and once for all the devices of a
    leaf built device by device under an operation (the rows of the tensor
    read last are kept for the next boxes of it, up to 256 MiB). Reading never writes: the files
    are byte-identical afterwards.

    Args:
      path: a `.safetensors` file, or a folder holding
        `model.safetensors.index.json` and the shards its `weight_map` names
        (or a folder holding a single `.safetensors` file). `~` is expanded.
        A `file://`, `gs://` or `s3://` URL also works.
      timeout: seconds each remote storage operation may take (default 30, or
        `TREEGRAFT_STORAGE_TIMEOUT`); a read that stalls longer is a
        `CheckpointError` naming the file.

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

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = None):
        if not isinstance(path, str | os.PathLike):
            raise CheckpointError(
                f"a safetensors path must be a str or os.PathLike, got {type(path).__name__}"
            )
        location = Location.parse(path, timeout=timeout, what="a safetensors path")
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
                    # A folder named like a file is easy to take for one.
                    named = " (a folder, though named like a file)" if (
                        self.path.endswith(_SUFFIX)) else ""
                    raise CheckpointError(
                        f"{self.path!r}{named} has no {INDEX_NAME} and holds {len(files)} "
                        f"{_SUFFIX} files ({listed}): pass one file, or add the index "
                        "that Hugging Face writes beside sharded weights"
                    )
                shard = _SHARD.search(files[0])
                if shard and int(shard.group(2)) > 1:
                    # What a sharded write to gs:// or s3:// interrupted after its
                    # first shard leaves (the index is written last).
                    raise CheckpointError(
                        f"{self.path!r} holds only {files[0]}, shard {int(shard.group(1))} "
                        f"of {int(shard.group(2))}, and no {INDEX_NAME}: it is incomplete (an "
                        "interrupted write or copy?); write or copy it again, or pass that "
                        "one file to read it alone"
                    )
                self._single = files[0]
        else:
            self.folder, self._single = self.path.rstrip("/").rsplit("/", 1)
            self._loc = Location.parse(
                self.folder, timeout=location.timeout, what="a safetensors folder"
            )
            self._index = None
        self._files = Files(self._loc, self.folder, self.describe())
        # The rows of the tensor read last by `read_boxes`, by file byte range (`_rows_of`).
        self._recent: tuple[TensorInfo, dict[tuple[int, int], np.ndarray]] | None = None
        self._arena = RowArena()  # the memory of those rows, used again for later tensors
        self._rows_lock = threading.Lock()  # held while rows are read into the arena
        self._tree: dict[Any, Any] | None = None
        self._by_parts: dict[tuple[Part, ...], TensorInfo] = {}
        self._by_loose: dict[tuple[Part, ...], TensorInfo] | None = None
        self._too_deep: dict[tuple[Part, ...], TensorInfo] = {}
        self._file_metadata: dict[str, dict[str, str]] = {}

    # -- the Source interface ---------------------------------------------------

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({self.path!r})"

    def describe(self) -> str:
        return f"the safetensors checkpoint {self.path}"

    def metadata(self) -> Any:
        """The tensors as a tree of nested dicts whose leaves are `TensorInfo`s.

        Reads only the headers (and, per file, one byte at the end of its data
        to check that the file is whole). Cached after the first call. A
        tensor whose name has more than 100 path parts is left out (jax cannot
        flatten a tree that deep): the other tensors stay usable, and reading
        that one by its path raises `CheckpointError`.

        Raises:
          CheckpointError: a header or the index is damaged; the message names
            the file and what is wrong.
        """
        if self._tree is None:
            infos, self._file_metadata, generations = read_headers(
                self._files.kvstore(), self._loc, self._index, self._single,
                self._files.check,
            )
            self._files.remember(sorted(generations), generations)
            self._tree, self._by_parts, self._too_deep = build_tree(infos, self.describe())
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
                sharding = sharding_of(like)
                indices = sharding.addressable_devices_indices_map(info.shape)
                boxes = list(
                    dict.fromkeys(box_of(index or (), info.shape) for index in indices.values())
                )
                jobs.append((info, boxes, sharding))
            else:
                jobs.append((info, [full_box(info.shape)], None))
        out: list[Any] = []
        for (info, boxes, sharding), pieces in zip(
            jobs, self._fetch([(info, boxes) for info, boxes, _ in jobs]), strict=True
        ):
            if sharding is None:
                out.append(pieces[boxes[0]])
                continue
            # Every device shard in a buffer of its own (docs/design.md section 12).
            out.append(array_from_blocks(info.shape, sharding, pieces.__getitem__, adopt=False))
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
            box = check_box(req.box, info)
            entry = by_tensor.setdefault(id(info), (info, []))
            if box not in entry[1]:
                entry[1].append(box)
            wanted.append((id(info), box))
        keys = list(by_tensor)
        if len(keys) == 1 and self._keeps_rows(by_tensor[keys[0]]):
            fetched = {keys[0]: self._rows_of(*by_tensor[keys[0]])}
        else:
            self._recent = None
            fetched = dict(zip(keys, self._fetch([by_tensor[k] for k in keys]), strict=True))
        out, given = [], set()
        for k, box in wanted:
            piece = fetched[k][box]
            # The same box asked twice: each request gets its own array.
            out.append(piece.copy() if (k, box) in given else piece)
            given.add((k, box))
        return out

    def lend_boxes(self, requests: Sequence[Any]) -> list[np.ndarray]:
        """Reads boxes of tensors as `read_boxes` does, but may lend them instead of copying.

        A box of a tensor whose rows are kept between calls (a local file, at
        most 256 MiB) is a read-only view of those rows, which are read once
        and not overwritten while any view of them lives; any other box is
        read as by `read_boxes`.
        The caller must copy what it keeps (the insert step's device put
        does: jax copies a strided view into a buffer of its own), and must
        not write into a lent box.

        Args:
          requests: as `read_boxes`.

        Returns:
          One array per request, in order, in the stored dtype.

        Raises:
          As `read_boxes`.

        Example:
          >>> from types import SimpleNamespace as Box
          >>> src = tg.SafetensorsCheckpoint('/models/llama')        # doctest: +SKIP
          >>> head = Box(path='lm_head.weight', box=(slice(0, 8), slice(None)))
          >>> [w] = src.lend_boxes([head])                            # doctest: +SKIP
          >>> w.flags.writeable                                       # doctest: +SKIP
          False
        """
        infos = [self._info(req.path) for req in requests]
        boxes = [check_box(req.box, info) for req, info in zip(requests, infos, strict=True)]
        job = (infos[0], list(dict.fromkeys(boxes))) if infos else None
        if job is None or any(info is not job[0] for info in infos) or not self._keeps_rows(job):
            return self.read_boxes(requests)
        views = self._views(*job)
        return [views[box] for box in boxes]

    def box_nbytes(self, path: Path | str, box: tuple[slice, ...]) -> int:
        """Bytes that reading `box` of the tensor at path alone really reads.

        The smallest range of rows that covers the box; boxes of one tensor read
        in one `read_boxes` call share the bytes of their overlapping ranges.

        Raises:
          GraftError: the box is not one slice per axis with step 1 inside the shape.
          PathNotFoundError: path is not a tensor of this checkpoint.
        """
        info = self._info(path)
        begin, end = covering(info, check_box(box, info))[:2]
        return end - begin

    def close(self) -> None:
        """Closes the files and the kvstore; later reads raise `CheckpointError`."""
        self._recent = None
        self._arena = RowArena()
        self._files.close()

    # -- internals --------------------------------------------------------------

    def _keeps_rows(self, job: tuple[TensorInfo, list[Box]]) -> bool:
        """Whether the boxes of one local tensor go through the rows kept between calls."""
        info, boxes = job
        return (
            _local_folder(self._loc) is not None
            and bool(info.shape)
            and info.end - info.begin <= _RECENT_BYTES
            and all(stop > start for box in boxes for start, stop in box)
        )

    def _rows_of(self, info: TensorInfo, boxes: list[Box]) -> dict[Box, np.ndarray]:
        """Boxes of one tensor, cut from its rows read by this call or the calls just before.

        A target leaf under an operation is built one device at a time, each
        device asking for its own box: devices that need the same rows
        (column shards, replicas, the whole input of a reshape) would each
        read them again. The rows read for one box are kept (`_kept_rows`)
        and the next boxes of that tensor cut from them. Each box is a new
        array, never a view of the kept rows.
        """
        out = {}
        for box, view in self._views(info, boxes).items():
            piece = _aligned(view.nbytes).view(info.dtype).reshape(view.shape)
            piece[...] = view
            out[box] = piece
        return out

    def _views(self, info: TensorInfo, boxes: list[Box]) -> dict[Box, np.ndarray]:
        """Each box of one tensor as a read-only view of its kept rows (`_kept_rows`)."""
        kept = self._kept_rows(info, boxes)
        out = {}
        for box in boxes:
            begin, end, sub_shape, inner = covering(info, box)
            b, rows = next((b, r) for (b, e), r in kept.items() if b <= begin and end <= e)
            offset = (begin - b) // info.dtype.itemsize
            view = rows[offset : offset + math.prod(sub_shape)].reshape(sub_shape)[inner]
            out[box] = view.reshape(tuple(stop - start for start, stop in box))
        return out

    def _kept_rows(self, info: TensorInfo, boxes: list[Box]) -> dict[tuple[int, int], np.ndarray]:
        """The rows of one tensor that hold boxes, by file byte range, read once for many calls.

        The rows read for earlier boxes of the same tensor are kept (one
        tensor at a time, at most `_RECENT_BYTES`) and used again after
        checking that the file has not changed since; only rows none of them
        holds are read. Kept rows are read-only; their memory is read into
        again, for a later tensor, only once no view of it lives (`RowArena`):
        a view stays valid after the next tensor replaces them. Calls from
        several threads take turns.
        """
        # One thread at a time: the arena hands out its memory by a counter,
        # and two reads taking from it at once were given the same bytes (one
        # checkpoint object grafted by several threads: wrong values).
        with self._rows_lock:
            kept = self._recent[1] if self._recent is not None and self._recent[0] is info else {}
            if kept:  # the checks of a read: the file's stat, then its header
                self._files.pread(info, info.begin, np.empty(0, np.uint8))
                self._files.check_unchanged([info])
            else:  # another tensor: the earlier one's rows go, their memory may serve again
                self._recent = None
                self._arena.restart()

            def held(box: Box) -> bool:
                begin, end = covering(info, box)[:2]
                return any(b <= begin and end <= e for b, e in kept)

            missing = list(dict.fromkeys(row_box(info, box) for box in boxes if not held(box)))
            if missing:
                for rows, piece in next(self._fetch([(info, missing)], self._arena.take)).items():
                    flat = piece.reshape(-1)
                    flat.flags.writeable = False
                    kept[covering(info, rows)[:2]] = flat
            self._recent = (info, kept)
            return kept

    def _fetch(
        self,
        jobs: Sequence[tuple[TensorInfo, list[Box]]],
        alloc: Callable[[int], np.ndarray] | None = None,
    ) -> Iterator[dict[Box, Any]]:
        """The files' pieces of each job, with every BOOL byte checked to be 0 or 1.

        Raises:
          CheckpointError: a BOOL tensor holds another byte, naming the tensor,
            the file and the offset of the first such byte read.
        """
        for (info, _), pieces in zip(jobs, self._files.fetch(jobs, alloc), strict=True):
            if info.dtype == np.bool_ and (bad := first_bad_bool(info, pieces)) is not None:
                # Refused, not normalised: a reader never changes a value silently.
                offset, byte = bad
                element = tuple(int(k) for k in np.unravel_index(offset - info.begin, info.shape))
                raise CheckpointError(
                    f"BOOL tensor {info.name!r} in {file_path(self.folder, info.file)} holds the "
                    f"byte {byte} at file offset {offset} (element {list(element)}); a BOOL "
                    "byte must be 0 or 1, and any other value gives an array that disagrees "
                    "with itself. Re-download the file, "
                    "or re-save the tensor as its bytes compared with 0 (in numpy, "
                    "`x.view(np.uint8) != 0`)"
                )
            yield pieces

    def _info(self, path: Path | str) -> TensorInfo:
        self.metadata()
        parts = parse_path(path).parts if isinstance(path, str) else tuple(path.parts)
        info = self._by_parts.get(parts)
        if info is None:
            # A path with int keys ('layers[0]') names the tensor 'layers.0'.
            if self._by_loose is None:
                self._by_loose = {loose(k): v for k, v in self._by_parts.items()}
            info = self._by_loose.get(loose(parts))
        if info is None and parts in self._too_deep:
            name = self._too_deep[parts].name
            shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}..."
            raise CheckpointError(
                f"tensor {shown} of {self.describe()} has "
                f"{len(parts)} path parts; treegraft reads names of at most {MAX_DEPTH} (a tree "
                "that deep cannot be flattened), so this tensor is left out of the metadata "
                "and cannot be read. Rename it in the file to read it"
            )
        if info is None:
            names = [render_parts(k) for k in self._by_parts]
            raise PathNotFoundError(
                f"{render_parts(parts)!r} is not a tensor of {self.describe()}"
                f"{suggest_path(render_parts(parts), names)}"
            )
        return info


SafetensorsCheckpoint.__module__ = "treegraft"
