"""Checkpoint metadata on demand: the tree from `_METADATA`, shapes when asked.

orbax's `PyTreeCheckpointHandler.metadata` opens every array of a checkpoint
to learn its shape and dtype (about 0.4 ms a leaf: 25 ms for 64 leaves, 38 s
for 100,000). A plan needs the shapes of the leaves it pairs only. So the tree
(keys, lists, empty nodes, which leaves exist) is read from the `_METADATA`
file, and each leaf's shape and dtype from its zarr header, when first asked.

This reads orbax's storage format for its OCDBT layouts, with zarr v2 (the
default) or zarr v3 arrays. Anything else, or anything unexpected in
`_METADATA`, returns None so that the caller falls back to orbax's own
metadata call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from treegraft._errors import CheckpointError, first_line
from treegraft._read.ocdbt_index import IndexWalk, start_walk
from treegraft._read.storage import Location
from treegraft._tree.gc import young_collections_only

__all__ = ["lazy_metadata", "LazyLeaf", "prefetch"]

_SEQUENCE, _DICT = 1, 2
_ARRAYS = ("jax.Array", "np.ndarray")
_PY_TYPES = {"b": bool, "i": int, "u": int, "f": float, "c": complex}


class _Unsupported(Exception):
    """`_METADATA` holds something this reader does not know: use orbax's."""


class _Corrupt(Exception):
    """`_METADATA` holds what orbax never writes: the checkpoint is damaged."""


# Single reads of a store before the rest of its leaves are read in one batch.
_SINGLE_LOADS = 16


def _context(location: Location) -> Any:
    """A tensorstore context whose cache keeps the decoded OCDBT index nodes.

    Without a cache pool each array open reads and decodes the index again:
    16 ms a leaf on a store of 100,000 keys, against 0.7 ms with one.
    """
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}, **location.context_spec()})


class _Store:
    """One tensorstore context per checkpoint, so the OCDBT index is read once."""

    def __init__(self, directory: Location, on_error: Callable[[CheckpointError], None] | None):
        self.location = directory
        self.directory = str(directory)
        self.on_error = on_error
        self._context: Any = None
        self.index: IndexWalk | None = None
        self.zarr3 = False  # set from `_METADATA`
        self.key_impls: dict[str, str] = {}  # array name -> PRNG impl, from orbax
        # Whether a chunk missing from the store reads as the fill value. orbax
        # stores every chunk unless told not to: then a missing chunk means the
        # checkpoint is damaged or being deleted, and must fail, never read as 0.
        self.fill_missing = True
        self.leaves: list[LazyLeaf] = []  # every leaf of the tree, for one bulk load
        self._single_loads = 0
        self._bulk_loaded = False

    def load(self, leaf: LazyLeaf) -> None:
        """Reads one leaf's shape and dtype; past a few, every leaf's at once.

        One array opened on its own costs 0.5 to 20 ms on a store of 100,000
        keys (each open decodes the index again), and code such as
        `jax.tree.map(lambda x: x.shape, metadata)` asks for every leaf in
        turn. A bulk load reads them all for about what 20 single ones cost.
        """
        self._single_loads += 1
        if self._single_loads > _SINGLE_LOADS and not self._bulk_loaded:
            self._bulk_loaded = True
            prefetch([x for x in self.leaves if x._spec is None])
            if leaf._spec is not None:
                return
        leaf._set(*self.header(leaf.name))

    def start_index(self) -> None:
        """Starts decoding the store's index, to overlap it with other work."""
        if self._context is None:
            self._context = _context(self.location)
        self.index = start_walk(self.location, self._context)

    def spec(self, name: str) -> dict[str, Any]:
        """The tensorstore spec of the array saved under name."""
        return {
            "driver": "zarr3" if self.zarr3 else "zarr",
            "kvstore": {"driver": "ocdbt", "base": self.location.kvstore(), "path": name},
        }

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
        import tensorstore as ts

        if self._context is None:
            self._context = _context(self.location)
        try:
            array = self.location.wait(
                ts.open(self.spec(name), open=True, read=True, context=self._context),
                "reading an array header of",
            )
        except Exception as e:  # tensorstore raises ValueError with a status
            _, reason = first_line(e, limit=300)
            error = CheckpointError(
                f"cannot read the metadata of {self.directory} (leaf {name!r}): {reason}"
            )
            error.__cause__ = e
            if self.on_error is not None:
                self.on_error(error)  # may raise a better error (a step deleted meanwhile)
            raise error from e
        return tuple(array.shape), np.dtype(array.dtype.numpy_dtype)


