"""Placement: grafted leaves take the target's sharding; numpy and scalars keep their kind.

Runs on the 8 fake CPU devices set up in conftest.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import buffer_pointers
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg

DEVICES = jax.devices()
MESH_1D = jax.make_mesh((8,), ("d",))
MESH_2D = Mesh(np.array(DEVICES).reshape(2, 4), ("x", "y"))

SHAPE = (8, 8)
VALUES = np.arange(64, dtype=np.float32).reshape(SHAPE)


def test_there_are_eight_devices():
    assert len(DEVICES) == 8


TARGET_SHARDINGS = {
    "1d-partitioned": NamedSharding(MESH_1D, P("d")),
    "1d-columns": NamedSharding(MESH_1D, P(None, "d")),
    "1d-replicated": NamedSharding(MESH_1D, P()),
    "2d-partitioned": NamedSharding(MESH_2D, P("x", "y")),
    "2d-transposed": NamedSharding(MESH_2D, P("y", "x")),
    "2d-one-axis": NamedSharding(MESH_2D, P(None, "y")),
    "2d-both-axes-on-rows": NamedSharding(MESH_2D, P(("x", "y"))),
    "2d-replicated": NamedSharding(MESH_2D, P()),
    "single-device-5": SingleDeviceSharding(DEVICES[5]),
}

SOURCE_PLACEMENTS = {
    "numpy": None,
    "device-0": SingleDeviceSharding(DEVICES[0]),
    "1d-partitioned": NamedSharding(MESH_1D, P("d")),
    "2d-columns": NamedSharding(MESH_2D, P(None, ("x", "y"))),
    "2d-replicated": NamedSharding(MESH_2D, P()),
}


def source_value(placement):
    sharding = SOURCE_PLACEMENTS[placement]
    return VALUES.copy() if sharding is None else jax.device_put(VALUES, sharding)


def assert_placed(value, sharding, expected):
    assert isinstance(value, jax.Array)
    assert value.sharding == sharding
    assert value.dtype == np.float32 and value.shape == SHAPE
    # Each device holds the shard the sharding says, with the right values.
    shard_shape = sharding.shard_shape(SHAPE)
    assert {s.device for s in value.addressable_shards} == sharding.device_set
    for shard in value.addressable_shards:
        assert shard.data.shape == shard_shape
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    np.testing.assert_array_equal(np.asarray(value), expected)


@pytest.mark.parametrize("placement", list(SOURCE_PLACEMENTS))
@pytest.mark.parametrize("target", list(TARGET_SHARDINGS))
def test_grafted_leaf_takes_the_target_sharding(target, placement):
    sharding = TARGET_SHARDINGS[target]
    state = {"w": jax.device_put(np.zeros(SHAPE, np.float32), sharding), "keep": np.zeros(2)}
    out = tg.graft(state, {"enc": {"w": source_value(placement)}}, {"w": "enc.w"})
    assert_placed(out["w"], sharding, VALUES)
    assert out["keep"] is state["keep"]


def test_a_source_already_placed_right_is_copied_into_buffers_of_its_own():
    # docs/design.md section 12: a grafted leaf never shares memory with the source.
    sharding = TARGET_SHARDINGS["2d-partitioned"]
    source = jax.device_put(VALUES, sharding)
    out = tg.graft(
        {"w": jax.device_put(np.zeros(SHAPE, np.float32), sharding)}, {"w": source}, {"w": "w"}
    )
    assert out["w"] is not source
    assert out["w"].sharding == sharding
    assert not buffers(out["w"]) & buffers(source)
    np.testing.assert_array_equal(np.asarray(out["w"]), VALUES)


def buffers(x):
    """The set of x's buffer addresses (`helpers.buffer_pointers`)."""
    return set(buffer_pointers(x))


ALIAS_TARGETS = {
    "device-0": SingleDeviceSharding(DEVICES[0]),
    "device-3": SingleDeviceSharding(DEVICES[3]),
    "1d-partitioned": NamedSharding(MESH_1D, P("d")),
    "1d-replicated": NamedSharding(MESH_1D, P()),
    "2d-partitioned": NamedSharding(MESH_2D, P("x", "y")),
    "numpy": None,
}


