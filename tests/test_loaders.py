"""Kauldron-compatible init transforms on real Kauldron-layout runs."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_same_objects
from helpers import assert_same_values as assert_equal_trees
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kauldron_run import (
    TrainState,
    init_params,
    snapshot,
    train_state,
    write_run,
)

import treegraft as tg

OLD = {
    "encoder": {"dense": {"kernel": (8, 16), "bias": (16,)}, "norm": {"scale": (16,)}},
    "decoder": {"kernel": (16, 8), "bias": (8,)},
}
# The seed's new model: the decoder's first layer has the shape of the old encoder's dense.
NEW = {
    "encoder": OLD["encoder"],
    "decoder": {
        "layers_0": {"dense": {"kernel": (8, 16), "bias": (16,)}},
        "layers_1": {"kernel": (16, 8), "bias": (8,)},
    },
}
STACKED = {"encoder": {f"layers_{i}": {"kernel": (8, 8), "bias": (8,)} for i in range(3)}}
ADAM = optax.adam(1e-3)


def collections(seed):
    return {"batch_stats": {"encoder": {"mean": jnp.full((16,), float(seed))}}}


def old_state(step):
    return train_state(
        init_params(OLD, seed=step), step=step, collections=collections(step), opt=ADAM
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs written once per module; tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("runs")
    pretrain = write_run(root / "pretrain", {1: old_state(1), 3: old_state(3)})
    stacked = write_run(
        root / "stacked", {2: train_state(init_params(STACKED, seed=7), step=2, opt=ADAM)}
    )
    return {
        "pretrain": (str(root / "pretrain"), pretrain),
        "stacked": (str(root / "stacked"), stacked),
    }


@pytest.fixture
def pretrain(runs):
    return runs["pretrain"]


@pytest.fixture
def own_pretrain(runs, tmp_path):
    workdir, states = runs["pretrain"]
    shutil.copytree(workdir, tmp_path / "pretrain")
    return str(tmp_path / "pretrain"), states


def fresh(shapes=OLD, seed=100, colls=None):
    """A TrainState as a Kauldron trainer builds it before the init transform."""
    return TrainState(
        step=jnp.asarray(0),
        params=init_params(shapes, seed=seed),
        collections=collections(seed) if colls is None else colls,
        opt_state=None,
    )


def with_optimizer(state):
    return state.replace(opt_state=jax.jit(ADAM.init)(state.params))


def add_step(workdir, step, like_step):
    """Simulates the source run saving one more (complete) step."""
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckpts, f"ckpt_{like_step}"), os.path.join(ckpts, f"ckpt_{step}"))


def spec_tree(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), tree)


# -- the dataclasses -------------------------------------------------------------------


def test_partial_loader_fields_and_defaults():
    loader = tg.PartialKauldronLoader(workdir="/nowhere")
    fields = [f.name for f in dataclasses.fields(loader) if f.init]
    # Kauldron's fields, in Kauldron's names (lightweight_initialize: accepted, no effect).
    assert fields == [
        "workdir",
        "new_to_old",
        "step",
        "ignore_model_keys",
        "ignore_restored_keys",
        "lightweight_initialize",
    ]
    assert dict(loader.new_to_old) == {"params": "params", "collections": "collections"}
    assert loader.step == -1
    assert tuple(loader.ignore_model_keys) == () and tuple(loader.ignore_restored_keys) == ()
    assert isinstance(loader, tg.InitTransform) and isinstance(loader, tg.AbstractPartialLoader)
    assert tg.AbstractPartialLoader is tg.InitTransform
    assert repr(loader).startswith("PartialKauldronLoader(workdir='/nowhere', new_to_old=")
    # Each loader has its own default mapping.
    assert tg.PartialKauldronLoader(workdir="/x").new_to_old is not loader.new_to_old


def test_partial_loader_is_frozen():
    loader = tg.PartialKauldronLoader(workdir="/nowhere")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'step'"):
        loader.step = 3  # type: ignore[misc]


def test_partial_loader_is_keyword_only():
    with pytest.raises(TypeError, match=r"takes 1 positional argument but 2 were given"):
        tg.PartialKauldronLoader("/nowhere")  # type: ignore[misc]


def test_simple_loader_fields_and_defaults():
    loader = tg.SimpleCheckpointLoader(workdir="/nowhere")
    assert [f.name for f in dataclasses.fields(loader) if f.init] == [
        "workdir",
        "step",
        "load_opt_state",
    ]
    assert (loader.step, loader.load_opt_state) == (-1, False)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field"):
        loader.load_opt_state = True  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional argument"):
        tg.SimpleCheckpointLoader("/nowhere")  # type: ignore[misc]


def test_public_module_names():
    for cls in (
        tg.PartialKauldronLoader,
        tg.SimpleCheckpointLoader,
        tg.NoopTransform,
        tg.MultiTransform,
        tg.InitTransform,
    ):
        assert cls.__module__ == "treegraft"


# -- PartialKauldronLoader.transform -----------------------------------------------------


def test_default_loader_grafts_params_and_collections(pretrain):
    workdir, saved = pretrain
    state = fresh()
    out = tg.PartialKauldronLoader(workdir=workdir).transform(state)
    assert type(out) is TrainState
    assert_equal_trees(out.params, saved[3].params)
    assert_equal_trees(out.collections, saved[3].collections)
    assert out.opt_state is None
    assert out.step is state.step
    # The input state is not modified.
    assert_equal_trees(state.params, init_params(OLD, seed=100))


def test_seed_example_sharded(pretrain):
    workdir, saved = pretrain
    mesh = jax.make_mesh((8,), ("x",))

    def sharding(x):
        if x.ndim == 2 and x.shape[1] % 8 == 0:
            return NamedSharding(mesh, P(None, "x"))
        if x.ndim == 1 and x.shape[0] % 8 == 0:
            return NamedSharding(mesh, P("x"))
        return NamedSharding(mesh, P())

    state = fresh(NEW)
    state = jax.device_put(state, jax.tree.map(sharding, state))
    loader = tg.PartialKauldronLoader(
        workdir=workdir,
        new_to_old={"params.decoder.layers_0": "params.encoder"},
        # The old encoder's norm has no place in the new decoder layer.
        ignore_restored_keys=("norm",),
    )
    out = loader.transform(state)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert spec_tree(out) == spec_tree(state)
    layer = out.params["decoder"]["layers_0"]
    assert_equal_trees(layer, {"dense": saved[3].params["encoder"]["dense"]})
    assert not np.array_equal(
        layer["dense"]["kernel"], state.params["decoder"]["layers_0"]["dense"]["kernel"]
    )
    # Everything else is untouched: the very same objects.
    new_leaves = jax.tree_util.tree_leaves_with_path(out)
    old_leaves = dict(jax.tree_util.tree_leaves_with_path(state))
    for path, leaf in new_leaves:
        if "layers_0" not in jax.tree_util.keystr(path):
            assert leaf is old_leaves[path], jax.tree_util.keystr(path)


def test_seed_example_without_ignore_names_the_option(pretrain):
    workdir, _ = pretrain
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params.decoder.layers_0": "params.encoder"}
    )
    with pytest.raises(tg.PathNotFoundError) as info:
        loader.transform(fresh(NEW))
    msg = str(info.value)
    assert (
        "to fix:\n  - to skip source leaves the state has no place for, add them to "
        "ignore_restored_keys"
    ) in msg
    assert (
        "'params.encoder.norm.scale' in the source has no target: the state has no "
        "'params.decoder.layers_0.norm.scale'" in msg
    )


def test_missing_key_names_ignore_model_keys(pretrain):
    workdir, _ = pretrain
    shapes = {**OLD, "decoder": {**OLD["decoder"], "scale": (8,)}}
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.PartialKauldronLoader(workdir=workdir).transform(fresh(shapes))
    msg = str(info.value)
    assert "map them to None ({'params.decoder.scale': None}) or add them to " \
        "ignore_model_keys" in msg
    assert "'params.decoder.scale' <- 'params.decoder.scale'" in msg


def test_missing_and_unexpected_reported_together(pretrain):
    workdir, _ = pretrain
    shapes = {
        "encoder": {"dense": OLD["encoder"]["dense"]},
        "decoder": {**OLD["decoder"], "scale": (8,)},
    }
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.PartialKauldronLoader(workdir=workdir).transform(fresh(shapes))
    msg = str(info.value)
    assert "2 problems" in msg
    assert "ignore_model_keys" in msg and "ignore_restored_keys" in msg
    assert {p.kind for p in info.value.problems} == {"missing", "unexpected"}


@pytest.mark.parametrize(
    ("pattern", "new_to_old"),
    [
        ("**.bias", None),
        ("*.bias", None),  # relative to 'params': 'decoder.bias'
        ("decoder.bias", None),
        ("params.decoder.bias", None),  # absolute
        ("bias", {"params.decoder": "params.decoder", "params.encoder": "params.encoder"}),
    ],
)
def test_ignore_restored_keys_patterns(pretrain, pattern, new_to_old):
    # Kauldron's own matcher raises KeyError on every pattern here but the first.
    workdir, saved = pretrain
    shapes = {**OLD, "decoder": {"kernel": (16, 8)}}
    kwargs = {} if new_to_old is None else {"new_to_old": new_to_old}
    state = fresh(shapes)
    loader = tg.PartialKauldronLoader(workdir=workdir, ignore_restored_keys=(pattern,), **kwargs)
    out = loader.transform(state)
    assert set(out.params["decoder"]) == {"kernel"}
    np.testing.assert_array_equal(
        out.params["decoder"]["kernel"], saved[3].params["decoder"]["kernel"]
    )
    # '**.bias' does not stop the encoder's bias from loading: it only skips extras.
    np.testing.assert_array_equal(
        out.params["encoder"]["dense"]["bias"], saved[3].params["encoder"]["dense"]["bias"]
    )


@pytest.mark.parametrize(
    "pattern", ["**.scale", "*.scale", "decoder.scale", "params.decoder.scale"]
)
def test_ignore_model_keys_patterns(pretrain, pattern):
    workdir, saved = pretrain
    shapes = {**OLD, "decoder": {**OLD["decoder"], "scale": (8,)}}
    state = fresh(shapes)
    out = tg.PartialKauldronLoader(workdir=workdir, ignore_model_keys=[pattern]).transform(state)
    assert out.params["decoder"]["scale"] is state.params["decoder"]["scale"]
    np.testing.assert_array_equal(out.params["decoder"]["bias"], saved[3].params["decoder"]["bias"])


def test_ignore_pattern_with_a_typo_is_an_error(pretrain):
    workdir, _ = pretrain
    loader = tg.PartialKauldronLoader(workdir=workdir, ignore_restored_keys=("**.nrom",))
    with pytest.raises(
        tg.PathNotFoundError,
        match=r"ignore_restored_keys pattern '\*\*.nrom' matches no key of the checkpoint .*ckpt_3",
    ):
        loader.transform(fresh())


def test_patterns_with_captures(runs):
    workdir, saved = runs["stacked"]
    shapes = {"encoder": STACKED["encoder"], "decoder": STACKED["encoder"]}
    state = fresh(shapes, colls={})
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params.decoder.layers_*": "params.encoder.layers_*"}
    )
    out = loader.transform(state)
    for i in range(3):
        assert_equal_trees(
            out.params["decoder"][f"layers_{i}"], saved[2].params["encoder"][f"layers_{i}"]
        )
    assert_same_objects(out.params["encoder"], state.params["encoder"])


def test_captures_with_a_layer_missing_in_the_checkpoint(runs):
    workdir, saved = runs["stacked"]
    dec = {f"layers_{i}": {"kernel": (8, 8), "bias": (8,)} for i in range(4)}
    state = fresh({"decoder": dec}, colls={})
    mapping = {"params.decoder.layers_*": "params.encoder.layers_*"}
    with pytest.raises(
        tg.PathNotFoundError,
        match=r"'params.decoder.layers_3' has no source: .*'layers_3'(.|\n)*map them to None "
        r"\(\{'params\.decoder\.layers_3': None\}\) or add them to ignore_model_keys"
        r"|ignore_model_keys(.|\n)*'params.decoder.layers_3' has no source",
    ):
        tg.PartialKauldronLoader(workdir=workdir, new_to_old=mapping).transform(state)
    out = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old=mapping, ignore_model_keys=["params.decoder.layers_3"]
    ).transform(state)
    assert_same_objects(out.params["decoder"]["layers_3"], state.params["decoder"]["layers_3"])
    assert_equal_trees(out.params["decoder"]["layers_2"], saved[2].params["encoder"]["layers_2"])


def test_step_selection(pretrain):
    workdir, saved = pretrain
    out = tg.PartialKauldronLoader(workdir=workdir, step=1).transform(fresh())
    assert_equal_trees(out.params, saved[1].params)
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"no complete step 7; available steps: 1, 3"
    ) as info:
        tg.PartialKauldronLoader(workdir=workdir, step=7).transform(fresh())
    assert isinstance(info.value, FileNotFoundError)


def test_restoring_step_too(pretrain):
    workdir, _ = pretrain
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"step": "step", "params": "params"}
    )
    out = loader.transform(fresh())
    assert int(out.step) == 3 and out.step.dtype == jnp.int32


def test_dtype_is_checked(pretrain):
    workdir, _ = pretrain
    state = fresh()
    state = state.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params))
    with pytest.raises(
        tg.MismatchError,
        match=r"'params.decoder.bias' in the state is bfloat16\[8\], "
        r"'params.decoder.bias' in the source is float32\[8\]",
    ):
        tg.PartialKauldronLoader(workdir=workdir, new_to_old={"params": "params"}).transform(state)


# -- the optimizer phase ---------------------------------------------------------------


def test_transform_after_optimizer_grafts_opt_state(pretrain):
    workdir, saved = pretrain
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params": "params", "opt_state": "opt_state"}
    )
    state = loader.transform(fresh())
    assert state.opt_state is None
    assert_equal_trees(state.params, saved[3].params)
    state = with_optimizer(state)
    init_opt = state.opt_state
    out = loader.transform_after_optimizer(state)
    assert type(out.opt_state) is tuple
    assert type(out.opt_state[0]) is optax.ScaleByAdamState
    assert type(out.opt_state[1]) is optax.EmptyState
    assert jax.tree.structure(out.opt_state) == jax.tree.structure(init_opt)
    assert_equal_trees(out.opt_state, saved[3].opt_state)
    assert int(out.opt_state[0].count) == 3
    assert_same_objects(out.params, state.params)


@pytest.mark.parametrize("form", ["opt_state[0].mu", "opt_state.0.mu"])
def test_opt_state_entry_forms(pretrain, form):
    workdir, saved = pretrain
    loader = tg.PartialKauldronLoader(workdir=workdir, new_to_old={form: form})
    state = fresh()
    # Nothing for the first phase: the state comes back as it is.
    assert loader.transform(state) is state
    state = with_optimizer(state)
    out = loader.transform_after_optimizer(state)
    assert type(out.opt_state[0]) is optax.ScaleByAdamState
    assert_equal_trees(out.opt_state[0].mu, saved[3].opt_state[0].mu)
    assert_same_objects(out.opt_state[0].nu, state.opt_state[0].nu)
    assert out.opt_state[0].count is state.opt_state[0].count
    assert_same_objects(out.params, state.params)


def test_no_opt_entries_returns_same_state(pretrain):
    workdir, _ = pretrain
    loader = tg.PartialKauldronLoader(workdir=workdir)
    state = with_optimizer(loader.transform(fresh()))
    assert loader.transform_after_optimizer(state) is state


def test_ignore_patterns_are_checked_over_both_phases(pretrain):
    workdir, saved = pretrain
    shapes = {"encoder": {"dense": OLD["encoder"]["dense"]}, "decoder": OLD["decoder"]}
    mapping = {"params": "params", "opt_state": "opt_state"}
    # 'encoder.norm' serves the params phase only, '*.*.encoder.norm' the optimizer's.
    loader = tg.PartialKauldronLoader(
        workdir=workdir,
        new_to_old=mapping,
        ignore_restored_keys=("encoder.norm", "*.*.encoder.norm"),
    )
    state = fresh(shapes, colls={})
    state = with_optimizer(loader.transform(state))
    out = loader.transform_after_optimizer(state)
    assert_equal_trees(
        out.opt_state[0].mu["encoder"]["dense"], saved[3].opt_state[0].mu["encoder"]["dense"]
    )
    # A typo in a pattern of the second phase is still caught there.
    loader = tg.PartialKauldronLoader(
        workdir=workdir,
        new_to_old=mapping,
        ignore_restored_keys=("encoder.norm", "*.*.encoder.norm", "*.*.encoder.nrom"),
    )
    state = with_optimizer(loader.transform(fresh(shapes, colls={})))
    with pytest.raises(
        tg.PathNotFoundError,
        match=r"ignore_restored_keys pattern '\*\.\*\.encoder\.nrom' matches no key of the "
        r"checkpoint .*ckpt_3, relative to a rule's prefix \('opt_state'\) or from the root "
        r"\(did you mean",
    ):
        loader.transform_after_optimizer(state)


def test_single_phase_reports_a_typo_with_the_other_problems(pretrain):
    workdir, _ = pretrain
    shapes = {"encoder": {"dense": OLD["encoder"]["dense"]}, "decoder": OLD["decoder"]}
    loader = tg.PartialKauldronLoader(workdir=workdir, ignore_restored_keys=("encoder.nrom",))
    with pytest.raises(tg.PathNotFoundError) as info:
        loader.transform(fresh(shapes))
    msg = str(info.value)
    assert "ignore_restored_keys pattern 'encoder.nrom' matches no key" in msg
    assert "'params.encoder.norm.scale' in the source has no target" in msg


def test_kauldron_trainer_flow(pretrain):
    """init -> transform -> optimizer init -> transform_after_optimizer, as Kauldron runs it."""
    workdir, saved = pretrain
    init = jax.jit(lambda: init_params(NEW, seed=5))()
    state = TrainState(step=jnp.asarray(0), params=init, collections={}, opt_state=None)
    loader = tg.MultiTransform(
        encoder=tg.PartialKauldronLoader(
            workdir=workdir,
            new_to_old={"params.encoder": "params.encoder", "step": "step"},
        ),
        optimizer=tg.PartialKauldronLoader(
            workdir=workdir,
            step=1,
            new_to_old={
                "opt_state[0].mu.encoder": "opt_state[0].mu.encoder",
                "opt_state[0].nu.encoder": "opt_state[0].nu.encoder",
            },
        ),
    )
    state = loader.transform(state)
    assert state.opt_state is None
    assert_equal_trees(state.params["encoder"], saved[3].params["encoder"])
    assert int(state.step) == 3
    state = with_optimizer(state)
    fresh_mu_decoder = state.opt_state[0].mu["decoder"]
    state = loader.transform_after_optimizer(state)
    assert type(state.opt_state[0]) is optax.ScaleByAdamState
    assert_equal_trees(state.opt_state[0].mu["encoder"], saved[1].opt_state[0].mu["encoder"])
    assert_equal_trees(state.opt_state[0].nu["encoder"], saved[1].opt_state[0].nu["encoder"])
    assert_same_objects(state.opt_state[0].mu["decoder"], fresh_mu_decoder)
    # One training step runs on the result.
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = jax.jit(ADAM.update)(grads, state.opt_state, state.params)
    assert jax.tree.structure(updates) == jax.tree.structure(state.params)


def flax_train_state():
    struct = pytest.importorskip("flax.struct")

    @struct.dataclass
    class FlaxTrainState:  # Kauldron's TrainState is a flax struct dataclass
        step: Any
        params: Any
        collections: Any
        opt_state: Any

    return FlaxTrainState


@pytest.mark.parametrize("kind", ["dataclass", "flax.struct"])
def test_trainer_flow_single_loader(pretrain, kind):
    """The seed's flow with the state exactly as the brief gives it (step a Python int)."""
    workdir, saved = pretrain
    cls = TrainState if kind == "dataclass" else flax_train_state()
    state = cls(step=0, params=init_params(OLD, seed=9), collections={}, opt_state=None)
    loader = tg.PartialKauldronLoader(
        workdir=workdir,
        new_to_old={"step": "step", "params": "params", "opt_state": "opt_state"},
    )
    with loader:
        state = loader.transform(state)
        assert type(state) is cls and state.opt_state is None
        assert type(state.step) is int and state.step == 3
        state = state.replace(opt_state=optax.adam(1e-3).init(state.params))
        state = loader.transform_after_optimizer(state)
    assert type(state) is cls
    assert type(state.opt_state[0]) is optax.ScaleByAdamState
    assert_equal_trees(state.opt_state, saved[3].opt_state)
    assert_equal_trees(state.params, saved[3].params)


