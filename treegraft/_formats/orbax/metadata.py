"""The tree of an orbax checkpoint from its `_METADATA` file, with lazy leaves.

orbax's `PyTreeCheckpointHandler.metadata` opens every array of a checkpoint
to learn its shape and dtype (about 0.4 ms a leaf: 25 ms for 64 leaves, 38 s
for 100,000). A plan needs the shapes of the leaves it pairs only. So the tree
(keys, lists, empty nodes, which leaves exist) is read from the `_METADATA`
file alone; `headers.prefetch` then reads the shapes and dtypes of the leaves
wanted, in one batch.

This reads orbax's storage format for its OCDBT layouts, with zarr v2 (the
default) or zarr v3 arrays. Anything else, or anything unexpected in
`_METADATA`, returns None so that the caller falls back to orbax's own
metadata call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from treegraft._errors import CheckpointError
from treegraft._formats.orbax.headers import LazyLeaf, OrbaxStore, store_context
from treegraft._formats.orbax.metadata_scan import Entry, scan
from treegraft._formats.orbax.ocdbt_index import start_walk
from treegraft._parse.paths import render_parts
from treegraft._storage.location import Location
from treegraft._tree.gc import young_collections_only

__all__ = ["lazy_metadata"]

log = logging.getLogger("treegraft")

_SEQUENCE, _DICT = 1, 2
_ARRAYS = ("jax.Array", "np.ndarray")


class _Unsupported(Exception):
    """`_METADATA` holds something this reader does not know: use orbax's."""


class _Corrupt(Exception):
    """`_METADATA` holds what orbax never writes: the checkpoint is damaged."""


