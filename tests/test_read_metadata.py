"""Checkpoint metadata on demand: the same tree as orbax's, shapes read only when asked."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from kauldron_run import init_params, train_state, write_item, write_run

import treegraft as tg
from treegraft._read.metadata import LazyLeaf, lazy_metadata
from treegraft._read.orbax import _spec_leaf
from treegraft._tree import flatten_parts


def orbax_metadata(directory: str):
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(directory)).tree
    finally:
        handler.close()
    return jax.tree_util.tree_map(_spec_leaf, tree)


def mixed_tree():
    return {
        "params": {
            "encoder": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
            "decoder": {"kernel": jnp.full((8, 4), 1.5, jnp.bfloat16)},
        },
        "count": jnp.asarray(7, jnp.int32),
        "epoch": 3,
        "lr": 0.25,
        "flag": True,
        "table": np.arange(6, dtype=np.float64).reshape(3, 2),
        "lst": [jnp.arange(3), None, {"x": jnp.ones(2)}, (jnp.ones(1), (), [])],
        "ints": {0: jnp.ones(3), 1: jnp.zeros(3)},
        "empty": {},
        "none": None,
    }


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    out = {"mixed": write_item(root / "mixed", mixed_tree())}
    state = train_state(init_params({"dense": {"kernel": (4, 8)}}, seed=1), step=2,
                        opt=optax.adam(1e-3))
    write_run(root / "run", {2: state})
    out["kauldron"] = str(root / "run" / "checkpoints" / "ckpt_2" / "default")
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "prefetched"])
@pytest.mark.parametrize("name", ["mixed", "kauldron"])
def test_same_tree_shapes_and_dtypes_as_orbax(items, name, batched):
    from treegraft._read.metadata import prefetch

    directory = os.path.abspath(items[name])
    lazy = lazy_metadata(directory)
    assert lazy is not None
    if batched:  # headers read from the key-value store in one batch
        prefetch(jax.tree_util.tree_leaves(lazy))
        assert all(leaf._spec is not None for leaf in jax.tree_util.tree_leaves(lazy))
    ref = orbax_metadata(directory)
    lazy_paths, lazy_leaves, lazy_def = flatten_parts(lazy)
    ref_paths, ref_leaves, ref_def = flatten_parts(ref)
    assert lazy_paths == ref_paths
    assert lazy_def == ref_def  # lists, None, empty dicts in the same places
    for path, a, b in zip(lazy_paths, lazy_leaves, ref_leaves, strict=True):
        assert isinstance(a, LazyLeaf)
        assert (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype), path


def test_python_scalars_keep_their_type(items):
    meta = lazy_metadata(os.path.abspath(items["mixed"]))
    assert (meta["epoch"].shape, meta["epoch"].dtype) == ((), int)
    assert meta["lr"].dtype is float and meta["flag"].dtype is bool


def test_a_plan_reads_the_headers_of_paired_leaves_only(items):
    source = tg.OrbaxCheckpoint(items["mixed"])
    state = {"enc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
    tg.plan(state, source, {"enc": "params.encoder"})
    _, leaves, _ = flatten_parts(source.metadata())
    loaded = sorted(leaf.name for leaf in leaves if leaf._spec is not None)
    assert loaded == ["params.encoder.bias", "params.encoder.kernel"]


def test_other_layouts_fall_back_to_orbax(tmp_path):
    directory = str(tmp_path / "plain")
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    try:
        handler.save(epath.Path(directory), args=ocp.args.PyTreeSave({"w": np.ones(3)}))
    finally:
        handler.close()
    assert lazy_metadata(directory) is None
    meta = tg.OrbaxCheckpoint(directory).metadata()
    assert meta["w"].shape == (3,) and meta["w"].dtype == np.float64


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(use_zarr3=True),
        lambda m: m.update(tree_metadata=[]),
        lambda m: next(iter(m["tree_metadata"].values()))["value_metadata"].update(
            value_type="mystery"
        ),
    ],
    ids=["zarr3", "not-a-dict", "unknown-value-type"],
)
def test_unknown_metadata_is_left_to_orbax(items, tmp_path, edit):
    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)
    path = os.path.join(directory, "_METADATA")
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    assert lazy_metadata(directory) is None


def test_a_missing_header_is_a_checkpoint_error_at_plan_time(items, tmp_path):
    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)
    os.remove(os.path.join(directory, "manifest.ocdbt"))
    source = tg.OrbaxCheckpoint(directory)
    state = {"k": jnp.zeros((4, 8))}
    with pytest.raises(tg.CheckpointError, match=r"cannot read the metadata of .*copy \(leaf "
                       r"'params.encoder.kernel'\): NOT_FOUND"):
        tg.plan(state, source, {"k": "params.encoder.kernel"})


def test_prefetch_reads_headers_in_one_batch_and_leaves_failures_for_later(items, tmp_path):
    from treegraft._read.metadata import prefetch

    meta = lazy_metadata(os.path.abspath(items["mixed"]))
    enc = meta["params"]["encoder"]
    prefetch([enc["kernel"], enc["bias"], meta["none"], 3])  # non-lazy entries are skipped
    assert enc["kernel"]._spec == ((4, 8), np.dtype("float32"))
    assert enc["bias"]._spec == ((8,), np.dtype("float32"))
    assert meta["params"]["decoder"]["kernel"]._spec is None  # not asked for
    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)
    broken = lazy_metadata(directory)
    os.remove(os.path.join(directory, "manifest.ocdbt"))
    leaf = broken["params"]["encoder"]["kernel"]
    prefetch([leaf])
    assert leaf._spec is None
    with pytest.raises(tg.CheckpointError, match="NOT_FOUND"):
        _ = leaf.shape