# -- context manager, close, steps ----------------------------------------------------------


def test_context_manager_releases(own_pretrain, monkeypatch):
    workdir, saved = own_pretrain
    closed = []
    original = tg.KauldronCheckpoint.close

    def close(self):
        closed.append(self.workdir)
        original(self)

    monkeypatch.setattr(tg.KauldronCheckpoint, "close", close)
    loader = tg.PartialKauldronLoader(workdir=workdir)
    with loader as entered:
        assert entered is loader
        out = loader.transform(fresh())
        add_step(workdir, 4, like_step=1)
        # Within one use the step stays the one first chosen.
        assert_equal_trees(loader.transform(fresh()).params, saved[3].params)
    assert closed == [workdir]
    assert_equal_trees(out.params, saved[3].params)
    # Released: the next use looks again and finds the new step.
    assert_equal_trees(loader.transform(fresh()).params, saved[1].params)
    loader.close()


def test_both_phases_read_the_same_step(own_pretrain):
    workdir, saved = own_pretrain
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params": "params", "opt_state": "opt_state"}
    )
    state = loader.transform(fresh())
    add_step(workdir, 4, like_step=1)  # the source run saves meanwhile
    out = loader.transform_after_optimizer(with_optimizer(state))
    assert_equal_trees(out.opt_state, saved[3].opt_state)
    loader.close()


