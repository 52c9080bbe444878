"""A lazy source over any orbax PyTree checkpoint.

Metadata comes from orbax's `_METADATA` (no array bytes read). `read` reads
only the requested leaves, each directly into the sharding of the target leaf
it will replace, in the source's own dtype, so that orbax's silent cast can
never happen unasked: with tensorstore for orbax's default layouts, else with
orbax's public partial restore (`restore`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, CheckpointNotFoundError
from treegraft._formats.orbax import arrays
from treegraft._formats.orbax.headers import LazyLeaf, prefetch
from treegraft._formats.orbax.restore import ScalarSpec, orbax_read
from treegraft._formats.orbax.restore import read_metadata as _read_metadata
from treegraft._multihost import check_processes_agree
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._read.source import BoxRequest, ReadRequest, Source
from treegraft._storage.local import local_kind, not_regular
from treegraft._storage.location import Location, children_of

__all__ = ["OrbaxCheckpoint", "ScalarSpec"]

_TMP_MARK = ".orbax-checkpoint-tmp"
_ITEM = "default"


def item_directory(path: str | os.PathLike[str] | Location) -> Location:
    """The orbax item directory at path: path itself, or its `default` item.

    Raises:
      CheckpointNotFoundError: path does not exist.
      CheckpointError: path is not an orbax PyTree checkpoint, or cannot be read.
    """
    loc = Location.parse(path)
    p = str(loc)
    keys: list[str] = [] if loc.is_local else loc.keys()  # remote: one listing answers all
    kind = "dir" if keys else loc.kind("checkpoint")
    if kind is None:
        raise CheckpointNotFoundError(f"checkpoint {p!r} does not exist")
    if kind != "dir":
        raise CheckpointError(f"checkpoint {p!r} is a file, not an orbax checkpoint directory")
    if _TMP_MARK in loc.name:
        raise CheckpointError(f"checkpoint {p!r} is still being written (orbax temporary folder)")
    if loc.is_local:
        for item in (loc, loc.join(_ITEM)):
            if _local_metadata_file(item):
                return item
        entries = loc.listdir("checkpoint")
    else:
        if "_METADATA" in keys:
            return loc
        if f"{_ITEM}/_METADATA" in keys:
            return loc.join(_ITEM)
        entries = list(children_of(keys))
    shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
    raise CheckpointError(
        f"{p!r} is not an orbax PyTree checkpoint: neither {p}/_METADATA nor "
        f"{p}/{_ITEM}/_METADATA exists (it holds: {shown or 'nothing'})"
    )


def _local_metadata_file(item: Location) -> bool:
    """Whether a local item folder holds orbax's `_METADATA` as a regular file.

    Its `manifest.ocdbt`, when there is one, must be a regular file too: reading
    a FIFO there would block forever, a device never end.

    Raises:
      CheckpointError: either is there but is a folder, FIFO, device, socket
        or loop of symbolic links; or cannot be looked at.
    """
    for name, what in (("_METADATA", "orbax's metadata file"),
                       ("manifest.ocdbt", "the OCDBT manifest")):
        path = item.join(name).key
        found = local_kind(path, what)
        if found in ("missing", "broken symlink"):
            if name == "_METADATA":
                return False
            continue  # not an OCDBT layout: orbax's restore reads it
        if found != "file":
            raise not_regular(path, found, what, "a file")
    return True


class OrbaxCheckpoint(Source):
    """A lazy source over an orbax PyTree checkpoint.

    Args:
      path: an item directory (holding `_METADATA`) or a step directory, in
        which case its `default` item is used: a local path, or a `file://`,
        `gs://` or `s3://` URL.
      timeout: seconds each remote storage operation may take (default 30, or
        `TREEGRAFT_STORAGE_TIMEOUT`).

    Reading never writes: no file or folder is created or touched in path.

    Example:
      >>> import treegraft as tg
      >>> src = tg.OrbaxCheckpoint('/path/to/ckpt_10')           # doctest: +SKIP
      >>> new_state = tg.graft(state, src, {'params.dec': 'params.enc'})  # doctest: +SKIP
    """

    def __init__(
        self, path: str | os.PathLike[str] | Location, *, timeout: float | None = None
    ):
        if not isinstance(path, str | os.PathLike | Location):
            raise CheckpointError(
                f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}"
            )
        # orbax wants absolute paths; a relative one is taken from the current folder.
        self.location = Location.parse(path, timeout=timeout)
        self.path = str(self.location)
        self._metadata: Any = None
        self._direct_reads = True  # False: every read through orbax's restore
        # Chunk-aligned regions kept between box reads (a shard's box cutting a
        # chunk leaves the chunk for the next shards): see `arrays.Regions`.
        self._regions = arrays.Regions()

    def __repr__(self) -> str:
        return f"OrbaxCheckpoint({self.path!r})"

    def describe(self) -> str:
        return f"the checkpoint {self.path}"

    def metadata(self) -> Any:
        """The checkpoint's tree with shapes and dtypes (no array bytes read).

        The tree comes from orbax's `_METADATA` file; `prefetch` then reads the
        shapes and dtypes of the leaves wanted from their zarr headers, in one
        batch. A leaf not prefetched reads its header when first touched, and
        after a few such reads the rest of the checkpoint's headers are read in
        one batch, so walking every leaf's shape is about as fast as a plan.

        Raises:
          CheckpointNotFoundError, CheckpointError: as `item_directory`, or the
            metadata is unreadable.
        """
        if self._metadata is None:
            self._metadata = _read_metadata(item_directory(self.location))
        return self._metadata

    def close(self) -> None:
        """Forgets the cached metadata, the tensorstore handles it holds and kept regions."""
        self._metadata = None
        self._regions.clear()

    def prefetch(self, leaves: Sequence[Any]) -> None:
        """Reads the shapes and dtypes of these metadata leaves in one batch.

        From one walk of the checkpoint's OCDBT index when enough of its leaves
        are wanted, else key by key. Afterwards their `.shape` and `.dtype` do
        no I/O.

        Raises:
          CheckpointError: a header cannot be read; the message names every
            such leaf.
        """
        prefetch(leaves)

    def read(self, requests: Sequence[ReadRequest]) -> list[Any]:
        """Reads exactly the requested leaves, each placed like its target.

        Arrays of the layouts orbax writes by default (OCDBT with zarr v2 or
        v3) are read with tensorstore, each target shard reading only its own
        slice; anything else is restored by orbax.
        """
        if not requests:
            return []
        meta = self.metadata()
        directory = item_directory(self.location)
        check_processes_agree(str(directory), requests)
        leaves = [_leaf_at(meta, req.path.parts) for req in requests]
        # Typed PRNG keys are saved as their key data: read the data, then wrap it.
        keyed = {
            i: impl
            for i, leaf in enumerate(leaves)
            if (impl := getattr(leaf, "key_impl", None)) is not None
        }
        if keyed:
            requests = list(requests)
            for i in keyed:
                requests[i] = _key_data_request(requests[i], keyed[i])
        direct = [
            i for i, (leaf, req) in enumerate(zip(leaves, requests, strict=True))
            if self._direct_reads and arrays.takes(leaf, req)
        ]
        out: list[Any] = [None] * len(requests)
        if direct:
            reader = arrays.DirectReader(leaves[direct[0]]._store)
            try:
                got = reader.read([leaves[i] for i in direct], [requests[i] for i in direct])
            except arrays._LeafError as e:
                raise CheckpointError(
                    f"reading {len(direct)} leaf(s) from {directory} failed: {e.reason} "
                    f"(in {e.message.split(':', 1)[0]})"
                ) from e.__cause__
            for i, value in zip(direct, got, strict=True):
                out[i] = value
        rest = [i for i in range(len(requests)) if i not in set(direct)]
        if rest:
            got = orbax_read(meta, directory, [requests[i] for i in rest])
            for i, value in zip(rest, got, strict=True):
                out[i] = value
        for i, impl in keyed.items():
            out[i] = jax.random.wrap_key_data(out[i], impl=impl)
        return out

    def read_boxes(self, requests: Sequence[BoxRequest]) -> Iterable[np.ndarray]:
        """`leaf[box]` for each request, reading only the chunks that hold the box.

        The paths and boxes are checked, and the arrays opened, by this call;
        the parts then stream in request order (`DirectReader.read_boxes`: a
        bounded window of reads in flight, cancelled if the consumer stops).
        Falls back to reading the whole leaf (the base class) for layouts the
        direct reader does not know.
        """
        if not requests:
            return []
        meta = self.metadata()
        leaves = [_leaf_at(meta, req.path.parts) for req in requests]
        if not all(isinstance(leaf, LazyLeaf) for leaf in leaves):
            return super().read_boxes(requests)
        reader = arrays.DirectReader(leaves[0]._store)
        # One reader (one tensorstore context) for every box of the call.
        boxes = [_check_box(req, leaf.shape) for leaf, req in zip(leaves, requests, strict=True)]
        outs = [getattr(req, "out", None) for req in requests]
        return reader.read_boxes(leaves, boxes, outs, self._regions)

    def box_nbytes(self, path: Path, box: Sequence[slice]) -> int:
        """Bytes a read of `leaf[box]` really reads, given the array's chunking."""
        leaf = _leaf_at(self.metadata(), path.parts)
        if not isinstance(leaf, LazyLeaf):
            return super().box_nbytes(path, tuple(box))
        reader = arrays.DirectReader(leaf._store)
        return reader.box_nbytes(leaf, _check_box(BoxRequest(path, tuple(box)), leaf.shape))

