"""tg.SafetensorsCheckpoint: headers-only metadata, byte-range reads per shard, damaged files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import rchar
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._formats.safetensors import files as st_files
from treegraft._formats.safetensors import header as st_header


def st_numpy():
    """The safetensors package's numpy API: the tests that write files with it need it;
    the reader does not."""
    return pytest.importorskip("safetensors.numpy")


def st_package():
    return pytest.importorskip("safetensors")


MiB = 1 << 20


@dataclass(frozen=True)
class BoxRequest:
    """What the Source base will ask `read_boxes` for: a path and a box."""

    path: tg.Path
    box: tuple[slice, ...]


def mesh_1d():
    return jax.make_mesh((8,), ("x",))


def mesh_2d():
    return jax.make_mesh((2, 4), ("a", "b"))


def fingerprint(folder):
    """Every file's bytes digest and mtime: reading must change none of them."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            out[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def random_array(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) > 0.5)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)
    if dtype.kind == "c":
        return np.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(
            dtype
        )
    return np.asarray(rng.standard_normal(shape)).astype(dtype)


def write_raw(path, header, data=b"", *, length=None):
    """Writes a safetensors file by hand (to damage it on purpose)."""
    text = json.dumps(header).encode()
    n = len(text) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + text + data)
    return str(path)


def llama_like(rng, layers=2, hidden=16, inner=32):
    out = {"model.embed_tokens.weight": random_array(rng, (64, hidden), ml_dtypes.bfloat16)}
    for i in range(layers):
        pre = f"model.layers.{i}."
        out[pre + "self_attn.q_proj.weight"] = random_array(
            rng, (hidden, hidden), ml_dtypes.bfloat16
        )
        out[pre + "mlp.up_proj.weight"] = random_array(rng, (inner, hidden), ml_dtypes.bfloat16)
        out[pre + "input_layernorm.weight"] = random_array(rng, (hidden,), ml_dtypes.bfloat16)
    out["model.norm.weight"] = random_array(rng, (hidden,), ml_dtypes.bfloat16)
    out["lm_head.weight"] = random_array(rng, (64, hidden), ml_dtypes.bfloat16)
    return out


def write_sharded(folder, tensors, n_shards=2):
    """Hugging Face's sharded layout: shards plus model.safetensors.index.json."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        st_numpy().save_file(part, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return str(folder)


DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    ml_dtypes.bfloat16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
]
FP8 = [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files written once for the module with the safetensors package; never changed."""
    root = tmp_path_factory.mktemp("safetensors")
    rng = np.random.default_rng(0)
    out = {}
    every = {}
    for dtype in DTYPES + FP8:
        for shape in SHAPES:
            name = f"t.{np.dtype(dtype).name}.s{'x'.join(map(str, shape)) or 'scalar'}"
            every[name] = random_array(rng, shape, dtype)
    out["every_path"] = str(root / "every.safetensors")
    st_numpy().save_file(every, out["every_path"], metadata={"format": "np", "note": "test"})
    out["every"] = every
    sharded = {
        "rows": np.arange(16 * 8, dtype=np.float32).reshape(16, 8),
        "cube": random_array(rng, (4, 16, 8), np.float32),
        "big": random_array(rng, (1024, 1024), np.float32),  # 4 MiB
        "half": random_array(rng, (16, 8), ml_dtypes.bfloat16),
    }
    out["arrays_path"] = str(root / "arrays.safetensors")
    st_numpy().save_file(sharded, out["arrays_path"])
    out["arrays"] = sharded
    out["llama"] = llama_like(rng)
    out["hf"] = write_sharded(root / "hf", out["llama"])
    return out


def reference(path, name):
    """A tensor as the safetensors package reads it (raw bytes for fp8, which its numpy
    reader does not know)."""
    with st_package().safe_open(path, framework="np") as f:
        try:
            return f.get_tensor(name)
        except AttributeError:  # fp8: numpy has no such dtype attribute
            pass
    with open(path, "rb") as f:
        found = dict(st_package().deserialize(f.read()))[name]
    dtype = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[found["dtype"]]
    return np.frombuffer(bytes(found["data"]), dtype).reshape(found["shape"])


def request(path, like, dtype=None):
    return tg.ReadRequest(tg.parse_path(path), like, np.dtype(dtype or like.dtype))


@pytest.fixture(params=["pread", "tensorstore"])
def backend(request, monkeypatch):
    """Local tensor data read with os.preadv (the default), or through tensorstore's
    kvstore as for gs:// and s3:// locations."""
    if request.param == "tensorstore":
        monkeypatch.setattr(st_files, "_local_folder", lambda location: None)
    return request.param


# -- metadata -------------------------------------------------------------------------