def lazy_metadata(directory: str | Location) -> Any:
    """The checkpoint's tree with `LazyLeaf` leaves, or None to use orbax's.

    Args:
      directory: the orbax item directory.

    Raises:
      CheckpointError: `_METADATA` is damaged, or remote storage fails.
    """
    location = Location.parse(directory)
    try:
        context = store_context(location)
        index, walk_later = None, False
        if not location.is_local or os.path.exists(os.path.join(location.key, "manifest.ocdbt")):
            if _early_walk(location):
                # Read and decoded on tensorstore's threads while _METADATA is
                # read and parsed (the manifest not waited for). Remote, without
                # a manifest, the walk fails and reads go key by key.
                index = start_walk(location, context, wait=False)
            else:
                walk_later = True
        with young_collections_only():
            text = location.join("_METADATA").read_bytes("metadata file")
            stores = _Stores(location, context, index, walk_later)
            tree = _scanned_tree(stores, text)
            if tree is not None:
                return tree
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                if location.is_local:
                    return _fallback(location, f"_METADATA is not JSON ({e})")
                raise _corrupt(str(location), f"JSONDecodeError: {e}") from None
            # What orbax's reader fails on, often with an AssertionError of no
            # message, is named here instead.
            _check_shape(meta)
            zarr3 = meta.get("use_zarr3", False)
            if zarr3 not in (True, False) or meta.get("use_ocdbt") is not True:
                _build(OrbaxStore(location), meta["tree_metadata"])  # its checks only
                return _fallback(location, "not an OCDBT layout with zarr v2 or v3 arrays")
            store = stores.make(meta)
            entries = meta["tree_metadata"]
            if not isinstance(entries, dict) or not entries:
                return _fallback(location, "tree_metadata is empty or not a dict")
            return _build(store, entries)
    except _Corrupt as e:
        raise _corrupt(str(location), str(e)) from None
    except RecursionError:
        raise _corrupt(str(location), "its JSON is nested too deeply to be orbax's") from None
    except CheckpointError as e:
        if location.is_local:
            return _fallback(location, str(e))  # orbax's own reader reports it
        raise
    except (_Unsupported, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return _fallback(location, f"{type(e).__name__}: {e}")


# Below this size of `_METADATA` (about 4,000 leaves) the OCDBT index walk is
# not started before parsing it: a plan reading a few leaves of a small
# checkpoint reads their headers key by key, and starting the walk cost 0.1 ms
# of a 1.3 ms metadata read. A prefetch of many leaves starts it then.
_EARLY_WALK_BYTES = 1 << 20


def _early_walk(location: Location) -> bool:
    """Whether to start the index walk before `_METADATA` is read: remote, or a large local one."""
    if not location.is_local:
        return True
    try:
        return os.stat(os.path.join(location.key, "_METADATA")).st_size >= _EARLY_WALK_BYTES
    except OSError:
        return True  # the read reports it


@dataclasses.dataclass
class _Stores:
    """What the `OrbaxStore` of either parse is made with; its key arrays listed once."""

    location: Location
    context: Any
    index: Any
    walk_later: bool
    key_impls: dict[str, str] | None = None

    def make(self, meta: dict[str, Any]) -> OrbaxStore:
        """The store of an OCDBT checkpoint whose `_METADATA` fields are meta."""
        if self.key_impls is None:
            self.key_impls = _key_impls(self.location)
        return OrbaxStore(
            self.location,
            zarr3=meta.get("use_zarr3", False),
            key_impls=self.key_impls,
            fill_missing=meta.get("store_array_data_equal_to_fill_value") is not True,
            context=self.context,
            index=self.index,
            walk_later=self.walk_later,
        )


def _scanned_tree(stores: _Stores, text: bytes) -> Any:
    """The tree from a scan of orbax's usual `_METADATA` text, or None: then `json` reads it.

    None for every text the scan does not vouch for, and for every tree
    `_build` would refuse or might build otherwise, so that each error keeps
    the one wording `_build` gives it.
    """
    scanned = scan(text)
    if scanned is None:
        log.debug("parsing the _METADATA of %s with json: not orbax's usual text", stores.location)
        return None
    fields, entries = scanned
    if not entries or fields.get("use_zarr3", False) not in (True, False) or (
        fields.get("use_ocdbt") is not True
    ):
        return None
    try:
        tree = _build_scanned(stores.make(fields), entries)
    except (_Corrupt, ValueError, RecursionError):
        tree = None
    if tree is None:
        log.debug("parsing the _METADATA of %s with json: its tree needs _build's checks",
                  stores.location)
    return tree


def _fallback(location: Location, why: str) -> None:
    """Logs why orbax's slower metadata reader is used instead, and returns None.

    The fast path failing is never an error (orbax's reader may know the
    layout), but a bug here would otherwise show only as a plan a thousand
    times slower: the log says so (docs/design.md section 11).
    """
    log.debug("reading the metadata of %s with orbax's reader: %s", location, why)
    return None


def _key_impls(location: Location) -> dict[str, str]:
    """{array name: PRNG implementation} of the key arrays orbax saved (its array metadata)."""
    folder = location.join("array_metadatas")
    if folder.kind("array metadata folder") != "dir":
        return {}
    out: dict[str, str] = {}
    for name in folder.listdir("array metadata folder"):
        try:
            text = folder.join(name).read_bytes("array metadata")
            if b"random_key_impl" not in text and b"\\u" not in text and b"\0" not in text:
                # Names no key array: skip its parse (a JSON escape, or UTF-16
                # text, could spell the name otherwise).
                continue
            entries = json.loads(text)["array_metadatas"]
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



def _check_shape(meta: Any) -> None:
    """Raises `_Corrupt` when `_METADATA` is not orbax's object of tree entries.

    Only the top level: each entry is checked by `_build` as it is read, in
    the one pass over the entries (a second pass cost 0.16 s for 100,000).
    """
    if not isinstance(meta, dict):
        raise _Corrupt(f"it holds a JSON {_json_type(meta)}, not an object with tree_metadata")
    if "tree_metadata" not in meta:
        return  # orbax's reader says so: KeyError: 'tree_metadata'
    entries = meta["tree_metadata"]
    if not isinstance(entries, dict):
        raise _Corrupt(f"its tree_metadata is a JSON {_json_type(entries)}, not an object")


def _not_an_entry(name: Any) -> _Corrupt:
    return _Corrupt(f"its tree_metadata entry {name!r} is not an object with a key_metadata list")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


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
    if kind not in (_SEQUENCE, _DICT):
        raise _Unsupported("key type")
    if kinds[id(node)] not in (0, kind):
        # orbax's reader cannot rebuild such a node (it fails comparing the keys)
        raise _Corrupt(f"one node has both list indices and dict keys (the key {k['key']!r})")
    kinds[id(node)] = kind
    key = k["key"]
    if kind == _DICT and not isinstance(key, str):
        # orbax writes every dict key as a string; jax cannot sort mixed keys.
        raise _Corrupt(f"the dict key {key!r} is not a string")
    return int(key) if kind == _SEQUENCE else key


def _build(store: OrbaxStore, entries: dict[str, Any]) -> Any:
    # Nodes are dicts while building; sequences carry their kind so they can
    # become lists (orbax saves tuples as lists) once every index is known.
    root: dict[Any, Any] = {}
    kinds: dict[int, int] = {id(root): 0}  # 0: kind not known yet
    # Entries come grouped by parent: walk down from the root only when the
    # parent changes.
    parent_meta: list[dict[str, Any]] | None = None
    parent, parent_name = root, ""
    parent_parts: list[Any] = []  # the keys of parent, for messages
    for name, entry in entries.items():
        key_meta = entry.get("key_metadata") if type(entry) is dict else None
        if type(key_meta) is not list:
            raise _not_an_entry(name)
        if not key_meta:
            raise _Unsupported("a leaf at the root")
        if type(key_meta[-1]) is not dict:
            raise _not_an_entry(name)
        if key_meta[:-1] != parent_meta:
            parent_meta, parent, parent_parts = key_meta[:-1], root, []
            for k in parent_meta:
                if type(k) is not dict:
                    raise _not_an_entry(name)
                key = _key(parent, k, kinds)
                parent_parts.append(key)
                child = parent.get(key)
                if child is None:
                    child = parent[key] = {}
                    kinds[id(child)] = 0  # kind set by its first key
                elif not isinstance(child, dict) or id(child) not in kinds:
                    raise _Corrupt(_leaf_and_node(parent_parts))
                parent = child
            # The name orbax saves the array under: the keys joined by dots.
            parent_name = "".join([f"{k['key']}." for k in parent_meta])
        last = key_meta[-1]
        key = _key(parent, last, kinds)
        if key in parent:
            existing = parent[key]
            if isinstance(existing, dict) and id(existing) in kinds:
                raise _Corrupt(_leaf_and_node([*parent_parts, key]))
            raise _Unsupported("duplicate key")
        kind = entry["value_metadata"]["value_type"]
        if kind in _ARRAYS:
            name = f"{parent_name}{last['key']}"
            parent[key] = store.leaf(name, False)
        elif kind == "scalar":
            parent[key] = store.leaf(f"{parent_name}{last['key']}", True)
        elif kind in _EMPTY_NODES:
            parent[key] = _EMPTY_NODES[kind]()
        else:
            raise _Unsupported(kind)
    return _finish(root, kinds, ())


def _build_scanned(store: OrbaxStore, entries: list[Entry]) -> Any:
    """`_build`'s tree from scanned entries, or None where `_build` would raise or differ.

    The scan has checked the text's form (keys are strings, key types 1 or
    2): what is left is `_build`'s checks of the tree itself.
    """
    root: dict[Any, Any] = {}
    kinds: dict[int, int] = {id(root): 0}
    # Each parent text met: its node and the name prefix of its arrays.
    nodes: dict[str, tuple[dict[Any, Any], str]] = {"": (root, "")}
    previous = None
    parent, parent_id, parent_kind, parent_name = root, id(root), 0, ""
    key_impls = store.key_impls
    keep = store.leaves.append
    for _, parent_text, raw, sequence, value_type in entries:
        if parent_text != previous:  # entries come grouped by parent
            previous = parent_text
            found = nodes.get(parent_text) or _node_at(parent_text, nodes, kinds)
            if found is None:
                return None
            parent, parent_name = found
            parent_id = id(parent)
            parent_kind = kinds[parent_id]
        if sequence:
            if parent_kind != _SEQUENCE:
                if parent_kind:
                    return None
                parent_kind = kinds[parent_id] = _SEQUENCE
            key: Any = int(raw)
        else:
            if parent_kind != _DICT:
                if parent_kind:
                    return None
                parent_kind = kinds[parent_id] = _DICT
            key = raw
        if key in parent:
            return None
        if value_type in _ARRAYS:
            # `store.leaf`, inline: one call less for each of 100,000 leaves.
            name = parent_name + raw
            impl = key_impls.get(name) if key_impls else None
            made = parent[key] = LazyLeaf(store, name, False, impl)
            keep(made)
        elif value_type == "scalar":
            made = parent[key] = LazyLeaf(store, parent_name + raw, True, None)
            keep(made)
        elif value_type in _EMPTY_NODES:
            parent[key] = _EMPTY_NODES[value_type]()
        else:
            return None
    # Without a list node the dicts built are the tree: no second pass over them.
    return _finish(root, kinds, ()) if _SEQUENCE in kinds.values() else root


# Where the last key of a parent text starts: a key's text holds no '"', so
# this is found only at the start of a key.
_KEY_START = '{"key": "'


def _node_at(
    text: str, nodes: dict[str, tuple[dict[Any, Any], str]], kinds: dict[int, int]
) -> tuple[dict[Any, Any], str] | None:
    """The node a parent text names, and its name prefix; None where `_build` would differ.

    From the longest parent text already met (its keys checked then), one
    key at a time: the checks `_build` makes of each key, each made once.
    """
    cuts: list[tuple[str, int]] = []
    head = text
    found = nodes.get(head)
    while found is None:
        at = head.rfind(_KEY_START)
        if at < 0:
            return None
        cuts.append((head, at))
        head = head[:at]
        found = nodes.get(head)
    parent, name = found
    for whole, at in reversed(cuts):
        # whole[at:] is '{"key": "<key>", "key_type": <1 or 2>}, '
        start = at + len(_KEY_START)
        stop = whole.index('"', start)
        k = whole[start:stop]
        sequence = whole[stop + 15] == "1"
        kind = _SEQUENCE if sequence else _DICT
        if kinds[id(parent)] not in (0, kind):
            return None
        kinds[id(parent)] = kind
        key: Any = int(k) if sequence else k
        child = parent.get(key)
        if child is None:
            child = parent[key] = {}
            kinds[id(child)] = 0
        elif type(child) is not dict or id(child) not in kinds:
            return None
        parent, name = nodes[whole] = (child, name + k + ".")
    return parent, name


def _leaf_and_node(parts: list[Any]) -> str:
    # orbax's reader fails on such a tree with an AssertionError of no message.
    return f"{render_parts(parts)!r} is both a leaf and a node with children"


def _finish(node: Any, kinds: dict[int, int], parts: tuple[Any, ...]) -> Any:
    if not isinstance(node, dict) or id(node) not in kinds:
        return node  # a leaf, or an empty node from a value type
    children = {k: _finish(v, kinds, (*parts, k)) for k, v in node.items()}
    if kinds[id(node)] != _SEQUENCE:
        return children
    indices = sorted(children)
    if indices != list(range(len(children))):
        # orbax's reader fails on it with an AssertionError of no message.
        gap = next(i for i, k in enumerate(indices) if i != k)
        shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
        where = f"the list {render_parts(parts)!r}" if parts else "the root list"
        raise _Corrupt(f"{where} has no index {gap} (its indices: {shown})")
    return [children[i] for i in range(len(children))]