def aligned_values():
    """VALUES in 64-byte aligned memory: jax's CPU client would keep such memory."""
    raw = np.empty(VALUES.nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    out = raw[offset : offset + VALUES.nbytes].view(np.float32).reshape(SHAPE)
    out[...] = VALUES
    return out


ALIAS_SOURCES = [*SOURCE_PLACEMENTS, "numpy-aligned"]


def alias_source(placement):
    return aligned_values() if placement == "numpy-aligned" else source_value(placement)


def _target(name):
    sharding = ALIAS_TARGETS[name]
    zeros = np.zeros(SHAPE, np.float32)
    return zeros if sharding is None else jax.device_put(zeros, sharding)


@pytest.mark.parametrize("placement", ALIAS_SOURCES)
@pytest.mark.parametrize("target", list(ALIAS_TARGETS))
def test_one_layer_copied_into_many_gives_leaves_that_own_their_buffers(target, placement):
    source = alias_source(placement)
    state = {f"layers_{i}": {"w": _target(target)} for i in range(3)}
    out = tg.graft(state, {"enc": {"w": source}}, {f"layers_{i}": "enc" for i in range(3)})
    got = [out[f"layers_{i}"]["w"] for i in range(3)]
    if target == "numpy":
        assert all(type(g) is np.ndarray and g.flags.writeable for g in got)
        for i, g in enumerate(got):
            assert not any(np.shares_memory(g, h) for h in got[i + 1 :])
            if isinstance(source, np.ndarray):
                assert not np.shares_memory(g, source)
        got[0][...] += 5  # writing one result changes neither its siblings nor the source
        np.testing.assert_array_equal(got[1], VALUES)
    else:
        seen = buffers(source)
        for g in got:
            assert g.sharding == ALIAS_TARGETS[target]
            assert not buffers(g) & seen, "a grafted leaf shares a buffer"
            seen |= buffers(g)
    np.testing.assert_array_equal(np.asarray(source), VALUES)


@pytest.mark.parametrize("placement", ALIAS_SOURCES)
@pytest.mark.parametrize("target", [t for t in ALIAS_TARGETS if t != "numpy"])
def test_donating_the_new_state_keeps_the_callers_source(target, placement):
    source = alias_source(placement)
    state = {"a": _target(target), "b": _target(target), "keep": jnp.zeros(2)}
    out = tg.graft(state, {"enc": source}, {"a": "enc", "b": "enc"})
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    stepped = step(out)
    np.testing.assert_array_equal(np.asarray(stepped["a"]), VALUES + 1)
    if isinstance(source, jax.Array):
        assert not source.is_deleted()
    np.testing.assert_array_equal(np.asarray(source), VALUES)
    # Untouched leaves are the state's own objects (documented): donated with it.
    assert out["keep"] is state["keep"]


def test_a_cast_leaf_and_its_uncast_sibling_do_not_share_buffers():
    sharding = TARGET_SHARDINGS["1d-partitioned"]
    source = jax.device_put(VALUES, sharding)
    state = {
        "a": jax.device_put(np.zeros(SHAPE, jnp.bfloat16), sharding),
        "b": jax.device_put(np.zeros(SHAPE, np.float32), sharding),
    }
    out = tg.graft(state, {"w": source}, {"a": "w", "b": "w"}, cast=True)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == np.float32
    assert not buffers(out["a"]) & buffers(out["b"])
    assert not buffers(out["b"]) & buffers(source)


def test_key_arrays_graft_into_buffers_of_their_own():
    sharding = TARGET_SHARDINGS["1d-partitioned"]
    keys = jax.device_put(jax.random.split(jax.random.key(0), 8), sharding)
    state = {"a": jax.device_put(jax.random.split(jax.random.key(1), 8), sharding), "b": keys}
    out = tg.graft(state, {"rng": keys}, {"a": "rng", "b": "rng"})
    assert out["a"].dtype == keys.dtype and out["a"].sharding == sharding
    assert not buffers(out["a"]) & buffers(out["b"])
    assert not buffers(out["b"]) & buffers(keys)
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(out["a"])), np.asarray(jax.random.key_data(keys))
    )


def test_one_source_leaf_feeding_targets_with_different_shardings():
    a, b = TARGET_SHARDINGS["1d-partitioned"], TARGET_SHARDINGS["2d-transposed"]
    state = {
        "l0": {"w": jax.device_put(np.zeros(SHAPE, np.float32), a)},
        "l1": {"w": jax.device_put(np.zeros(SHAPE, np.float32), b)},
    }
    out = tg.graft(state, {"enc": {"w": source_value("2d-columns")}}, {"l0": "enc", "l1": "enc"})
    assert_placed(out["l0"]["w"], a, VALUES)
    assert_placed(out["l1"]["w"], b, VALUES)


