"""Issue #25 row 6, the orbax read path: shards that tile a chunk are read straight into
their own buffers.

A sharded target whose shards cut through a chunk used to read the chunk-aligned
region into a buffer of its own and copy each shard out of it. Shards that tile
a box (every shard of one process does) are now one tensorstore read of that box
into an overlay of the shards' own buffers: each chunk decoded once, no region
buffer, no copy. The region path stays for slices that leave gaps (a process
holding every other shard of a chunk). Oracles: orbax's own restore and
tensorstore's read of the same array. No timing here: benchmarks/run.py
--cases sharded measures the memory and time.
"""

from __future__ import annotations

import os
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_owns_buffers, buffer_pointers
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._formats.orbax import arrays
from treegraft._insert.placement import devices_by_box
from treegraft._read.source import ReadRequest

SHAPE = (8, 256, 64)
NBYTES = 8 * 256 * 64 * 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """float32 (8, 256, 64) as one chunk and as two chunks of 4 layers; a bfloat16 and an
    int8 array of one chunk each."""
    rng = np.random.default_rng(6)
    values = {
        "one_chunk": rng.standard_normal(SHAPE).astype(np.float32),
        "two_chunks": rng.standard_normal(SHAPE).astype(np.float32),
        "bf16": rng.standard_normal((16, 24)).astype(ml_dtypes.bfloat16),
        "ints": rng.integers(-128, 128, (8, 6), dtype=np.int8),
    }
    two = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    tree = {
        "one_chunk": jax.device_put(jnp.asarray(values["one_chunk"]), jax.devices()[0]),
        # Saved from 2 shards: orbax writes one chunk per shard.
        "two_chunks": jax.device_put(jnp.asarray(values["two_chunks"]),
                                     NamedSharding(two, P("x"))),
        "bf16": jnp.asarray(values["bf16"]),
        "ints": jnp.asarray(values["ints"]),
    }
    path = os.path.abspath(str(tmp_path_factory.mktemp("r6") / "item"))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()
    return path, values


def _like(shape, dtype, mesh, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _orbax(path, name, like):
    """orbax's own restore of one array into like's sharding (the oracle)."""
    args = ocp.args.PyTreeRestore(
        item={name: 0},
        restore_args={name: ocp.ArrayRestoreArgs(sharding=like.sharding,
                                                 global_shape=like.shape, dtype=like.dtype)},
        partial_restore=True,
    )
    return ocp.PyTreeCheckpointer().restore(path, args=args)[name]


def _shards(x):
    return {s.device: np.asarray(s.data).tobytes() for s in x.addressable_shards}


# --- which boxes tile -------------------------------------------------------------------


def test_a_grid_of_boxes_tiles_its_span():
    grid = [((a, a + 2), (b, b + 3)) for a in (4, 6) for b in (0, 3, 6)]
    assert arrays.tiled_box(grid) == ((4, 8), (0, 9))
    assert arrays.tiled_box([((0, 5),)]) == ((0, 5),)
    assert arrays.tiled_box([()]) == ()


@pytest.mark.parametrize("boxes", [
    [((0, 2), (0, 4)), ((3, 5), (0, 4))],  # a gap
    [((0, 3), (0, 4)), ((2, 5), (0, 4))],  # an overlap
    [((0, 2), (0, 2)), ((0, 2), (2, 4)), ((2, 4), (0, 2))],  # one cell of the grid missing
    [((0, 2), (0, 2)), ((2, 4), (2, 4))],  # the diagonal only
    [((0, 0), (0, 4)), ((0, 0), (4, 8))],  # empty boxes
])
def test_boxes_with_a_gap_or_an_overlap_tile_nothing(boxes):
    assert arrays.tiled_box(boxes) is None


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3).flatmap(
    lambda sizes: st.tuples(st.just(sizes),
                            st.lists(st.booleans(), min_size=int(np.prod(sizes)),
                                     max_size=int(np.prod(sizes))))))
def test_tiled_box_agrees_with_counting_cells(case):
    """Against a brute-force oracle: some cells of a grid, tiled iff the cells kept
    fill their bounding box."""
    sizes, keep = case
    cells = list(np.ndindex(*sizes))
    kept = [c for c, k in zip(cells, keep, strict=True) if k]
    if not kept:
        return
    boxes = [tuple((3 * i, 3 * i + 3) for i in c) for c in kept]
    lo = [min(c[d] for c in kept) for d in range(len(sizes))]
    hi = [max(c[d] for c in kept) + 1 for d in range(len(sizes))]
    fills = len(kept) == int(np.prod([h - low for low, h in zip(lo, hi, strict=True)]))
    want = tuple((3 * low, 3 * h) for low, h in zip(lo, hi, strict=True)) if fills else None
    assert arrays.tiled_box(boxes) == want