def prefetch(leaves: Any) -> None:
    """Reads the headers of these leaves not read yet, concurrently.

    A header that cannot be read is left unread: touching that leaf later
    raises the error, naming it.
    """
    import tensorstore as ts

    by_store: dict[_Store, list[LazyLeaf]] = {}
    for leaf in leaves:
        if type(leaf) is LazyLeaf and leaf._spec is None:
            group = by_store.get(leaf._store)
            if group is None:
                group = by_store[leaf._store] = []
            group.append(leaf)
    for store, pending in by_store.items():
        if store._context is None:
            store._context = _context(store.location)
        with young_collections_only():
            pending = _read_headers(store, pending)
        futures = [
            ts.open(store.spec(leaf.name), open=True, read=True, context=store._context)
            for leaf in pending
        ]
        for leaf, future in zip(pending, futures, strict=True):
            try:
                array = future.result(timeout=store.location.timeout)
            except Exception:  # read again, and reported, when the leaf is used
                continue
            leaf._set(tuple(array.shape), np.dtype(array.dtype.numpy_dtype))


def _read_headers(store: _Store, leaves: list[LazyLeaf]) -> list[LazyLeaf]:
    """Reads zarr headers straight from the OCDBT store.

    Opening an array through tensorstore costs about 95 µs; reading its small
    JSON header from the key-value store about 60 µs; decoding it from a walk
    of the store's whole index about 2 µs a key. Returns the leaves this could
    not read, for the caller to open the usual way.
    """
    import tensorstore as ts

    suffix = "/zarr.json" if store.zarr3 else "/.zarray"
    wanted = {f"{leaf.name}{suffix}".encode(): leaf for leaf in leaves}
    try:
        index = store.index
        found: dict[bytes, bytes] = {}
        if index is not None:
            if index.worth_it(len(wanted)):
                found = index.values(wanted)
            else:
                index.drop()
        rest = [key for key in wanted if key not in found] if len(found) < len(wanted) else []
        if rest:
            kv = store.location.wait(
                ts.KvStore.open(
                    {"driver": "ocdbt", "base": store.location.kvstore()}, context=store._context
                ),
                "opening",
            )
            futures = [kv.read(key) for key in rest]
            for key, future in zip(rest, futures, strict=True):
                try:
                    found[key] = bytes(future.result(timeout=store.location.timeout).value)
                except Exception:  # left for the array open, which reports it
                    pass
    except Exception:  # another layout, or an unreadable store: open each array
        return leaves
    left = [] if not rest else [leaf for key, leaf in wanted.items() if key not in found]
    parsed: dict[bytes, tuple[tuple[int, ...], np.dtype[Any]] | None] = {}
    for key, value in found.items():
        leaf = wanted[key]
        if value in parsed:  # most headers repeat: parse each text once
            spec = parsed[value]
        else:
            spec = parsed[value] = _parse_header(value, store.zarr3)
        if spec is None:  # unparsable or unusual: the array open decides
            left.append(leaf)
        elif leaf.scalar or leaf.key_impl is not None:
            leaf._set(*spec)
        else:
            leaf._spec = spec
    return left


_KEY_SPECS: dict[str, tuple[Any, int]] = {}


def _key_spec(impl: str) -> tuple[Any, int]:
    """The key dtype of a PRNG implementation, and the rank of its key data."""
    if impl not in _KEY_SPECS:
        import jax

        key = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
        data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
        _KEY_SPECS[impl] = (key.dtype, len(data.shape))
    return _KEY_SPECS[impl]


