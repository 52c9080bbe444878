"""Reads through orbax's own API: its metadata call, and its partial restore."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, describe_leaf, first_line
from treegraft._formats.orbax.headers import PY_TYPES, LazyLeaf
from treegraft._formats.orbax.metadata import lazy_metadata
from treegraft._insert.placement import own_buffers, sharding_of
from treegraft._parse.paths import Part, render_parts
from treegraft._read.source import ReadRequest
from treegraft._storage.errors import reason
from treegraft._storage.location import Location
from treegraft._tree import leaves as _leaves

__all__ = ["ScalarSpec", "orbax_read", "read_metadata"]

_WINDOW_BYTES = 256 * 10**6  # bytes of reads in flight at once, at least


class ScalarSpec:
    """Metadata of a Python scalar saved by orbax: shape () and a Python type."""

    __slots__ = ("dtype",)
    shape = ()

    def __init__(self, dtype: type):
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"ScalarSpec({self.dtype.__name__})"


def read_metadata(directory: Location) -> Any:
    """The checkpoint's tree: lazy leaves from `_METADATA`, else orbax's metadata call.

    Raises:
      CheckpointError: the metadata cannot be read, or is not a tree of arrays.
    """
    tree = lazy_metadata(directory)
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
        # orbax's own asserts fail with no message: say so rather than print 'AssertionError: '
        why = str(e).strip() or "orbax's reader failed one of its own checks on it"
        raise CheckpointError(
            f"cannot read the metadata of {directory} (is _METADATA corrupt?): "
            f"{type(e).__name__}: {why}"
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
        return ScalarSpec(PY_TYPES.get(np.dtype(leaf.dtype).kind, float))
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


def orbax_read(meta: Any, directory: Location, requests: Sequence[ReadRequest]) -> list[Any]:
    """Restores the requested leaves with orbax's partial restore, in order."""
    import orbax.checkpoint as ocp

    item: Any = _empty_like(meta)
    restore_args: Any = _empty_like(meta)
    largest = 0
    planned = []
    for req in requests:
        leaf = _set(item, meta, req.path.parts, _Marker())
        _set(restore_args, meta, req.path.parts, _restore_args(req))
        largest = max(largest, _leaves.nbytes(_leaves.spec_of(leaf)))
        planned.append(leaf)
    # orbax lets up to 96 GB of reads be in flight at once: peak memory then
    # grows well past the bytes grafted. A smaller window costs no time
    # (measured: docs/benchmarks.md); it must hold the largest array whole.
    handler = ocp.PyTreeCheckpointHandler(
        restore_concurrent_gb=max(_WINDOW_BYTES, 2 * largest) / 1e9  # type: ignore[arg-type]
    )
    try:
        # orbax puts what it reads on the devices: transfers graft was asked
        # for, allowed whatever guard the caller set (docs/design.md section 12).
        with jax.transfer_guard("allow"):
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
            f"reading {len(requests)} leaf(s) from {directory} failed: {reason(e)}"
        ) from e
    finally:
        handler.close()
    out = []
    for req, leaf in zip(requests, planned, strict=True):
        value = _get(restored, req.path.parts)
        if isinstance(value, _Marker):
            raise CheckpointError(
                f"orbax did not restore {render_parts(req.path.parts)!r} from {directory}"
            )
        _check_unchanged(req, leaf, value, directory)
        if isinstance(req.dtype, np.dtype) and np.dtype(value.dtype) != req.dtype:
            value = value.astype(req.dtype)  # a cast the caller asked for
        out.append(own_buffers(value))
    return out


def _check_unchanged(req: ReadRequest, leaf: Any, value: Any, directory: Location) -> None:
    """Refuses a restored value whose saved shape or dtype differs from the plan's.

    orbax restores in the saved dtype here (no dtype is passed), so a
    checkpoint rewritten since the plan shows; asked for a dtype, orbax would
    cast to it without a word (docs/design.md section 4).

    Raises:
      CheckpointError: names the path and both sides.
    """
    if isinstance(leaf, LazyLeaf):
        planned: tuple[Any, Any] = leaf.stored
    else:
        planned = (tuple(getattr(leaf, "shape", ()) or ()), getattr(leaf, "dtype", None))
    found = (tuple(np.shape(value)), np.dtype(getattr(value, "dtype", type(value))))
    if isinstance(planned[1], type) and not isinstance(leaf, LazyLeaf):
        # A Python scalar: orbax's metadata gives its type, the value a numpy dtype.
        same = PY_TYPES.get(found[1].kind, float) is planned[1] and found[0] == ()
    else:
        same = found == (planned[0], np.dtype(planned[1]))
    if not same:
        raise CheckpointError(
            f"{render_parts(req.path.parts)!r} in {directory} changed since the plan: the plan "
            f"saw {_describe(planned)}, the checkpoint now holds {_describe(found)}; nothing "
            "was grafted: plan again to read the new checkpoint"
        )


def _describe(spec: tuple[Any, Any]) -> str:
    dtype = spec[1].__name__ if isinstance(spec[1], type) else spec[1]
    return describe_leaf(spec[0], dtype)


def _restore_args(req: ReadRequest) -> Any:
    import orbax.checkpoint as ocp

    like = req.like
    # No dtype: orbax would cast to it silently; the value is checked and cast after.
    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        return ocp.ArrayRestoreArgs(sharding=sharding_of(like), global_shape=tuple(like.shape))
    return ocp.RestoreArgs(restore_type=np.ndarray)


class _Marker:
    """A requested leaf in the restore template (orbax returns it if unread)."""
