"""Issue #25 row 1: a safetensors tensor goes to each device in one copy, not three.

A transposed or head-split Linear weight (the tunix Llama 3 recipe) used to be
read into memory, cut into each device's box, then transposed into the device
buffer. Now the reader lends read-only views of the rows it keeps
(`SafetensorsCheckpoint.lend_boxes`), a reshape that only splits axes pulls
back to the one input box it needs (`pullback.reshape_box`), and the device
put is the one copy (jax copies a strided view into a buffer of its own;
`placement.copy_block` no longer copies it first on the host), made by two
threads for a large leaf (`copies.place_shared`). The kept rows are read into
memory used before once no view of it lives (`files.RowArena`), and the
header check before each use parses the header only when its bytes changed.
Each test checks that the fast path is taken and that its result is the
general path's (values against `safetensors.safe_open`, shardings, dtypes,
buffers of their own), and the cases where it must not be taken.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from helpers import assert_owns_buffers, buffer_pointers, mesh_2x4
from helpers import safetensors_oracle as oracle
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._insert import copies, placement
from treegraft._insert.pullback import reshape_box

pytest.importorskip("safetensors")
save_file = pytest.importorskip("safetensors.numpy").save_file

D, N, K, H, F = 32, 8, 4, 4, 64  # hidden, heads, kv heads, head dim, ffn


@pytest.fixture
def weights(tmp_path):
    """A Llama-like layer in Hugging Face's `[out, in]` layout, and its file."""
    rng = np.random.default_rng(0)
    tensors = {
        "q.weight": rng.standard_normal((N * H, D)).astype(np.float32),
        "k.weight": rng.standard_normal((K * H, D)).astype(np.float32),
        "o.weight": rng.standard_normal((D, N * H)).astype(np.float32),
        "up.weight": rng.standard_normal((F, D)).astype(np.float32),
        "norm.weight": rng.standard_normal(D).astype(np.float32),
        "scalar": np.array(3.5, np.float32),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    return path


def kept_ranges(src):
    """(begin, end) memory ranges of the rows the reader keeps."""
    assert src._recent is not None
    return [(r.ctypes.data, r.ctypes.data + r.nbytes) for r in src._recent[1].values()]


def assert_outside(x, ranges):
    """No shard of x has its buffer inside the reader's kept rows."""
    for p in buffer_pointers(x):
        assert not any(b <= p < e for b, e in ranges), (p, ranges)


# -- reshape_box: a reshape's output box as one input box -----------------------------------


def test_reshape_box_of_a_head_range_is_a_column_range():
    # tunix's q_proj: [D, N * H] -> [D, N, H], a device holding heads 1..3 of rows 0..16.
    got = reshape_box((D, N * H), (D, N, H), (slice(0, 16), slice(1, 3), slice(0, H)))
    assert got == (slice(0, 16), slice(H, 3 * H))
    # o_proj: [N * H, D] -> [N, H, D]
    got = reshape_box((N * H, D), (N, H, D), (slice(2, 4), slice(0, H), slice(8, 16)))
    assert got == (slice(2 * H, 4 * H), slice(8, 16))


@pytest.mark.parametrize(
    "shape_in, shape_out, box",
    [
        # A range of the head dim across several heads: not one input box.
        ((D, N * H), (D, N, H), (slice(0, D), slice(0, N), slice(0, H // 2))),
        # Half a row, a row and half a row of a [4, 8] merged into [32].
        ((4, 8), (32,), (slice(4, 20),)),
        # An empty box, and a scalar.
        ((4, 8), (32,), (slice(3, 3),)),
        ((), (1,), (slice(0, 1),)),
    ],
    ids=["head-dim", "merged-partial", "empty", "scalar"],
)
def test_reshape_box_refuses_boxes_that_are_not_one_input_box(shape_in, shape_out, box):
    assert reshape_box(shape_in, shape_out, box) is None


@st.composite
def reshapes(draw):
    """A shape, a reshape of it (axes split and merged), and a box of the output."""
    factors = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    cuts_in = sorted(draw(st.sets(st.integers(1, len(factors) - 1), max_size=3))) if len(
        factors) > 1 else []
    cuts_out = sorted(draw(st.sets(st.integers(1, len(factors) - 1), max_size=3))) if len(
        factors) > 1 else []

    def join(cuts):
        edges = [0, *cuts, len(factors)]
        return tuple(int(np.prod(factors[a:b])) for a, b in zip(edges, edges[1:], strict=False))

    shape_in, shape_out = join(cuts_in), join(cuts_out)
    box = []
    for d in shape_out:
        start = draw(st.integers(0, d - 1))
        box.append(slice(start, draw(st.integers(start + 1, d))))
    return shape_in, shape_out, tuple(box)


@given(reshapes())
def test_reshape_box_gives_the_values_of_the_output_box(case):
    shape_in, shape_out, box = case
    x = np.arange(int(np.prod(shape_in))).reshape(shape_in)
    inner = reshape_box(shape_in, shape_out, box)
    want = x.reshape(shape_out)[box]
    # The box's elements are one box of the input when their bounding box holds no other.
    coords = np.unravel_index(want.reshape(-1), shape_in)
    bounding = int(np.prod([c.max() - c.min() + 1 for c in coords]))
    assert (inner is not None) == (bounding == want.size), (inner, bounding, want.size)
    if inner is not None:
        np.testing.assert_array_equal(x[inner].reshape(want.shape), want)


# -- lend_boxes: read-only views of the kept rows -------------------------------------------


class Req:
    def __init__(self, path, box):
        self.path, self.box = path, box


def test_lent_boxes_are_read_only_views_of_the_rows_read_once(weights):
    src = tg.SafetensorsCheckpoint(weights)
    whole = oracle(weights, "up.weight")
    a, b = src.lend_boxes([Req("up.weight", (slice(0, 16), slice(0, 8))),
                           Req("up.weight", (slice(0, 16), slice(8, 20)))])
    (c,) = src.lend_boxes([Req("up.weight", (slice(0, 16), slice(20, D)))])  # kept: not read again
    for got, cols in ((a, slice(0, 8)), (b, slice(8, 20)), (c, slice(20, D))):
        np.testing.assert_array_equal(got, whole[0:16, cols])
        assert not got.flags.writeable
    ranges = kept_ranges(src)
    assert len(ranges) == 1 and ranges[0][1] - ranges[0][0] == 16 * D * 4  # rows 0..16, once
    assert all(np.shares_memory(x, next(iter(src._recent[1].values()))) for x in (a, b, c))
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 0.0
    # read_boxes still gives arrays of the caller's own from the same kept rows.
    (own,) = src.read_boxes([Req("up.weight", (slice(0, 16), slice(0, 8)))])
    assert own.flags.writeable and not np.shares_memory(own, a)
    np.testing.assert_array_equal(own, a)


@pytest.mark.parametrize(
    "requests",
    [
        [Req("scalar", ())],  # a 0-d tensor: rows are not kept
        [Req("up.weight", (slice(2, 2), slice(0, D)))],  # an empty box
        [Req("up.weight", (slice(0, 4), slice(0, D))), Req("norm.weight", (slice(0, 8),))],
    ],
    ids=["scalar", "empty", "two-tensors"],
)
def test_boxes_that_are_not_lent_are_fresh_arrays(weights, requests):
    src = tg.SafetensorsCheckpoint(weights)
    got = src.lend_boxes(requests)
    for req, part in zip(requests, got, strict=True):
        assert part.flags.writeable  # read as read_boxes reads: the caller's own
        np.testing.assert_array_equal(part, oracle(weights, req.path)[req.box])


# -- grafts: the one-copy path, against the oracle --------------------------------------------


def tunix_like(mesh):
    """Targets laid out as tunix's Llama 3 (heads split out, kernels `[in, out]`)."""
    def like(shape, spec):
        return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, spec))

    state = {
        "q": like((D, N, H), P("a", "b", None)),
        "k": like((D, K, H), P("a", "b", None)),
        "o": like((N, H, D), P("b", None, "a")),
        "up": like((D, F), P("a", "b")),
        "norm": like((D,), P("b")),
    }
    mapping = {
        "q": tg.reshape(tg.transpose("q.weight", (1, 0)), (D, N, H)),
        "k": tg.reshape(tg.transpose("k.weight", (1, 0)), (D, K, H)),
        "o": tg.reshape(tg.transpose("o.weight", (1, 0)), (N, H, D)),
        "up": tg.transpose("up.weight", (1, 0)),
        "norm": "norm.weight",
    }
    return state, mapping


def wanted(path):
    return {
        "q": oracle(path, "q.weight").T.reshape(D, N, H),
        "k": oracle(path, "k.weight").T.reshape(D, K, H),
        "o": oracle(path, "o.weight").T.reshape(N, H, D),
        "up": oracle(path, "up.weight").T,
        "norm": oracle(path, "norm.weight"),
    }


def test_a_tunix_layout_on_a_2x4_mesh_is_the_oracle_with_buffers_of_its_own(weights):
    state, mapping = tunix_like(mesh_2x4())
    src = tg.SafetensorsCheckpoint(weights)
    first = tg.graft(state, src, mapping)
    second = tg.graft(state, src, mapping)
    want = wanted(weights)
    for name, like in state.items():
        for got in (first[name], second[name]):
            np.testing.assert_array_equal(np.asarray(got), want[name])
            assert got.sharding == like.sharding and got.dtype == like.dtype
        assert_owns_buffers(second[name], *first.values())
    assert_outside(second["up"], kept_ranges(src))  # up.weight is read last: its rows kept
    first["q"].delete()  # a shard freed frees nothing of another result
    np.testing.assert_array_equal(np.asarray(second["q"]), want["q"])


def test_a_head_sharded_reshape_reads_only_its_rows(weights):
    """The fast path: each device's heads are one row range of q.weight, kept apart."""
    mesh = mesh_2x4()
    like = jax.ShapeDtypeStruct((D, N, H), np.float32, sharding=NamedSharding(mesh, P("a", "b")))
    src = tg.SafetensorsCheckpoint(weights)
    got = tg.graft({"q": like}, src, {"q": tg.reshape(tg.transpose("q.weight", (1, 0)),
                                                       (D, N, H))})["q"]
    ranges = sorted(kept_ranges(src))
    # Four head groups: four row ranges of a quarter each, not the whole tensor.
    assert [e - b for b, e in ranges] == [N * H * D * 4 // 4] * 4
    np.testing.assert_array_equal(np.asarray(got), wanted(weights)["q"])
    assert_owns_buffers(got)
    assert_outside(got, ranges)


def test_a_head_dim_sharded_reshape_takes_the_general_path(weights):
    """A range of the head dim is no box of the input: the whole input, as before."""
    mesh = mesh_2x4()
    like = jax.ShapeDtypeStruct((D, N, H), np.float32,
                                sharding=NamedSharding(mesh, P(None, None, "b")))
    src = tg.SafetensorsCheckpoint(weights)
    got = tg.graft({"q": like}, src, {"q": tg.reshape(tg.transpose("q.weight", (1, 0)),
                                                       (D, N, H))})["q"]
    assert [e - b for b, e in kept_ranges(src)] == [N * H * D * 4]  # the whole tensor, once
    np.testing.assert_array_equal(np.asarray(got), wanted(weights)["q"])
    assert got.sharding == like.sharding
    assert_owns_buffers(got)


@pytest.mark.parametrize("sharded", [True, False], ids=["one-device-sharding", "no-sharding"])
def test_a_lent_block_in_c_order_is_copied_not_adopted(weights, sharded):
    """A reshape alone lends a C-ordered view of the kept rows: jax would adopt it."""
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device) if sharded else None
    like = jax.ShapeDtypeStruct((F, 2, D // 2), np.float32, sharding=sharding)
    src = tg.SafetensorsCheckpoint(weights)
    mapping = {"up": tg.reshape("up.weight", (F, 2, D // 2))}
    first = tg.graft({"up": like}, src, mapping)["up"]
    second = tg.graft({"up": like}, src, mapping)["up"]
    want = oracle(weights, "up.weight").reshape(F, 2, D // 2)
    np.testing.assert_array_equal(np.asarray(second), want)
    assert_owns_buffers(second, first)
    assert_outside(first, kept_ranges(src))
    assert_outside(second, kept_ranges(src))


def test_a_cast_of_a_lent_block_is_its_own_array(weights):
    mesh = mesh_2x4()
    like = jax.ShapeDtypeStruct((D, F), np.float16, sharding=NamedSharding(mesh, P("a", "b")))
    src = tg.SafetensorsCheckpoint(weights)
    got = tg.graft({"up": like}, src, {"up": tg.transpose("up.weight", (1, 0))},
                   cast="unsafe")["up"]
    np.testing.assert_array_equal(np.asarray(got), oracle(weights, "up.weight").T.astype(
        np.float16))
    assert got.dtype == np.float16 and got.sharding == like.sharding
    assert_owns_buffers(got)
    assert_outside(got, kept_ranges(src))


# -- placement: a strided block is put as it is, each device in its own buffer -----------------


def test_a_strided_block_is_put_without_a_host_copy_and_owns_each_buffer():
    host = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    view = host.T[8:40]  # strided: no host copy can be adopted
    assert placement.copy_block(view) is view  # put as it is: jax copies it
    devices = jax.devices()[:3]
    got = placement.put_block(view, devices, adopt=False)
    pointers = [x.unsafe_buffer_pointer() for x in got]
    assert len(set(pointers)) == 3
    assert not any(host.ctypes.data <= p < host.ctypes.data + host.nbytes for p in pointers)
    for x, device in zip(got, devices, strict=True):
        np.testing.assert_array_equal(np.asarray(x), host.T[8:40])
        assert x.devices() == {device}
    contiguous = host[8:40]  # a C-ordered view is still copied on the host
    copy = placement.copy_block(contiguous)
    assert copy is not contiguous and not np.shares_memory(copy, host)


# -- RowArena: the kept rows' memory serves later tensors once no view of it lives -----------


@pytest.fixture
def layers(tmp_path):
    """Six tensors of the same shape, and their file."""
    rng = np.random.default_rng(1)
    tensors = {f"l{k}.weight": rng.standard_normal((F, D)).astype(np.float32) for k in range(6)}
    path = str(tmp_path / "layers.safetensors")
    save_file(tensors, path)
    return path


def lend_rows(src, name, rows=(0, F)):
    """Lends rows of a tensor in two column halves; returns the views and the rows' address."""
    views = src.lend_boxes([Req(name, (slice(*rows), slice(0, D // 2))),
                            Req(name, (slice(*rows), slice(D // 2, D)))])
    (start, end), = kept_ranges(src)
    return views, start


def test_rows_of_later_tensors_are_read_into_memory_used_before(layers):
    src = tg.SafetensorsCheckpoint(layers)
    starts = []
    for k in range(6):
        views, start = lend_rows(src, f"l{k}.weight")
        want = oracle(layers, f"l{k}.weight")
        np.testing.assert_array_equal(np.concatenate(views, axis=1), want)
        starts.append(start)
        del views  # nothing holds them: the memory may serve again
    # Once the first tensor has sized the arena, every later one is read into it
    # (a second arena only serves while the first is held).
    assert src._arena.reused == 4
    assert len(set(starts[1:])) == 1 and len(src._arena._roots) == 1


def test_memory_a_lent_view_still_holds_is_never_read_into(layers):
    src = tg.SafetensorsCheckpoint(layers)
    lend_rows(src, "l0.weight")  # sizes the arenas
    held, start = lend_rows(src, "l1.weight")
    others = []
    for k in range(2, 6):
        views, other = lend_rows(src, f"l{k}.weight")
        others.append(other)
        del views
    assert start not in others  # l1's memory was not used again while `held` lives
    np.testing.assert_array_equal(np.concatenate(held, axis=1), oracle(layers, "l1.weight"))
    del held
    lend_rows(src, "l0.weight")  # another tensor: l1's memory is free again, and used
    views, again = lend_rows(src, "l2.weight")
    assert again in [start, *others]
    np.testing.assert_array_equal(np.concatenate(views, axis=1), oracle(layers, "l2.weight"))


def test_grafts_of_many_tensors_through_the_arena_match_the_oracle(layers):
    mesh = mesh_2x4()
    like = jax.ShapeDtypeStruct((D, F), np.float32, sharding=NamedSharding(mesh, P("a", "b")))
    state = {f"l{k}": like for k in range(6)}
    mapping = {f"l{k}": tg.transpose(f"l{k}.weight", (1, 0)) for k in range(6)}
    src = tg.SafetensorsCheckpoint(layers)
    out = tg.graft(state, src, mapping)
    again = tg.graft(state, src, mapping)
    assert src._arena.reused > 0
    for k in range(6):
        want = oracle(layers, f"l{k}.weight").T
        np.testing.assert_array_equal(np.asarray(out[f"l{k}"]), want)
        np.testing.assert_array_equal(np.asarray(again[f"l{k}"]), want)
        assert out[f"l{k}"].sharding == like.sharding
        assert_owns_buffers(again[f"l{k}"], *out.values())
        assert_outside(out[f"l{k}"], [(r.ctypes.data, r.ctypes.data + r.nbytes)
                                       for r in src._arena._roots])


# -- the header check before each use of kept rows: parsed again only when its bytes differ --


def test_the_header_is_parsed_once_while_its_bytes_stay_the_same(weights):
    src = tg.SafetensorsCheckpoint(weights)
    views = src.lend_boxes([Req("up.weight", (slice(0, 16), slice(0, 8)))])
    (_, parsed, _), = src._files._headers.values()
    views += src.lend_boxes([Req("up.weight", (slice(0, 16), slice(8, 16)))])  # checked again
    (_, again, _), = src._files._headers.values()
    assert again is parsed  # the same bytes: not parsed again
    np.testing.assert_array_equal(np.concatenate(views, axis=1), oracle(weights, "up.weight")[
        0:16, 0:16])


def test_a_header_rewritten_in_place_is_still_refused(weights):
    """Same inode, size and mtime, one dtype changed: the bytes differ, the parse says so."""
    import os

    src = tg.SafetensorsCheckpoint(weights)
    mesh = mesh_2x4()
    like = jax.ShapeDtypeStruct((D, F), np.float32, sharding=NamedSharding(mesh, P("a", "b")))
    mapping = {"up": tg.transpose("up.weight", (1, 0))}
    tg.graft({"up": like}, src, mapping)  # up.weight's rows kept, the header's bytes cached
    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
    start = header.index(b'"up.weight"')
    changed = header[:start] + header[start:].replace(b'"F32"', b'"I32"', 1)
    assert len(changed) == len(header) and changed != header
    stat = os.stat(weights)
    with open(weights, "r+b") as f:
        f.seek(8)
        f.write(changed)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(weights).st_ino == stat.st_ino and os.stat(weights).st_size == stat.st_size
    with pytest.raises(tg.CheckpointError, match=r"changed since the plan.*up\.weight.*int32"):
        tg.graft({"up": like}, src, mapping)


# -- copies.place_shared: lent blocks of a large leaf copied by two threads -----------------


@pytest.fixture
def large(tmp_path):
    """One Linear weight of 4 MiB (the size from which two threads copy), and its file."""
    w = np.random.default_rng(2).standard_normal((1024, 1024)).astype(np.float32)
    assert w.nbytes >= copies.SHARED_FROM
    path = str(tmp_path / "large.safetensors")
    save_file({"w": w}, path)
    return path, w


def copy_threads():
    return [t for t in threading.enumerate() if t.name.startswith("treegraft-copy")]


@pytest.mark.parametrize(
    "spec", [P("a", "b"), P(None, "b"), P()], ids=["ab", "cols-replicated", "replicated"]
)
def test_a_large_transposed_leaf_is_copied_by_two_threads_and_is_the_oracle(large, spec):
    path, w = large
    like = jax.ShapeDtypeStruct((1024, 1024), np.float32, sharding=NamedSharding(mesh_2x4(), spec))
    src = tg.SafetensorsCheckpoint(path)
    mapping = {"w": tg.transpose("w", (1, 0))}
    first = tg.graft({"w": like}, src, mapping)["w"]
    second = tg.graft({"w": like}, src, mapping)["w"]
    assert copy_threads()  # the worker was started: the shared path was taken
    for got in (first, second):
        np.testing.assert_array_equal(np.asarray(got), oracle(path, "w").T)
        assert got.sharding == like.sharding and got.dtype == np.float32
    assert_owns_buffers(second, first)
    assert_outside(second, kept_ranges(src))


def test_a_large_cast_leaf_puts_its_own_blocks_through_the_shared_path(large):
    """Cast blocks are the caller's own (not lent): put as array_from_blocks puts them."""
    path, w = large
    like = jax.ShapeDtypeStruct((1024, 1024), np.float64,
                                sharding=NamedSharding(mesh_2x4(), P("a", None)))
    with jax.enable_x64(True):  # else jax holds float64 as float32: refused by execute
        got = tg.graft({"w": like}, tg.SafetensorsCheckpoint(path),
                       {"w": tg.transpose("w", (1, 0))}, cast=True)["w"]
        assert got.dtype == np.float64
        np.testing.assert_array_equal(np.asarray(got), oracle(path, "w").T.astype(np.float64))
    assert got.sharding == like.sharding
    assert_owns_buffers(got)


def test_a_failing_block_stops_the_shared_copies_and_raises(large):
    _, w = large
    sharding = NamedSharding(mesh_2x4(), P("a", "b"))
    view = w.T
    view.flags.writeable = False
    seen = []

    def block_of(box):
        seen.append(box)
        if len(seen) == 3:
            raise tg.GraftError("the third block fails")
        return view[tuple(slice(a, b) for a, b in box)]

    with pytest.raises(tg.GraftError, match="third block"):
        copies.place_shared((1024, 1024), sharding, block_of)
    # The path works again at once: no copy of the failed call is left running.
    seen.clear()
    got = copies.place_shared((1024, 1024), sharding,
                              lambda box: view[tuple(slice(a, b) for a, b in box)])
    np.testing.assert_array_equal(np.asarray(got), w.T)
    assert_owns_buffers(got)
    assert not any(w.ctypes.data <= p < w.ctypes.data + w.nbytes for p in buffer_pointers(got))