def test_close_opens_nothing(tmp_path):
    missing = tmp_path / "never"
    loader = tg.PartialKauldronLoader(workdir=missing)
    loader.close()
    with tg.SimpleCheckpointLoader(workdir=missing):
        pass
    with tg.PartialKauldronLoader(workdir=missing) as loader:
        loader.close()
    assert not missing.exists()
    assert os.listdir(tmp_path) == []


def test_missing_workdir_error(tmp_path):
    with pytest.raises(tg.CheckpointNotFoundError, match=r"workdir '.*/never' does not exist"):
        tg.PartialKauldronLoader(workdir=tmp_path / "never").transform(fresh())
    assert not (tmp_path / "never").exists()


def test_nothing_written_in_source_workdir(own_pretrain):
    workdir, _ = own_pretrain
    before = snapshot(workdir)
    with tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params": "params", "opt_state": "opt_state"}
    ) as loader:
        loader.transform_after_optimizer(with_optimizer(loader.transform(fresh())))
    with tg.SimpleCheckpointLoader(workdir=workdir, load_opt_state=True, step=1) as loader:
        loader.transform_after_optimizer(with_optimizer(loader.transform(fresh())))
    # Failed loads write nothing either.
    with pytest.raises(tg.CheckpointNotFoundError, match="no complete step 2"):
        tg.PartialKauldronLoader(workdir=workdir, step=2).transform(fresh())
    with pytest.raises(tg.PathNotFoundError, match="ignore_restored_keys"):
        tg.PartialKauldronLoader(
            workdir=workdir, new_to_old={"params.decoder.layers_0": "params.encoder"}
        ).transform(fresh(NEW))
    with pytest.raises(tg.MismatchError, match="shape differs"):
        shapes = {**OLD, "decoder": {"kernel": (16, 4), "bias": (8,)}}
        tg.SimpleCheckpointLoader(workdir=workdir).transform(fresh(shapes))
    assert snapshot(workdir) == before


