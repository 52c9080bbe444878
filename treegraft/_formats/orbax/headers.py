"""Shapes and dtypes of a checkpoint's arrays, read from their zarr headers in batches."""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from treegraft._errors import CheckpointError
from treegraft._formats.orbax.ocdbt_index import IndexWalk, start_walk, worth_walking
from treegraft._storage.errors import reason, stalled
from treegraft._storage.location import Location
from treegraft._tree.gc import young_collections_only

log = logging.getLogger("treegraft")

__all__ = ["LazyLeaf", "OrbaxStore", "prefetch", "store_context"]

# The Python type orbax saved a scalar as, by the numpy kind of its stored dtype.
PY_TYPES = {"b": bool, "i": int, "u": int, "f": float, "c": complex}
# Failed leaves a prefetch error lists by name; the rest are counted.
_SHOWN_FAILURES = 10

# Single reads of a store before the rest of its leaves are read in one batch.
_SINGLE_LOADS = 16


def store_context(location: Location) -> Any:
    """A tensorstore context whose cache keeps the decoded OCDBT index nodes.

    Without a cache pool each array open reads and decodes the index again:
    16 ms a leaf on a store of 100,000 keys, against 0.7 ms with one.
    """
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}, **location.context_spec()})


class OrbaxStore:
    """The arrays of one orbax checkpoint (an OCDBT store): how to open each, and its leaves.

    One tensorstore context per checkpoint, so the OCDBT index is read once.
    `LazyLeaf`s made by `leaf` read their headers through it, one at a time
    and then, past a few, all together.

    Args:
      directory: the orbax item directory.
      zarr3: whether the arrays are zarr v3 (`use_zarr3` in `_METADATA`),
        else zarr v2.
      key_impls: {array name: PRNG implementation} of the typed key arrays.
      fill_missing: whether a chunk missing from the store reads as the fill
        value. orbax stores every chunk unless told not to
        (`store_array_data_equal_to_fill_value`): then a missing chunk means
        the checkpoint is damaged or being deleted, and must fail, never
        read as 0.
      context: the tensorstore context (`store_context`; made on first use
        when None).
      index: a walk of the store's index started before (`start_walk`), or None.
      walk_later: with no index, whether the store can be walked: a batch of
        headers then starts a walk when it beats reading them key by key.
    """

    def __init__(
        self,
        directory: Location,
        *,
        zarr3: bool = False,
        key_impls: Mapping[str, str] | None = None,
        fill_missing: bool = True,
        context: Any = None,
        index: IndexWalk | None = None,
        walk_later: bool = False,
    ):
        self.location = directory
        self.directory = str(directory)
        self.zarr3 = zarr3
        self.key_impls = dict(key_impls or {})
        self.fill_missing = fill_missing
        self._context = context
        self.index = index
        self.walk_later = walk_later and index is None
        self.leaves: list[LazyLeaf] = []  # every leaf of the tree, for one bulk load
        self._single_loads = 0
        self._bulk_loaded = False

    def leaf(self, name: str, scalar: bool) -> LazyLeaf:
        """A new `LazyLeaf` for the array saved under name, kept for a bulk load."""
        made = LazyLeaf(self, name, scalar, None if scalar else self.key_impls.get(name))
        self.leaves.append(made)
        return made

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
            # Leaves the caller may never touch: one that fails here is left
            # unread, and reports its error if it is touched.
            _load_batch([x for x in self.leaves if x._spec is None])
            if leaf._spec is not None:
                return
        leaf._set(*self.header(leaf.name))

    def context(self) -> Any:
        """The store's tensorstore context, made on first use."""
        if self._context is None:
            self._context = store_context(self.location)
        return self._context

    def spec(self, name: str) -> dict[str, Any]:
        """The tensorstore spec of the array saved under name."""
        return {
            "driver": "zarr3" if self.zarr3 else "zarr",
            "kvstore": {"driver": "ocdbt", "base": self.location.kvstore(), "path": name},
        }

    def open_header(self, name: str) -> Any:
        """Starts opening the array saved under name (a tensorstore future)."""
        import tensorstore as ts

        return ts.open(self.spec(name), open=True, read=True, context=self.context())

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """Shape and dtype of the array saved under name, from one array open.

        Raises:
          CheckpointError: the header cannot be read; the message names the leaf.
        """
        return self.finish_header(name, self.open_header(name))

    def finish_header(self, name: str, future: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """Shape and dtype from an `open_header` future, as `header`."""
        try:
            array = self.location.wait(future, "reading an array header of")
        except CheckpointError as e:
            raise CheckpointError(
                f"cannot read the metadata of {self.directory} (leaf {name!r}): {reason(e)}"
            ) from e
        return tuple(array.shape), np.dtype(array.dtype.numpy_dtype)


def prefetch(leaves: Iterable[Any]) -> None:
    """Reads the shapes and dtypes of these leaves not read yet, in one batch.

    Entries that are not `LazyLeaf`s, or are read already, are skipped. After
    it returns, the shape and dtype of every `LazyLeaf` given are in memory:
    reading them does no I/O.

    Raises:
      CheckpointError: a header cannot be read; the message names every such
        leaf (the leaves left unread report their error again if touched).
    """
    failed = _load_batch(leaves)
    if not failed:
        return
    if len(failed) == 1:
        raise failed[0]
    shown = "; ".join(str(e) for e in failed[:_SHOWN_FAILURES])
    more = len(failed) - _SHOWN_FAILURES
    raise CheckpointError(
        f"cannot read the metadata of {len(failed)} leaves: {shown}"
        + (f"; and {more} more" if more > 0 else "")
    ) from failed[0]


def _load_batch(leaves: Iterable[Any]) -> list[CheckpointError]:
    """Reads the headers of these leaves not read yet, concurrently.

    Returns the error of each leaf whose header could not be read (it is
    left unread), in order.
    """
    unread = [leaf for leaf in leaves if type(leaf) is LazyLeaf and leaf._spec is None]
    stores = set(map(_STORE, unread))
    by_store: dict[OrbaxStore, list[LazyLeaf]] = {}
    if len(stores) == 1:  # the usual case: one checkpoint, no grouping step per leaf
        by_store[stores.pop()] = unread
    else:
        for leaf in unread:
            by_store.setdefault(leaf._store, []).append(leaf)
    failed: list[CheckpointError] = []
    for store, pending in by_store.items():
        with young_collections_only():
            pending = _read_headers(store, pending)
        futures = [store.open_header(leaf.name) for leaf in pending]
        for k, (leaf, future) in enumerate(zip(pending, futures, strict=True)):
            try:
                leaf._set(*store.finish_header(leaf.name, future))
            except CheckpointError as e:
                if stalled(e):  # the others wait on the same storage: one timeout, not many
                    for other in futures[k + 1:]:
                        other.cancel()
                    raise
                failed.append(e)
    return failed


_STORE = operator.attrgetter("_store")


def _read_headers(store: OrbaxStore, leaves: list[LazyLeaf]) -> list[LazyLeaf]:
    """Reads zarr headers straight from the OCDBT store.

    Opening an array through tensorstore costs about 95 µs; reading its small
    JSON header from the key-value store about 60 µs; decoding it from a walk
    of the store's whole index about 2 µs a key. Returns the leaves this could
    not read, for the caller to open the usual way.

    Raises:
      CheckpointError: the storage stalled (`stalled`); opening the arrays
        would wait on it again.
    """
    import tensorstore as ts

    suffix = "/zarr.json" if store.zarr3 else "/.zarray"
    wanted = {f"{leaf.name}{suffix}".encode(): leaf for leaf in leaves}
    if store.index is not None and not store.index.ready():
        store.index = None  # no manifest it knows (as if never started): key by key
    try:
        if store.walk_later and worth_walking(len(wanted), 2 * len(store.leaves)):
            # Each array has a header and at least one chunk: about twice as many keys.
            store.walk_later = False
            store.index = start_walk(store.location, store.context())
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
                    {"driver": "ocdbt", "base": store.location.kvstore()}, context=store.context()
                ),
                "opening",
            )
            futures = [kv.read(key) for key in rest]
            for key, future in zip(rest, futures, strict=True):
                try:
                    doing = f"reading the array header {key.decode(errors='replace')!r} of"
                    found[key] = bytes(store.location.wait(future, doing).value)
                except Exception as e:  # left for the array open, which reports it
                    if stalled(e):
                        raise
    except Exception as e:  # another layout, or an unreadable store: open each array
        if stalled(e):
            raise
        log.debug("opening %d arrays one by one: their headers could not be read "
                  "from the OCDBT store (%s: %s)", len(leaves), type(e).__name__, e)
        return leaves
    left = [] if not rest else [leaf for key, leaf in wanted.items() if key not in found]
    parsed: dict[bytes, tuple[tuple[int, ...], np.dtype[Any]] | None] = {}
    last, spec = None, None
    for key, value in found.items():
        leaf = wanted[key]
        if value != last:  # neighbours share a header: compared, not hashed again
            last = value
            spec = parsed.get(value, _UNSEEN)
            if spec is _UNSEEN:  # most headers repeat: parse each text once
                spec = parsed[value] = _parse_header(value, store.zarr3)
        if spec is None:  # unparsable or unusual: the array open decides
            left.append(leaf)
        elif leaf.scalar or leaf.key_impl is not None:
            leaf._set(*spec)
        else:
            # A plain array, as `_set` would set it: one spec object shared by
            # every leaf of that header (100,000 calls of `_set` cost 0.07 s).
            leaf._stored = leaf._spec = spec
            leaf.shape, leaf.dtype = spec
    return left