def test_names_parse_as_paths(files):
    src = tg.SafetensorsCheckpoint(files["hf"])
    meta = src.metadata()
    assert sorted(meta) == ["lm_head", "model"]
    assert sorted(meta["model"]["layers"]) == [0, 1]  # int keys, as tg.parse_path gives
    leaf = meta["model"]["layers"][1]["mlp"]["up_proj"]["weight"]
    assert (leaf.shape, leaf.dtype) == ((32, 16), np.dtype(ml_dtypes.bfloat16))
    paths = set(tg.flatten(meta))
    assert tg.parse_path("model.layers.0.mlp.up_proj.weight") in paths
    assert tg.Path(("model", "layers", 0, "mlp", "up_proj", "weight")) in paths
    assert len(paths) == len(files["llama"])
    assert repr(leaf) == "TensorInfo(bfloat16[32, 16] in model-00002-of-00002.safetensors)"


def test_metadata_matches_the_package_headers(files):
    src = tg.SafetensorsCheckpoint(files["every_path"])
    flat = {k.parts: v for k, v in tg.flatten(src.metadata()).items()}
    with st_package().safe_open(files["every_path"], framework="np") as f:
        names = list(f.keys())
        assert src.header_metadata == {"every.safetensors": f.metadata()}
    assert len(flat) == len(names)
    for name in names:
        leaf = flat[tg.parse_path(name).parts]
        want = files["every"][name]
        assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype), name


def test_metadata_reads_only_headers(files):
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    before = rchar()
    src.metadata()
    assert rchar() - before < 64 * 1024  # the file holds 4 MiB of tensors


def test_metadata_is_cached(files, monkeypatch):
    src = tg.SafetensorsCheckpoint(files["hf"])
    first = src.metadata()
    monkeypatch.setattr(st_header, "_parse_header", None)  # would fail if called again
    assert src.metadata() is first


def test_a_name_the_grammar_refuses_is_split_on_dots(tmp_path):
    path = str(tmp_path / "odd.safetensors")
    st_numpy().save_file({"block-sparse.0.w": np.ones(2, np.float32)}, path)
    meta = tg.SafetensorsCheckpoint(path).metadata()
    assert list(meta) == ["block-sparse"] and list(meta["block-sparse"]) == [0]
    out = tg.graft(
        {"w": np.zeros(2, np.float32)},
        tg.SafetensorsCheckpoint(path),
        {"w": "['block-sparse'][0].w"},
    )
    np.testing.assert_array_equal(out["w"], np.ones(2))


def test_a_tensor_cannot_also_be_a_prefix(tmp_path):
    path = str(tmp_path / "clash.safetensors")
    st_numpy().save_file({"a.b": np.ones(2, np.float32), "a.b.c": np.ones(2, np.float32)}, path)
    with pytest.raises(
        tg.CheckpointError,
        match=r"tensor 'a.b.c' lies under tensor 'a.b'.*both a tensor and a prefix",
    ):
        tg.SafetensorsCheckpoint(path).metadata()


def test_int_and_name_keys_side_by_side(tmp_path):
    # jax cannot flatten {0: ..., 'norm': ...}: such a level keeps its digits as strings.
    path = str(tmp_path / "mixed.safetensors")
    tensors = {
        "m.0.w": np.ones(2, np.float32),
        "m.1.w": np.full(2, 2, np.float32),
        "m.norm": np.zeros(3, np.float32),
        "layers.0.w": np.ones(1, np.float32),
    }
    st_numpy().save_file(tensors, path)
    src = tg.SafetensorsCheckpoint(path)
    meta = src.metadata()
    assert sorted(meta["m"]) == ["0", "1", "norm"] and list(meta["layers"]) == [0]
    state = {
        "a": np.zeros(2, np.float32),
        "n": np.ones(3, np.float32),
        "l": np.zeros(1, np.float32),
    }
    out = tg.graft(state, src, {"a": "m.1.w", "n": "m.norm", "l": "layers[0].w"})
    np.testing.assert_array_equal(out["a"], [2, 2])
    np.testing.assert_array_equal(out["n"], [0, 0, 0])
    np.testing.assert_array_equal(out["l"], [1])


