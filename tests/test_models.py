"""End to end with the model libraries: Flax NNX, Flax Linen with optax, Equinox.

Each test grafts, then runs the model (a forward pass or a training step) on
the result. flax and equinox are test extras: their tests skip without them.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import assert_leaves_equal
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg


def save(path: Any, tree: Any) -> str:
    """Writes tree with orbax's standard checkpointer; returns the path."""
    path = os.fspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def assert_differ(a: Any, b: Any) -> None:
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ----------------------------------------------------------------------------
# Flax NNX.
# ----------------------------------------------------------------------------


@pytest.fixture
def nnx() -> Any:
    return pytest.importorskip("flax.nnx")


@functools.cache
def nnx_models() -> Any:
    """The NNX modules of these tests (defined once flax is known to import)."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, width: int, *, rngs: nnx.Rngs, sharded: bool = False):
            kernel_init = nnx.initializers.lecun_normal()
            bias_init = nnx.initializers.zeros_init()
            if sharded:
                kernel_init = nnx.with_partitioning(kernel_init, (None, "model"))
                bias_init = nnx.with_partitioning(bias_init, ("model",))
            self.linear = nnx.Linear(
                width, width, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs
            )
            self.norm = nnx.LayerNorm(width, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return nnx.relu(self.norm(self.linear(x)))

    class Classifier(nnx.Module):
        """The pretrained model: an encoder and a 10-class head."""

        def __init__(self, *, rngs: nnx.Rngs, sharded: bool = False):
            self.encoder = Block(8, rngs=rngs, sharded=sharded)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(self.encoder(x))

    class EncoderDecoder(nnx.Module):
        """The new model: encoder and decoder shaped like the pretrained encoder."""

        def __init__(self, *, rngs: nnx.Rngs, sharded: bool = False):
            self.encoder = Block(8, rngs=rngs, sharded=sharded)
            self.decoder = Block(8, rngs=rngs, sharded=sharded)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(self.decoder(self.encoder(x)))

    class DropoutClassifier(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.encoder = Block(8, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(self.dropout(self.encoder(x)))

    class Models:
        pass

    Models.Block = Block  # type: ignore[attr-defined]
    Models.Classifier = Classifier  # type: ignore[attr-defined]
    Models.EncoderDecoder = EncoderDecoder  # type: ignore[attr-defined]
    Models.DropoutClassifier = DropoutClassifier  # type: ignore[attr-defined]
    return Models


X = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32).reshape(2, 8)
ENCODER_TO_BOTH = {"encoder": "encoder", "decoder": "encoder"}

# What orbax makes of an nnx.State: nested dicts whose last key is `value`;
# treegraft's index lines them up with the Variables' own paths.


def nnx_source(kind: str, state: Any, tmp_path: Any) -> Any:
    """The pretrained state as a source of the given kind."""
    from flax import nnx

    if kind == "state":
        return state
    if kind == "pure_dict":
        return nnx.to_pure_dict(state)
    if kind == "state_checkpoint":
        return tg.OrbaxCheckpoint(save(tmp_path / "state", state))
    assert kind == "pure_dict_checkpoint"
    return tg.OrbaxCheckpoint(save(tmp_path / "pure", nnx.to_pure_dict(state)))


NNX_SOURCES = [
    "state",
    "pure_dict",
    "state_checkpoint",
    "pure_dict_checkpoint",
]


def test_nnx_paths_are_the_pure_dict_paths(nnx):
    models = nnx_models()
    state = nnx.state(models.Classifier(rngs=nnx.Rngs(0)))
    paths = [str(p) for p in tg.flatten(state)]
    assert "encoder.linear.kernel" in paths
    assert paths == [str(p) for p in tg.flatten(nnx.to_pure_dict(state))]
    # The slow path (jax's own key paths) agrees with the fast walk.
    arrays = [str(p) for p in tg.flatten(state, is_leaf=lambda x: isinstance(x, jax.Array))]
    assert arrays == paths
    # A Variable is the node at its path: extract gives it, with its type.
    kernel = tg.extract(state, "encoder.linear.kernel")
    assert isinstance(kernel, nnx.Param)
    with pytest.raises(tg.PathNotFoundError, match=r"'encoder.linear.kernel' is a leaf"):
        tg.extract(state, "encoder.linear.kernel.value")


def test_nnx_variable_holding_a_tree_or_none(nnx):
    state = nnx.State(
        {
            "stats": nnx.Variable({"mean": jnp.zeros(2), "count": jnp.ones(())}),
            "empty": nnx.Variable(None),
            "w": nnx.Param(jnp.ones(3)),
        }
    )
    want = ["stats.count", "stats.mean", "w"]
    assert [str(p) for p in tg.flatten(state)] == want
    assert [str(p) for p in tg.flatten(state, is_leaf=lambda x: x is None)] == [
        "empty", "stats.count", "stats.mean", "w"
    ]
    new = tg.graft(state, {"stats": {"mean": jnp.full(2, 5.0), "count": jnp.ones(())}},
                   {"stats": "stats"})
    assert type(new["stats"]) is nnx.Variable
    np.testing.assert_array_equal(new["stats"].get_value()["mean"], [5.0, 5.0])
    assert new["empty"].get_value() is None


def test_value_fields_of_other_nodes_stay_in_paths(nnx):
    # Only NNX Variables lose their `value` key: a flax struct field named
    # `value` is a path part like any other, on the fast and the slow path.
    import flax.struct

    @flax.struct.dataclass
    class Box:
        value: Any

    tree = {"box": Box(value=np.zeros(2)), "w": nnx.Param(np.ones(2))}
    assert [str(p) for p in tg.flatten(tree)] == ["box.value", "w"]
    slow = tg.flatten(tree, is_leaf=lambda x: isinstance(x, np.ndarray))
    assert [str(p) for p in slow] == ["box.value", "w"]


def test_insert_a_pure_dict_into_a_state(nnx):
    models = nnx_models()
    state = nnx.state(models.EncoderDecoder(rngs=nnx.Rngs(1)))
    pure = nnx.to_pure_dict(nnx.state(models.Classifier(rngs=nnx.Rngs(0))))
    new = tg.insert(state, "decoder", pure["encoder"])
    assert type(new) is type(state) and type(new["decoder"]["norm"]["scale"]) is nnx.Param
    np.testing.assert_array_equal(
        new["decoder"]["linear"]["kernel"].get_value(), pure["encoder"]["linear"]["kernel"]
    )
    with pytest.raises(tg.MismatchError, match=r"'head.kernel': shape differs"):
        tg.insert(state, "head", pure["head"])


def test_treegraft_imports_without_flax():
    import subprocess

    code = (
        "import sys; import treegraft as tg, numpy as np; "
        "tg.graft({'a': np.zeros(2)}, {'a': np.ones(2)}, {'a': 'a'}); "
        "assert 'flax' not in sys.modules, 'treegraft imported flax'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", NNX_SOURCES)
def test_nnx_encoder_into_encoder_and_decoder(nnx, kind, tmp_path):
    models = nnx_models()
    pretrained = models.Classifier(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(models.EncoderDecoder(rngs=nnx.Rngs(1)))

    new_state = tg.graft(state, nnx_source(kind, nnx.state(pretrained), tmp_path), ENCODER_TO_BOTH)

    assert type(new_state) is type(state)
    assert type(new_state["decoder"]["linear"]["kernel"]) is nnx.Param
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    model = nnx.merge(graphdef, new_state)
    expected = pretrained.encoder(X)
    np.testing.assert_allclose(model.encoder(X), expected, rtol=1e-6)
    np.testing.assert_allclose(model.decoder(X), expected, rtol=1e-6)
    assert model(X).shape == (2, 3)
    # The head keeps its own initialisation.
    assert new_state["head"]["kernel"].get_value() is state["head"]["kernel"].get_value()
    # Grafted leaves own their buffers (docs/design.md section 12), one per target.
    pointers = {
        new_state[name]["linear"]["kernel"].get_value().unsafe_buffer_pointer()
        for name in ("encoder", "decoder")
    }
    pointers.add(pretrained.encoder.linear.kernel.get_value().unsafe_buffer_pointer())
    assert len(pointers) == 3


@pytest.mark.parametrize("kind", NNX_SOURCES)
def test_nnx_pure_dict_target_from_state(nnx, kind, tmp_path):
    models = nnx_models()
    pretrained = nnx.state(models.Classifier(rngs=nnx.Rngs(0)))
    model = models.EncoderDecoder(rngs=nnx.Rngs(1))
    target = nnx.to_pure_dict(nnx.state(model))

    new = tg.graft(target, nnx_source(kind, pretrained, tmp_path), ENCODER_TO_BOTH)

    assert type(new) is dict and type(new["decoder"]["linear"]["kernel"]) is not nnx.Param
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    expected = nnx.merge(*nnx.split(models.Classifier(rngs=nnx.Rngs(0)))).encoder(X)
    np.testing.assert_allclose(model.decoder(X), expected, rtol=1e-6)


def test_nnx_mismatch_names_pure_dict_paths(nnx):
    models = nnx_models()
    state = nnx.state(models.EncoderDecoder(rngs=nnx.Rngs(1)))
    source = nnx.to_pure_dict(nnx.state(models.Classifier(rngs=nnx.Rngs(0))))
    with pytest.raises(tg.MismatchError, match=r"'head.kernel' in the state is float32\[8, 3\]"):
        tg.graft(state, source, {"head": "head"})


def test_nnx_module_itself_as_target(nnx):
    # NNX modules are pytrees too: grafting into one returns a new module.
    models = nnx_models()
    pretrained = models.Classifier(rngs=nnx.Rngs(0))
    model = models.EncoderDecoder(rngs=nnx.Rngs(1))
    before = np.asarray(model.decoder.linear.kernel.get_value())

    new = tg.graft(model, nnx.to_pure_dict(nnx.state(pretrained)), ENCODER_TO_BOTH)

    assert type(new) is type(model) and new is not model
    np.testing.assert_array_equal(model.decoder.linear.kernel.get_value(), before)
    np.testing.assert_allclose(new.decoder(X), pretrained.encoder(X), rtol=1e-6)
    assert new(X).shape == (2, 3)


def test_nnx_optimizer_state(nnx, tmp_path):
    models = nnx_models()

    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    @nnx.jit
    def train_step(model, optimizer, x):
        grads = nnx.grad(loss)(model, x)
        optimizer.update(model, grads)

    # A pretrained run: a few adam steps, then save params and optimizer state.
    pretrained = models.Classifier(rngs=nnx.Rngs(0))
    pre_opt = nnx.Optimizer(pretrained, optax.adam(1e-2), wrt=nnx.Param)
    for _ in range(3):
        train_step(pretrained, pre_opt, X)
    ckpt = save(
        tmp_path / "run",
        {"model": nnx.to_pure_dict(nnx.state(pretrained)),
         "optimizer": nnx.to_pure_dict(nnx.state(pre_opt))},
    )

    model = models.Classifier(rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    opt_state = nnx.state(optimizer)
    paths = [str(p) for p in tg.flatten(opt_state)]
    assert "opt_state[0].mu.encoder.linear.kernel" in paths and "step" in paths

    source = tg.OrbaxCheckpoint(ckpt)
    new_model = tg.graft(nnx.state(model), source, {"encoder": "model.encoder"})
    new_opt = tg.graft(
        opt_state,
        source,
        {
            "opt_state[0].*.encoder": "optimizer.opt_state[0].*.encoder",
            "opt_state[0].count": "optimizer.opt_state[0].count",
            "step": "optimizer.step",
        },
    )
    assert type(new_opt) is type(opt_state)
    mu = new_opt["opt_state"][0]["mu"]["encoder"]["linear"]["kernel"]
    assert type(mu) is type(opt_state["opt_state"][0]["mu"]["encoder"]["linear"]["kernel"])
    want = nnx.state(pre_opt)["opt_state"][0]
    want_mu = want["mu"]["encoder"]["linear"]["kernel"]
    np.testing.assert_array_equal(mu.get_value(), want_mu.get_value())
    np.testing.assert_array_equal(
        new_opt["opt_state"][0]["nu"]["encoder"]["norm"]["scale"].get_value(),
        want["nu"]["encoder"]["norm"]["scale"].get_value(),
    )
    assert int(new_opt["step"].get_value()) == 3
    # The head's moments are fresh zeros: not grafted.
    assert not np.any(np.asarray(new_opt["opt_state"][0]["mu"]["head"]["kernel"].get_value()))

    nnx.update(model, new_model)
    nnx.update(optimizer, new_opt)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    train_step(model, optimizer, X)
    assert int(optimizer.step.get_value()) == 4
    assert_differ(before, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_nnx_abstract_target_from_eval_shape(nnx, tmp_path):
    models = nnx_models()
    pretrained = models.Classifier(rngs=nnx.Rngs(0))
    ckpt = tg.OrbaxCheckpoint(save(tmp_path / "pure", nnx.to_pure_dict(nnx.state(pretrained))))
    abstract = nnx.eval_shape(lambda: models.EncoderDecoder(rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(abstract)
    assert isinstance(state["encoder"]["linear"]["kernel"].get_value(), jax.ShapeDtypeStruct)

    # The head stays abstract on purpose (a keep rule): strict mode refuses an
    # abstract leaf that no rule fills.
    mapping = {**ENCODER_TO_BOTH, "head": None}
    plan = tg.plan(state, ckpt, mapping)
    assert [str(p) for p in plan.abstract] == ["head.bias", "head.kernel"]
    new_state = tg.graft(state, ckpt, mapping)
    assert isinstance(new_state["decoder"]["linear"]["kernel"].get_value(), jax.Array)
    assert isinstance(new_state["head"]["kernel"].get_value(), jax.ShapeDtypeStruct)

    # Initialise only the head, then run the model.
    head = nnx.state(nnx.Linear(8, 3, rngs=nnx.Rngs(2)))
    new_state = tg.insert(new_state, "head", head)
    model = nnx.merge(graphdef, new_state)
    np.testing.assert_allclose(model.decoder(X), pretrained.encoder(X), rtol=1e-6)
    assert model(X).shape == (2, 3)


@pytest.mark.parametrize("kind", ["state", "pure_dict_checkpoint"])
def test_nnx_sharded_with_partitioning(nnx, kind, tmp_path):
    models = nnx_models()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    pretrained = models.Classifier(rngs=nnx.Rngs(0))  # saved unsharded
    source = nnx_source(kind, nnx.state(pretrained), tmp_path)
    with jax.set_mesh(mesh):
        model = models.EncoderDecoder(rngs=nnx.Rngs(1), sharded=True)
        graphdef, state = nnx.split(model)
        kernel = state["decoder"]["linear"]["kernel"].get_value()
        assert kernel.sharding == NamedSharding(mesh, P(None, "model"))

        new_state = tg.graft(state, source, ENCODER_TO_BOTH)

        grafted = tg.plan(state, source, ENCODER_TO_BOTH).entries
        assert len(grafted) == 2 * 4
        old_leaves, new_leaves = tg.flatten(state), tg.flatten(new_state)
        for entry in grafted:
            assert new_leaves[entry.target].sharding == old_leaves[entry.target].sharding
        assert new_state["decoder"]["linear"]["bias"].get_value().sharding == NamedSharding(
            mesh, P("model")
        )
        # The annotations are still there: the Variables' metadata survived.
        specs = nnx.get_partition_spec(new_state)
        assert specs["decoder"]["linear"]["kernel"].get_value() == P(None, "model")
        new_model = nnx.merge(graphdef, new_state)
        out = nnx.jit(lambda m, x: m.decoder(x))(new_model, X)
    np.testing.assert_allclose(out, pretrained.encoder(X), rtol=1e-5)


def concrete(state: Any, mesh: Any) -> Any:
    """An abstract state whose shardings are on mesh, not on its AbstractMesh."""

    def on_mesh(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec))

    return jax.tree.map(on_mesh, state)


@pytest.mark.parametrize("on_abstract_mesh", [False, True], ids=["concrete_mesh", "abstract_mesh"])
def test_nnx_sharded_abstract_target(nnx, on_abstract_mesh, tmp_path):
    models = nnx_models()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    pretrained = models.Classifier(rngs=nnx.Rngs(0))
    source = nnx_source("pure_dict_checkpoint", nnx.state(pretrained), tmp_path)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: models.EncoderDecoder(rngs=nnx.Rngs(1), sharded=True))
        graphdef, state = nnx.split(abstract)
        if not on_abstract_mesh:
            state = concrete(state, mesh)

        if on_abstract_mesh:
            # Outside the mesh's context the AbstractMesh has no devices: a typed error.
            with jax.set_mesh(jax.make_mesh((8,), ("other",))):
                with pytest.raises(tg.GraftError, match=r"target leaves are sharded on an "
                                   r"AbstractMesh .* graft under `with jax.set_mesh\(mesh\):`"):
                    tg.graft(state, source, {**ENCODER_TO_BOTH, "head": None})
        new_state = tg.graft(state, source, {**ENCODER_TO_BOTH, "head": None})

        kernel = new_state["decoder"]["linear"]["kernel"].get_value()
        assert isinstance(kernel, jax.Array)
        assert kernel.sharding == NamedSharding(mesh, P(None, "model"))
        assert isinstance(new_state["head"]["kernel"].get_value(), jax.ShapeDtypeStruct)
        new_state = tg.insert(new_state, "head", nnx.state(nnx.Linear(8, 3, rngs=nnx.Rngs(2))))
        out = nnx.jit(lambda m, x: m.decoder(x))(nnx.merge(graphdef, new_state), X)
    np.testing.assert_allclose(out, pretrained.encoder(X), rtol=1e-5)


@pytest.mark.parametrize("kind", ["state", "pure_dict", "pure_dict_checkpoint"])
def test_nnx_rngs_and_dropout(nnx, kind, tmp_path):
    models = nnx_models()
    pretrained = models.DropoutClassifier(rngs=nnx.Rngs(0, dropout=1))
    pretrained(X)  # advances the dropout stream: count 1
    state = nnx.state(pretrained)
    saved_key = jax.random.key_data(state["dropout"]["rngs"]["key"].get_value())
    paths = [str(p) for p in tg.flatten(state)]
    assert "dropout.rngs.key" in paths and "dropout.rngs.count" in paths
    source = nnx_source(kind, state, tmp_path)

    model = models.DropoutClassifier(rngs=nnx.Rngs(5, dropout=6))
    graphdef, target = nnx.split(model)
    printed = str(tg.plan(target, source, {"": ""}))
    assert re.search(r"dropout\.rngs\.key +dropout\.rngs\.key +key<fry>\[\]", printed)
    new_state = tg.graft(target, source, {"": ""})

    key = new_state["dropout"]["rngs"]["key"]
    assert type(key) is nnx.RngKey
    assert jax.dtypes.issubdtype(key.get_value().dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key.get_value()), saved_key)
    assert int(new_state["dropout"]["rngs"]["count"].get_value()) == 1
    restored = nnx.merge(graphdef, new_state)
    # Same weights and the same dropout stream: the same training-mode output.
    np.testing.assert_array_equal(restored(X), pretrained(X))


# ----------------------------------------------------------------------------
# Flax Linen with optax: a TrainState.
# ----------------------------------------------------------------------------


@functools.cache
def linen_net() -> Any:
    import flax.linen as nn

    class Net(nn.Module):
        classes: int

        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.relu(nn.Dense(8, name="encoder")(x))
            return nn.Dense(self.classes, name="head")(x)

    return Net


def make_train_state(classes: int, seed: int) -> Any:
    from flax.training import train_state

    net = linen_net()(classes)
    params = net.init(jax.random.key(seed), X)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    return train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)


def linen_loss(params: Any, state: Any) -> jax.Array:
    return jnp.mean(state.apply_fn({"params": params}, X) ** 2)


# Params and adam's moments of the encoder; the head (10 -> 3 classes) is new.
# adamw's state sits in the chain's tuple: opt_state[1] is adamw's own chain,
# [0] its ScaleByAdamState.
LINEN_MAPPING = {
    "params.encoder": "params.encoder",
    "opt_state[1][0].*.encoder": "opt_state[1][0].*.encoder",
    "opt_state[1][0].count": "opt_state[1][0].count",
    "step": "step",
}


@pytest.mark.parametrize("from_checkpoint", [False, True], ids=["memory", "checkpoint"])
def test_linen_train_state_with_chained_adamw(from_checkpoint, tmp_path):
    pytest.importorskip("flax.linen")
    pretrained = make_train_state(10, seed=0)
    for _ in range(2):
        grads = jax.grad(linen_loss)(pretrained.params, pretrained)
        pretrained = pretrained.apply_gradients(grads=grads)
    source: Any = pretrained
    if from_checkpoint:
        source = tg.OrbaxCheckpoint(save(tmp_path / "run", pretrained))
    state = make_train_state(3, seed=1)

    new = tg.graft(state, source, LINEN_MAPPING)

    assert type(new) is type(state) and new.tx is state.tx and new.apply_fn is state.apply_fn
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert int(new.step) == 2
    assert_leaves_equal(new.params["encoder"], pretrained.params["encoder"])
    adam, fresh = new.opt_state[1][0], state.opt_state[1][0]
    assert type(adam) is type(fresh)  # ScaleByAdamState, though orbax saved a dict
    assert_leaves_equal(adam.mu["encoder"], pretrained.opt_state[1][0].mu["encoder"])
    assert_leaves_equal(adam.nu["encoder"], pretrained.opt_state[1][0].nu["encoder"])
    assert new.params["head"]["kernel"] is state.params["head"]["kernel"]
    assert adam.mu["head"]["kernel"] is fresh.mu["head"]["kernel"]

    stepped = new.apply_gradients(grads=jax.grad(linen_loss)(new.params, new))
    assert int(stepped.step) == 3
    assert_differ(stepped.params, new.params)
    assert stepped.apply_fn({"params": stepped.params}, X).shape == (2, 3)


def test_linen_head_shape_mismatch_lists_params_and_moments(tmp_path):
    pytest.importorskip("flax.linen")
    source = tg.OrbaxCheckpoint(save(tmp_path / "run", make_train_state(10, seed=0)))
    state = make_train_state(3, seed=1)
    mapping = {"params": "params", "opt_state": "opt_state"}
    with pytest.raises(tg.MismatchError) as info:
        tg.plan(state, source, mapping)
    message = str(info.value)
    assert "'params.head.kernel' in the state is float32[8, 3]" in message
    assert "'opt_state[1][0].mu.head.kernel' in the state is float32[8, 3]" in message


# ----------------------------------------------------------------------------
# Equinox.
# ----------------------------------------------------------------------------


@pytest.fixture
def eqx() -> Any:
    return pytest.importorskip("equinox")


def make_mlp(eqx: Any, out_size: int, seed: int) -> Any:
    return eqx.nn.MLP(8, out_size, width_size=16, depth=3, key=jax.random.key(seed))


def hidden(mlp: Any, x: jax.Array) -> jax.Array:
    """The MLP's features: every layer but the last."""
    for layer in mlp.layers[:-1]:
        x = mlp.activation(layer(x))
    return x


