"""Issue #25 row 4, the execute side: the direct reader works in a child of the store's context.

The plan reads the OCDBT manifest, index nodes and zarr headers through the
checkpoint store's tensorstore context (`headers.store_context`); the reader now
opens its arrays in a child of that context (decoded chunks never cached), so
what the plan read is revalidated, not read again. A checkpoint written anew at
the same path since is another OCDBT database, which the store's context refuses
on its uuid: the reader then opens it in a context of its own, and the header
check (`arrays.check_unchanged`) or the new values follow, never the old ones.
Oracles: orbax's own restore, numpy values saved, the files' bytes. No timing
here: benchmarks/read_inprocess.py measures it.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_owns_buffers, buffer_pointers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kauldron_run import write_item

import treegraft as tg
from treegraft._formats.orbax import arrays
from treegraft._parse.paths import Path
from treegraft._read.source import BoxRequest, ReadRequest

SHAPE = (16, 8)


def _values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(SHAPE).astype(np.float32),
            "b": rng.integers(-100, 100, (8,), dtype=np.int32)}


def _like(sharded: bool) -> dict:
    if sharded:
        sharding = NamedSharding(jax.make_mesh((4, 2), ("a", "b")), P("a", "b"))
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding),
            "b": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(
                jax.devices()[1]))}


MAPPING = {"w": "w", "b": "b"}


def _orbax(path: str, like: dict) -> dict:
    """orbax's own partial restore of the leaves into like's shardings (the oracle)."""
    args = ocp.args.PyTreeRestore(
        item={k: 0 for k in like},
        restore_args={k: ocp.ArrayRestoreArgs(sharding=v.sharding, global_shape=v.shape,
                                              dtype=v.dtype) for k, v in like.items()},
        partial_restore=True,
    )
    return ocp.PyTreeCheckpointer().restore(path, args=args)


def _files(path: str) -> dict[str, tuple[int, int, str]]:
    """Every file under path: (size, mtime_ns, sha256), and every folder (-1, -1, '')."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = (-1, -1, "")
        for f in files:
            full = os.path.join(root, f)
            st = os.stat(full)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns,
                                                    hashlib.sha256(fh.read()).hexdigest())
    return out


def _rewrite(path: str, tree: dict) -> None:
    """Writes another checkpoint at path (a new OCDBT database, as a new save does)."""
    shutil.rmtree(path)
    write_item(path, tree)


@pytest.fixture
def item(tmp_path):
    values = _values(0)
    return write_item(tmp_path / "item", values), values


# --- the reader's context ---------------------------------------------------------------


def test_the_reader_opens_arrays_in_a_child_of_the_store_context(item):
    path, _ = item
    src = tg.OrbaxCheckpoint(path)
    leaf = src.metadata()["w"]
    reader = arrays.DirectReader(leaf._store)
    assert reader.context.parent is leaf._store.context()
    reader.open("w")
    assert reader.context.parent is leaf._store.context()  # no fallback for an unchanged one


# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["one-device", "sharded"])
@pytest.mark.parametrize("kept", [False, True], ids=["fresh-source", "kept-source"])
def test_values_match_orbax_restore_shard_by_shard(item, sharded, kept):
    path, values = item
    like = _like(sharded)
    src = tg.OrbaxCheckpoint(path)
    want = _orbax(path, like)
    for _ in range(2 if kept else 1):  # a kept source reads twice through the same store
        got = tg.graft(like, src if kept else tg.OrbaxCheckpoint(path), MAPPING)
        for k in like:
            assert got[k].sharding == like[k].sharding and got[k].dtype == like[k].dtype
            assert np.asarray(got[k]).tobytes() == values[k].tobytes()
            assert {s.device: np.asarray(s.data).tobytes() for s in got[k].addressable_shards} \
                == {s.device: np.asarray(s.data).tobytes() for s in want[k].addressable_shards}
            assert_owns_buffers(got[k], want[k])


def test_two_reads_of_one_kept_source_share_no_buffer(item):
    path, _ = item
    like = _like(True)
    src = tg.OrbaxCheckpoint(path)
    first = tg.graft(like, src, MAPPING)
    second = tg.graft(like, src, MAPPING)
    for k in like:
        assert_owns_buffers(first[k], second[k])
        assert len(set(buffer_pointers(first[k]))) == len(first[k].addressable_shards)


# --- a checkpoint changed between plan and execute --------------------------------------


@pytest.mark.parametrize("kept", [False, True], ids=["fresh-source", "kept-source"])
def test_a_dtype_rewritten_after_the_plan_still_fails(item, kept):
    path, values = item
    src = tg.OrbaxCheckpoint(path)
    if kept:
        tg.graft(_like(False), src, MAPPING)  # the store's context has read the old database
    p = tg.plan(_like(False), src, MAPPING)
    _rewrite(path, {"w": values["w"].astype(np.float64) * 1e300, "b": values["b"]})
    with pytest.raises(tg.CheckpointError,
                       match=rf"^'w' in {path} changed since the plan: the plan saw "
                             r"float32\[16, 8\], the checkpoint now holds float64\[16, 8\]; "
                             "nothing was grafted: plan again"):
        tg.execute(p)