def test_folder_with_one_file_and_no_index(files, tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    st_numpy().save_file({"w": np.arange(3, dtype=np.int32)}, str(folder / "model.safetensors"))
    src = tg.SafetensorsCheckpoint(folder)
    (got,) = src.read([request("w", np.zeros(3, np.int32))])
    np.testing.assert_array_equal(got, [0, 1, 2])


# -- round trips against the safetensors package ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES + FP8, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype_and_shape(files, dtype, backend):
    src = tg.SafetensorsCheckpoint(files["every_path"])
    names = [n for n in files["every"] if n.split(".")[1] == np.dtype(dtype).name]
    assert len(names) == len(SHAPES)
    likes = [np.zeros(files["every"][n].shape, dtype) for n in names]
    got = src.read([request(n, like) for n, like in zip(names, likes, strict=True)])
    for name, value in zip(names, got, strict=True):
        want = reference(files["every_path"], name)
        assert type(value) is np.ndarray and value.dtype == want.dtype and value.shape == want.shape
        assert value.tobytes() == want.tobytes(), name  # bitwise: NaNs and -0.0 included
        assert value.flags.writeable
    for a, b in zip(got, got[1:], strict=False):
        assert not np.shares_memory(a, b)


@pytest.mark.parametrize(
    "dtype", [np.float32, ml_dtypes.bfloat16, np.int8, np.bool_], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize("shape", [(), (7,), (3, 5)], ids=str)
def test_round_trip_to_one_device(files, dtype, shape):
    name = f"t.{np.dtype(dtype).name}.s{'x'.join(map(str, shape)) or 'scalar'}"
    like = jax.ShapeDtypeStruct(shape, dtype)
    (got,) = tg.SafetensorsCheckpoint(files["every_path"]).read([request(name, like)])
    assert isinstance(got, jax.Array) and isinstance(got.sharding, SingleDeviceSharding)
    np.testing.assert_array_equal(np.asarray(got), reference(files["every_path"], name))


SHARDINGS = [
    (mesh_1d, P("x")),
    (mesh_1d, P(None, "x")),
    (mesh_1d, P()),
    (mesh_2d, P("a", "b")),
    (mesh_2d, P("b", "a")),
    (mesh_2d, P(None, ("a", "b"))),
]
SHARDING_IDS = ["rows", "cols", "replicated", "2d", "2d-swapped", "cols-both-axes"]


@pytest.mark.parametrize(("mesh", "spec"), SHARDINGS, ids=SHARDING_IDS)
@pytest.mark.parametrize("name", ["rows", "half"])
def test_round_trip_sharded(files, mesh, spec, name, backend):
    sharding = NamedSharding(mesh(), spec)
    want = reference(files["arrays_path"], name)
    like = jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=sharding)
    (got,) = tg.SafetensorsCheckpoint(files["arrays_path"]).read([request(name, like)])
    assert got.sharding == sharding and got.dtype == want.dtype
    for shard in got.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    "spec", [P(None, "x"), P(None, None, "x"), P("a", "b"), P(None, "a", "b")], ids=str
)
def test_round_trip_sharded_3d(files, spec, backend):
    mesh = mesh_1d() if "x" in str(spec) else mesh_2d()
    sharding = NamedSharding(mesh, spec)
    want = reference(files["arrays_path"], "cube")
    like = jax.device_put(jnp.zeros(want.shape, want.dtype), sharding)
    (got,) = tg.SafetensorsCheckpoint(files["arrays_path"]).read([request("cube", like)])
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), want)


def test_sharded_result_can_be_donated(files, backend):
    sharding = NamedSharding(mesh_1d(), P())
    like = jax.ShapeDtypeStruct((16, 8), np.float32, sharding=sharding)
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    (got,) = src.read([request("rows", like)])
    doubled = jax.jit(lambda t: t * 2, donate_argnums=0)(got)
    want = reference(files["arrays_path"], "rows")
    np.testing.assert_array_equal(np.asarray(doubled), want * 2)
    (again,) = src.read([request("rows", like)])  # the source is untouched
    np.testing.assert_array_equal(np.asarray(again), want)


# -- reading only the bytes each shard needs ------------------------------------------------


class Spy:
    """Wraps the kvstore to record each byte range read."""

    def __init__(self, kv, log):
        self.kv, self.log = kv, log

    def read(self, key, *, byte_range=None):
        if byte_range is not None:
            self.log.append((key, byte_range.start, byte_range.stop))
        return self.kv.read(key, byte_range=byte_range)


def spy_reads(monkeypatch):
    """Records (file, begin, end) of every read, through tensorstore or os.preadv."""
    log = []
    original = st_files._kvstore
    monkeypatch.setattr(st_files, "_kvstore", lambda location: Spy(original(location), log))
    pread = st_files.Files.pread

    def spied(self, info, begin, buffer):
        log.append((info.file, begin, begin + len(buffer)))
        return pread(self, info, begin, buffer)

    monkeypatch.setattr(st_files.Files, "pread", spied)
    return log


def data_ranges(log, src, name):
    info = src._info(tg.parse_path(name))
    return sorted(
        (b - info.begin, e - info.begin)
        for key, b, e in log
        if key == info.file and info.begin <= b and e <= info.end and e > b
    )


