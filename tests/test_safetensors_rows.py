"""Boxes of one safetensors tensor asked device by device read its rows once.

A sharded target leaf under an operation (a transposed Linear weight, a
reshaped attention kernel) is built one device at a time, each device asking
`read_boxes` for its own box. Devices that need the same rows (the columns of
a row range, replicas, the whole input of a reshape) are served from the rows
read for the first one (`SafetensorsCheckpoint._rows_of`): every byte of the
tensor is read once, each shard still gets a buffer of its own, and a file
changed in between is refused, not served from memory.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from helpers import assert_owns_buffers, mesh_2x4, rchar
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg

save_file = pytest.importorskip("safetensors.numpy").save_file


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "up.weight": rng.standard_normal((256, 128)).astype(np.float32),  # [out, in], 128 KiB
        "q.weight": rng.standard_normal((128, 128)).astype(np.float32),
        "norm.weight": rng.standard_normal(128).astype(np.float32),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    return path, tensors


def bytes_read(path, state, mapping):
    """The graft's result and the bytes it read (`rchar`), after a warm-up run.

    The warm-up (on another source object: nothing kept) leaves out the
    first-use reads of the process (modules imported lazily).
    """
    tg.graft(state, tg.SafetensorsCheckpoint(path), mapping)
    plan = tg.plan(state, tg.SafetensorsCheckpoint(path), mapping)  # the headers
    before = rchar()
    out = tg.execute(plan)
    return out, rchar() - before


@pytest.mark.parametrize(
    "spec", [P("a", "b"), P("b", "a"), P(None, "b"), P()], ids=["ab", "ba", "cols", "replicated"]
)
def test_a_transposed_sharded_leaf_reads_each_byte_once(weights, spec):
    path, tensors = weights
    like = jax.ShapeDtypeStruct((128, 256), np.float32, sharding=NamedSharding(mesh_2x4(), spec))
    got, read = bytes_read(path, {"up": like}, {"up": tg.transpose("up.weight", (1, 0))})
    out = got["up"]
    size = tensors["up.weight"].nbytes
    # Once, not once per device with the same rows (2x to 8x); the rest is the
    # header, read again before each use of the kept rows (a few hundred bytes).
    assert size <= read <= size + 8 * 1024, read
    np.testing.assert_array_equal(np.asarray(out), tensors["up.weight"].T)
    assert out.sharding == like.sharding
    assert_owns_buffers(out)


def test_a_reshaped_sharded_leaf_reads_its_input_once(weights):
    path, tensors = weights
    sharding = NamedSharding(mesh_2x4(), P("a", "b", None))
    like = jax.ShapeDtypeStruct((128, 8, 16), np.float32, sharding=sharding)
    mapping = {"q": tg.reshape(tg.transpose("q.weight", (1, 0)), (128, 8, 16))}
    got, read = bytes_read(path, {"q": like}, mapping)
    out = got["q"]
    size = tensors["q.weight"].nbytes
    assert size <= read <= size + 8 * 1024, read  # a reshape's whole input, once for 8 devices
    np.testing.assert_array_equal(np.asarray(out), tensors["q.weight"].T.reshape(128, 8, 16))
    assert_owns_buffers(out)


def test_a_second_graft_of_the_same_tensor_gives_new_buffers(weights):
    path, tensors = weights
    src = tg.SafetensorsCheckpoint(path)
    like = jax.ShapeDtypeStruct((128, 256), np.float32, sharding=NamedSharding(mesh_2x4(), P()))
    mapping = {"up": tg.transpose("up.weight", (1, 0))}
    first = tg.graft({"up": like}, src, mapping)["up"]
    second = tg.graft({"up": like}, src, mapping)["up"]
    np.testing.assert_array_equal(np.asarray(second), tensors["up.weight"].T)
    assert_owns_buffers(second, first)


def test_kept_rows_are_not_used_once_the_file_has_changed(weights):
    path, tensors = weights
    src = tg.SafetensorsCheckpoint(path)
    like = jax.ShapeDtypeStruct((128, 256), np.float32, sharding=NamedSharding(mesh_2x4(), P()))
    mapping = {"up": tg.transpose("up.weight", (1, 0))}
    tg.graft({"up": like}, src, mapping)  # the rows of up.weight are kept
    changed = {**tensors, "up.weight": tensors["up.weight"] + 1}
    save_file(changed, path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(tg.CheckpointError, match=r"changed"):
        tg.graft({"up": like}, src, mapping)
    fresh = tg.graft({"up": like}, tg.SafetensorsCheckpoint(path), mapping)["up"]
    np.testing.assert_array_equal(np.asarray(fresh), changed["up.weight"].T)


def test_boxes_of_other_tensors_in_between_read_only_their_own_rows(weights):
    """Only the tensor read last is kept: another tensor's boxes replace it."""
    path, tensors = weights
    src = tg.SafetensorsCheckpoint(path)
    mesh = jax.make_mesh((8,), ("x",))
    state = {
        "norm": jax.ShapeDtypeStruct((128,), np.float32, sharding=NamedSharding(mesh, P("x"))),
        "up": jax.ShapeDtypeStruct((128, 256), np.float32, sharding=NamedSharding(mesh, P("x"))),
    }
    mapping = {"norm": tg.cast("norm.weight", np.float32),
               "up": tg.transpose("up.weight", (1, 0))}
    out = tg.graft(state, src, mapping)
    np.testing.assert_array_equal(np.asarray(out["norm"]), tensors["norm.weight"])
    np.testing.assert_array_equal(np.asarray(out["up"]), tensors["up.weight"].T)
    kept = src._recent
    assert kept is not None and kept[0].name in ("norm.weight", "up.weight")
    assert sum(a.nbytes for a in kept[1].values()) <= tensors[kept[0].name].nbytes
    src.close()
    assert src._recent is None
