"""The read path's memory work, checked for values, buffer ownership and bytes read.

Boxes read straight into the caller's block (`BoxRequest.out`), stack blocks
filled in place, slices that cut through chunks read once as their region
(`read`) or kept for the next shard (`read_boxes`, `Regions`). No timing here:
speed and peak memory are measured by benchmarks/rule_ops.py and run.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_owns_buffers, buffer_pointers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._formats.orbax.arrays import Regions, region_of
from treegraft._read.source import BoxRequest, ReadRequest

LAYERS, ROWS, COLS = 8, 256, 64
LAYER = ROWS * COLS * 4


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh):
    """(8, 256, 64) float32 layers: stacked with one chunk per layer, as one chunk, and apart."""
    stacked = np.random.default_rng(3).standard_normal((LAYERS, ROWS, COLS)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("perf_read") / "item")
    tree = {
        "per_layer": jax.device_put(jnp.asarray(stacked), NamedSharding(mesh, P("x"))),
        "one_chunk": jax.device_put(jnp.asarray(stacked), jax.devices()[0]),
        "layers": {str(i): jnp.asarray(stacked[i]) for i in range(LAYERS)},
    }
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()
    return path, stacked


def _like(shape, mesh, spec):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))


@pytest.mark.parametrize("axis,spec", [(0, P("x")), (0, P(None, "x")), (1, P("x")),
                                       (1, P(None, None, "x")), (0, P())])
def test_stack_fills_its_blocks_in_place_with_the_right_values(saved, mesh, axis, spec):
    path, stacked = saved
    want = np.stack(list(stacked), axis=axis)
    like = {"w": _like(want.shape, mesh, spec)}
    got = tg.graft(like, tg.OrbaxCheckpoint(path), {"w": tg.stack("layers.*", axis=axis)})["w"]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding == like["w"].sharding
    assert_owns_buffers(got)


def test_a_box_read_goes_into_the_out_it_is_given(saved):
    path, stacked = saved
    src = tg.OrbaxCheckpoint(path)
    block = np.zeros((ROWS, 3, COLS), np.float32)
    reqs = [BoxRequest(tg.parse_path(f"layers['{i}']"), (slice(None), slice(None)), block[:, k])
            for k, i in enumerate((5, 2, 7))]
    got = list(src.read_boxes(reqs))
    for req, part in zip(reqs, got, strict=True):
        assert part is req.out
    np.testing.assert_array_equal(block, np.stack([stacked[5], stacked[2], stacked[7]], axis=1))


def test_an_out_that_does_not_fit_is_left_alone(saved):
    path, stacked = saved
    src = tg.OrbaxCheckpoint(path)
    wrong_dtype = np.zeros((ROWS, COLS), np.float64)
    wrong_shape = np.zeros((ROWS, COLS + 1), np.float32)
    reqs = [BoxRequest(tg.parse_path("layers['1']"), (slice(None), slice(None)), out)
            for out in (wrong_dtype, wrong_shape)]
    for part in src.read_boxes(reqs):
        assert part is not wrong_dtype and part is not wrong_shape
        assert not np.shares_memory(part, wrong_dtype) and not np.shares_memory(part, wrong_shape)
        np.testing.assert_array_equal(part, stacked[1])
    assert not wrong_dtype.any() and not wrong_shape.any()


class _Whole(tg.Source):
    """A source with only metadata and whole-leaf reads: the base class reads its boxes."""

    def __init__(self, tree):
        self.tree = tree

    def metadata(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.tree)

    def read(self, requests: list[ReadRequest]):
        return [np.array(self.tree[r.path.parts[0]][r.path.parts[1]]) for r in requests]


def test_the_base_class_fills_out_too(saved):
    _, stacked = saved
    src = _Whole({"layers": {str(i): stacked[i] for i in range(LAYERS)}})
    out = np.zeros((10, COLS), np.float32)
    (part,) = src.read_boxes([BoxRequest(tg.parse_path("layers['4']"),
                                         (slice(3, 13), slice(None)), out)])
    assert part is out
    np.testing.assert_array_equal(out, stacked[4][3:13])


def test_the_base_class_leaves_an_out_that_does_not_fit_alone(saved):
    _, stacked = saved
    src = _Whole({"layers": {str(i): stacked[i] for i in range(LAYERS)}})
    wrong = np.zeros((10, COLS), np.float64)
    (part,) = src.read_boxes([BoxRequest(tg.parse_path("layers['4']"),
                                         (slice(3, 13), slice(None)), wrong)])
    assert part is not wrong and part.dtype == np.float32 and not wrong.any()
    np.testing.assert_array_equal(part, stacked[4][3:13])


def test_region_of_covers_a_box_with_whole_chunks_clipped_to_the_shape():
    assert region_of(((3, 5), (0, 64)), (4, 64), (10, 64)) == ((0, 8), (0, 64))
    assert region_of(((8, 10), (10, 20)), (4, 16), (10, 40)) == ((8, 10), (0, 32))
    assert region_of(((0, 4), (0, 0)), (4, 16), (10, 40)) == ((0, 4), (0, 0))


class _OwnArrays(_Whole):
    """A third-party source that reads boxes itself and knows nothing of `out`."""

    def __init__(self, tree, dtype=None):
        super().__init__(tree)
        self.dtype = dtype

    def read_boxes(self, requests):
        out = []
        for r in requests:
            part = np.array(self.tree[r.path.parts[0]][r.path.parts[1]][tuple(r.box)])
            out.append(part if self.dtype is None else part.astype(self.dtype))
        return out


def test_a_source_that_ignores_out_still_stacks(saved, mesh):
    _, stacked = saved
    layers = {str(i): stacked[i] for i in range(LAYERS)}
    like = {"w": _like((LAYERS, ROWS, COLS), mesh, P(None, "x"))}
    got = tg.graft(like, _OwnArrays({"layers": layers}), {"w": tg.stack("layers.*")})["w"]
    np.testing.assert_array_equal(np.asarray(got), stacked)
    assert_owns_buffers(got)


def test_a_source_returning_another_dtype_is_refused(saved, mesh):
    _, stacked = saved
    src = _OwnArrays({"layers": {str(i): stacked[i] for i in range(LAYERS)}}, dtype=np.float64)
    like = {"w": _like((LAYERS, ROWS, COLS), mesh, P("x"))}
    with pytest.raises(tg.GraftError, match="read_boxes must give each box in its shape"):
        tg.graft(like, src, {"w": tg.stack("layers.*")})


def test_unstack_into_sharded_target_decodes_the_layer_once(saved, mesh):
    """Eight shards cut through the layer's one chunk: it is read once, not eight times."""
    path, stacked = saved
    src = tg.OrbaxCheckpoint(path)
    like = {"l_5": _like((ROWS, COLS), mesh, P("x"))}
    mapping = {"l_*": tg.unstack("per_layer")}
    plan = tg.plan(like, src, mapping)
    before = _rchar()
    got = tg.execute(plan)["l_5"]
    read = _rchar() - before
    np.testing.assert_array_equal(np.asarray(got), stacked[5])
    assert_owns_buffers(got)
    # Eight shards each decoding the chunk would read 8 layers; compression makes
    # the bytes on disk a little smaller than a layer.
    assert read <= 1.5 * LAYER, read
    assert src._regions.nbytes() == 0  # every shard cut from it: the region is dropped