def test_each_row_shard_reads_its_rows(files, monkeypatch, backend):
    log = spy_reads(monkeypatch)
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    sharding = NamedSharding(mesh_1d(), P("x"))
    src.metadata()
    before = rchar()
    (got,) = src.read(
        [request("big", jax.ShapeDtypeStruct((1024, 1024), np.float32, sharding=sharding))]
    )
    read = rchar() - before
    block = 128 * 1024 * 4
    assert data_ranges(log, src, "big") == [(k * block, (k + 1) * block) for k in range(8)]
    assert read <= 1.05 * 4 * MiB
    np.testing.assert_array_equal(np.asarray(got), reference(files["arrays_path"], "big"))


@pytest.mark.parametrize("spec", [P(None, "x"), P(), P("b", "a")], ids=["cols", "replicated", "2d"])
def test_shards_with_the_same_rows_read_them_once(files, monkeypatch, spec, backend):
    log = spy_reads(monkeypatch)
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    mesh = mesh_1d() if "x" in str(spec) or spec == P() else mesh_2d()
    like = jax.ShapeDtypeStruct((1024, 1024), np.float32, sharding=NamedSharding(mesh, spec))
    src.metadata()
    before = rchar()
    (got,) = src.read([request("big", like)])
    read = rchar() - before
    reads = data_ranges(log, src, "big")
    # Every byte of the tensor read exactly once (through tensorstore, in reads
    # of at most 1 MiB: it is several times faster than one large read).
    assert [b for b, _ in reads] == [0] + [e for _, e in reads[:-1]]
    assert reads[-1][1] == 4 * MiB
    if backend == "tensorstore":
        assert max(e - b for b, e in reads) <= st_files._CHUNK_BYTES
    assert read <= 1.05 * 4 * MiB
    np.testing.assert_array_equal(np.asarray(got), reference(files["arrays_path"], "big"))
    assert read <= 1.05 * 4 * MiB


def test_a_layer_of_a_stack_reads_only_that_layer(files, monkeypatch, backend):
    # cube[2] sharded on its rows: the leading index is fixed, the rows taken inside it.
    log = spy_reads(monkeypatch)
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    want = reference(files["arrays_path"], "cube")
    boxes = [(slice(2, 3), slice(4 * k, 4 * k + 4), slice(None)) for k in range(4)]
    got = src.read_boxes([BoxRequest(tg.parse_path("cube"), b) for b in boxes])
    for box, value in zip(boxes, got, strict=True):
        np.testing.assert_array_equal(value, want[box])
    layer = 16 * 8 * 4
    row = 8 * 4
    assert data_ranges(log, src, "cube") == [
        (2 * layer + 4 * k * row, 2 * layer + (4 * k + 4) * row) for k in range(4)
    ]


@pytest.mark.parametrize(
    "box",
    [
        (slice(None), slice(None), slice(None)),
        (slice(1, 3), slice(None), slice(None)),
        (slice(1, 2), slice(3, 9), slice(2, 5)),
        (slice(0, 4), slice(0, 1), slice(7, 8)),
        (slice(3, 4), slice(15, 16), slice(7, 8)),
        (slice(2, 2), slice(None), slice(None)),
    ],
    ids=["all", "rows", "inner", "thin", "last-element", "empty"],
)
def test_read_boxes_and_box_nbytes(files, monkeypatch, box, backend):
    log = spy_reads(monkeypatch)
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    want = reference(files["arrays_path"], "cube")
    (got,) = src.read_boxes([BoxRequest(tg.parse_path("cube"), box)])
    np.testing.assert_array_equal(got, want[box])
    assert got.shape == want[box].shape and got.flags.writeable
    ranges = data_ranges(log, src, "cube")
    assert sum(e - b for b, e in ranges) == src.box_nbytes("cube", box)
    assert src.box_nbytes("cube", box) <= want.nbytes
    if box[0] == slice(1, 2):  # one layer fixed, rows 3..9 inside it
        assert src.box_nbytes("cube", box) == 6 * 8 * 4


def test_read_boxes_of_one_tensor_share_their_reads(files, monkeypatch, backend):
    log = spy_reads(monkeypatch)
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    boxes = [(slice(0, 8), slice(0, 4)), (slice(0, 8), slice(4, 8)), (slice(4, 12), slice(None))]
    got = src.read_boxes([BoxRequest(tg.parse_path("rows"), b) for b in boxes])
    want = reference(files["arrays_path"], "rows")
    for box, value in zip(boxes, got, strict=True):
        np.testing.assert_array_equal(value, want[box])
    assert data_ranges(log, src, "rows") == [(0, 12 * 8 * 4)]  # three boxes, one range


@pytest.mark.parametrize(
    "box",
    [(slice(None),), (slice(0, 2), slice(0, 9)), (slice(0, 4, 2), slice(None)), (0, slice(None))],
    ids=["too-few-axes", "out-of-bounds", "step", "an-int"],
)
def test_a_bad_box_is_an_error(files, box):
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    with pytest.raises(tg.GraftError, match=r"box .* for tensor 'rows' of shape \(16, 8\) must be"):
        src.read_boxes([BoxRequest(tg.parse_path("rows"), box)])