# -- SimpleCheckpointLoader ------------------------------------------------------------------


def test_simple_loader(pretrain):
    workdir, saved = pretrain
    loader = tg.SimpleCheckpointLoader(workdir=workdir)
    state = loader.transform(fresh())
    assert_equal_trees(state.params, saved[3].params)
    assert_equal_trees(state.collections, saved[3].collections)
    assert state.opt_state is None
    state = with_optimizer(state)
    assert loader.transform_after_optimizer(state) is state
    loader.close()


def test_simple_loader_with_opt_state(pretrain):
    workdir, saved = pretrain
    with tg.SimpleCheckpointLoader(workdir=workdir, load_opt_state=True, step=1) as loader:
        state = loader.transform(fresh())
        assert state.opt_state is None
        assert_equal_trees(state.params, saved[1].params)
        state = loader.transform_after_optimizer(with_optimizer(state))
    assert type(state.opt_state[0]) is optax.ScaleByAdamState
    assert_equal_trees(state.opt_state, saved[1].opt_state)
    assert_equal_trees(state.params, saved[1].params)


def test_simple_loader_without_optimizer_state(pretrain):
    # A trainer built with skip_optimizer=True still calls transform_after_optimizer.
    workdir, saved = pretrain
    with tg.SimpleCheckpointLoader(workdir=workdir, load_opt_state=True) as loader:
        state = loader.transform(fresh())
        assert loader.transform_after_optimizer(state) is state
    assert_equal_trees(state.params, saved[3].params)