def test_mixed_state_every_leaf_follows_its_own_target():
    state = {
        "params": {
            "dense": {
                "kernel": jax.device_put(
                    np.zeros((4, 8), np.float32), NamedSharding(MESH_2D, P("x", "y"))
                ),
                "bias": jax.device_put(np.zeros(8, np.float32), NamedSharding(MESH_2D, P())),
            },
            "emb": jax.device_put(np.zeros((8, 2), jnp.bfloat16), NamedSharding(MESH_1D, P("d"))),
        },
        "step": 0,
        "host": np.zeros(3, np.int32),
    }
    source = {
        "params": {
            "dense": {
                "kernel": jax.device_put(
                    np.full((4, 8), 2.0, np.float32), NamedSharding(MESH_1D, P(None, "d"))
                ),
                "bias": np.full(8, 3.0, np.float32),
            },
            "emb": jnp.full((8, 2), 4.0, jnp.bfloat16),
        },
        "step": jnp.int32(12),
        "host": jax.device_put(np.arange(3, dtype=np.int32), DEVICES[2]),
    }
    out = tg.graft(state, source, {"": ""})
    for path, like in tg.flatten(state).items():
        got = tg.flatten(out)[path]
        if isinstance(like, jax.Array):
            assert got.sharding == like.sharding, path
            assert got.dtype == like.dtype
    np.testing.assert_array_equal(
        np.asarray(out["params"]["dense"]["kernel"]), np.full((4, 8), 2.0)
    )
    np.testing.assert_array_equal(
        np.asarray(out["params"]["emb"], np.float32), np.full((8, 2), 4.0)
    )
    assert out["step"] == 12 and type(out["step"]) is int
    assert type(out["host"]) is np.ndarray
    np.testing.assert_array_equal(out["host"], [0, 1, 2])


# ----------------------------------------------------------------------------
# numpy and Python scalar targets.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("placement", list(SOURCE_PLACEMENTS))
def test_numpy_targets_stay_numpy(placement):
    out = tg.graft({"w": np.zeros(SHAPE, np.float32)}, {"w": source_value(placement)}, {"w": "w"})
    assert type(out["w"]) is np.ndarray and out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], VALUES)


def test_numpy_scalar_targets_stay_numpy_scalars():
    out = tg.graft(
        {"s": np.float32(0.0)}, {"s": jax.device_put(jnp.float32(2.5), DEVICES[3])}, {"s": "s"}
    )
    assert type(out["s"]) is np.float32 and out["s"] == 2.5


@pytest.mark.parametrize(
    "target, source, expected",
    [
        pytest.param(0, jnp.int32(7), 7, id="int<-jax-int32"),
        pytest.param(
            0.0, jax.device_put(jnp.float32(1.5), DEVICES[4]), 1.5, id="float<-jax-on-device-4"
        ),
        pytest.param(False, jnp.bool_(True), True, id="bool<-jax-bool"),
        pytest.param(0, np.int64(9), 9, id="int<-np-int64"),
        pytest.param(
            0.0,
            jax.device_put(jnp.float32(0.25), NamedSharding(MESH_2D, P())),
            0.25,
            id="float<-replicated",
        ),
    ],
)
def test_python_scalar_targets_stay_python_scalars(target, source, expected):
    out = tg.graft({"s": target}, {"s": source}, {"s": "s"})
    assert type(out["s"]) is type(target)
    assert out["s"] == expected


# ----------------------------------------------------------------------------
# Abstract targets.
# ----------------------------------------------------------------------------


def _init():
    return {
        "params": {
            "enc": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)},
            "head": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
        },
        "step": jnp.zeros((), jnp.int32),
    }


SHARDINGS = {
    "params": {
        "enc": {"kernel": NamedSharding(MESH_2D, P("y", "x")), "bias": NamedSharding(MESH_1D, P())},
        "head": {
            "kernel": NamedSharding(MESH_2D, P(None, "y")),
            "bias": NamedSharding(MESH_1D, P("d")),
        },
    },
    "step": NamedSharding(MESH_2D, P()),
}


def _with_shardings(abstract):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, SHARDINGS
    )


ABSTRACT_STATES = {
    "eval_shape-then-shardings": lambda: _with_shardings(jax.eval_shape(_init)),
    "eval_shape-of-jit-out_shardings": lambda: jax.eval_shape(
        jax.jit(_init, out_shardings=SHARDINGS)
    ),
}


