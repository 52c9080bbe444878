"""Issue #25 row 2: an in-memory weight sync checks only the buffers a reshard can share.

Proves, on behaviour only (the timings are in `benchmarks/run.py --cases sync`):
- which device blocks are one run of memory (`_dense`) agrees with numpy's own
  `c_contiguous` of the same slice;
- a reshard the rule calls fresh (no device keeps a source block, and no block is
  one run of memory: the columns of a row-major kernel) gives, from
  `jax.device_put` itself, shards that share no buffer with each other, with the
  source's buffers or with the source's host copy, on every try;
- a graft takes that path (the kernels' buffers are not looked at, the biases'
  are) and gives the same values, shardings and ownership as the general path,
  which looks at every leaf;
- where a block is one run of memory (a bias split over a replicated axis) the
  fast path is not taken: jax's CPU client does adopt such a host block for two
  devices, and the graft still hands out buffers of their own;
- many small such reshards (at least half a chunk of one shape, dtype and sharding)
  are copied whole by the compiled chunk copy, padded to a full chunk, instead of
  being looked at; fewer, or larger arrays, are looked at as before; both give
  the general path's values, shardings and owned buffers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import assert_owns_buffers, buffer_pointers
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._insert import sharding as placing


def _meshes():
    devices = jax.devices()[:8]
    return (
        jax.make_mesh((8,), ("fsdp",), devices=devices),
        jax.make_mesh((2, 4), ("data", "model"), devices=devices),
    )


# ----------------------------------------------------------------------------
# Which blocks are one run of memory.
# ----------------------------------------------------------------------------


@st.composite
def _boxes(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    box = []
    for n in shape:
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        box.append((a, b))
    return shape, tuple(box)


@given(_boxes())
def test_dense_agrees_with_numpy_contiguity(case):
    shape, box = case
    view = np.zeros(shape, np.float32)[tuple(slice(a, b) for a, b in box)]
    assert placing._dense(box, shape) == view.flags.c_contiguous


# ----------------------------------------------------------------------------
# The rule against jax itself: a reshard called fresh shares nothing.
# ----------------------------------------------------------------------------


def _shardings():
    fsdp, tp = _meshes()
    return {
        "fsdp rows": (fsdp, P("fsdp", None)),
        "fsdp cols": (fsdp, P(None, "fsdp")),
        "replicated 8": (fsdp, P()),
        "tp cols": (tp, P(None, "model")),
        "tp rows": (tp, P("model", None)),
        "tp both": (tp, P("data", "model")),
        "tp cols by data": (tp, P(None, "data")),
        "tp replicated": (tp, P()),
        "device 0": (jax.devices()[0],),
        "device 3": (jax.devices()[3],),
    }


def _sharding(name):
    made = _shardings()[name]
    if len(made) == 1:
        return jax.sharding.SingleDeviceSharding(made[0])
    return NamedSharding(*made)


_NAMES = sorted(_shardings())


def _ranges(x):
    """(start, stop) of the memory of each addressable shard of x."""
    return [
        (s.data.unsafe_buffer_pointer(), s.data.unsafe_buffer_pointer() + s.data.nbytes)
        for s in x.addressable_shards
    ]


def _assert_fresh(got, source):
    """Every shard of got has a buffer of its own, inside no memory of the source."""
    mine = buffer_pointers(got)
    assert len(set(mine)) == len(mine), "two shards share a buffer"
    host = np.asarray(source)  # jax's host copy, the one its reshard slices
    theirs = _ranges(source) + [(host.ctypes.data, host.ctypes.data + host.nbytes)]
    inside = [p for p in mine for a, b in theirs if a <= p < b]
    assert not inside, "a shard lives in the source's memory"


@given(
    st.sampled_from(_NAMES),
    st.sampled_from(_NAMES),
    st.sampled_from([(16, 32), (32, 8), (8, 64)]),
)
def test_a_reshard_called_fresh_shares_no_memory(have_name, want_name, shape):
    have, want = _sharding(have_name), _sharding(want_name)
    keeps, adopts = placing._reshard_checks(have, want, shape)
    fresh = have != want and not keeps and not placing._any_block_dense(want, shape)
    if fresh:
        assert not adopts  # the rule's claim: nothing to look at
    for k in range(4):  # alignment of the host copy varies from array to array
        source = jax.device_put(np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + k,
                                have)
        got = jax.device_put(source, want, may_alias=False)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(source))
        if fresh:
            _assert_fresh(got, source)
        elif not (keeps or adopts):
            # A block of one run on one device only: it may be adopted from the
            # host copy, but no two shards, nor a shard and a source buffer, share.
            assert_owns_buffers(got, source)


def test_the_sync_layouts_get_the_expected_rule():
    fsdp, tp = _meshes()
    kernel = placing._reshard_checks(
        NamedSharding(fsdp, P("fsdp", None)), NamedSharding(tp, P(None, "model")), (512, 512)
    )
    bias = placing._reshard_checks(
        NamedSharding(fsdp, P("fsdp")), NamedSharding(tp, P("model")), (512,)
    )
    replicated = placing._reshard_checks(
        NamedSharding(fsdp, P()), NamedSharding(tp, P("model")), (512,)
    )
    assert kernel == (False, False)  # columns of a row-major array: never adopted
    assert bias == (False, True)  # a run of memory on two devices: looked at
    assert replicated == (True, True)  # every device holds the source's whole block


# ----------------------------------------------------------------------------
# The graft: the path is taken, and gives what the general path gives.
# ----------------------------------------------------------------------------


def _sync_trees(n=12, side=64, bias=None):
    fsdp, tp = _meshes()

    def layer(mesh, kernel, bias_spec, value):
        return {
            "kernel": jax.device_put(
                np.arange(side * side, dtype=np.float32).reshape(side, side) + value,
                NamedSharding(mesh, kernel),
            ),
            "bias": jax.device_put(np.full(bias or side, value, np.float32),
                                   NamedSharding(mesh, bias_spec)),
        }

    source = {"model": {f"layers_{i}": layer(fsdp, P("fsdp", None), P("fsdp"), i + 1.0)
                        for i in range(n)}}
    target = {"decoder": {f"block_{i}": layer(tp, P(None, "model"), P("model"), 0.0)
                          for i in range(n)}}
    return source, target, {"decoder.block_*": "model.layers_*"}


def _general_checks(have, want, shape):
    """The rule before #25 row 2: every reshard is looked at for both."""
    return (
        have != want and placing._may_keep(have, want, shape),
        placing._on_cpu(want) and placing._has_replicas(want, shape),
    )