def test_every_shard_of_one_process_is_read_straight():
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    for spec in (P("a", "b"), P(None, "b"), P("b"), P()):
        slices = devices_by_box(NamedSharding(mesh, spec), SHAPE)
        reads = arrays._plan_reads(slices, SHAPE, SHAPE)  # one chunk
        assert [(box, cut) for box, _, cut in reads] == [(((0, 8), (0, 256), (0, 64)), False)]
        assert sorted(b for b, _ in reads[0][1]) == sorted(slices)


def test_slices_with_a_gap_read_their_region_and_cut():
    d = jax.devices()
    slices = {((0, 2), (0, 256), (0, 64)): [d[0]], ((4, 6), (0, 256), (0, 64)): [d[1]]}
    (read,) = arrays._plan_reads(slices, SHAPE, SHAPE)
    assert read[0] == ((0, 8), (0, 256), (0, 64)) and read[2] is True
    # Two chunks of 4 layers: each slice alone in its region, read straight.
    reads = arrays._plan_reads(slices, (4, 256, 64), SHAPE)
    assert [(box, cut) for box, _, cut in reads] == [
        (((0, 2), (0, 256), (0, 64)), False), (((4, 6), (0, 256), (0, 64)), False)]


# --- values, shardings, buffers ---------------------------------------------------------


@pytest.mark.parametrize("name", ["one_chunk", "two_chunks"])
@pytest.mark.parametrize("spec", [P("x"), P(None, "x"), P(None, None, "x"), P("a", "b"),
                                  P(None, ("a", "b")), P()])
def test_sharded_reads_match_orbax_shard_by_shard(saved, name, spec):
    path, values = saved
    axes = ("a", "b") if "a" in str(spec) else ("x",)
    mesh = jax.make_mesh((2, 4) if len(axes) == 2 else (8,), axes)
    like = _like(SHAPE, jnp.float32, mesh, spec)
    got = tg.graft({name: like}, tg.OrbaxCheckpoint(path), {name: name})[name]
    want = _orbax(path, name, like)
    assert got.sharding == like.sharding and got.dtype == jnp.float32
    assert _shards(got) == _shards(want)
    assert np.asarray(got).tobytes() == values[name].tobytes()
    assert_owns_buffers(got, want)
    assert len(set(buffer_pointers(got))) == 8


@pytest.mark.parametrize("name,shape,dtype", [("bf16", (16, 24), jnp.bfloat16),
                                              ("ints", (8, 6), jnp.int8)])
def test_other_dtypes_read_straight_bit_for_bit(saved, name, shape, dtype):
    path, values = saved
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    like = _like(shape, dtype, mesh, P("a", "b"))
    got = tg.graft({name: like}, tg.OrbaxCheckpoint(path), {name: name})[name]
    assert got.dtype == dtype and got.sharding == like.sharding
    assert _shards(got) == _shards(_orbax(path, name, like))
    assert np.asarray(got).tobytes() == values[name].tobytes()
    assert_owns_buffers(got)