def test_simple_loader_rejects_a_wrong_shape(pretrain):
    # Kauldron's SimpleCheckpointLoader restores whatever is on disk; here it is an error.
    workdir, _ = pretrain
    shapes = {**OLD, "decoder": {"kernel": (16, 4), "bias": (8,)}}
    with pytest.raises(
        tg.MismatchError,
        match=r"'params.decoder.kernel' in the state is float32\[16, 4\], "
        r"'params.decoder.kernel' in the source is float32\[16, 8\]",
    ):
        tg.SimpleCheckpointLoader(workdir=workdir).transform(fresh(shapes))


# -- NoopTransform and MultiTransform --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tag(tg.InitTransform):
    """Appends its name to state['log'], recording the phase."""

    name: str
    fail: BaseException | None = None

    def transform(self, state):
        if self.fail is not None:
            raise self.fail
        return {**state, "log": state["log"] + (("transform", self.name),)}

    def transform_after_optimizer(self, state):
        return {**state, "log": state["log"] + (("after", self.name),)}


def test_noop_transform():
    state = fresh()
    noop = tg.NoopTransform()
    assert noop.transform(state) is state
    assert noop.transform_after_optimizer(state) is state
    assert noop == tg.NoopTransform()


def test_base_transform_after_optimizer_is_identity():
    class Only(tg.InitTransform):
        def transform(self, state):
            return state

    state = {"x": 1}
    assert Only().transform_after_optimizer(state) is state
    with pytest.raises(TypeError, match="abstract"):
        tg.InitTransform()  # type: ignore[abstract]


