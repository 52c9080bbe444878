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
from treegraft._formats.orbax.headers import LazyLeaf
from treegraft._formats.orbax.metadata import lazy_metadata
from treegraft._formats.orbax.restore import _spec_leaf
from treegraft._tree.pytree import flatten_parts


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


def write_zarr3_item(path, tree) -> str:
    """Saves tree with orbax's zarr v3 arrays (its default is v2)."""
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True))
    try:
        ckptr.save(epath.Path(os.path.abspath(path)), args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()
    return str(path)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    out = {"mixed": write_item(root / "mixed", mixed_tree())}
    out["zarr3"] = write_zarr3_item(root / "zarr3", mixed_tree())
    state = train_state(init_params({"dense": {"kernel": (4, 8)}}, seed=1), step=2,
                        opt=optax.adam(1e-3))
    write_run(root / "run", {2: state})
    out["kauldron"] = str(root / "run" / "checkpoints" / "ckpt_2" / "default")
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "prefetched"])
@pytest.mark.parametrize("name", ["mixed", "kauldron", "zarr3"])
def test_same_tree_shapes_and_dtypes_as_orbax(items, name, batched):
    from treegraft._formats.orbax.headers import prefetch

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


def write_plain_item(directory: str) -> str:
    """Saves {"w": ones(3)} without OCDBT: a layout the fast metadata reader leaves to orbax."""
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    try:
        handler.save(epath.Path(directory), args=ocp.args.PyTreeSave({"w": np.ones(3)}))
    finally:
        handler.close()
    return directory


def test_other_layouts_fall_back_to_orbax(tmp_path):
    directory = write_plain_item(str(tmp_path / "plain"))
    assert lazy_metadata(directory) is None
    meta = tg.OrbaxCheckpoint(directory).metadata()
    assert meta["w"].shape == (3,) and meta["w"].dtype == np.float64


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(use_zarr3="maybe"),
        # A tree_metadata that is not an object is no longer left to orbax (which
        # fails on it): tests/test_r3_cli.py checks the CheckpointError saying so.
        lambda m: next(iter(m["tree_metadata"].values()))["value_metadata"].update(
            value_type="mystery"
        ),
    ],
    ids=["unknown-zarr-version", "unknown-value-type"],
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


def test_prefetch_reads_headers_in_one_batch_and_raises_for_failures(items, tmp_path):
    from treegraft._formats.orbax.headers import prefetch

    meta = lazy_metadata(os.path.abspath(items["mixed"]))
    enc = meta["params"]["encoder"]
    prefetch([enc["kernel"], enc["bias"], meta["none"], 3])  # non-lazy entries are skipped
    assert enc["kernel"]._spec == ((4, 8), np.dtype("float32"))
    assert enc["bias"]._spec == ((8,), np.dtype("float32"))
    assert meta["params"]["decoder"]["kernel"]._spec is None  # not asked for
    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)
    os.remove(os.path.join(directory, "manifest.ocdbt"))
    broken = lazy_metadata(directory)  # the tree comes from _METADATA alone
    leaf = broken["params"]["encoder"]["kernel"]
    with pytest.raises(tg.CheckpointError, match=r"\(leaf 'params.encoder.kernel'\): NOT_FOUND"):
        prefetch([leaf])
    assert leaf._spec is None
    with pytest.raises(tg.CheckpointError, match="NOT_FOUND"):
        _ = leaf.shape  # still unread: touching it reports the error again
    both = [broken["params"]["encoder"]["bias"], broken["params"]["decoder"]["kernel"]]
    with pytest.raises(tg.CheckpointError, match=r"of 2 leaves: .*'params.encoder.bias'.*"
                       r"NOT_FOUND.*'params.decoder.kernel'.*NOT_FOUND"):
        prefetch(both)  # every failure, in one error


def test_after_prefetch_shapes_and_dtypes_read_no_file(items, tmp_path):
    """Prefetch is the only step that reads headers: afterwards the files may be gone."""
    from treegraft._formats.orbax.headers import prefetch

    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)
    lazy = lazy_metadata(directory)
    leaves = jax.tree_util.tree_leaves(lazy)
    prefetch(leaves)
    ref = jax.tree_util.tree_leaves(orbax_metadata(directory))
    shutil.rmtree(directory)  # any header read from now on fails
    assert [(tuple(leaf.shape), leaf.dtype) for leaf in leaves] == [
        (tuple(r.shape), r.dtype) for r in ref
    ]
    assert lazy["params"]["encoder"]["kernel"].shape == (4, 8)


