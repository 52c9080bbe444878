"""OrbaxCheckpoint: metadata without reading, partial reads, sharding, dtype checks."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rchar
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from kauldron_run import (
    data_files,
    init_params,
    train_state,
    write_item,
    write_run,
)

import treegraft as tg

MiB = 1 << 20


def mesh_1d():
    return jax.make_mesh((8,), ("x",))


def mesh_2d():
    return jax.make_mesh((2, 4), ("a", "b"))


def mixed_tree():
    """One leaf of each kind orbax saves, two levels deep and more."""
    return {
        "params": {
            "encoder": {
                "kernel": jnp.arange(32, dtype=jnp.float32).reshape(4, 8),
                "bias": jnp.linspace(-1, 1, 8, dtype=jnp.float32),
            },
            "decoder": {"kernel": jnp.full((8, 4), 1.5, jnp.bfloat16)},
        },
        "count": jnp.asarray(7, jnp.int32),
        "epoch": 3,
        "lr": 0.25,
        "table": np.arange(6, dtype=np.float64).reshape(3, 2),
        "lst": [jnp.arange(3), None, {"x": jnp.ones(2)}],
        "empty": {},
        "none": None,
    }


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints written once for the module; tests must not change them."""
    root = tmp_path_factory.mktemp("orbax")
    out = {}
    out["mixed"] = write_item(root / "mixed", mixed_tree())
    rng = np.random.default_rng(0)
    big_tree = {
        # Random, so that compression cannot shrink it: 32 MiB on disk too.
        "big": jnp.asarray(rng.standard_normal((2048, 4096), dtype=np.float32)),
        "small": {"a": jnp.arange(8, dtype=jnp.float32), "b": jnp.ones((16, 8))},
    }
    out["big"] = write_item(root / "big", big_tree)
    sharded_tree = {
        "w": jax.device_put(
            jnp.arange(128, dtype=jnp.float32).reshape(16, 8), NamedSharding(mesh_1d(), P("x"))
        ),
        "v": jnp.arange(128, dtype=jnp.float32).reshape(8, 16) * -1,
    }
    out["sharded"] = write_item(root / "sharded", sharded_tree)
    state = train_state(
        init_params({"dense": {"kernel": (4, 8)}}, seed=1), step=2, opt=optax.adam(1e-3)
    )
    write_run(root / "run", {2: state})
    out["step_dir"] = str(root / "run" / "checkpoints" / "ckpt_2")
    out["state"] = state
    return out