def test_multi_transform_order_in_both_phases():
    multi = tg.MultiTransform(zeta=Tag("zeta"), alpha=Tag("alpha"), noop=tg.NoopTransform())
    state = multi.transform({"log": ()})
    assert state["log"] == (("transform", "zeta"), ("transform", "alpha"))
    state = multi.transform_after_optimizer(state)
    assert state["log"][2:] == (("after", "zeta"), ("after", "alpha"))
    assert list(multi.transforms) == ["zeta", "alpha", "noop"]


def test_multi_transform_arguments():
    with pytest.raises(TypeError, match="positional argument"):
        tg.MultiTransform(tg.NoopTransform())  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"MultiTransform: 'x' is a int, not an init transform"):
        tg.MultiTransform(x=3)  # type: ignore[arg-type]


def test_multi_transform_error_keeps_type_and_adds_name(tmp_path):
    multi = tg.MultiTransform(
        ok=tg.NoopTransform(), load=tg.PartialKauldronLoader(workdir=tmp_path / "gone")
    )
    with pytest.raises(tg.CheckpointNotFoundError) as info:
        multi.transform(fresh())
    err = info.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, tg.GraftError)
    assert str(err) == f"init_transform 'load' failed: workdir '{tmp_path}/gone' does not exist"
    assert isinstance(err.__cause__, tg.CheckpointNotFoundError)


