"""The orbax writer: a pytree item that plain orbax restores (docs/design.md section 15).

The item is orbax's layout: one zarr (v2) array per leaf, named by the leaf's
keys joined with '.', its uncompressed chunks written one box at a time, then
`_METADATA` (the tree: each leaf's keys and their kinds),
`_CHECKPOINT_METADATA` and `commit_success.txt`, last. By default the arrays
live in one OCDBT database at the item's root (orbax's default layout, which
treegraft's fast reader reads on every storage, S3 included); with
`ocdbt=False` each array is a folder and each chunk its own file (a layout
several processes can write side by side, which orbax restores too).
`ocp.StandardCheckpointer().restore`, `ocp.PyTreeCheckpointer().restore` and
`treegraft.OrbaxCheckpoint` read it; with `item="default"` the folder is a
`CheckpointManager` step holding that item.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from treegraft._errors import GraftError
from treegraft._write.interface import BoxFetch, Budget, OutLeaf, Share, Writer, slabs

__all__ = ["OrbaxWriter", "zarr_dtype", "CHUNK_BYTES"]

# The largest chunk of an array file: small enough to stream under any budget
# worth having, large enough that a model is not a million files.
CHUNK_BYTES = 64 * 2**20
_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
_KEY_SEQUENCE, _KEY_DICT = 1, 2
# The ml_dtypes tensorstore's zarr driver writes under their own names.
_NAMED = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
          "float8_e5m2fnuz", "int4", "uint4"}


def zarr_dtype(dtype: np.dtype[Any]) -> str | None:
    """The zarr v2 dtype string tensorstore writes for a numpy dtype, or None if it has none."""
    if dtype.name in _NAMED:
        return dtype.name
    if dtype.kind in "biufc" and dtype.fields is None:
        return dtype.str
    return None


def leaf_name(path: Sequence[Any]) -> str:
    """The folder orbax names a leaf's array by: its keys joined with '.'."""
    return ".".join(str(part) for part in path)