def specs(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


def copy_item(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return str(dst)


def spy_reads(monkeypatch):
    """Records the requests of every OrbaxCheckpoint.read call."""
    calls = []
    original = tg.OrbaxCheckpoint.read

    def read(self, requests):
        calls.append([str(r.path) for r in requests])
        return original(self, requests)

    monkeypatch.setattr(tg.OrbaxCheckpoint, "read", read)
    return calls


# -- opening ------------------------------------------------------------------


def test_step_dir_reads_its_default_item(ckpts, where):
    step_dir = where.publish(ckpts["step_dir"], cache=True)
    item = f"{step_dir}/default"
    by_step = tg.OrbaxCheckpoint(step_dir).metadata()
    by_item = tg.OrbaxCheckpoint(item).metadata()
    assert specs(by_step) == specs(by_item)
    assert sorted(by_step) == ["collections", "opt_state", "params", "step"]
    state = ckpts["state"]
    target = {"k": jnp.zeros((4, 8))}
    for path in (step_dir, item):
        out = tg.graft(target, tg.OrbaxCheckpoint(path), {"k": "params.dense.kernel"})
        np.testing.assert_array_equal(out["k"], state.params["dense"]["kernel"])


@pytest.mark.parametrize(
    ("path", "shape", "dtype"),
    [
        ("params.encoder.kernel", (4, 8), "float32"),
        ("params.encoder.bias", (8,), "float32"),
        ("params.decoder.kernel", (8, 4), "bfloat16"),
        ("count", (), "int32"),
        ("table", (3, 2), "float64"),
        ("lst[0]", (3,), "int32"),
        ("lst[2].x", (2,), "float32"),
    ],
)
def test_metadata_shapes_and_dtypes(ckpts, path, shape, dtype):
    meta = tg.OrbaxCheckpoint(ckpts["mixed"]).metadata()
    leaf = tg.extract(meta, path)
    assert tuple(leaf.shape) == shape
    assert np.dtype(leaf.dtype) == np.dtype(jnp.bfloat16 if dtype == "bfloat16" else dtype)


def test_metadata_structure(ckpts):
    meta = tg.OrbaxCheckpoint(ckpts["mixed"]).metadata()
    assert sorted(meta) == ["count", "empty", "epoch", "lr", "lst", "none", "params", "table"]
    assert meta["empty"] == {} and meta["none"] is None
    assert isinstance(meta["lst"], list) and meta["lst"][1] is None
    # Python scalars keep their Python type.
    assert meta["epoch"].dtype is int and meta["epoch"].shape == ()
    assert meta["lr"].dtype is float and meta["lr"].shape == ()


def test_metadata_is_cached(ckpts, monkeypatch):
    src = tg.OrbaxCheckpoint(ckpts["mixed"])
    first = src.metadata()
    import treegraft._formats.orbax.source as orbax_mod

    monkeypatch.setattr(orbax_mod, "_read_metadata", lambda d: pytest.fail("read twice"))
    assert src.metadata() is first


def test_missing_path(tmp_path, where):
    (tmp_path / "other").write_text("x")
    missing = where.publish(tmp_path) + "/nope"
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"checkpoint '.*/nope' does not exist"
    ) as info:
        tg.OrbaxCheckpoint(missing).metadata()
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / "nope").exists()


def test_path_is_a_file(tmp_path, where):
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(tg.CheckpointError, match=r"is a file, not an orbax checkpoint directory"):
        tg.OrbaxCheckpoint(where.publish(tmp_path) + "/x.txt").metadata()


def test_not_a_checkpoint(tmp_path, where):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_text("x")  # an object store has no empty folders
    with pytest.raises(
        tg.CheckpointError,
        match=r"is not an orbax PyTree checkpoint: neither .*/_METADATA nor .*/default/_METADATA "
        r"exists \(it holds: notes.txt, sub\)",
    ):
        tg.OrbaxCheckpoint(where.publish(tmp_path)).metadata()


def test_temporary_folder_is_refused(ckpts, tmp_path, where):
    tmp = tmp_path / "ckpt_4.orbax-checkpoint-tmp"
    shutil.copytree(ckpts["step_dir"], tmp)
    with pytest.raises(
        tg.CheckpointError, match=r"is still being written \(orbax temporary folder\)"
    ):
        tg.OrbaxCheckpoint(where.publish(tmp)).metadata()


def test_corrupt_metadata_file(ckpts, tmp_path, where):
    item = copy_item(ckpts["mixed"], tmp_path)
    with open(os.path.join(item, "_METADATA"), "w") as f:
        f.write("{not json")
    with pytest.raises(
        tg.CheckpointError,
        match=r"cannot read the metadata of .* \(is _METADATA corrupt\?\): JSONDecodeError",
    ):
        tg.OrbaxCheckpoint(where.publish(item)).metadata()


# -- plan reads nothing ---------------------------------------------------------