def test_an_unknown_tensor_suggests_close_names(files):
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    with pytest.raises(
        tg.PathNotFoundError, match=r"'rowz' is not a tensor of .*did you mean 'rows'"
    ):
        src.box_nbytes("rowz", (slice(None), slice(None)))


# -- plan and graft -----------------------------------------------------------------------


def test_graft_from_the_sharded_layout_with_renames(files, backend):
    src = tg.SafetensorsCheckpoint(files["hf"])
    sharding = NamedSharding(mesh_1d(), P("x"))
    bf16 = ml_dtypes.bfloat16
    state = {
        "embed": jax.ShapeDtypeStruct((64, 16), bf16, sharding=sharding),
        "layers_0": {"up": jnp.zeros((32, 16), bf16), "norm": np.zeros(16, bf16)},
        "layers_1": {"up": jnp.zeros((32, 16), bf16), "norm": np.zeros(16, bf16)},
        "head": jnp.ones((64, 16), bf16),
    }
    mapping = {
        "embed": "model.embed_tokens.weight",
        "layers_*.up": "model.layers.*.mlp.up_proj.weight",
        "layers_*.norm": "model.layers.*.input_layernorm.weight",
    }
    p = tg.plan(state, src, mapping)
    assert p.nbytes == (64 * 16 + 2 * (32 * 16 + 16)) * 2
    out = tg.graft(state, src, mapping)
    llama = files["llama"]
    assert out["embed"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["embed"]), llama["model.embed_tokens.weight"])
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(out[f"layers_{i}"]["up"]), llama[f"model.layers.{i}.mlp.up_proj.weight"]
        )
        norm = out[f"layers_{i}"]["norm"]
        assert type(norm) is np.ndarray and norm.dtype == bf16
        np.testing.assert_array_equal(norm, llama[f"model.layers.{i}.input_layernorm.weight"])
    assert out["head"] is state["head"]


def test_plan_reports_a_shape_mismatch_with_both_sides(files, monkeypatch):
    log = spy_reads(monkeypatch)
    src = tg.SafetensorsCheckpoint(files["hf"])
    state = {"up": jnp.zeros((16, 32), ml_dtypes.bfloat16)}  # Flax [in, out]: needs a transpose
    with pytest.raises(
        tg.MismatchError,
        match=r"shape differs: 1\n  'up' in the state is bfloat16\[16, 32\], "
        r"'model.layers\[0\].mlp.up_proj.weight' in the source is bfloat16\[32, 16\]",
    ):
        tg.plan(state, src, {"up": "model.layers.0.mlp.up_proj.weight"})
    assert all(e - b < 64 * 1024 for _, b, e in log)  # headers only


def test_plan_reports_a_dtype_mismatch_and_cast_is_explicit(files):
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    with pytest.raises(
        tg.MismatchError,
        match=r"dtype differs .*: 1\n  'w' in the state is float32\[16, 8\], "
        r"'half' in the source is bfloat16",
    ):
        tg.plan({"w": np.zeros((16, 8), np.float32)}, src, {"w": "half"})
    sharding = NamedSharding(mesh_1d(), P("x"))
    state = {"w": jax.device_put(jnp.zeros((16, 8), jnp.float32), sharding)}
    out = tg.graft(state, src, {"w": "half"}, cast=True)
    assert out["w"].dtype == jnp.float32 and out["w"].sharding == sharding
    want = reference(files["arrays_path"], "half").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out["w"]), want)


def test_unexpected_source_tensors_are_reported(files):
    src = tg.SafetensorsCheckpoint(files["hf"])
    state = {"layer": {"mlp": {"up_proj": {"weight": jnp.zeros((32, 16), ml_dtypes.bfloat16)}}}}
    with pytest.raises(tg.GraftError, match=r"self_attn"):
        tg.plan(state, src, {"layer": "model.layers.0"})


