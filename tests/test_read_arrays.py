"""The direct tensorstore reader against orbax's restore, byte for byte, and box reads.

A corpus of checkpoints (zarr v2 and v3, OCDBT on and off, compressed or not,
arrays saved sharded or whole, several chunks per array) is read into targets
of many shardings on 8 devices, once by treegraft's own reader and once by
orbax's restore (its fallback); the results must agree in type, dtype, shape,
sharding and every byte of every shard.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import buffer_pointers
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._read.source import BoxRequest, ReadRequest

DTYPES = ["float32", "bfloat16", "float16", "int8", "uint32", "int64", "bool", "complex64"]


def _values(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "bfloat16":
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def corpus_tree(mesh) -> dict:
    """Arrays of every dtype and shape class, some saved sharded, zeros and numpy leaves."""
    tree = {
        f"{dtype}": {
            "scalar": jnp.asarray(_values(dtype, (), 1)),
            "vector": jnp.asarray(_values(dtype, (24,), 2)),
            "matrix": jnp.asarray(_values(dtype, (16, 8), 3)),
            "cube": jnp.asarray(_values(dtype, (4, 6, 8), 4)),
        }
        for dtype in DTYPES
    }
    tree["sharded"] = {
        "rows": jax.device_put(jnp.asarray(_values("float32", (64, 16), 5)),
                               NamedSharding(mesh, P("x"))),
        "grid": jax.device_put(jnp.asarray(_values("int32", (8, 16), 6)),
                               NamedSharding(jax.make_mesh((2, 4), ("a", "b")), P("a", "b"))),
    }
    tree["zeros"] = jnp.zeros((32, 32))  # equal to the fill value: maybe not stored at all
    tree["numpy"] = _values("float32", (5, 7), 7)  # a numpy leaf
    tree["python"] = {"int": 7, "float": 2.5}
    return tree


CONFIGS = {
    "zarr2-ocdbt": dict(use_ocdbt=True, use_zarr3=False),
    "zarr3-ocdbt": dict(use_ocdbt=True, use_zarr3=True),
    "zarr2-ocdbt-raw": dict(use_ocdbt=True, use_zarr3=False, use_compression=False),
    "zarr2-plain": dict(use_ocdbt=False, use_zarr3=False),
    "zarr3-plain": dict(use_ocdbt=False, use_zarr3=True),
}


def save(path: str, tree, **options) -> str:
    handler = ocp.PyTreeCheckpointHandler(**options)
    ckptr = ocp.Checkpointer(handler)
    try:
        # Small chunks for the big arrays: several chunks per array.
        save_args = jax.tree.map(
            lambda x: ocp.SaveArgs(chunk_byte_size=1024) if np.size(x) >= 256 else ocp.SaveArgs(),
            tree,
        )
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree, save_args=save_args))
    finally:
        ckptr.close()
    return path


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",))


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory, mesh):
    tree = corpus_tree(mesh)
    path = save(str(tmp_path_factory.mktemp(request.param) / "item"), tree,
                **CONFIGS[request.param])
    return request.param, path, tree


def _targets(mesh, leaf) -> dict[str, object]:
    shape, dtype = tuple(np.shape(leaf)), np.asarray(leaf).dtype
    out: dict[str, object] = {
        "one-device": jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(
            jax.devices()[3])),
        "replicated": jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P())),
        "numpy": np.zeros(shape, dtype),
    }
    if shape and shape[0] % 8 == 0:
        out["rows/8"] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("x")))
    if len(shape) >= 2 and shape[0] % 2 == 0 and shape[1] % 4 == 0:
        grid = jax.make_mesh((2, 4), ("a", "b"))
        out["2x4"] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(grid, P("a", "b")))
        out["cols/4,rows-replicated"] = jax.ShapeDtypeStruct(
            shape, dtype, sharding=NamedSharding(grid, P(None, "b")))
    return out


def _requests(tree, mesh):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out, names = [], []
    for keypath, leaf in leaves:
        path = tg.Path.from_keypath(keypath)
        if isinstance(leaf, int | float):
            out.append(ReadRequest(path, leaf, type(leaf)))
            names.append((str(path), "python"))
            continue
        for name, like in _targets(mesh, leaf).items():
            out.append(ReadRequest(path, like, np.asarray(leaf).dtype))
            names.append((str(path), name))
    return out, names


def _shards(value) -> list[tuple[object, bytes]]:
    if isinstance(value, jax.Array):
        return sorted(
            ((s.device.id, str(s.index)), np.asarray(s.data).tobytes())
            for s in value.addressable_shards
        )
    return [(None, np.asarray(value).tobytes())]


def test_direct_reads_equal_orbax_restore_byte_for_byte(checkpoint, mesh):
    config, path, tree = checkpoint
    requests, names = _requests(tree, mesh)
    direct = tg.OrbaxCheckpoint(path)
    via_orbax = tg.OrbaxCheckpoint(path)
    via_orbax._direct_reads = False
    got, want = [None] * len(requests), [None] * len(requests)
    # One read per target kind: a read asks for each source leaf once (as a graft does).
    for kind in sorted({t for _, t in names}):
        idx = [i for i, (_, t) in enumerate(names) if t == kind]
        batch = [requests[i] for i in idx]
        for i, a, b in zip(idx, direct.read(batch), via_orbax.read(batch), strict=True):
            got[i], want[i] = a, b
    for req, (leaf, target), a, b in zip(requests, names, got, want, strict=True):
        where = f"{config}: {leaf} into {target}"
        # A jax target gets a jax.Array in its sharding (orbax sometimes hands back
        # numpy, which the graft then places); anything else a host numpy array.
        if isinstance(req.like, jax.ShapeDtypeStruct):
            assert isinstance(a, jax.Array) and a.sharding == req.like.sharding, where
        else:
            assert type(a) is type(b) is np.ndarray, where
        with jax.transfer_guard("allow"):
            ha, hb = np.asarray(a), np.asarray(b)
        assert ha.dtype == hb.dtype and ha.shape == hb.shape, where
        assert ha.tobytes() == hb.tobytes(), where
        if isinstance(b, jax.Array):
            assert a.sharding == b.sharding, where
            assert _shards(a) == _shards(b), where


def test_the_direct_reader_is_used_for_ocdbt_checkpoints(checkpoint, mesh, monkeypatch):
    config, path, tree = checkpoint
    restored = []
    original = ocp.PyTreeCheckpointHandler.restore
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore",
                        lambda self, *a, **k: restored.append(1) or original(self, *a, **k))
    requests, _ = _requests({"float32": tree["float32"], "sharded": tree["sharded"]}, mesh)
    tg.OrbaxCheckpoint(path).read(requests)
    # Without OCDBT, the metadata comes from orbax, and so do the arrays.
    assert bool(restored) == (not config.endswith(("ocdbt", "ocdbt-raw")))


def test_outputs_own_their_buffers(checkpoint, mesh):
    _, path, tree = checkpoint
    like = jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh, P()))
    path_ = tg.parse_path("float32.matrix")
    src = tg.OrbaxCheckpoint(path)
    (a,) = src.read([ReadRequest(path_, like, np.dtype("float32"))])
    (b,) = src.read([ReadRequest(path_, like, np.dtype("float32"))])
    pointers = buffer_pointers(a) + buffer_pointers(b)
    assert len(set(pointers)) == len(pointers)  # replicated shards: 16 distinct buffers


@pytest.fixture(scope="module")
def layers(tmp_path_factory, mesh):
    """A stacked (8, 256, 64) float32 array saved with one chunk per layer, and as one chunk."""
    stacked = _values("float32", (8, 256, 64), 9)
    path = str(tmp_path_factory.mktemp("boxes") / "item")
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        tree = {
            # Saved sharded by layer: orbax writes one chunk per shard.
            "per_layer": jax.device_put(jnp.asarray(stacked), NamedSharding(mesh, P("x"))),
            "one_chunk": jax.device_put(jnp.asarray(stacked), jax.devices()[0]),
        }
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()
    return path, stacked


LAYER = 256 * 64 * 4


def test_read_boxes_equal_the_slices(layers):
    path, stacked = layers
    src = tg.OrbaxCheckpoint(path)
    boxes = [
        (slice(3, 4), slice(None), slice(None)),
        (slice(0, 8), slice(10, 20), slice(5, 6)),
        (slice(7, 8), slice(255, 256), slice(0, 64)),
    ]
    for name in ("per_layer", "one_chunk"):
        reqs = [BoxRequest(tg.parse_path(name), box) for box in boxes]
        got = src.read_boxes(reqs)
        for box, value in zip(boxes, got, strict=True):
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value, stacked[box])
            assert value.flags.owndata or value.base is None or not np.shares_memory(value, stacked)


def test_box_nbytes_follows_the_chunking(layers):
    path, _ = layers
    with tg.OrbaxCheckpoint(path) as src:
        layer = (slice(3, 4), slice(None), slice(None))
        assert src.box_nbytes(tg.parse_path("per_layer"), layer) == LAYER
        assert src.box_nbytes(tg.parse_path("one_chunk"), layer) == 8 * LAYER
        assert src.box_nbytes(tg.parse_path("per_layer"), (slice(2, 5), slice(0, 1), slice(0, 1))
                              ) == 3 * LAYER


def test_a_box_read_reads_only_its_chunks(layers):
    """Bytes really read from disk (rchar of this process) for one layer, per chunking."""
    import tensorstore as ts

    path, stacked = layers

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    layer = (slice(7, 8), slice(None), slice(None))
    read = {}
    for name in ("per_layer", "one_chunk"):
        src = tg.OrbaxCheckpoint(path)
        src.metadata()
        src.box_nbytes(tg.parse_path(name), layer)  # opens the array: index and header read
        before = rchar()
        (value,) = src.read_boxes([BoxRequest(tg.parse_path(name), layer)])
        read[name] = rchar() - before
        np.testing.assert_array_equal(value, stacked[layer])
    assert ts is not None
    # Compression makes bytes on disk a little smaller or larger than a layer.
    assert read["per_layer"] <= 1.5 * LAYER + 64 * 1024, read
    assert read["one_chunk"] >= 6 * LAYER, read


def test_bad_boxes_are_checkpoint_errors(layers):
    path, _ = layers
    src = tg.OrbaxCheckpoint(path)
    with pytest.raises(tg.CheckpointError, match=r"needs one slice of step 1 per axis"):
        src.read_boxes([BoxRequest(tg.parse_path("per_layer"), (slice(0, 1),))])
    with pytest.raises(tg.CheckpointError, match=r"is outside 'per_layer' of shape"):
        box = (slice(0, 9),) + (slice(None),) * 2
        src.read_boxes([BoxRequest(tg.parse_path("per_layer"), box)])
    with pytest.raises(tg.CheckpointError, match=r"'nope' is not a leaf of the checkpoint"):
        src.read_boxes([BoxRequest(tg.parse_path("nope"), (slice(0, 1),))])


def test_base_class_box_reads_slice_the_whole_leaf():
    """A source with only metadata and read gets read_boxes, box_nbytes and a lifecycle."""

    class Memory(tg.Source):
        def __init__(self, tree):
            self.tree = tree
            self.closed = False

        def metadata(self):
            return self.tree

        def read(self, requests):
            return [self.tree[r.path.parts[0]] for r in requests]

        def close(self):
            self.closed = True

    x = np.arange(24, dtype=np.int16).reshape(4, 6)
    with Memory({"x": x}) as src:
        (got,) = src.read_boxes([BoxRequest(tg.parse_path("x"), (slice(1, 3), slice(2, 4)))])
        np.testing.assert_array_equal(got, x[1:3, 2:4])
        assert not np.shares_memory(got, x)
        assert src.box_nbytes(tg.parse_path("x"), (slice(0, 1), slice(0, 1))) == x.nbytes
    assert src.closed


def test_sources_are_context_managers_that_forget_on_close(layers):
    path, stacked = layers
    with tg.OrbaxCheckpoint(path) as src:
        first = src.metadata()
        assert src.metadata() is first
    assert src.metadata() is not first  # read again after close
    (value,) = src.read_boxes([BoxRequest(tg.parse_path("per_layer"), (slice(0, 1),) +
                                          (slice(None),) * 2)])
    np.testing.assert_array_equal(value, stacked[:1])


def _served(kind: str) -> int:
    import tensorstore as ts

    found = ts.experimental_collect_matching_metrics(f"/tensorstore/kvstore/{kind}/bytes_read")
    return sum(v["value"] for m in found for v in m["values"])


def test_box_reads_from_every_storage_fetch_only_their_chunks(layers, where):
    path, stacked = layers
    src = tg.OrbaxCheckpoint(where.publish(path, cache=True))
    layer = (slice(6, 7), slice(None), slice(None))
    kind = {"local": "file", "gcs": "gcs", "s3": "s3"}[where.kind]
    served = {}
    for name in ("per_layer", "one_chunk"):
        src.box_nbytes(tg.parse_path(name), layer)  # opens the array: header and index
        before = _served(kind)
        (value,) = src.read_boxes([BoxRequest(tg.parse_path(name), layer)])
        served[name] = _served(kind) - before
        np.testing.assert_array_equal(value, stacked[layer])
    # zstd barely shrinks random floats: one layer's chunk, or the whole array.
    assert served["per_layer"] <= 1.1 * LAYER, served
    assert served["one_chunk"] >= 6 * LAYER, served