def chunk_shape(shape: Sequence[int], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """A regular chunk grid of whole rows of the largest suffix that fits in max_bytes."""
    first = next(slabs(shape, itemsize, max_bytes))
    return tuple(max(1, b.stop - b.start) for b in first)


class OrbaxWriter(Writer):
    """Writes an orbax pytree item (or, with `item`, a CheckpointManager step holding it).

    Args:
      item: None for an item folder; an item name ("default") to write a
        step folder with the item below it, as `CheckpointManager` saves.
      chunk_bytes: the largest chunk of each array.
      ocdbt: the arrays in one OCDBT database (True), or a folder each.
    """

    format = "orbax"

    def __init__(self, item: str | None = None, chunk_bytes: int = CHUNK_BYTES,
                 ocdbt: bool = True):
        self.item = item
        self.chunk_bytes = chunk_bytes
        self.ocdbt = ocdbt

    def problems(self, leaves: Sequence[OutLeaf]) -> list[str]:
        out = []
        seen: dict[str, tuple[Any, ...]] = {}
        for leaf in leaves:
            name = leaf_name(leaf.path)
            shown = name or "(the root)"
            if zarr_dtype(leaf.dtype) is None:
                out.append(f"{shown}: orbax cannot store dtype {leaf.dtype} (typed keys and "
                           "other non-numeric dtypes have no zarr form)")
            if not leaf.path:
                out.append("the output is one array with no key: orbax names arrays by their "
                           "keys; wrap it in a dict")
            elif any("/" in str(part) or str(part) in ("", ".", "..") for part in leaf.path):
                out.append(f"{shown}: a key that is empty or holds '/' cannot name an orbax array "
                           "folder")
            other = seen.get(name)
            if other is not None:
                out.append(f"{shown}: the paths {other} and {tuple(leaf.path)} both name the "
                           f"orbax array folder {name!r} (keys are joined with '.')")
            seen[name] = tuple(leaf.path)
        return out

    # Several processes can write one item together (docs/design.md section 15):
    # each its own chunks, in the layout without OCDBT (one file per chunk).
    shares = True

    def write(self, tmp: Any, leaves: Sequence[OutLeaf], fetch: BoxFetch, budget: Budget) -> None:
        share = budget.share
        if share.count > 1 and self.ocdbt:
            raise GraftError("several processes write an orbax item without OCDBT: "
                             "OrbaxWriter(ocdbt=False)")
        started = time.time_ns()
        item = tmp.join(self.item) if self.item else tmp
        chunk = max(1, min(self.chunk_bytes, budget.max_host_bytes // 2))
        grids = [share.grid(i) or chunk_shape(leaf.shape, leaf.dtype.itemsize, chunk)
                 for i, leaf in enumerate(leaves)]
        # Each step's failure on one process is heard by all at the next agreement,
        # so that all raise together and none waits forever.
        _step(share, "creating the arrays", lambda: share.process == 0 and self._create(
            item, leaves, grids, open_only=False))

        def chunks() -> None:
            arrays = self._create(item, leaves, grids, open_only=True)
            # The chunks in flight hold the budget less the largest chunk, which
            # is the next one fetched while they commit.
            sizes = [_chunk_bytes(leaf, grid) for leaf, grid in zip(leaves, grids, strict=True)]
            largest = max(sizes, default=0)
            window = _Window(max(largest, budget.max_host_bytes - largest), item,
                             batched=self.ocdbt)
            try:
                for i, leaf in enumerate(leaves):
                    for box in _grid_boxes(leaf.shape, grids[i]):
                        if not share.owns(i, box):
                            continue
                        window.add(arrays[i], box, fetch(i, box), sizes[i])
                window.drain()
            except BaseException:
                # Nothing staged is kept, and the writes in flight end before the
                # caller removes the temporary folder: else they would write files
                # into it again after.
                window.abort()
                window.settle()
                raise

        _step(share, "writing the chunks", chunks)

        def metadata() -> None:
            if share.process != 0:
                return
            _write_json(item, "_METADATA", _tree_metadata(leaves, self.ocdbt))
            handlers: Any = {self.item: _HANDLER} if self.item else _HANDLER
            _write_json(tmp, "_CHECKPOINT_METADATA", {
                "item_handlers": handlers, "metrics": {}, "performance_metrics": {},
                "init_timestamp_nsecs": started, "commit_timestamp_nsecs": time.time_ns(),
                "custom_metadata": {},
            })
            if self.item:
                _write_text(item, "commit_success.txt",
                            f"Checkpoint commit was successful to {item}")
            _write_text(tmp, "commit_success.txt", f"Checkpoint commit was successful to {tmp}")

        _step(share, "writing the metadata", metadata)

    def _create(self, item: Any, leaves: Sequence[OutLeaf], grids: Sequence[tuple[int, ...]],
                *, open_only: bool) -> list[Any]:
        """Creates (or opens) every leaf's zarr array; opened arrays are returned."""
        import tensorstore as ts

        context = ts.Context(item.context_spec())
        futures = []
        for leaf, grid in zip(leaves, grids, strict=True):
            spec: dict[str, Any] = {
                "driver": "zarr",
                "kvstore": self._kvstore(item, leaf_name(leaf.path)),
                "open": True,
            }
            if not open_only:
                spec["create"] = True
                spec["metadata"] = {
                    "shape": list(leaf.shape),
                    "chunks": list(grid),
                    "dtype": zarr_dtype(leaf.dtype),
                    "compressor": None,
                    "dimension_separator": ".",
                    "fill_value": None,
                }
            futures.append(ts.open(spec, context=context))
        return [item.wait(f, "creating an array in") for f in futures]

    def _kvstore(self, item: Any, name: str) -> dict[str, Any]:
        if not self.ocdbt:
            return dict(item.join(name).kvstore())
        # orbax's own settings for the database it writes.
        config = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000}
        return {"driver": "ocdbt", "base": item.kvstore(), "path": name, "config": config}


def _step(share: Share, what: str, run: Any) -> None:
    """Runs one step of the write, then agrees on it with the other processes."""
    try:
        run()
    except BaseException:
        share.agree(what, ok=False)
        raise
    share.agree(what)


def _grid_boxes(shape: Sequence[int], grid: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The chunks of a regular grid over shape, in C order (the last one of an axis cut short)."""
    if not shape:
        yield ()
        return
    if any(d == 0 for d in shape):
        yield tuple(slice(0, d) for d in shape)
        return
    counts = [-(-d // g) for d, g in zip(shape, grid, strict=True)]
    for cell in np.ndindex(*counts):
        yield tuple(slice(c * g, min(d, (c + 1) * g))
                    for c, g, d in zip(cell, grid, shape, strict=True))


# A fetched box is a fresh array the window drops once written (interface.BoxFetch):
# tensorstore may keep it as its copy instead of copying it.
_HAND_OVER = {"can_reference_source_data_indefinitely": True}


def _chunk_bytes(leaf: OutLeaf, grid: Sequence[int]) -> int:
    """The bytes of one whole chunk of a leaf (zarr stores a chunk at the edge whole too)."""
    return int(np.prod([min(d, g) for d, g in zip(leaf.shape, grid, strict=True)],
                       dtype=np.int64)) * leaf.dtype.itemsize


class _Window:
    """Chunk writes in flight, their host bytes bounded: a new one waits for the oldest to commit.

    Each chunk is handed over to tensorstore (no copy: `_HAND_OVER`), which
    holds it, or the whole chunk it writes it into at an edge, until the write
    commits: a chunk in flight costs one whole chunk. With `batched` (OCDBT)
    the chunks are staged in a tensorstore transaction, committed together
    once it holds half the window or the next chunk would not fit beside it:
    every commit of an OCDBT database writes and syncs a data file, a b-tree
    node and the manifest, so that one commit per chunk spends its time on
    syncs and manifests rather than on the bytes.
    """

    def __init__(self, max_bytes: int, where: Any, *, batched: bool):
        self.max_bytes = max_bytes
        self.where = where
        self.batched = batched
        self.pending: deque[tuple[Any, int]] = deque()
        self.held = 0  # the cost of the commits in flight
        self.txn: Any = None
        self.staged = 0  # the cost of the chunks staged in txn

    def add(self, array: Any, box: tuple[slice, ...], part: np.ndarray, cost: int) -> None:
        """Writes part (a fresh array, dropped after) into array's box; cost: its chunk's bytes."""
        if self.staged and self.held + self.staged + cost > self.max_bytes:
            self._commit()
        while self.pending and self.held + self.staged + cost > self.max_bytes:
            self._pop()
        if not self.batched:
            target = array[box] if box else array
            self.pending.append((target.write(part, **_HAND_OVER), cost))
            self.held += cost
            return
        import tensorstore as ts

        if self.txn is None:
            self.txn = ts.Transaction()
        target = array.with_transaction(self.txn)
        target = target[box] if box else target
        self.where.wait(target.write(part, **_HAND_OVER).copy, "writing")
        self.staged += cost
        if 2 * self.staged >= self.max_bytes:
            self._commit()

    def _commit(self) -> None:
        txn, self.txn = self.txn, None
        self.pending.append((txn.commit_async(), self.staged))
        self.held += self.staged
        self.staged = 0

    def _pop(self) -> None:
        future, cost = self.pending.popleft()
        self.where.wait(future, "writing")
        self.held -= cost

    def drain(self) -> None:
        if self.txn is not None:
            self._commit()
        while self.pending:
            self._pop()

    def abort(self) -> None:
        """Drops what is staged and not committed (after a failure: nothing of it is kept)."""
        if self.txn is not None:
            self.txn.abort()
            self.txn, self.staged = None, 0

    def settle(self) -> None:
        """Waits for every commit in flight (each within the storage timeout), ignoring failures."""
        while self.pending:
            future, _ = self.pending.popleft()
            try:
                self.where.wait(future, "writing")
            except Exception:  # the error that stopped the write is the one reported
                pass
        self.held = 0


def _tree_metadata(leaves: Sequence[OutLeaf], ocdbt: bool) -> dict[str, Any]:
    sequences = _sequences(leaves)
    tree = {}
    for leaf in leaves:
        keys = [str(part) for part in leaf.path]
        tree[str(tuple(keys))] = {
            "key_metadata": [
                {"key": str(part),
                 "key_type": _KEY_SEQUENCE if leaf.path[:k] in sequences else _KEY_DICT}
                for k, part in enumerate(leaf.path)
            ],
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    return {"tree_metadata": tree, "use_ocdbt": ocdbt, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


def _sequences(leaves: Sequence[OutLeaf]) -> set[tuple[Any, ...]]:
    """The nodes orbax restores as lists: their keys are the ints 0..n-1 (others are dicts)."""
    children: dict[tuple[Any, ...], set[Any]] = {}
    for leaf in leaves:
        for k in range(len(leaf.path)):
            children.setdefault(tuple(leaf.path[:k]), set()).add(leaf.path[k])
    return {
        node for node, keys in children.items()
        if all(isinstance(key, int) and not isinstance(key, bool) for key in keys)
        and sorted(keys) == list(range(len(keys)))
    }


def _write_json(where: Any, name: str, value: Any) -> None:
    _write_text(where, name, json.dumps(value))


def _write_text(where: Any, name: str, text: str) -> None:
    kv = where.open_kvstore()
    where.wait(kv.write(name.encode(), text.encode()), "writing")