@pytest.mark.parametrize("spec", [P(), P(None, None, "x"), P(None, "x")], ids=str)
def test_torch_layout_into_a_scanned_flax_layout_in_one_mapping(files, spec):
    tg_ops = tg
    src = tg.SafetensorsCheckpoint(files["hf"])
    llama = files["llama"]
    bf16 = ml_dtypes.bfloat16
    sharding = NamedSharding(mesh_1d(), spec)

    def stacked(*shape):
        return jax.ShapeDtypeStruct((2, *shape), bf16, sharding=sharding)

    state = {
        "embed": np.zeros((64, 16), bf16),
        "layers": {"q": stacked(16, 16), "up": stacked(16, 32), "norm": np.zeros((2, 16), bf16)},
        "head": jnp.zeros((16, 64), bf16),
    }

    def linear(name):
        return tg_ops.transpose(tg_ops.stack(f"model.layers.*.{name}", axis=0), (0, 2, 1))

    mapping = {
        "embed": "model.embed_tokens.weight",
        "head": tg_ops.transpose("lm_head.weight", (1, 0)),
        "layers.q": linear("self_attn.q_proj.weight"),
        "layers.up": linear("mlp.up_proj.weight"),
        "layers.norm": tg_ops.stack("model.layers.*.input_layernorm.weight", axis=0),
    }
    out = tg.graft(state, src, mapping)
    for i in range(2):
        q = llama[f"model.layers.{i}.self_attn.q_proj.weight"]
        np.testing.assert_array_equal(np.asarray(out["layers"]["q"][i]), q.T)
        up = llama[f"model.layers.{i}.mlp.up_proj.weight"]
        np.testing.assert_array_equal(np.asarray(out["layers"]["up"][i]), up.T)
        norm = llama[f"model.layers.{i}.input_layernorm.weight"]
        np.testing.assert_array_equal(out["layers"]["norm"][i], norm)
    assert out["layers"]["up"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["head"]), llama["lm_head.weight"].T)
    with pytest.raises(tg.MismatchError, match=r"'layers.up' .* is bfloat16\[2, 16, 32\]"):
        tg.plan(
            state, src, {**mapping, "layers.up": tg_ops.stack("model.layers.*.mlp.up_proj.weight")}
        )


def test_unstack_plans_the_bytes_of_its_layers(files):
    tg_ops = tg
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    cube = reference(files["arrays_path"], "cube")  # (4, 16, 8) float32: 4 stacked layers
    sharding = NamedSharding(mesh_1d(), P("x"))
    state = {
        f"layers_{i}": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=sharding) for i in (1, 3)
    }
    mapping = {"layers_*": tg_ops.unstack("cube", axis=0)}
    p = tg.plan(state, src, mapping, strict=False)
    layer = 16 * 8 * 4
    assert src.box_nbytes("cube", (slice(1, 2), slice(0, 16), slice(0, 8))) == layer
    assert p.nbytes == 2 * layer  # two layers of four
    out = tg.graft(state, src, mapping, strict=False)
    for i in (1, 3):
        assert out[f"layers_{i}"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(out[f"layers_{i}"]), cube[i])


# -- damaged files ---------------------------------------------------------------------------


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def damaged(tmp_path, kind):
    path = tmp_path / "bad.safetensors"
    data = np.arange(4, dtype=np.float32).tobytes()
    if kind == "truncated":
        return write_raw(path, GOOD, data[:10])
    if kind == "header-beyond-file":
        return write_raw(path, GOOD, data, length=10_000)
    if kind == "shorter-than-8-bytes":
        path.write_bytes(b"\x01\x02\x03")
        return str(path)
    if kind == "not-safetensors":
        path.write_bytes(b"PK\x03\x04" + b"\xff" * 60)  # e.g. a zip (a torch .bin)
        return str(path)
    if kind == "overlap":
        header = {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
        return write_raw(path, header, data)
    if kind == "offsets-out-of-range":
        header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1000, 1016]}}
        return write_raw(path, header, data)
    if kind == "offsets-wrong-size":
        header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
        return write_raw(path, header, data)
    if kind == "offsets-reversed":
        header = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}
        return write_raw(path, header, data)
    if kind == "unknown-dtype":
        header = {"a": {"dtype": "F12", "shape": [2, 2], "data_offsets": [0, 16]}}
        return write_raw(path, header, data)
    if kind == "bad-shape":
        header = {"a": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}
        return write_raw(path, header, data)
    if kind == "bad-json":
        text = b'{"a": {"dtype": "F32",'
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        return str(path)
    if kind == "not-an-object":
        return write_raw(path, [1, 2, 3], data)
    if kind == "entry-not-an-object":
        return write_raw(path, {"a": [0, 16]}, data)
    if kind == "bad-metadata":
        return write_raw(path, {"__metadata__": ["x"], **GOOD}, data)
    if kind == "empty-name":
        return write_raw(path, {"": GOOD["a"]}, data)
    raise AssertionError(kind)