def _general_path(monkeypatch):
    """place as before #25 row 2: every leaf's buffers looked at, none copied whole."""
    monkeypatch.setattr(placing, "_reshard_checks", _general_checks)
    monkeypatch.setattr(placing, "_SMALL", -1)


def _counting(monkeypatch):
    """Counts the arrays whose shards' buffers place looks at (the real check runs)."""
    looked = []
    real = placing.shares_buffers

    def shares_buffers(x):
        looked.append(x.shape)
        return real(x)

    monkeypatch.setattr(placing, "shares_buffers", shares_buffers)
    return looked


def _compiled_copies():
    info = placing._chunk_copier.cache_info()
    return info.hits + info.misses


def _assert_sync_result(out, source, target, n):
    mine = []
    for i in range(n):
        for name in ("kernel", "bias"):
            got = out["decoder"][f"block_{i}"][name]
            src = source["model"][f"layers_{i}"][name]
            assert got.sharding == target["decoder"][f"block_{i}"][name].sharding
            assert got.dtype == src.dtype and got.shape == src.shape
            np.testing.assert_array_equal(np.asarray(got), np.asarray(src))
            _assert_fresh(got, src)
            assert_owns_buffers(got, src, target["decoder"][f"block_{i}"][name])
            mine.extend(buffer_pointers(got))
    assert len(set(mine)) == len(mine), "two grafted leaves share a buffer"