@pytest.mark.parametrize("spec", [P(None, "x"), P(None, None, "x"), P()])
def test_sharded_read_of_one_chunk_reads_it_once(saved, mesh, spec):
    path, stacked = saved
    src = tg.OrbaxCheckpoint(path)
    like = {"one_chunk": _like((LAYERS, ROWS, COLS), mesh, spec)}
    plan = tg.plan(like, src, {"one_chunk": "one_chunk"})
    before = _rchar()
    got = tg.execute(plan)["one_chunk"]
    read = _rchar() - before
    np.testing.assert_array_equal(np.asarray(got), stacked)
    assert got.sharding == like["one_chunk"].sharding
    assert_owns_buffers(got)
    assert read <= 1.5 * LAYERS * LAYER, read


def test_a_read_owns_its_buffers_apart_from_a_second_read(saved, mesh):
    path, _ = saved
    like = {"one_chunk": _like((LAYERS, ROWS, COLS), mesh, P(None, "x"))}
    src = tg.OrbaxCheckpoint(path)
    a = tg.graft(like, src, {"one_chunk": "one_chunk"})["one_chunk"]
    b = tg.graft(like, src, {"one_chunk": "one_chunk"})["one_chunk"]
    assert_owns_buffers(a, b)
    assert len(set(buffer_pointers(a))) == 8