def test_plan_never_reads(ckpts, monkeypatch):
    def read(self, requests):
        raise AssertionError("plan must not read array bytes")

    monkeypatch.setattr(tg.OrbaxCheckpoint, "read", read)
    src = tg.OrbaxCheckpoint(ckpts["mixed"])
    state = {"enc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
    p = tg.plan(state, src, {"enc": "params.encoder"})
    assert [(str(e.target), str(e.source)) for e in p.entries] == [
        ("enc.bias", "params.encoder.bias"),
        ("enc.kernel", "params.encoder.kernel"),
    ]
    assert p.nbytes == (8 + 32) * 4
    bad = {"enc": {"kernel": jnp.zeros((4, 9)), "bias": jnp.zeros(8, jnp.int32)}}
    with pytest.raises(tg.MismatchError, match="shape differs"):
        tg.graft(bad, src, {"enc": "params.encoder"})


def test_plan_checks_on_metadata_even_with_data_files_gone(ckpts, tmp_path):
    # Small arrays are inlined in OCDBT's index; the 32 MiB one lives in the data files.
    item = copy_item(ckpts["big"], tmp_path)
    files = data_files(item)
    assert files
    for name in files:
        with open(name, "wb") as f:
            f.write(b"garbage")
    src = tg.OrbaxCheckpoint(item)
    bad = {"w": jnp.zeros((4096, 2048)), "a": jnp.zeros(8, jnp.int32)}
    with pytest.raises(tg.MismatchError) as info:
        tg.graft(bad, src, {"w": "big", "a": "small.a"})
    msg = str(info.value)
    assert "2 problems" in msg
    assert (
        "'w' in the state is float32[4096, 2048], 'big' in the source is float32[2048, 4096]" in msg
    )
    assert "'a' in the state is int32[8], 'small.a' in the source is float32[8]" in msg
    # A valid graft does reach the data files, and says which read failed.
    good = {"w": jnp.zeros((2048, 4096))}
    with pytest.raises(
        tg.CheckpointError, match=r"reading 1 leaf\(s\) from .*copy failed: "
    ) as info:
        tg.graft(good, src, {"w": "big"})
    assert info.value.__cause__ is not None


def test_missing_key_is_caught_before_reading(ckpts, monkeypatch):
    calls = spy_reads(monkeypatch)
    state = {"enc": {"kernel": jnp.zeros((4, 8))}}
    # orbax itself would hand back the template leaf unfilled.
    with pytest.raises(
        tg.PathNotFoundError,
        match=r"'enc' has no source: path 'params.encodr' not found in the checkpoint .*mixed: "
        r"'params' has no key 'encodr' \(did you mean 'encoder' or 'decoder'\?\)",
    ) as info:
        tg.graft(state, tg.OrbaxCheckpoint(ckpts["mixed"]), {"enc": "params.encodr"})
    assert isinstance(info.value, KeyError)
    assert calls == []


# -- reading only what is needed --------------------------------------------------


def test_reads_only_requested_leaves(ckpts, monkeypatch):
    calls = spy_reads(monkeypatch)
    src = tg.OrbaxCheckpoint(ckpts["big"])
    state = {"a": jnp.zeros(8), "other": jnp.zeros(3)}
    src.metadata()
    before = rchar()
    out = tg.graft(state, src, {"a": "small.a"})
    small_read = rchar() - before
    assert calls == [["small.a"]]
    np.testing.assert_array_equal(out["a"], np.arange(8, dtype=np.float32))
    assert out["other"] is state["other"]
    assert small_read < 2 * MiB

    before = rchar()
    out = tg.graft({"w": jnp.zeros((2048, 4096))}, src, {"w": "big"})
    big_read = rchar() - before
    assert calls[-1] == ["big"]
    assert big_read > 24 * MiB  # random floats: zstd saves a few percent
    assert small_read * 10 < big_read
    assert out["w"].shape == (2048, 4096)


def test_each_source_leaf_read_once(ckpts, monkeypatch):
    calls = spy_reads(monkeypatch)
    s1 = NamedSharding(mesh_1d(), P("x"))
    s2 = NamedSharding(mesh_1d(), P(None, "x"))
    state = {
        "x": jax.device_put(jnp.zeros((16, 8)), s1),
        "y": jax.device_put(jnp.zeros((16, 8)), s2),
        "z": {"a": jnp.zeros(8)},
    }
    mapping = {"x": "small.b", "y": "small.b", "z": "small"}
    out = tg.graft(state, tg.OrbaxCheckpoint(ckpts["big"]), mapping, ignore_restored_keys=["b"])
    assert len(calls) == 1
    assert sorted(calls[0]) == ["small.a", "small.b"]
    for name, sharding in (("x", s1), ("y", s2)):
        np.testing.assert_array_equal(out[name], np.ones((16, 8)))
        assert out[name].sharding == sharding
    p = tg.plan(state, tg.OrbaxCheckpoint(ckpts["big"]), mapping, ignore_restored_keys=["b"])
    assert p.nbytes == (16 * 8 + 8) * 4


def test_read_of_nothing_opens_nothing(tmp_path):
    assert tg.OrbaxCheckpoint(tmp_path / "missing").read([]) == []
    assert not (tmp_path / "missing").exists()


# -- sharding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh", "spec"),
    [
        (mesh_1d, P(None, "x")),  # saved P('x'): a different split
        (mesh_1d, P()),  # replicated
        (mesh_2d, P("a", "b")),
        (mesh_2d, P("b", None)),
    ],
    ids=["1d-cols", "1d-replicated", "2d", "2d-rows"],
)
def test_restores_into_target_sharding(ckpts, mesh, spec, where):
    sharding = NamedSharding(mesh(), spec)
    saved = np.arange(128, dtype=np.float32).reshape(16, 8)
    state = {"w": jax.device_put(jnp.zeros((16, 8)), sharding), "keep": jnp.ones(3)}
    source = tg.OrbaxCheckpoint(where.publish(ckpts["sharded"], cache=True))
    out = tg.graft(state, source, {"w": "w"})
    assert out["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["w"]), saved)
    assert out["keep"] is state["keep"]


def test_read_returns_arrays_already_in_target_sharding(ckpts):
    src = tg.OrbaxCheckpoint(ckpts["sharded"])
    s2d = NamedSharding(mesh_2d(), P("a", "b"))
    s1d = NamedSharding(mesh_1d(), P("x"))
    like_v = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=s2d)
    like_w = jax.device_put(jnp.zeros((16, 8)), s1d)
    v, w = src.read(
        [
            tg.ReadRequest(tg.parse_path("v"), like_v, np.dtype("float32")),
            tg.ReadRequest(tg.parse_path("w"), like_w, np.dtype("float32")),
        ]
    )
    assert v.sharding == s2d and w.sharding == s1d
    # Each device holds only its own shard.
    assert {s.data.shape for s in v.addressable_shards} == {(4, 4)}
    np.testing.assert_array_equal(np.asarray(v), -np.arange(128, dtype=np.float32).reshape(8, 16))