@pytest.mark.parametrize("make", list(ABSTRACT_STATES.values()), ids=list(ABSTRACT_STATES))
def test_abstract_targets_grafted_become_arrays_others_stay_abstract(make):
    state = make()
    enc_kernel = np.arange(32, dtype=np.float32).reshape(8, 4)
    source = {"encoder": {"kernel": enc_kernel, "bias": jnp.ones(4)}}
    # The others stay abstract on purpose (keep rules): strict mode refuses an
    # abstract leaf that no rule fills.
    mapping = {"params.enc": "encoder", "params.head": None, "step": None}
    p = tg.plan(state, source, mapping)
    assert sorted(str(x) for x in p.abstract) == ["params.head.bias", "params.head.kernel", "step"]
    assert "(3 stay abstract)" in str(p)
    out = tg.graft(state, source, mapping)
    kernel = out["params"]["enc"]["kernel"]
    assert isinstance(kernel, jax.Array)
    assert kernel.sharding == SHARDINGS["params"]["enc"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), enc_kernel)
    bias = out["params"]["enc"]["bias"]
    assert bias.sharding == SHARDINGS["params"]["enc"]["bias"]
    np.testing.assert_array_equal(np.asarray(bias), np.ones(4))
    for path in p.abstract:
        assert tg.flatten(out)[path] is tg.flatten(state)[path]
        assert isinstance(tg.flatten(out)[path], jax.ShapeDtypeStruct)


def test_abstract_target_without_a_sharding_becomes_an_array():
    state = jax.eval_shape(lambda: {"w": jnp.zeros(3, jnp.int8)})
    assert state["w"].sharding is None
    out = tg.graft(state, {"w": np.array([1, 2, 3], np.int8)}, {"w": "w"})
    assert isinstance(out["w"], jax.Array) and out["w"].dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out["w"]), [1, 2, 3])


def test_fully_grafted_abstract_state_has_no_abstract_leaf_left():
    state = _with_shardings(jax.eval_shape(_init))
    full = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), jax.eval_shape(_init))
    assert tg.plan(state, full, {"": ""}).abstract == []
    out = tg.graft(state, full, {"": ""})
    for got, sharding in zip(jax.tree.leaves(out), jax.tree.leaves(SHARDINGS), strict=True):
        assert isinstance(got, jax.Array) and got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.ones(got.shape))
    # Grafted arrays are ordinary inputs to a jitted function.
    kernel = out["params"]["enc"]["kernel"]
    doubled = jax.jit(lambda x: x * 2)(kernel)
    np.testing.assert_array_equal(np.asarray(doubled), np.full((8, 4), 2.0))


# ----------------------------------------------------------------------------
# propagate_sharding.
# ----------------------------------------------------------------------------


def test_propagate_sharding_places_every_leaf_like_its_counterpart():
    like = {
        "a": jax.device_put(np.zeros(SHAPE, np.float32), TARGET_SHARDINGS["2d-partitioned"]),
        "b": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=TARGET_SHARDINGS["1d-partitioned"]),
        "c": np.zeros(SHAPE, np.float32),
        "d": 0.0,
        "e": (
            jax.ShapeDtypeStruct((8,), jnp.float32, sharding=TARGET_SHARDINGS["single-device-5"]),
        ),
    }
    values = {
        "a": VALUES.copy(),
        "b": source_value("2d-columns"),
        "c": source_value("1d-partitioned"),
        "d": jnp.float32(4.5),
        "e": [np.arange(8, dtype=np.float32)],  # a list where like has a tuple
    }
    out = tg.propagate_sharding(values, like)
    assert jax.tree.structure(out) == jax.tree.structure(like)
    assert_placed(out["a"], like["a"].sharding, VALUES)
    assert_placed(out["b"], like["b"].sharding, VALUES)
    assert type(out["c"]) is np.ndarray
    np.testing.assert_array_equal(out["c"], VALUES)
    assert out["d"] == 4.5 and type(out["d"]) is float
    assert type(out["e"]) is tuple and out["e"][0].sharding == like["e"][0].sharding
    np.testing.assert_array_equal(np.asarray(out["e"][0]), np.arange(8))


def test_propagate_sharding_does_not_copy_arrays_already_placed():
    # Documented: propagate_sharding moves values like jax.device_put; only
    # graft promises buffers of their own.
    sharding = TARGET_SHARDINGS["2d-transposed"]
    value = jax.device_put(VALUES, sharding)
    host = VALUES.copy()
    out = tg.propagate_sharding(
        {"w": value, "h": host},
        {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding), "h": VALUES},
    )
    assert out["w"] is value
    assert out["h"] is host