# All layers but the last (its output size differs): one rule per layer, or
# all layers and a keep rule (docs/design.md section 10) for the last.
MLP_MAPPINGS = {
    "per_layer": {f"layers[{i}]": f"layers[{i}]" for i in range(3)},
    "keep_last": {"layers": "layers", "layers[3]": None},
}


@pytest.mark.parametrize("mapping", MLP_MAPPINGS)
def test_equinox_module_from_memory(eqx, mapping):
    pretrained = make_mlp(eqx, 10, seed=0)
    model = make_mlp(eqx, 3, seed=1)

    new = tg.graft(model, pretrained, MLP_MAPPINGS[mapping])

    assert type(new) is type(model)
    assert new.activation is model.activation  # non-array leaves are untouched
    for i in range(3):
        assert_leaves_equal(new.layers[i], pretrained.layers[i])
    assert new.layers[3].weight is model.layers[3].weight
    np.testing.assert_allclose(hidden(new, X[0]), hidden(pretrained, X[0]), rtol=1e-6)
    assert jax.vmap(new)(X).shape == (2, 3)


@pytest.mark.parametrize("mapping", MLP_MAPPINGS)
def test_equinox_from_orbax_save_of_partition(eqx, mapping, tmp_path):
    pretrained = make_mlp(eqx, 10, seed=0)
    params, _ = eqx.partition(pretrained, eqx.is_array)
    source = tg.OrbaxCheckpoint(save(tmp_path / "mlp", params))
    model = make_mlp(eqx, 3, seed=1)
    target, static = eqx.partition(model, eqx.is_array)

    new_params = tg.graft(target, source, MLP_MAPPINGS[mapping])

    assert jax.tree.structure(new_params) == jax.tree.structure(target)
    new = eqx.combine(new_params, static)
    for i in range(3):
        assert_leaves_equal(new.layers[i], pretrained.layers[i])

    @eqx.filter_jit
    def loss(m, x):
        return jnp.mean(jax.vmap(m)(x) ** 2)

    np.testing.assert_allclose(hidden(new, X[0]), hidden(pretrained, X[0]), rtol=1e-6)
    assert jax.vmap(new)(X).shape == (2, 3)
    grads = eqx.filter_grad(loss)(new, X)
    assert np.isfinite(float(loss(new, X))) and np.any(np.asarray(grads.layers[0].weight))
