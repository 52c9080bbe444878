"""The orbax writer's window: chunks in flight bounded by the budget, batched in transactions.

Oracles: plain orbax's restore (StandardCheckpointer, PyTreeCheckpointer) and
tensorstore's own read of the arrays written.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

import treegraft as tg
from treegraft._formats.orbax.write import _chunk_bytes, _Window
from treegraft._storage.location import Location
from treegraft._write.interface import OutLeaf


def bits(tree):
    """{path text: (dtype, shape, bytes)} of every leaf: equal means bit-identical."""
    return {str(path): (np.asarray(leaf).dtype, np.asarray(leaf).shape, np.asarray(leaf).tobytes())
            for path, leaf in tg.flatten(tree).items()}


def mixed_tree():
    """Many small leaves (several per transaction), leaves cut into chunks with a short last
    one, a scalar, an empty array, bfloat16 and bool."""
    rng = np.random.default_rng(3)
    return {
        "bias": {str(i): rng.standard_normal(i + 1).astype(np.float32) for i in range(12)},
        "w": rng.standard_normal((300, 7)).astype(np.float32),
        "emb": rng.standard_normal((97, 5)).astype(ml_dtypes.bfloat16),
        "mask": rng.random((41, 3)) > 0.5,
        "step": np.int64(7),
        "empty": np.zeros((0, 4), np.int8),
    }


@pytest.mark.parametrize("budget", [1024, 4096, 1 << 20])
def test_batched_chunks_restore_bit_identically(tmp_path, budget):
    tree = mixed_tree()
    dest = tg.save(tree, str(tmp_path / "out"), max_host_bytes=budget)
    want = bits(tree)
    assert bits(ocp.StandardCheckpointer().restore(dest)) == want
    assert bits(ocp.PyTreeCheckpointer().restore(dest)) == want
    assert bits(tg.graft(tree, tg.OrbaxCheckpoint(dest), {"": ""})) == want


def open_array(folder, name, shape, chunks, context):
    spec = {"driver": "zarr", "create": True, "open": True,
            "kvstore": {"driver": "ocdbt", "base": {"driver": "file", "path": folder + "/"},
                        "path": name},
            "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": "<i4",
                         "compressor": None, "dimension_separator": ".", "fill_value": None}}
    return ts.open(spec, context=context).result()


def test_window_holds_at_most_its_bytes_and_batches_small_chunks(tmp_path):
    where = Location.parse(str(tmp_path))
    context = ts.Context()
    shape, chunks = (50, 8), (8, 8)  # 7 chunks of 256 bytes, the last 2 rows
    arrays = [open_array(str(tmp_path), f"a{k}", shape, chunks, context) for k in range(3)]
    cost = _chunk_bytes(OutLeaf(("a",), shape, np.dtype("int32")), chunks)
    assert cost == 8 * 8 * 4
    window = _Window(4 * cost, where, batched=True)
    rng = np.random.default_rng(0)
    want = [rng.integers(-2**31, 2**31, shape, dtype=np.int32) for _ in arrays]
    added = 0
    for array, values in zip(arrays, want, strict=True):
        for row in range(0, shape[0], chunks[0]):
            box = (slice(row, min(shape[0], row + chunks[0])), slice(0, shape[1]))
            window.add(array, box, values[box].copy(), cost)
            added += 1
            assert window.held + window.staged <= window.max_bytes
            if added == 1:  # staged in the transaction, not committed alone
                assert window.staged == cost and not window.pending
            if added == 2:  # half the window: both committed together
                assert window.staged == 0 and len(window.pending) == 1
                assert window.held == 2 * cost
    window.drain()
    assert window.held == 0 and window.staged == 0 and window.txn is None
    for array, values in zip(arrays, want, strict=True):
        np.testing.assert_array_equal(array.read().result(), values)


def test_aborted_window_keeps_nothing_staged(tmp_path):
    where = Location.parse(str(tmp_path))
    array = open_array(str(tmp_path), "a", (16, 8), (8, 8), ts.Context())
    window = _Window(1 << 20, where, batched=True)
    window.add(array, (slice(0, 8), slice(0, 8)), np.ones((8, 8), np.int32), 256)
    assert window.txn is not None and not window.pending  # staged, not committed
    window.abort()
    assert window.txn is None and window.staged == 0
    # Nothing was written: the chunk reads as the fill value.
    np.testing.assert_array_equal(array.read().result(), np.zeros((16, 8), np.int32))