def test_propagate_sharding_copies_a_value_used_twice():
    sharding = TARGET_SHARDINGS["1d-partitioned"]
    value = jax.device_put(VALUES, sharding)
    like = jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding)
    out = tg.propagate_sharding([value, value], [like, like])
    assert out[0] is value
    assert not buffers(out[1]) & buffers(value)


def test_propagate_sharding_dtype_mismatch_names_the_leaf():
    sharding = TARGET_SHARDINGS["1d-replicated"]
    like = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=sharding)}
    with pytest.raises(
        tg.MismatchError,
        match=r"cannot place 'w': the value is float64\[8, 8\], the leaf it replaces is "
        r"float32\[8, 8\] \(float64 -> float32: casting is never implicit; pass cast=True\)",
    ):
        tg.propagate_sharding({"w": np.zeros(SHAPE, np.float64)}, like)


def test_propagate_sharding_does_not_modify_its_inputs():
    values = {"w": VALUES.copy()}
    like = {"w": jax.device_put(np.zeros(SHAPE, np.float32), TARGET_SHARDINGS["1d-replicated"])}
    tg.propagate_sharding(values, like)
    np.testing.assert_array_equal(values["w"], VALUES)
    np.testing.assert_array_equal(np.asarray(like["w"]), np.zeros(SHAPE))


@pytest.mark.parametrize(
    "values, match",
    [
        pytest.param(
            {"a": VALUES}, r"in like only: \['b'\], in values only: \[\]", id="missing-leaf"
        ),
        pytest.param(
            {"a": VALUES, "b": VALUES, "c": VALUES},
            r"in like only: \[\], in values only: \['c'\]",
            id="extra-leaf",
        ),
        pytest.param(
            {"a": VALUES, "b": {"x": VALUES}},
            r"in like only: \['b'\], in values only: \['b\.x'\]",
            id="subtree-for-leaf",
        ),
    ],
)
def test_propagate_sharding_structure_mismatch(values, match):
    like = {
        "a": np.zeros(SHAPE, np.float32),
        "b": jax.device_put(np.zeros(SHAPE, np.float32), DEVICES[1]),
    }
    with pytest.raises(
        tg.MismatchError, match=r"propagate_sharding: values and like differ in structure: " + match
    ):
        tg.propagate_sharding(values, like)


def test_propagate_sharding_shape_mismatch_names_the_leaf():
    like = {
        "w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=TARGET_SHARDINGS["2d-replicated"])
    }
    with pytest.raises(
        tg.MismatchError,
        match=r"differ in shape \(1 leaves\):\n"
        r"  'w': in values float32\[4, 8\], in like float32\[8, 8\]",
    ):
        tg.propagate_sharding({"w": np.zeros((4, 8), np.float32)}, like)


def test_place_refuses_a_cast_the_policy_does_not_allow():
    # place checks the casting policy again: a refused cast never happens silently.
    from treegraft._insert.sharding import place

    like = jax.device_put(jnp.zeros(2, jnp.int32), TARGET_SHARDINGS["1d-replicated"])
    nan = np.array([np.nan, 1.0], np.float32)
    with pytest.raises(
        tg.MismatchError,
        match=r"cannot place 'w': the value is float32\[2\], the leaf it replaces is int32\[2\] "
        r"\(float32 -> int32 can change values; pass cast='unsafe'\)",
    ):
        place([nan], [like], cast=True, name_of=lambda k: "w")
    with pytest.raises(tg.MismatchError, match=r"cannot place leaf #0: .*pass cast=True"):
        place([np.zeros(2, np.int8)], [like])
    [out] = place([np.array([2.0, 1.0], np.float32)], [like], cast="unsafe")
    assert out.dtype == jnp.int32 and out.sharding == like.sharding
    # complex to real under "unsafe": the real part, with no ComplexWarning.
    [real] = place([np.array([1 + 2j])], [np.zeros(1, np.float32)], cast="unsafe")
    [jreal] = place([jnp.array([3 + 4j])], [jnp.zeros(1)], cast="unsafe")
    assert real.tolist() == [1.0] and float(jreal[0]) == 3.0


def test_an_unsafe_cast_asked_for_does_not_warn():
    from treegraft._insert.sharding import place

    nan = np.array([np.nan, 300.0], np.float32)
    [host] = place([nan], [np.zeros(2, np.uint8)], cast="unsafe")
    [dev] = place([nan], [jnp.zeros(2, jnp.uint8)], cast="unsafe")
    assert host.dtype == np.uint8 and dev.dtype == jnp.uint8
    with pytest.raises(tg.MismatchError, match=r"float32 -> uint8 can change values"):
        place([nan], [np.zeros(2, np.uint8)], cast=True)