def test_multi_transform_graft_error_keeps_problems(pretrain):
    workdir, _ = pretrain
    shapes = {**OLD, "decoder": {"kernel": (16, 4), "bias": (8,)}}
    multi = tg.MultiTransform(simple=tg.SimpleCheckpointLoader(workdir=workdir))
    with pytest.raises(
        tg.MismatchError, match=r"^init_transform 'simple' failed: cannot graft"
    ) as info:
        multi.transform(fresh(shapes))
    assert [p.kind for p in info.value.problems] == ["shape"]
    assert info.value.message.startswith("init_transform 'simple' failed: ")


def test_multi_transform_error_in_second_phase(pretrain):
    workdir, _ = pretrain
    multi = tg.MultiTransform(
        first=tg.NoopTransform(),
        opt=tg.PartialKauldronLoader(workdir=workdir, new_to_old={"opt_state": "opt_state"}),
    )
    state = TrainState(step=0, params={}, collections={}, opt_state={"wrong": jnp.zeros(2)})
    with pytest.raises(
        tg.PathNotFoundError, match=r"^init_transform 'opt' failed: cannot graft"
    ) as info:
        multi.transform_after_optimizer(state)
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        KeyError("k"),
        RuntimeError("boom"),
        FileNotFoundError(2, "No such file", "/x"),
    ],
    ids=["ValueError", "KeyError", "RuntimeError", "FileNotFoundError-errno"],
)
def test_multi_transform_reraises_any_error_type(error):
    multi = tg.MultiTransform(bad=Tag("bad", fail=error))
    with pytest.raises(type(error)) as info:
        multi.transform({"log": ()})
    assert type(info.value) is type(error)
    assert "init_transform 'bad' failed: " + str(error) in str(info.value)
    if not isinstance(error, KeyError):  # KeyError's str() quotes its argument
        assert str(info.value) == "init_transform 'bad' failed: " + str(error)
    if isinstance(error, OSError):
        assert info.value.errno == error.errno
    assert info.value.__cause__ is error