def test_regions_cut_copies_and_drop_a_region_once_cut_whole():
    regions = Regions(limit=1 << 20)
    region = np.arange(64, dtype=np.float32).reshape(8, 8)
    regions.keep("r", region)
    top = regions.cut("r", (slice(0, 4), slice(None)), None)
    assert top is not None and not np.shares_memory(top, region)
    np.testing.assert_array_equal(top, region[:4])
    out = np.zeros((4, 8), np.float32)
    assert regions.cut("r", (slice(4, 8), slice(None)), out) is out
    np.testing.assert_array_equal(out, region[4:])
    assert not regions.has("r") and regions.nbytes() == 0
    assert regions.cut("r", (slice(0, 1), slice(None)), None) is None


def test_regions_keep_within_their_limit_and_only_what_a_call_needs():
    regions = Regions(limit=3 * 256)
    for key in "abc":
        regions.keep(key, np.zeros(64, np.float32))  # 256 bytes each
    regions.keep("d", np.zeros(64, np.float32))
    assert [regions.has(k) for k in "abcd"] == [False, True, True, True]
    regions.keep("huge", np.zeros(1024, np.float32))  # over the limit alone: not kept
    assert not regions.has("huge")
    regions.keep_only({"c"})
    assert [regions.has(k) for k in "bcd"] == [False, True, False]
    regions.clear()
    assert regions.nbytes() == 0


def test_a_view_into_a_larger_array_is_copied_not_adopted():
    """An adopted view would keep the whole array it cuts alive as long as the shard."""
    from treegraft._insert.placement import aligned_empty, put_block

    whole = aligned_empty((64, 256), np.float32)
    whole[...] = np.arange(whole.size, dtype=np.float32).reshape(whole.shape)
    view = whole[8:16]
    (placed,) = put_block(view, [jax.devices()[0]])
    assert placed.unsafe_buffer_pointer() != view.ctypes.data
    whole[...] = -1  # the caller's array changes; the shard does not
    np.testing.assert_array_equal(np.asarray(placed),
                                  np.arange(8 * 256, 16 * 256, dtype=np.float32).reshape(8, 256))


def test_a_stack_of_scalar_leaves_fills_each_slot(tmp_path):
    # A 0-d slot must be a view of the block: a plain index gives a scalar copy,
    # into which nothing can be read (a TypeError, found by the invert law test).
    src = {f"l_{i}": np.float32(i + 0.5) for i in range(3)}
    want = np.array([0.5, 1.5, 2.5], np.float32)
    got = tg.graft({"s": np.zeros(3, np.float32)}, src, {"s": tg.stack("l_*")})
    np.testing.assert_array_equal(got["s"], want)
    ckpt = tg.save({k: np.asarray(v) for k, v in src.items()}, str(tmp_path / "c"))
    got = tg.graft({"s": jnp.zeros(3, jnp.float32)}, tg.OrbaxCheckpoint(ckpt),
                   {"s": tg.stack("l_*")})
    np.testing.assert_array_equal(np.asarray(got["s"]), want)