def test_a_plan_reads_headers_only_in_prefetch(items, tmp_path):
    """The planner's metadata I/O happens in `prefetch`: files removed after it go unnoticed."""
    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)

    class RemovedAfterPrefetch(tg.OrbaxCheckpoint):
        def prefetch(self, leaves):
            super().prefetch(leaves)
            shutil.rmtree(directory)

    state = {"enc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
    p = tg.plan(state, RemovedAfterPrefetch(directory), {"enc": "params.encoder"})
    assert [(str(e.source), e.shape) for e in p.entries] == [
        ("params.encoder.bias", (8,)), ("params.encoder.kernel", (4, 8))
    ]
    assert not os.path.exists(directory)


def test_orbax_checkpoint_has_no_metadata_error_hook(items):
    src = tg.OrbaxCheckpoint(items["mixed"])
    src.metadata()
    assert not hasattr(src, "on_metadata_error")


# The index walk: headers decoded from the OCDBT B-tree, a node per call.


def reencode(item: str, out, **config) -> str:
    """A copy of an orbax item whose OCDBT store is rewritten with config."""
    import tensorstore as ts

    config = {"max_inline_value_bytes": 1024, **config}  # as orbax writes it

    out = str(out)
    shutil.copytree(item, out, ignore=lambda d, names: [
        n for n in names if n in ("d", "manifest.ocdbt") or n.startswith("ocdbt.process_")
    ])
    src = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
    dst = ts.KvStore.open(
        {"driver": "ocdbt", "base": f"file://{out}/", "config": config}
    ).result()
    with ts.Transaction() as txn:
        for key in src.list().result():
            dst.with_transaction(txn)[key] = src[key]
    return out


def btree_height(item: str) -> int:
    import tensorstore as ts

    base = ts.KvStore.open(f"file://{item}/").result()
    versions = ts.ocdbt.dump(base).result()["versions"]
    return max(versions, key=lambda v: v["generation_number"])["root_height"]


def all_specs(lazy):
    from treegraft._formats.orbax.headers import prefetch

    leaves = jax.tree_util.tree_leaves(lazy)
    prefetch(leaves)
    return [leaf._spec for leaf in leaves]


@pytest.mark.parametrize(
    "config",
    [
        {"max_decoded_node_bytes": 256},  # a B-tree of several levels
        {"max_inline_value_bytes": 16},  # headers stored out of line: read key by key
    ],
    ids=["deep-btree", "out-of-line-headers"],
)
def test_walk_finds_every_header_of_other_store_layouts(items, tmp_path, config):
    item = os.path.abspath(items["kauldron"])
    copy = reencode(item, tmp_path / "copy", **config)
    if "max_decoded_node_bytes" in config:
        assert btree_height(copy) >= 2
    lazy = lazy_metadata(copy)
    ref = orbax_metadata(copy)
    assert lazy is not None
    specs = all_specs(lazy)
    assert None not in specs
    for leaf, spec, want in zip(jax.tree_util.tree_leaves(lazy), specs,
                                jax.tree_util.tree_leaves(ref), strict=True):
        assert spec == (tuple(want.shape), want.dtype), leaf.name


def test_walk_reads_the_index_only_never_array_data(items, tmp_path):
    directory = str(tmp_path / "copy")
    shutil.copytree(items["kauldron"], directory)
    data = [os.path.join(root, f) for root, _, files in os.walk(directory)
            for f in files if "ocdbt.process_" in root]
    assert data
    for path in data:  # the arrays' bytes, and the per-process indexes
        os.remove(path)
    lazy = lazy_metadata(directory)
    ref = orbax_metadata(items["kauldron"])
    assert all_specs(lazy) == [(tuple(x.shape), x.dtype) for x in jax.tree_util.tree_leaves(ref)]


@pytest.mark.parametrize("share,walks", [(1.0, True), (0.01, False)])
def test_the_walk_is_used_only_when_it_beats_key_reads(tmp_path, monkeypatch, share, walks):
    from treegraft._formats.orbax import ocdbt_index

    n = 200
    tree = {"w": {f"k{i:03d}": np.full(3, i, np.float32) for i in range(n)}}
    item = write_item(tmp_path / "many", tree)
    calls = []
    original = ocdbt_index.IndexWalk.values
    monkeypatch.setattr(ocdbt_index.IndexWalk, "values",
                        lambda self, wanted: calls.append(len(wanted)) or original(self, wanted))
    lazy = lazy_metadata(os.path.abspath(item))
    chosen = sorted(lazy["w"])[: max(1, int(n * share))]
    from treegraft._formats.orbax.headers import prefetch

    prefetch([lazy["w"][k] for k in chosen])
    assert [lazy["w"][k]._spec for k in chosen] == [((3,), np.dtype("float32"))] * len(chosen)
    assert bool(calls) is walks


@pytest.mark.parametrize("node_bytes", [256, 100_000_000], ids=["deep", "one-node"])
def test_walk_returns_the_inline_value_of_every_wanted_key(items, tmp_path, node_bytes):
    import tensorstore as ts

    from treegraft._formats.orbax.ocdbt_index import IndexWalk

    copy = reencode(os.path.abspath(items["kauldron"]), tmp_path / "copy",
                    max_decoded_node_bytes=node_bytes)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{copy}/"}).result()
    keys = kv.list().result()
    headers = {k: kv[k] for k in keys if k.endswith(b"/.zarray")}
    assert len(headers) >= 5
    walk = IndexWalk(copy, ts.Context())
    assert walk.num_keys == len(keys)
    assert walk.values(set(headers)) == headers
    assert walk.values({b"no/such/key"}) == {}  # a second walk reads the root again


@pytest.mark.parametrize("name", ["mixed", "zarr3"])
def test_headers_of_both_zarr_versions_parse_without_opening_arrays(items, name):
    from treegraft._formats.orbax.headers import _read_headers

    lazy = lazy_metadata(os.path.abspath(items[name]))
    leaves = jax.tree_util.tree_leaves(lazy)
    store = leaves[0]._store
    assert store.zarr3 is (name == "zarr3")
    assert _read_headers(store, leaves) == []  # none left for tensorstore to open
    ref = jax.tree_util.tree_leaves(orbax_metadata(os.path.abspath(items[name])))
    assert [leaf._spec for leaf in leaves] == [
        (tuple(r.shape), r.dtype) for r in ref
    ]


def test_a_graft_from_a_zarr3_checkpoint(items):
    source = tg.OrbaxCheckpoint(items["zarr3"])
    state = {"enc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.ones(8)},
             "dec": jnp.zeros((8, 4), jnp.bfloat16), "epoch": 0}
    out = tg.graft(state, source, {"enc": "params.encoder", "dec": "params.decoder.kernel",
                                   "epoch": "epoch"})
    want = mixed_tree()
    np.testing.assert_array_equal(out["enc"]["kernel"], want["params"]["encoder"]["kernel"])
    np.testing.assert_array_equal(out["dec"], want["params"]["decoder"]["kernel"])
    assert out["epoch"] == 3 and state["epoch"] == 0


def test_touching_every_shape_in_turn_reads_them_in_bulk_after_a_few(tmp_path, monkeypatch):
    from treegraft._formats.orbax import headers

    n = 120
    tree = {"w": {f"k{i:03d}": np.full((i % 5 + 1,), i, np.float32) for i in range(n)}}
    item = os.path.abspath(write_item(tmp_path / "many", tree))
    single = []
    original = headers.OrbaxStore.header
    monkeypatch.setattr(headers.OrbaxStore, "header",
                        lambda self, name: single.append(name) or original(self, name))
    lazy = lazy_metadata(item)
    shapes = jax.tree.map(lambda x: x.shape, lazy)  # as user code would
    assert shapes == {"w": {f"k{i:03d}": (i % 5 + 1,) for i in range(n)}}
    assert len(single) == headers._SINGLE_LOADS  # then one batch for the other 104
    assert [leaf._spec is not None for leaf in jax.tree.leaves(lazy)] == [True] * n


def test_a_leaf_that_fails_after_the_bulk_load_still_names_itself(items, tmp_path, monkeypatch):
    from treegraft._formats.orbax import headers

    monkeypatch.setattr(headers, "_SINGLE_LOADS", 0)  # the first touch loads in bulk
    directory = str(tmp_path / "copy")
    shutil.copytree(items["mixed"], directory)
    os.remove(os.path.join(directory, "manifest.ocdbt"))
    lazy = lazy_metadata(directory)
    with pytest.raises(tg.CheckpointError, match=r"leaf 'params.encoder.kernel'.*NOT_FOUND"):
        _ = lazy["params"]["encoder"]["kernel"].shape


# ----------------------------------------------------------------------------
# The fast path never fails silently (docs/design.md section 11).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixed", "kauldron", "zarr3"])
def test_standard_checkpoints_never_take_the_fallback(items, name, caplog, monkeypatch):
    """A checkpoint orbax writes by default plans without orbax's metadata reader.

    The fallback is allowed to be slow, so a bug in the fast path would show
    only as a slow plan: here it fails the test instead.
    """

    def refuse(*args, **kwargs):
        raise AssertionError("orbax's metadata reader was used for a standard checkpoint")

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "metadata", refuse)
    caplog.set_level("DEBUG", logger="treegraft")
    with tg.OrbaxCheckpoint(items[name]) as source:
        meta = source.metadata()
        leaves = jax.tree_util.tree_leaves(meta)
        tg.plan(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), meta),
                source, {"": ""}, strict=False)
    assert leaves and all(isinstance(leaf, LazyLeaf) for leaf in leaves)
    assert [r.getMessage() for r in caplog.records if r.name == "treegraft"] == []


def test_the_fallback_says_why_in_the_log(tmp_path, caplog):
    directory = write_plain_item(str(tmp_path / "plain"))
    caplog.set_level("DEBUG", logger="treegraft")
    assert lazy_metadata(directory) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "treegraft"]
    assert len(messages) == 1
    assert "with orbax's reader: not an OCDBT layout" in messages[0]
    assert directory in messages[0]
