"""A lazy source over any orbax PyTree checkpoint.

Metadata comes from orbax's `_METADATA` (no array bytes read). `read` restores
only the requested leaves with orbax's public partial restore, each directly
into the sharding of the target leaf it will replace, in the source's own
dtype, so that orbax's silent cast can never happen unasked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, CheckpointNotFoundError, first_line
from treegraft._multihost import check_processes_agree
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._read import arrays
from treegraft._read.metadata import LazyLeaf, lazy_metadata, prefetch
from treegraft._read.source import BoxRequest, ReadRequest, Source
from treegraft._read.storage import Location, children_of
from treegraft._tree import leaves as _leaves

__all__ = ["OrbaxCheckpoint", "ScalarSpec"]

_TMP_MARK = ".orbax-checkpoint-tmp"
_WINDOW_BYTES = 256 * 10**6  # bytes of reads in flight at once, at least
_ITEM = "default"


class ScalarSpec:
    """Metadata of a Python scalar saved by orbax: shape () and a Python type."""

    __slots__ = ("dtype",)
    shape = ()

    def __init__(self, dtype: type):
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"ScalarSpec({self.dtype.__name__})"


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
        if loc.join("_METADATA").kind("checkpoint") == "file":
            return loc
        item = loc.join(_ITEM)
        if item.join("_METADATA").kind("the item folder") == "file":
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
        # Called when a leaf's metadata, read on demand during a plan, fails:
        # an owner (KauldronCheckpoint) may raise a more telling error.
        self.on_metadata_error: Callable[[CheckpointError], None] | None = None

    def __repr__(self) -> str:
        return f"OrbaxCheckpoint({self.path!r})"

    def describe(self) -> str:
        return f"the checkpoint {self.path}"

    def metadata(self) -> Any:
        """The checkpoint's tree with shapes and dtypes (no array bytes read).

        The tree comes from orbax's `_METADATA` file. Each leaf reads its shape
        and dtype from the array's zarr header when first asked; `prefetch`
        reads many at once, and after a few single reads the rest of the
        checkpoint's headers are read in one batch, so walking every leaf's
        shape is about as fast as a plan.

        Raises:
          CheckpointNotFoundError, CheckpointError: as `item_directory`, or the
            metadata is unreadable.
        """
        if self._metadata is None:
            self._metadata = _read_metadata(
                item_directory(self.location), self.on_metadata_error
            )
        return self._metadata

    def close(self) -> None:
        """Forgets the cached metadata (and the tensorstore handles it holds)."""
        self._metadata = None

    def prefetch(self, leaves: Sequence[Any]) -> None:
        """Reads the shapes and dtypes of these metadata leaves in one batch.

        From one walk of the checkpoint's OCDBT index when enough of its leaves
        are wanted, else key by key; a header that cannot be read is reported
        when its leaf is used.
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
            got = self._orbax_read(meta, directory, [requests[i] for i in rest])
            for i, value in zip(rest, got, strict=True):
                out[i] = value
        for i, impl in keyed.items():
            out[i] = jax.random.wrap_key_data(out[i], impl=impl)
        return out

    def read_boxes(self, requests: Sequence[BoxRequest]) -> list[np.ndarray]:
        """`leaf[box]` for each request, reading only the chunks that hold the box.

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
        return [
            reader.read_box(leaf, _check_box(req, leaf.shape))
            for leaf, req in zip(leaves, requests, strict=True)
        ]

    def box_nbytes(self, path: Path, box: Sequence[slice]) -> int:
        """Bytes a read of `leaf[box]` really reads, given the array's chunking."""
        leaf = _leaf_at(self.metadata(), path.parts)
        if not isinstance(leaf, LazyLeaf):
            return super().box_nbytes(path, tuple(box))
        reader = arrays.DirectReader(leaf._store)
        return reader.box_nbytes(leaf, _check_box(BoxRequest(path, tuple(box)), leaf.shape))

    def _orbax_read(self, meta: Any, directory: Location, requests: Sequence[ReadRequest]
                    ) -> list[Any]:
        import orbax.checkpoint as ocp

        item: Any = _empty_like(meta)
        restore_args: Any = _empty_like(meta)
        largest = 0
        for req in requests:
            leaf = _set(item, meta, req.path.parts, _Marker())
            _set(restore_args, meta, req.path.parts, _restore_args(req))
            largest = max(largest, _leaves.nbytes(_leaves.spec_of(leaf)))
        # orbax lets up to 96 GB of reads be in flight at once: peak memory then
        # grows well past the bytes grafted. A smaller window costs no time
        # (measured: docs/benchmarks.md); it must hold the largest array whole.
        handler = ocp.PyTreeCheckpointHandler(
            restore_concurrent_gb=max(_WINDOW_BYTES, 2 * largest) / 1e9  # type: ignore[arg-type]
        )
        try:
            restored = handler.restore(
                directory.orbax_path(),
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        except CheckpointError:
            raise
        except Exception as e:  # orbax/tensorstore raise ValueError, OSError, ...
            raise CheckpointError(
                f"reading {len(requests)} leaf(s) from {directory} failed: {_reason(e)}"
            ) from e
        finally:
            handler.close()
        out = []
        for req in requests:
            value = _get(restored, req.path.parts)
            if isinstance(value, _Marker):
                raise CheckpointError(
                    f"orbax did not restore {render_parts(req.path.parts)!r} from {directory}"
                )
            out.append(_own_buffers(value))
        return out


def _own_buffers(value: Any) -> Any:
    """value, with copies where orbax handed several shards one buffer (DESIGN 12).

    orbax restores a replicated array into one host buffer shared by every
    device on CPU: donating one shard would then free the others.
    """
    if not isinstance(value, jax.Array) or len(value.addressable_shards) < 2:
        return value
    shards = value.addressable_shards
    try:
        pointers = [s.data.unsafe_buffer_pointer() for s in shards]
    except Exception:  # a backend without pointers: nothing to check
        return value
    if len(set(pointers)) == len(pointers):
        return value
    seen: set[int] = set()
    buffers = []
    with jax.transfer_guard("allow"):
        for shard, pointer in zip(shards, pointers, strict=True):
            data = shard.data
            if pointer in seen:
                data = jax.device_put(np.array(data), shard.device)
            seen.add(pointer)
            buffers.append(data)
        return jax.make_array_from_single_device_arrays(value.shape, value.sharding, buffers)


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


def _reason(error: BaseException) -> str:
    name, line = first_line(error)
    return f"{name}: {line}"


class _Marker:
    """A requested leaf in the restore template (orbax returns it if unread)."""








def _read_metadata(
    directory: Location, on_error: Callable[[CheckpointError], None] | None = None
) -> Any:
    tree = lazy_metadata(directory, on_error)
    if tree is not None:
        return tree
    import orbax.checkpoint as ocp

    path = directory.orbax_path()
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(path).tree
    except RecursionError as e:
        raise CheckpointError(
            f"cannot read the metadata of {directory} (is _METADATA corrupt?): its JSON is "
            "nested too deeply to be orbax's"
        ) from e
    except Exception as e:  # a corrupt _METADATA raises JSONDecodeError, KeyError, ...
        raise CheckpointError(
            f"cannot read the metadata of {directory} (is _METADATA corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        handler.close()
    if not isinstance(tree, dict | list):
        raise CheckpointError(
            f"the metadata of {directory} is a {type(tree).__name__}, not a tree of arrays"
        )
    try:
        return jax.tree_util.tree_map(_spec_leaf, tree)
    except (ValueError, TypeError, RecursionError) as e:  # jax cannot sort mixed dict keys
        raise CheckpointError(
            f"cannot read the metadata of {directory} (is _METADATA corrupt?): "
            f"{type(e).__name__}: {first_line(e)[1]}"
        ) from e


def _spec_leaf(leaf: Any) -> Any:
    from orbax.checkpoint import metadata as ocp_metadata

    if isinstance(leaf, ocp_metadata.ScalarMetadata):
        kind = np.dtype(leaf.dtype).kind
        types = {"b": bool, "i": int, "u": int, "f": float, "c": complex}
        return ScalarSpec(types.get(kind, float))
    return leaf


def _empty_like(meta: Any) -> Any:
    if isinstance(meta, dict):
        return {}
    if isinstance(meta, list):
        return [None] * len(meta)
    return None


def _set(tree: Any, meta: Any, parts: tuple[Part, ...], value: Any) -> Any:
    # Builds the sparse template: dicts hold only requested keys, lists keep
    # their saved length with None where nothing is requested (orbax needs it).
    # Returns the leaf's metadata.
    node, m = tree, meta
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        child_meta = m[part]
        if last:
            node[part] = value
            return child_meta
        if isinstance(node, dict):
            if part not in node:
                node[part] = _empty_like(child_meta)
        elif node[part] is None:
            node[part] = _empty_like(child_meta)
        node, m = node[part], child_meta
    raise CheckpointError("cannot read the root of a checkpoint as one leaf")


def _get(tree: Any, parts: tuple[Part, ...]) -> Any:
    node = tree
    for part in parts:
        node = node[part]
    return node


def _restore_args(req: ReadRequest) -> Any:
    import orbax.checkpoint as ocp

    like = req.like
    dtype = req.dtype if isinstance(req.dtype, np.dtype) else None
    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        sharding = like.sharding
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(like.shape), dtype=dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