DAMAGED = [
    (
        "truncated",
        r"is truncated or damaged: reading the end of its data needs \d+ bytes "
        r"but the file has \d+",
    ),
    (
        "header-beyond-file",
        r"is truncated or damaged: reading its 10000-byte header needs 10008 bytes",
    ),
    ("shorter-than-8-bytes", r"reading its header length needs 8 bytes but the file has 3"),
    ("not-safetensors", r"is not a safetensors file: its first 8 bytes give a header of \d+ bytes"),
    ("overlap", r"is damaged: tensors 'a' \(bytes 0..8\) and 'b' \(bytes 4..12\) overlap"),
    (
        "offsets-out-of-range",
        r"is truncated or damaged: reading the end of its data needs \d+ bytes",
    ),
    (
        "offsets-wrong-size",
        r"tensor 'a' .*: data_offsets \[0, 12\] span 12 bytes, but F32\[2, 2\] takes 16",
    ),
    (
        "offsets-reversed",
        r"tensor 'a' .*: data_offsets must be \[begin, end\] with 0 <= begin <= end",
    ),
    ("unknown-dtype", r"tensor 'a' .*: unknown dtype 'F12'; treegraft reads BOOL, U8"),
    ("bad-shape", r"tensor 'a' .*: shape must be a list of non-negative ints, got \[2, -2\]"),
    ("bad-json", r"the header of .*bad.safetensors is not valid JSON"),
    ("not-an-object", r"the header of .*bad.safetensors is a JSON list, not an object of tensors"),
    (
        "entry-not-an-object",
        r"tensor 'a' in the header of .*: expected an object with dtype, shape and data_offsets",
    ),
    ("bad-metadata", r"the __metadata__ of .*bad.safetensors is not a JSON object of strings"),
    ("empty-name", r"the safetensors checkpoint .*bad.safetensors has a tensor with an empty name"),
]


@pytest.mark.parametrize(("kind", "message"), DAMAGED, ids=[k for k, _ in DAMAGED])
def test_damaged_files_are_checkpoint_errors(tmp_path, kind, message):
    path = damaged(tmp_path, kind)
    before = fingerprint(tmp_path)
    src = tg.SafetensorsCheckpoint(path)
    with pytest.raises(tg.CheckpointError, match=message) as info:
        src.metadata()
    assert path in str(info.value)  # the message names the file
    with pytest.raises(tg.CheckpointError, match=message):  # and again, the same way
        tg.plan({"w": np.zeros((2, 2), np.float32)}, tg.SafetensorsCheckpoint(path), {"w": "a"})
    assert fingerprint(tmp_path) == before


def test_a_file_truncated_after_opening_fails_on_read(tmp_path, backend):
    path = str(tmp_path / "shrinks.safetensors")
    st_numpy().save_file({"w": np.arange(64, dtype=np.float32)}, path)
    src = tg.SafetensorsCheckpoint(path)
    src.metadata()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    message = {
        # os.preadv: the file's size and mtime are checked before each read.
        "pread": r"shrinks.safetensors has changed since its header was read \(reading tensor 'w'",
        # tensorstore: the read past the end fails first.
        "tensorstore": r"shrinks.safetensors is truncated or damaged: reading tensor 'w' needs",
    }[backend]
    with pytest.raises(tg.CheckpointError, match=message):
        src.read([request("w", np.zeros(64, np.float32))])


def test_a_file_rewritten_after_opening_fails_on_read(tmp_path, backend):
    path = str(tmp_path / "rewritten.safetensors")
    st_numpy().save_file({"w": np.arange(64, dtype=np.float32)}, path)
    src = tg.SafetensorsCheckpoint(path)
    src.metadata()
    st_numpy().save_file({"w": -np.arange(64, dtype=np.float32)}, path + ".new")
    os.replace(path + ".new", path)  # same size, other bytes: a new upload
    with pytest.raises(
        tg.CheckpointError,
        match=r"rewritten.safetensors has changed since its header was read \(reading tensor "
        r"'w'\): open a new SafetensorsCheckpoint",
    ):
        src.read([request("w", np.zeros(64, np.float32))])
    (got,) = tg.SafetensorsCheckpoint(path).read([request("w", np.zeros(64, np.float32))])
    np.testing.assert_array_equal(got, -np.arange(64, dtype=np.float32))


def sharded_copy(files, tmp_path):
    folder = tmp_path / "hf"
    write_sharded(folder, files["llama"])
    return folder


def test_index_naming_a_missing_shard(files, tmp_path):
    folder = sharded_copy(files, tmp_path)
    os.remove(folder / "model-00002-of-00002.safetensors")
    with pytest.raises(
        tg.CheckpointError,
        match=r"model.safetensors.index.json names 1 shard\(s\) that do not exist in .*: "
        r"model-00002-of-00002.safetensors",
    ):
        tg.SafetensorsCheckpoint(folder).metadata()


def test_index_naming_a_tensor_the_shard_lacks(files, tmp_path):
    folder = sharded_copy(files, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.down_proj.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        tg.CheckpointError,
        match=r"maps tensor 'model.layers.0.mlp.down_proj.weight' to model-00001-of-00002"
        r".safetensors, but the header of .* has no such tensor",
    ):
        tg.SafetensorsCheckpoint(folder).metadata()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"model.safetensors.index.json is not valid JSON"),
        ('{"metadata": {}}', r"has no \"weight_map\" object of tensor name -> file name"),
        (
            '{"weight_map": {"a": "../x.safetensors"}}',
            r"names shard '../x.safetensors', which is not a file name",
        ),
    ],
    ids=["bad-json", "no-weight-map", "shard-outside"],
)
def test_damaged_index(files, tmp_path, text, message):
    folder = sharded_copy(files, tmp_path)
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(tg.CheckpointError, match=message):
        tg.SafetensorsCheckpoint(folder).metadata()