def _leaf_at(meta: Any, parts: tuple[Part, ...]) -> Any:
    node = meta
    for part in parts:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(
                f"{render_parts(parts)!r} is not a leaf of the checkpoint"
            ) from None
    return node


def _check_box(req: BoxRequest, shape: tuple[int, ...]) -> tuple[slice, ...]:
    box = tuple(req.box)
    if len(box) != len(shape) or any(
        not isinstance(s, slice) or s.step not in (None, 1) for s in box
    ):
        raise CheckpointError(
            f"a box of {render_parts(req.path.parts)!r} needs one slice of step 1 per axis "
            f"of its shape {shape}; got {box!r}"
        )
    for s, n in zip(box, shape, strict=True):
        for bound in (s.start, s.stop):
            if bound is not None and not 0 <= bound <= n:
                raise CheckpointError(
                    f"the box {box!r} is outside {render_parts(req.path.parts)!r} of shape "
                    f"{shape}"
                )
    return box


def _key_data_request(req: ReadRequest, impl: str) -> ReadRequest:
    """The request for the key data of a typed PRNG key target, sharded like it."""
    like = req.like
    data = jax.eval_shape(
        lambda: jax.random.key_data(jax.random.key(0, impl=impl))
    )
    shape = tuple(getattr(like, "shape", ())) + tuple(data.shape)
    sharding = getattr(like, "sharding", None)
    return ReadRequest(req.path, jax.ShapeDtypeStruct(shape, data.dtype, sharding=sharding),
                       np.dtype(data.dtype))