def test_numpy_target_stays_numpy(ckpts):
    state = {"w": np.zeros((16, 8), np.float32), "t": np.zeros((3, 2))}
    src = tg.OrbaxCheckpoint(ckpts["sharded"])
    out = tg.graft(state, src, {"w": "w"})
    assert type(out["w"]) is np.ndarray and out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.arange(128, dtype=np.float32).reshape(16, 8))
    out = tg.graft(state, tg.OrbaxCheckpoint(ckpts["mixed"]), {"t": "table"})
    assert type(out["t"]) is np.ndarray and out["t"].dtype == np.float64
    np.testing.assert_array_equal(out["t"], np.arange(6.0).reshape(3, 2))


def test_abstract_target_comes_back_as_array(ckpts):
    sharding = NamedSharding(mesh_2d(), P("a", "b"))
    state = {
        "w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding),
        "rest": jax.ShapeDtypeStruct((5,), jnp.float32),
    }
    src = tg.OrbaxCheckpoint(ckpts["sharded"])
    # 'rest' stays abstract on purpose (a keep rule; strict mode refuses one no rule fills).
    assert [str(p) for p in tg.plan(state, src, {"w": "w", "rest": None}).abstract] == ["rest"]
    out = tg.graft(state, src, {"w": "w", "rest": None})
    assert isinstance(out["w"], jax.Array)
    assert out["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(128.0).reshape(16, 8))
    assert out["rest"] is state["rest"]


def test_abstract_target_without_sharding(ckpts):
    state = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
    out = tg.graft(state, tg.OrbaxCheckpoint(ckpts["sharded"]), {"w": "w"})
    assert isinstance(out["w"], jax.Array)
    assert isinstance(out["w"].sharding, SingleDeviceSharding)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(128.0).reshape(16, 8))