_UNSEEN: Any = object()


_KEY_SPECS: dict[str, tuple[Any, int]] = {}


def _key_spec(impl: str) -> tuple[Any, int]:
    """The key dtype of a PRNG implementation, and the rank of its key data."""
    if impl not in _KEY_SPECS:
        import jax

        key = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
        data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
        _KEY_SPECS[impl] = (key.dtype, len(data.shape))
    return _KEY_SPECS[impl]


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
    """A saved array's metadata: its shape and dtype once `prefetch` has read them.

    A Python scalar saved by orbax has shape () and its Python type as dtype.
    `shape` and `dtype` are plain attributes once read (a plan compares them
    for every leaf); until then, touching one reads the header (`__getattr__`).
    """

    __slots__ = ("name", "scalar", "key_impl", "_store", "_spec", "_stored", "shape", "dtype")
    shape: tuple[int, ...]
    dtype: Any

    def __init__(self, store: OrbaxStore, name: str, scalar: bool, key_impl: str | None = None):
        self._store = store
        self.name = name
        self.scalar = scalar
        # A typed PRNG key array is saved as its key data (uint32[..., 2] for
        # threefry): its metadata is the key array's own shape and key dtype.
        self.key_impl = key_impl
        self._spec: tuple[tuple[int, ...], Any] | None = None
        self._stored: tuple[tuple[int, ...], np.dtype[Any]] | None = None

    def _set(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self._stored = (tuple(shape), np.dtype(dtype))
        if self.scalar:
            self._spec = ((), PY_TYPES.get(dtype.kind, float))
        elif self.key_impl is not None:
            key_dtype, data_ndim = _key_spec(self.key_impl)
            self._spec = (tuple(shape[: len(shape) - data_ndim]), key_dtype)
        else:
            self._spec = (shape, dtype)
        self.shape, self.dtype = self._spec

    def _load(self) -> tuple[tuple[int, ...], Any]:
        # A plan reads every leaf it uses in `prefetch` first, so it never gets
        # here. User code may touch any leaf of `metadata()` (its whole tree
        # would cost every header up front: 38 s for 100,000 leaves), so a
        # leaf nobody prefetched still reads its own header on first touch.
        if self._spec is None:
            self._store.load(self)
        assert self._spec is not None
        return self._spec

    @property
    def stored(self) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """Shape and dtype of the array as its header gave them when first read.

        The array saved, not the value it stands for: a PRNG key's key data, a
        scalar's numpy dtype. A read compares it with the header it opens, so a
        checkpoint rewritten since the plan is never read as what it was.
        """
        if self._stored is None:
            self._load()
        assert self._stored is not None
        return self._stored

    def __getattr__(self, name: str) -> Any:
        # Called only for an attribute not set: shape and dtype before the header is read.
        if name == "shape":
            return self._load()[0]
        if name == "dtype":
            return self._load()[1]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        if self._spec is None:
            return f"LazyLeaf({self.name!r})"
        return f"LazyLeaf({self.name!r}, shape={self._spec[0]}, dtype={self._spec[1]})"