def test_a_shape_rewritten_after_the_plan_still_fails(item):
    path, values = item
    p = tg.plan(_like(True), tg.OrbaxCheckpoint(path), MAPPING)
    _rewrite(path, {"w": np.zeros((16, 4), np.float32), "b": values["b"]})
    with pytest.raises(tg.CheckpointError, match=r"the plan saw float32\[16, 8\], the checkpoint "
                                                 r"now holds float32\[16, 4\]"):
        tg.execute(p)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-device", "sharded"])
def test_values_rewritten_after_the_plan_are_read_as_they_now_are(item, sharded):
    """Same shapes and dtypes, other values: never the values cached from before."""
    path, old = item
    like = _like(sharded)
    src = tg.OrbaxCheckpoint(path)
    before = tg.graft(like, src, MAPPING)  # the store's context caches the old database
    p = tg.plan(like, src, MAPPING)
    new = _values(1)
    _rewrite(path, new)
    got = tg.execute(p)
    for k in like:
        assert np.asarray(before[k]).tobytes() == old[k].tobytes()
        assert np.asarray(got[k]).tobytes() == new[k].tobytes()
        assert np.asarray(got[k]).tobytes() != old[k].tobytes()
    # And the same kept source again, after a second rewrite.
    third = _values(2)
    _rewrite(path, third)
    again = tg.graft(like, src, MAPPING)
    for k in like:
        assert np.asarray(again[k]).tobytes() == third[k].tobytes()


def test_boxes_of_a_kept_source_are_read_as_the_checkpoint_now_is(item):
    path, _ = item
    src = tg.OrbaxCheckpoint(path)
    box = (slice(2, 6), slice(0, 8))
    assert src.metadata()["w"].shape == SHAPE
    new = _values(3)
    _rewrite(path, new)
    (got,) = list(src.read_boxes([BoxRequest(Path(("w",)), box)]))
    np.testing.assert_array_equal(got, new["w"][box])


def test_a_checkpoint_deleted_after_the_plan_fails_typed(item):
    path, _ = item
    p = tg.plan(_like(False), tg.OrbaxCheckpoint(path), MAPPING)
    shutil.rmtree(path)
    with pytest.raises(tg.CheckpointError, match=rf"{path}"):
        tg.execute(p)


# --- reading never writes ----------------------------------------------------------------


def test_reading_writes_nothing_to_the_checkpoint(item):
    path, _ = item
    before = _files(path)
    src = tg.OrbaxCheckpoint(path)
    for sharded in (False, True, False):
        tg.graft(_like(sharded), src, MAPPING)
        tg.graft(_like(sharded), tg.OrbaxCheckpoint(path), MAPPING)
    list(src.read_boxes([BoxRequest(Path(("w",)), (slice(0, 3), slice(1, 5)))]))
    assert _files(path) == before


# --- opens started together ---------------------------------------------------------------


def test_opens_start_together_and_each_is_waited_for_once(item):
    path, values = item
    store = tg.OrbaxCheckpoint(path).metadata()["w"]._store
    reader = arrays.DirectReader(store)
    reader.start_opens(["w", "b", "w"])
    assert sorted(reader._opening) == ["b", "w"]
    assert reader.open("b").shape == (8,) and reader.open("w").shape == SHAPE
    assert reader._opening == {}
    assert reader.open("w") is reader.open("w")  # opened once per reader
    (w,) = [leaf for leaf in store.leaves if leaf.name == "w"]
    np.testing.assert_array_equal(reader.read_box(w, (slice(0, 2),) * 2), values["w"][:2, :2])


def test_an_array_gone_since_the_plan_fails_typed_and_stops_the_other_opens(item):
    path, values = item
    src = tg.OrbaxCheckpoint(path)
    p = tg.plan(_like(False), src, MAPPING)
    _rewrite(path, {"b": values["b"]})  # "w" is no longer saved
    with pytest.raises(tg.CheckpointError, match=rf"opening array 'w' of {path} failed: NOT_FOUND"):
        tg.execute(p)
    leaves = [src.metadata()[k] for k in ("w", "b")]
    reader = arrays.DirectReader(leaves[0]._store)
    with pytest.raises(tg.CheckpointError, match=r"'w'"):
        reader.read(leaves, _requests(_like(False)))
    assert reader._opening == {}


def _requests(like: dict) -> list[ReadRequest]:
    return [ReadRequest(Path((k,)), like[k], like[k].dtype) for k in ("w", "b")]