def _key_impls(location: Location) -> dict[str, str]:
    """{array name: PRNG implementation} of the key arrays orbax saved (its array metadata)."""
    folder = location.join("array_metadatas")
    if folder.kind("array metadata folder") != "dir":
        return {}
    out: dict[str, str] = {}
    for name in folder.listdir("array metadata folder"):
        try:
            entries = json.loads(folder.join(name).read_bytes("array metadata"))["array_metadatas"]
        except (CheckpointError, ValueError, KeyError, TypeError):
            continue  # not orbax's array metadata: no key arrays known from it
        for entry in entries if isinstance(entries, list) else ():
            meta = entry.get("array_metadata") if isinstance(entry, dict) else None
            ext = meta.get("ext_metadata") if isinstance(meta, dict) else None
            impl = ext.get("random_key_impl") if isinstance(ext, dict) else None
            param = meta.get("param_name") if isinstance(meta, dict) else None
            if isinstance(impl, str) and isinstance(param, str):
                out[param] = impl
    return out


def _parse_header(text: bytes, zarr3: bool) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """Shape and dtype from a zarr v2 `.zarray` or v3 `zarr.json`, or None."""
    try:
        header = json.loads(text)
        dtype = header["data_type"] if zarr3 else header["dtype"]
        return tuple(int(d) for d in header["shape"]), _zarr_dtype(dtype)
    except Exception:
        return None


def _zarr_dtype(text: Any) -> np.dtype[Any]:
    if not isinstance(text, str):
        raise TypeError("structured dtype")
    try:
        return np.dtype(text)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends, as jax names them

        return np.dtype(getattr(ml_dtypes, text))


class LazyLeaf:
    """A saved array's metadata; shape and dtype are read on first use.

    A Python scalar saved by orbax has shape () and its Python type as dtype.
    """

    __slots__ = ("name", "scalar", "key_impl", "_store", "_spec")

    def __init__(self, store: _Store, name: str, scalar: bool, key_impl: str | None = None):
        self._store = store
        self.name = name
        self.scalar = scalar
        # A typed PRNG key array is saved as its key data (uint32[..., 2] for
        # threefry): its metadata is the key array's own shape and key dtype.
        self.key_impl = key_impl
        self._spec: tuple[tuple[int, ...], Any] | None = None

    def _set(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        if self.scalar:
            self._spec = ((), _PY_TYPES.get(dtype.kind, float))
        elif self.key_impl is not None:
            key_dtype, data_ndim = _key_spec(self.key_impl)
            self._spec = (tuple(shape[: len(shape) - data_ndim]), key_dtype)
        else:
            self._spec = (shape, dtype)

    def _load(self) -> tuple[tuple[int, ...], Any]:
        if self._spec is None:
            self._store.load(self)
        assert self._spec is not None
        return self._spec

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._spec or self._load())[0]

    @property
    def dtype(self) -> Any:
        return (self._spec or self._load())[1]

    def __repr__(self) -> str:
        if self._spec is None:
            return f"LazyLeaf({self.name!r})"
        return f"LazyLeaf({self.name!r}, shape={self._spec[0]}, dtype={self._spec[1]})"