def test_missing_path(tmp_path):
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"safetensors checkpoint '.*nope' does not exist"
    ):
        tg.SafetensorsCheckpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        tg.SafetensorsCheckpoint(str(tmp_path / "nope.safetensors"))
    assert not (tmp_path / "nope").exists()


def test_folder_without_index(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        st_numpy().save_file({"w": np.ones(1, np.float32)}, str(tmp_path / name))
    with pytest.raises(
        tg.CheckpointError,
        match=r"has no model.safetensors.index.json and holds 2 .safetensors files "
        r"\(a.safetensors, b.safetensors\): pass one file, or add the index",
    ):
        tg.SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize("path", [None, 3], ids=["None", "int"])
def test_a_path_that_is_not_a_path(path):
    with pytest.raises(tg.CheckpointError, match="must be a str or os.PathLike, got"):
        tg.SafetensorsCheckpoint(path)


# -- reading never writes; closing ---------------------------------------------------------


def test_files_are_byte_identical_after_every_read(files, tmp_path, backend):
    folder = sharded_copy(files, tmp_path)
    before = fingerprint(folder)
    src = tg.SafetensorsCheckpoint(folder)
    sharding = NamedSharding(mesh_2d(), P("a", "b"))
    like = jax.ShapeDtypeStruct((64, 16), ml_dtypes.bfloat16, sharding=sharding)
    src.read(
        [
            request("model.embed_tokens.weight", like),
            request("lm_head.weight", np.zeros((64, 16), ml_dtypes.bfloat16)),
        ]
    )
    src.read_boxes(
        [BoxRequest(tg.parse_path("model.layers.1.mlp.up_proj.weight"), (slice(3, 9), slice(1, 2)))]
    )
    tg.graft({"n": np.zeros(16, ml_dtypes.bfloat16)}, src, {"n": "model.norm.weight"})
    with pytest.raises(tg.MismatchError):
        tg.graft({"n": np.zeros(15, ml_dtypes.bfloat16)}, src, {"n": "model.norm.weight"})
    assert fingerprint(folder) == before
    assert sorted(os.listdir(folder)) == sorted(before)


def test_close_and_context_manager(files, backend):
    with tg.SafetensorsCheckpoint(files["arrays_path"]) as src:
        (got,) = src.read([request("rows", np.zeros((16, 8), np.float32))])
        np.testing.assert_array_equal(got, np.arange(128, dtype=np.float32).reshape(16, 8))
    with pytest.raises(tg.CheckpointError, match=r"is closed: open a new SafetensorsCheckpoint"):
        src.read([request("rows", np.zeros((16, 8), np.float32))])
    assert src.read([]) == []
    tg.SafetensorsCheckpoint(files["arrays_path"]).close()  # closing what never opened


def test_files_are_closed(files, backend):
    def open_fds():
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.add(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # the fd listdir itself used
                pass
        return out

    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    src.read([request("rows", np.zeros((16, 8), np.float32))])
    if backend == "pread":
        assert files["arrays_path"] in open_fds()
    src.close()
    assert files["arrays_path"] not in open_fds()
    src = tg.SafetensorsCheckpoint(files["arrays_path"])
    src.read([request("rows", np.zeros((16, 8), np.float32))])
    del src  # never closed: the files close with the source
    assert files["arrays_path"] not in open_fds()


def test_the_reader_does_not_import_safetensors():
    code = (
        "import sys, treegraft._formats.safetensors.source as m; "
        "assert 'safetensors' not in sys.modules, 'imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_sharded_weights_graft_from_local_gcs_and_s3(where, tmp_path):
    """The HF layout read through the storage layer: each location kind, same values."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((16, 8), dtype=np.float32)
        for i in range(2)
    }
    folder = tmp_path / "hf"
    folder.mkdir()
    names = sorted(tensors)
    for k, name in enumerate(names):
        shard = str(folder / f"model-0000{k + 1}.safetensors")
        safetensors_numpy.save_file({name: tensors[name]}, shard)
    index = {"weight_map": {name: f"model-0000{k + 1}.safetensors" for k, name in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    url = where.publish(folder)
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    like = {"up": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding)}
    with tg.SafetensorsCheckpoint(url) as src:
        assert src.describe().endswith(url)
        new = tg.graft(like, src, {"up": "model.layers[1].mlp.up_proj.weight"})
    assert new["up"].sharding == sharding
    want = tensors["model.layers.1.mlp.up_proj.weight"]
    np.testing.assert_array_equal(np.asarray(new["up"]), want)