def test_sharded_graft_under_jit_consumer(ckpts):
    # The result feeds a jitted step with the state's shardings, as in training.
    sharding = NamedSharding(mesh_1d(), P("x"))
    state = {"w": jax.device_put(jnp.zeros((16, 8)), sharding)}
    out = tg.graft(state, tg.OrbaxCheckpoint(ckpts["sharded"]), {"w": "w"})
    total = jax.jit(lambda t: t["w"].sum(), in_shardings=({"w": sharding},))(out)
    assert float(total) == float(np.arange(128).sum())


# -- dtypes, shapes and scalars ---------------------------------------------------------


def test_dtype_mismatch_is_an_error(ckpts, monkeypatch):
    calls = spy_reads(monkeypatch)
    state = {"k": jnp.zeros((4, 8), jnp.bfloat16)}
    with pytest.raises(tg.MismatchError) as info:
        tg.graft(state, tg.OrbaxCheckpoint(ckpts["mixed"]), {"k": "params.encoder.kernel"})
    msg = str(info.value)
    assert "dtype differs (casting is never implicit)" in msg
    assert "to fix:\n  - float32 -> bfloat16: casting is never implicit; pass cast=True" in msg
    assert (
        "'k' in the state is bfloat16[4, 8], 'params.encoder.kernel' in the source is float32[4, 8]"
        in msg
    )
    assert calls == []
    (problem,) = info.value.problems
    assert (problem.kind, str(problem.target), str(problem.source)) == (
        "dtype",
        "k",
        "params.encoder.kernel",
    )


def test_cast_is_explicit(ckpts):
    src = tg.OrbaxCheckpoint(ckpts["mixed"])
    sharding = NamedSharding(mesh_1d(), P(None, "x"))
    state = {
        "k": jax.device_put(jnp.zeros((4, 8), jnp.bfloat16), sharding),
        "d": np.zeros((8, 4), np.float32),
    }
    out = tg.graft(
        state, src, {"k": "params.encoder.kernel", "d": "params.decoder.kernel"}, cast=True
    )
    assert out["k"].dtype == jnp.bfloat16 and out["k"].sharding == sharding
    np.testing.assert_array_equal(
        np.asarray(out["k"]), np.arange(32, dtype=np.float32).reshape(4, 8).astype(jnp.bfloat16)
    )
    assert type(out["d"]) is np.ndarray and out["d"].dtype == np.float32
    np.testing.assert_array_equal(out["d"], np.full((8, 4), 1.5, np.float32))


def test_bfloat16_kept(ckpts):
    state = {"d": jnp.zeros((8, 4), jnp.bfloat16)}
    out = tg.graft(state, tg.OrbaxCheckpoint(ckpts["mixed"]), {"d": "params.decoder.kernel"})
    assert out["d"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["d"], np.float32), np.full((8, 4), 1.5))


def test_shape_mismatch_names_both_sides(ckpts):
    state = {"k": jnp.zeros((8, 4))}
    with pytest.raises(
        tg.MismatchError,
        match=r"shape differs: 1\n  'k' in the state is float32\[8, 4\], "
        r"'params.encoder.kernel' in the source is float32\[4, 8\]",
    ):
        tg.graft(state, tg.OrbaxCheckpoint(ckpts["mixed"]), {"k": "params.encoder.kernel"})


def test_scalars_and_list_elements(ckpts, where):
    state = {
        "epoch": 0,
        "lr": 0.0,
        "count": jnp.asarray(0, jnp.int32),
        "first": jnp.zeros(3, jnp.int32),
        "x": jnp.zeros(2),
    }
    mapping = {"epoch": "epoch", "lr": "lr", "count": "count", "first": "lst.0", "x": "lst[2].x"}
    out = tg.graft(state, tg.OrbaxCheckpoint(where.publish(ckpts["mixed"], cache=True)), mapping)
    assert type(out["epoch"]) is int and out["epoch"] == 3
    assert type(out["lr"]) is float and out["lr"] == 0.25
    assert isinstance(out["count"], jax.Array) and int(out["count"]) == 7
    np.testing.assert_array_equal(out["first"], [0, 1, 2])
    np.testing.assert_array_equal(out["x"], [1.0, 1.0])