def lazy_metadata(
    directory: str | Location, on_error: Callable[[CheckpointError], None] | None = None
) -> Any:
    """The checkpoint's tree with `LazyLeaf` leaves, or None to use orbax's.

    Args:
      directory: the orbax item directory.
      on_error: called with the error when a leaf's header cannot be read
        later; it may raise a more telling one.

    Raises:
      CheckpointError: `_METADATA` is damaged, or remote storage fails.
    """
    location = Location.parse(directory)
    try:
        store = _Store(location, on_error)
        if location.is_local:
            if os.path.exists(os.path.join(location.key, "manifest.ocdbt")):
                store.start_index()  # decodes on tensorstore's threads while we parse
        else:
            store.start_index()  # no manifest: the walk fails and reads go key by key
        with young_collections_only():
            text = location.join("_METADATA").read_bytes("metadata file")
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                if location.is_local:
                    return None  # orbax's reader reports it, as it always did
                raise _corrupt(str(location), f"JSONDecodeError: {e}") from None
            zarr3 = meta.get("use_zarr3", False) if isinstance(meta, dict) else None
            if zarr3 not in (True, False) or meta.get("use_ocdbt") is not True:
                return None
            store.zarr3 = zarr3
            store.key_impls = _key_impls(location)
            store.fill_missing = meta.get("store_array_data_equal_to_fill_value") is not True
            entries = meta["tree_metadata"]
            if not isinstance(entries, dict) or not entries:
                return None
            return _build(store, entries.values())
    except _Corrupt as e:
        raise _corrupt(str(location), str(e)) from None
    except RecursionError:
        raise _corrupt(str(location), "its JSON is nested too deeply to be orbax's") from None
    except CheckpointError:
        if location.is_local:
            return None  # orbax's own reader reports it
        raise
    except (_Unsupported, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _corrupt(directory: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read the metadata of {directory} (is _METADATA corrupt?): {reason}; "
        "restore the checkpoint from a good copy, or read another step"
    )


_EMPTY_NODES: dict[str, Callable[[], Any]] = {
    "None": lambda: None, "Dict": dict, "List": list, "Tuple": tuple
}


def _key(node: dict[Any, Any], k: dict[str, Any], kinds: dict[int, int]) -> Any:
    """The key k names in node; a node's keys must all be of one kind."""
    kind = k["key_type"]
    if kind not in (_SEQUENCE, _DICT) or kinds[id(node)] not in (0, kind):
        raise _Unsupported("key type")
    kinds[id(node)] = kind
    key = k["key"]
    if kind == _DICT and not isinstance(key, str):
        # orbax writes every dict key as a string; jax cannot sort mixed keys.
        raise _Corrupt(f"the dict key {key!r} is not a string")
    return int(key) if kind == _SEQUENCE else key


def _build(store: _Store, entries: Any) -> Any:
    # Nodes are dicts while building; sequences carry their kind so they can
    # become lists (orbax saves tuples as lists) once every index is known.
    root: dict[Any, Any] = {}
    kinds: dict[int, int] = {id(root): 0}  # 0: kind not known yet
    # Entries come grouped by parent: walk down from the root only when the
    # parent changes.
    parent_meta: list[dict[str, Any]] | None = None
    parent, parent_name = root, ""
    for entry in entries:
        key_meta = entry["key_metadata"]
        if not key_meta:
            raise _Unsupported("a leaf at the root")
        if key_meta[:-1] != parent_meta:
            parent_meta, parent = key_meta[:-1], root
            for k in parent_meta:
                key = _key(parent, k, kinds)
                child = parent.get(key)
                if child is None:
                    child = parent[key] = {}
                    kinds[id(child)] = 0  # kind set by its first key
                elif not isinstance(child, dict) or id(child) not in kinds:
                    raise _Unsupported("a leaf with children")
                parent = child
            # The name orbax saves the array under: the keys joined by dots.
            parent_name = "".join([f"{k['key']}." for k in parent_meta])
        last = key_meta[-1]
        key = _key(parent, last, kinds)
        if key in parent:
            raise _Unsupported("duplicate key")
        kind = entry["value_metadata"]["value_type"]
        if kind in _ARRAYS:
            name = f"{parent_name}{last['key']}"
            parent[key] = leaf = LazyLeaf(store, name, False, store.key_impls.get(name))
            store.leaves.append(leaf)
        elif kind == "scalar":
            parent[key] = leaf = LazyLeaf(store, f"{parent_name}{last['key']}", True)
            store.leaves.append(leaf)
        elif kind in _EMPTY_NODES:
            parent[key] = _EMPTY_NODES[kind]()
        else:
            raise _Unsupported(kind)
    return _finish(root, kinds)


def _finish(node: Any, kinds: dict[int, int]) -> Any:
    if not isinstance(node, dict) or id(node) not in kinds:
        return node  # a leaf, or an empty node from a value type
    children = {k: _finish(v, kinds) for k, v in node.items()}
    if kinds[id(node)] != _SEQUENCE:
        return children
    if sorted(children) != list(range(len(children))):
        raise _Unsupported("a sequence with missing indices")
    return [children[i] for i in range(len(children))]