def test_sync_looks_only_at_the_buffers_a_reshard_can_share(monkeypatch):
    n = 12
    source, target, mapping = _sync_trees(n)
    looked = _counting(monkeypatch)
    out = tg.graft(target, source, mapping)
    assert sorted(looked) == [(64,)] * n  # the biases, never a kernel
    _assert_sync_result(out, source, target, n)


def test_sync_gives_what_the_general_path_gives(monkeypatch):
    n = 12
    source, target, mapping = _sync_trees(n)
    fast = tg.graft(target, source, mapping)
    _general_path(monkeypatch)
    looked = _counting(monkeypatch)
    general = tg.graft(target, source, mapping)
    assert len(looked) == 2 * n  # the general path looks at every leaf
    assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(general)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(general),
                    strict=True):
        assert a.sharding == b.sharding and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_sync_result(fast, source, target, n)


def test_donating_the_synced_state_leaves_the_trainer_intact():
    n = 4
    source, target, mapping = _sync_trees(n)
    before = jax.tree_util.tree_map(np.array, source)
    out = tg.graft(target, source, mapping)
    step = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 0 - 1, t), donate_argnums=0)
    jax.block_until_ready(step(out))
    for a, b in zip(jax.tree_util.tree_leaves(source), jax.tree_util.tree_leaves(before),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("spec", [P("model"), P(("model", "data"))])
def test_a_block_of_one_run_of_memory_is_looked_at_and_owned(monkeypatch, spec):
    # A replicated source: jax's host copy is a view of a device buffer (aligned),
    # so its CPU client adopts every run-of-memory block: here the fast path would
    # hand out shared buffers, and must not be taken.
    fsdp, tp = _meshes()
    source = {f"b{i}": jax.device_put(np.full(512, i, np.float32), NamedSharding(fsdp, P()))
              for i in range(6)}
    target = {f"b{i}": jax.device_put(np.zeros(512, np.float32), NamedSharding(tp, spec))
              for i in range(6)}
    raw = jax.device_put(source["b0"], NamedSharding(tp, spec), may_alias=False)
    raw_mine = buffer_pointers(raw)
    assert len(set(raw_mine)) < len(raw_mine) or set(raw_mine) & set(
        buffer_pointers(source["b0"])
    ), "jax no longer adopts the block: the premise of this test changed"
    looked = _counting(monkeypatch)
    out = tg.graft(target, source, {"": ""})
    assert placing._reshard_checks(source["b0"].sharding, target["b0"].sharding, (512,))[0]
    for i in range(6):
        got = out[f"b{i}"]
        assert got.sharding == target[f"b{i}"].sharding
        np.testing.assert_array_equal(np.asarray(got), np.full(512, i, np.float32))
        _assert_fresh(got, source[f"b{i}"])
    if spec == P("model"):
        assert len(looked) == 6  # replicas: each leaf's shards looked at


@pytest.mark.parametrize(
    ("n", "bias", "chunks", "looked_at"),
    [
        (160, 64, 1, 0),  # 160 biases of 256 B: one chunk, padded
        (100, 64, 0, 100),  # less than half a chunk: looked at
        (300, 64, 1, 44),  # a full chunk, and a rest of 44 looked at
        (160, 4096, 0, 160),  # 16 KiB each: looking costs less than copying
    ],
)
def test_many_small_reshards_onto_replicas_are_copied_whole(
    monkeypatch, n, bias, chunks, looked_at
):
    source, target, mapping = _sync_trees(n, side=8, bias=bias)
    looked = _counting(monkeypatch)
    before = _compiled_copies()
    out = tg.graft(target, source, mapping)
    assert _compiled_copies() == before + chunks
    assert looked == [(bias,)] * looked_at  # never a kernel
    _assert_sync_result(out, source, target, n)
    _general_path(monkeypatch)
    del looked[:]
    general = tg.graft(target, source, mapping)
    assert len(looked) == 2 * n  # the general path looks at every leaf
    _assert_sync_result(general, source, target, n)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(general),
                    strict=True):
        assert a.sharding == b.sharding and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