def test_the_straight_read_allocates_only_the_shards(saved):
    """The path is taken: host memory allocated during the read is the shards' own bytes.
    The region path allocates the region besides (2x the array here)."""
    path, values = saved
    mesh = jax.make_mesh((8,), ("x",))
    like = {"one_chunk": _like(SHAPE, jnp.float32, mesh, P(None, "x"))}
    src = tg.OrbaxCheckpoint(path)
    plan = tg.plan(like, src, {"one_chunk": "one_chunk"})
    tracemalloc.start()
    try:
        got = tg.execute(plan)["one_chunk"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.asarray(got).tobytes() == values["one_chunk"].tobytes()
    assert NBYTES <= peak < 1.5 * NBYTES, peak


def _metric(name):
    """A tensorstore counter of this process (reads its caches and kvstores made)."""
    import tensorstore as ts

    (found,) = ts.experimental_collect_matching_metrics(name)
    return sum(v.get("value", 0) for v in found.get("values", []))


def _counts(fn):
    """(chunk and header reads through tensorstore's caches, file bytes read) while fn runs."""
    reads = "/tensorstore/cache/kvs_cache_read"
    read_bytes = "/tensorstore/kvstore/file/bytes_read"
    before = _metric(reads), _metric(read_bytes)
    fn()
    return _metric(reads) - before[0], _metric(read_bytes) - before[1]


@pytest.mark.parametrize("name", ["one_chunk", "two_chunks"])
def test_eight_shards_decode_each_chunk_once(saved, name):
    """As many cache reads (each a chunk or header fetched and decoded) and file bytes
    as one read of the whole array to the host, however many shards cut the chunks.
    Repeated: an unbatched overlay write decodes a chunk again now and then."""
    path, _ = saved
    mesh = jax.make_mesh((8,), ("x",))
    spec = {name: _like(SHAPE, jnp.float32, mesh, P(None, "x"))}
    host = {name: np.zeros(SHAPE, np.float32)}
    for _ in range(8):
        counts = []
        for like in (host, spec):
            plan = tg.plan(like, tg.OrbaxCheckpoint(path), {name: name})
            counts.append(_counts(lambda plan=plan: jax.block_until_ready(tg.execute(plan))))
        (whole_reads, whole_bytes), (sharded_reads, sharded_bytes) = counts
        assert whole_bytes >= NBYTES // 2  # the chunks were read (compressed on disk)
        assert sharded_reads == whole_reads, counts
        assert sharded_bytes == whole_bytes, counts


def _read_slices(path, name, slices):
    """DirectReader's reads of slices, as a process holding only them would read them."""
    src = tg.OrbaxCheckpoint(path)
    leaf = src.metadata()[name]
    reader = arrays.DirectReader(leaf._store)
    array = reader.open(leaf.name)
    dtype = array.dtype.numpy_dtype
    req = ReadRequest(tg.parse_path(name), np.zeros(SHAPE, np.float32), np.dtype(np.float32))
    job = arrays._Job(leaf, req)
    (read,) = arrays._plan_reads(slices, arrays.chunk_shape(array), SHAPE)
    box, members, cut = read
    unit = arrays._start(job, array, box, members, cut, dtype, 0)
    reader._place(unit)
    return cut, job.buffers


def test_the_region_path_still_cuts_slices_with_a_gap(saved):
    path, values = saved
    d = jax.devices()
    slices = {((0, 2), (0, 256), (0, 64)): [d[0]], ((4, 6), (0, 256), (0, 64)): [d[1], d[2]]}
    cut, buffers = _read_slices(path, "one_chunk", slices)
    assert cut is True
    want = values["one_chunk"]
    for box, devices in slices.items():
        for device in devices:
            got = buffers[device]
            assert got.devices() == {device}
            assert np.asarray(got).tobytes() == want[tuple(slice(a, b) for a, b in box)].tobytes()
    pointers = [b.unsafe_buffer_pointer() for b in buffers.values()]
    assert len(set(pointers)) == 3  # replicas of one slice have buffers of their own


def test_one_slice_inside_a_chunk_is_read_straight(saved):
    """A process holding one shard of a chunk reads that box alone: tensorstore decodes
    the chunk once and copies the box out, with no region buffer of ours."""
    path, values = saved
    box = ((1, 3), (32, 96), (0, 64))
    device = jax.devices()[5]
    cut, buffers = _read_slices(path, "one_chunk", {box: [device]})
    assert cut is False and list(buffers) == [device]
    want = values["one_chunk"][tuple(slice(a, b) for a, b in box)]
    assert np.asarray(buffers[device]).tobytes() == want.tobytes()


def test_a_failed_read_leaves_the_target_alone(saved, tmp_path):
    """A checkpoint whose chunk is gone: a CheckpointError, the state unchanged."""
    import shutil

    path, _ = saved
    copy = str(tmp_path / "item")
    shutil.copytree(path, copy)
    mesh = jax.make_mesh((8,), ("x",))
    state = {"one_chunk": jax.device_put(jnp.zeros(SHAPE, jnp.float32),
                                         NamedSharding(mesh, P(None, "x")))}
    src = tg.OrbaxCheckpoint(copy)
    plan = tg.plan(state, src, {"one_chunk": "one_chunk"})
    for root, _, files in os.walk(copy):
        for f in files:
            full = os.path.join(root, f)
            if os.path.getsize(full) > NBYTES // 2:
                os.remove(full)  # the data file holding the chunk
    with pytest.raises(tg.CheckpointError, match="one_chunk"):
        tg.execute(plan)
    assert not np.asarray(state["one_chunk"]).any()