def test_whole_tree_round_trip(ckpts, where):
    tree = mixed_tree()
    like = jax.tree.map(lambda x: x * 0 if hasattr(x, "shape") else type(x)(0), tree)
    source = tg.OrbaxCheckpoint(where.publish(ckpts["mixed"], cache=True))
    out = tg.graft(like, source, {"": ""})
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
        assert type(got) is type(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# -- the checkpoint is never written ---------------------------------------------------


def test_nothing_written(ckpts, tmp_path, where):
    item = where.publish(copy_item(ckpts["mixed"], tmp_path))
    before = where.snapshot(item)
    src = tg.OrbaxCheckpoint(item)
    state = {"k": jnp.zeros((4, 8)), "t": np.zeros((3, 2))}
    tg.graft(state, src, {"k": "params.encoder.kernel", "t": "table"})
    tg.graft(
        {"k": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
        tg.OrbaxCheckpoint(item),
        {"k": "params.encoder.kernel"},
    )
    with pytest.raises(tg.MismatchError, match="dtype differs"):
        tg.graft({"k": jnp.zeros((4, 8), jnp.int32)}, src, {"k": "params.encoder.kernel"})
    with pytest.raises(tg.PathNotFoundError, match="'params.nope'"):
        tg.graft(state, src, {"k": "params.nope"})
    assert where.snapshot(item) == before


@pytest.mark.parametrize("path", [None, 3], ids=["None", "int"])
def test_a_path_that_is_not_a_path_is_a_checkpoint_error(path):
    with pytest.raises(tg.CheckpointError, match="must be a str or os.PathLike, got"):
        tg.OrbaxCheckpoint(path)


@pytest.mark.parametrize("where", ["local", "gcs"], indirect=True)
def test_typed_prng_keys_plan_print_and_graft_from_a_checkpoint(where, tmp_path):
    """orbax saves a key array as its key data; treegraft shows and restores the keys."""
    saved = {"rngs": {"dropout": jax.random.split(jax.random.key(1), 8),
                      "params": jax.random.key(2)},
             "w": jnp.ones(4)}
    src = tg.OrbaxCheckpoint(where.publish(write_item(tmp_path / "item", saved)))
    meta = src.metadata()
    assert (meta["rngs"]["dropout"].shape, str(meta["rngs"]["dropout"].dtype)) == ((8,), "key<fry>")
    sharding = NamedSharding(mesh_1d(), P("x"))
    state = {"rngs": {"dropout": jax.device_put(jax.random.split(jax.random.key(9), 8), sharding),
                      "params": jax.random.key(3)}, "w": jnp.zeros(4)}
    p = tg.plan(state, src, {"rngs": "rngs"})
    assert "key<fry>[8]" in str(p) and p.nbytes == 8 * 2 * 4 + 2 * 4
    new = tg.execute(p)
    assert new["rngs"]["dropout"].sharding == sharding
    for path in ("dropout", "params"):
        np.testing.assert_array_equal(jax.random.key_data(new["rngs"][path]),
                                      jax.random.key_data(saved["rngs"][path]))
    with pytest.raises(tg.MismatchError, match=r"'rngs\.params' in the state is key<rbg>\[\], "
                       r"'rngs\.params' in the source is key<fry>\[\](.|\n)*PRNG keys of different "
                       r"implementations are never cast"):
        tg.plan({"rngs": {"params": jax.random.key(3, impl="rbg")}}, src,
                {"rngs.params": "rngs.params"},
                cast="unsafe")


def test_every_source_uses_the_base_class_lifecycle(ckpts):
    """`with` and `close()` come from `Source` once; sources override only `close`."""
    for cls in (tg.OrbaxCheckpoint, tg.KauldronCheckpoint, tg.SafetensorsCheckpoint):
        assert "__enter__" not in vars(cls) and "__exit__" not in vars(cls), cls
    with tg.OrbaxCheckpoint(ckpts["mixed"]) as src:
        assert isinstance(src, tg.OrbaxCheckpoint)
        meta = src.metadata()
    assert src._metadata is None  # released
    src.close()  # twice is fine
    assert src.metadata() is not meta  # read again on use