def test_multi_transform_path_syntax_error(pretrain):
    workdir, _ = pretrain
    multi = tg.MultiTransform(
        load=tg.PartialKauldronLoader(workdir=workdir, new_to_old={"params..x": "params"})
    )
    with pytest.raises(
        tg.GraftError, match=r"^init_transform 'load' failed: invalid path 'params..x'"
    ) as info:
        multi.transform(fresh())
    assert isinstance(info.value, tg.PathSyntaxError)
    assert info.value.column == 7


def test_loader_fields_are_frozen_and_hashable():
    loader = tg.PartialKauldronLoader(
        workdir="/nonexistent", new_to_old={"a": "b"}, ignore_model_keys=["c"]
    )
    assert loader.ignore_model_keys == ("c",)
    assert hash(loader) == hash(
        tg.PartialKauldronLoader(workdir="/nonexistent", new_to_old={"a": "b"},
                                 ignore_model_keys=("c",))
    )
    with pytest.raises(TypeError, match="does not support item assignment"):
        loader.new_to_old["x"] = "y"  # type: ignore[index]


def test_lightweight_initialize_is_accepted_for_kauldron_configs():
    loader = tg.PartialKauldronLoader(workdir="/nonexistent", lightweight_initialize=True)
    assert loader.lightweight_initialize is True
    loader.close()  # opens nothing, so nothing to fail on
