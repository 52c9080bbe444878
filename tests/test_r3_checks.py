"""Round-3 checks: what used to pass the plan and fail later, opaquely, is refused early and typed.

* An abstract target leaf (`jax.eval_shape`) that no rule fills is an error in
  strict mode, listing every such leaf with the rule that would fill it; with
  `strict=False` the plan reports it and it stays abstract. A keep rule says
  it stays abstract on purpose. Kauldron's two-phase loading still works when
  the optimizer phase fills abstract `opt_state` leaves (item 8).
* Operations on typed PRNG key leaves are refused in `plan`, naming the leaf;
  a plain copy of a key still grafts (item 14).
* A deleted or donated source array is a typed error naming its path, in
  `plan` and again in `execute`; a deleted target leaf still lends its
  sharding (item 15).
* Operations nest at most `MAX_DEPTH` deep: deeper is a `MappingError` with
  the depth, never a `RecursionError` (item 16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from kauldron_run import init_params, train_state, write_run

import treegraft as tg
from treegraft._parse.ops import MAX_DEPTH, Transpose

# ----------------------------------------------------------------------------
# Item 8: abstract target leaves that no rule fills.
# ----------------------------------------------------------------------------


def _init(key):
    k1, k2 = jax.random.split(key)
    return {
        "enc": {"w": jax.random.normal(k1, (8, 4)), "b": jnp.zeros(4)},
        "head": {"kernel": jax.random.normal(k2, (4, 3)), "bias": jnp.zeros(3)},
        "step": jnp.zeros((), jnp.int32),
    }


def _pretrained():
    return {
        "enc": {"w": np.ones((8, 4), np.float32), "b": np.ones(4, np.float32)},
        "head": {"kernel": np.ones((4, 10), np.float32), "bias": np.ones(10, np.float32)},
        "step": np.asarray(7, np.int32),
    }


def test_abstract_leaf_no_rule_fills_is_an_error_listing_each_with_its_rule():
    abstract = jax.eval_shape(_init, jax.random.key(0))
    with pytest.raises(tg.GraftError) as info:
        tg.graft(abstract, _pretrained(), {"enc": "enc"})
    message = str(info.value)
    assert message.startswith("cannot graft (1 rule): 3 problems\n")
    assert "abstract target leaves no rule fills (they would stay abstract): 3" in message
    for line in (
        "'head.bias' in the state is abstract (float32[3]) and no rule fills it",
        "'head.kernel' in the state is abstract (float32[4, 3]) and no rule fills it",
        "'step' in the state is abstract (int32[]) and no rule fills it",
    ):
        assert line in message
    # The rule that would fill it: the source's leaf of the same name, when it fits ...
    assert "'step': graft it from the source ({'step': 'step'})" in message
    # ... and when it does not, why, with the keep rule for the whole subtree.
    assert (
        "'head' (2 abstract leaves): the source's 'head' does not fit it ('head.bias' is "
        "float32[10] in the source, float32[3] in the state)" in message
    )
    assert "keep it abstract on purpose ({'head': None}, or strict=False)" in message
    kinds = {p.kind for p in info.value.problems}
    assert kinds == {"unfilled"}
    assert {str(p.target) for p in info.value.problems} == {"head.bias", "head.kernel", "step"}


def test_remedy_when_the_source_has_no_such_subtree():
    abstract = jax.eval_shape(_init, jax.random.key(0))
    source = {"enc": _pretrained()["enc"]}
    with pytest.raises(tg.GraftError, match=r"'head' \(2 abstract leaves\): the source has no "
                       r"'head': map it from another source path, build it concretely"):
        tg.plan(abstract, source, {"enc": "enc", "step": None})


def test_unfilled_abstract_leaves_are_reported_with_strict_false_and_stay_abstract():
    abstract = jax.eval_shape(_init, jax.random.key(0))
    p = tg.plan(abstract, _pretrained(), {"enc": "enc"}, strict=False)
    assert [pr.kind for pr in p.report] == ["unfilled"] * 3
    assert [str(x) for x in p.abstract] == ["head.bias", "head.kernel", "step"]
    assert p.executable
    out = tg.execute(p)
    assert isinstance(out["enc"]["w"], jax.Array)
    assert out["head"]["kernel"] is abstract["head"]["kernel"]
    assert out["step"] is abstract["step"]


def test_keep_rules_and_ignored_leaves_stay_abstract_on_purpose():
    abstract = jax.eval_shape(_init, jax.random.key(0))
    out = tg.graft(abstract, _pretrained(), {"enc": "enc", "head": None, "step": "step"})
    assert isinstance(out["head"]["bias"], jax.ShapeDtypeStruct)
    assert int(out["step"]) == 7
    # A leaf a rule covers, missing from the source but ignored, keeps its value too.
    source = {"enc": _pretrained()["enc"], "head": {"kernel": np.ones((4, 3), np.float32)}}
    out = tg.graft(
        abstract, source, {"": ""}, ignore_model_keys=["head.bias", "step"]
    )
    assert isinstance(out["head"]["bias"], jax.ShapeDtypeStruct)
    assert isinstance(out["head"]["kernel"], jax.Array)


def test_concrete_untouched_leaves_are_no_problem():
    state = _init(jax.random.key(0))
    out = tg.graft(state, _pretrained(), {"enc": "enc"})
    assert out["head"]["kernel"] is state["head"]["kernel"]


def test_nnx_eval_shape_with_a_forgotten_rule_fails_in_plan_not_in_the_model():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(4, 8, rngs=rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

    pretrained = nnx.state(Model(nnx.Rngs(0)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(1))))
    with pytest.raises(
        tg.GraftError,
        match=r"'head.kernel' in the state is abstract \(float32\[8, 2\]\) and no rule fills it",
    ):
        tg.graft(abstract, pretrained, {"encoder": "encoder"})
    full = tg.graft(abstract, pretrained, {"encoder": "encoder", "head": "head"})
    model = nnx.merge(graphdef, full)
    assert model.head(model.encoder(jnp.ones((1, 4)))).shape == (1, 2)


ADAM = optax.adam(1e-3)
SHAPES = {"dense": {"kernel": (4, 8), "bias": (8,)}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3_checks")
    states = write_run(
        root / "pretrain", {2: train_state(init_params(SHAPES, seed=2), step=2, opt=ADAM)}
    )
    return str(root / "pretrain"), states[2]


def test_two_phase_loader_fills_an_abstract_opt_state_in_its_second_phase(run):
    workdir, saved = run
    params = init_params(SHAPES, seed=9)
    state = train_state(params)
    state = state.replace(opt_state=jax.eval_shape(ADAM.init, params))
    with tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params": "params", "opt_state": "opt_state"}
    ) as loader:
        state = loader.transform(state)  # the optimizer phase fills opt_state: no error yet
        assert isinstance(state.opt_state[0].mu["dense"]["kernel"], jax.ShapeDtypeStruct)
        state = loader.transform_after_optimizer(state)
    mu = state.opt_state[0].mu["dense"]["kernel"]
    want = saved.opt_state[0].mu["dense"]["kernel"]
    np.testing.assert_array_equal(np.asarray(mu), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(state.params["dense"]["bias"]), np.asarray(saved.params["dense"]["bias"])
    )


def test_two_phase_loader_still_refuses_abstract_leaves_no_phase_fills(run):
    workdir, _ = run
    params = init_params(SHAPES, seed=9)
    state = train_state(params, opt=ADAM)
    state = state.replace(params=jax.eval_shape(lambda: params))
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params.dense.kernel": "params.dense.kernel",
                                     "opt_state": "opt_state"}
    )
    with pytest.raises(tg.GraftError, match=r"'params.dense.bias' in the state is abstract"):
        loader.transform(state)
    # And a missing leaf still fails the first phase, as strict mode would.
    loader = tg.PartialKauldronLoader(
        workdir=workdir, new_to_old={"params": "params.nope", "opt_state": "opt_state"}
    )
    with pytest.raises(tg.PathNotFoundError, match=r"'params' has no source"):
        loader.transform(train_state(params))


# ----------------------------------------------------------------------------
# Item 14: operations on typed PRNG keys.
# ----------------------------------------------------------------------------

KEY = jax.random.key(0)
KEYS = jax.random.split(KEY, 4)
KEY_CASES = {
    "stack": (
        {"l": KEYS},
        {f"l_{i}": KEYS[i] for i in range(4)},
        {"l": tg.stack("l_*")},
        "stack",
    ),
    "unstack": ({f"l_{i}": KEY for i in range(4)}, {"l": KEYS}, {"l_*": tg.unstack("l")},
                "unstack"),
    "transpose": (
        {"w": KEYS.reshape(2, 2).T},
        {"w": KEYS.reshape(2, 2)},
        {"w": tg.transpose("w", (1, 0))},
        "transpose",
    ),
    "reshape": ({"w": KEYS}, {"w": KEYS.reshape(2, 2)}, {"w": tg.reshape("w", (4,))}, "reshape"),
    "cast": (
        {"w": np.zeros(4, np.float32)},
        {"w": KEYS},
        {"w": tg.cast("w", np.float32)},
        "cast",
    ),
    "stack-then-transpose": (
        {"l": jax.random.split(KEY, 8).reshape(2, 4).T},
        {f"l_{i}": jax.random.split(KEY, 4) for i in range(2)},
        {"l": tg.transpose(tg.stack("l_*"), (1, 0))},
        "stack and transpose",
    ),
}


@pytest.mark.parametrize("case", list(KEY_CASES.values()), ids=list(KEY_CASES))
def test_operations_on_typed_keys_are_refused_in_plan(case):
    state, source, mapping, what = case
    with pytest.raises(tg.MismatchError) as info:
        tg.plan(state, source, mapping)
    message = str(info.value)
    assert f"typed PRNG keys cannot go through {what} [rule" in message
    assert "graft only as plain copies" in message
    assert {p.kind for p in info.value.problems} == {"dtype"}


def test_a_plain_copy_of_keys_still_grafts():
    out = tg.graft({"k": jax.random.split(jax.random.key(1), 4)}, {"k": KEYS}, {"k": "k"})
    assert jnp.array_equal(jax.random.key_data(out["k"]), jax.random.key_data(KEYS))


# ----------------------------------------------------------------------------
# Item 15: deleted (donated) arrays.
# ----------------------------------------------------------------------------


def _deleted(x):
    x = jnp.asarray(x)
    x.delete()
    return x


@pytest.mark.parametrize(
    "mapping",
    [{"w": "w"}, {"w": tg.reshape("w", (3,))}],
    ids=["copy", "operation"],
)
def test_a_deleted_source_array_is_refused_in_plan_naming_it(mapping):
    source = {"w": _deleted(np.ones(3, np.float32)), "b": jnp.ones(2)}
    with pytest.raises(tg.GraftError) as info:
        tg.plan({"w": np.zeros(3, np.float32)}, source, mapping, ignore_restored_keys=["b"])
    message = str(info.value)
    assert "'w' in the source (float32[3]) has been deleted: its buffer is gone" in message
    assert "donated to a jitted function" in message
    assert [str(p.source) for p in info.value.problems] == ["w"]


def test_a_donated_source_array_is_refused():
    params = {"w": jnp.ones(3)}
    jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p), donate_argnums=0)(params)
    assert params["w"].is_deleted()
    with pytest.raises(tg.GraftError, match=r"'w' in the source .* has been deleted"):
        tg.graft({"w": jnp.zeros(3)}, params, {"w": "w"})


def test_stacked_deleted_sources_are_each_named():
    source = {"l_0": _deleted(np.ones(2)), "l_1": jnp.ones(2), "l_2": _deleted(np.ones(2))}
    with pytest.raises(tg.GraftError) as info:
        tg.plan({"l": np.zeros((3, 2), np.float32)}, source, {"l": tg.stack("l_*")})
    assert [str(p.source) for p in info.value.problems] == ["l_0", "l_2"]


def test_a_source_deleted_between_plan_and_execute_is_a_typed_error():
    source = {"w": jnp.ones(3)}
    p = tg.plan({"w": np.zeros(3, np.float32)}, source, {"w": "w"})
    source["w"].delete()
    with pytest.raises(tg.GraftError, match=r"'w' in the source \(float32\[3\]\) has been deleted"):
        tg.execute(p)


def test_a_deleted_target_leaf_still_gives_its_sharding():
    target = _deleted(np.zeros(3, np.float32))
    out = tg.graft({"w": target}, {"w": jnp.arange(3.0)}, {"w": "w"})
    assert not out["w"].is_deleted()
    assert out["w"].sharding == target.sharding
    np.testing.assert_array_equal(np.asarray(out["w"]), [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------
# Item 16: deep nesting.
# ----------------------------------------------------------------------------


def _nested(depth, make=tg.transpose):
    op = "w"
    for _ in range(depth):
        op = make(op, (0,))
    return op


def test_nesting_past_the_limit_is_a_mapping_error_with_the_depth():
    op = _nested(MAX_DEPTH)
    with pytest.raises(tg.MappingError, match=rf"operations nest {MAX_DEPTH + 1} deep, more "
                       rf"than the {MAX_DEPTH} allowed"):
        tg.transpose(op, (0,))


def test_nesting_3000_deep_through_the_classes_is_a_mapping_error_not_a_recursion_error():
    op = _nested(3000, make=Transpose)
    with pytest.raises(tg.MappingError, match=r"entry 'w': the rule's value: operations nest "
                       r"3000 deep"):
        tg.graft({"w": np.zeros(2)}, {"w": np.ones(2)}, {"w": op})


def test_nesting_up_to_the_limit_grafts_and_prints():
    op = _nested(MAX_DEPTH)
    out = tg.graft({"w": np.zeros(2)}, {"w": np.ones(2)}, {"w": op})
    np.testing.assert_array_equal(out["w"], [1.0, 1.0])
    assert op.describe() == "transpose(" * MAX_DEPTH + "'w'" + ", (0,))" * MAX_DEPTH
    assert repr(op) and hash(op) == hash(_nested(MAX_DEPTH)) and op == _nested(MAX_DEPTH)
