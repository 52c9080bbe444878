"""Values that change on the way in: scalars that do not fit, overflowing casts, weak types.

What it proves (reliability round 3, values):

- A Python scalar source whose value the target dtype does not hold exactly
  (2**40 into int32, 300 into int8, -1 into uint8, 1e10 into float16, 2**70
  into int64) is a dtype mismatch reported by `plan`, not a wrapped value or a
  raw OverflowError; an orbax-saved Python scalar (its value is known only
  once read) is checked as it is read, with a typed error naming the path.
- `cast=True` never makes inf or NaN of a finite value: dtype pairs whose range
  cannot hold the source's values (int32 to float16, float32 to float8, anything
  to float8_e8m0fnu) need `cast="unsafe"` and fail in `plan`; float narrowings
  that stay allowed (float32 to float16 or bfloat16, float64 to float32) check
  the values as they cast, on the host and on devices, sharded or not.
- A weakly typed target leaf (`jnp.asarray(0.0)`, an abstract one from
  `jax.eval_shape`) gives a weakly typed grafted leaf, so the user's next
  `bfloat16 + leaf` stays bfloat16 and jitted steps do not retrace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import assert_owns_buffers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kauldron_run import write_item

import treegraft as tg

# ----------------------------------------------------------------------------
# Item 1: Python scalars that do not fit.
# ----------------------------------------------------------------------------

MISFITS = [
    pytest.param(lambda: jnp.int32(0), 2**40, r"1099511627776 is outside the range of int32",
                 id="2**40->int32"),
    pytest.param(lambda: np.int8(0), 300, r"300 is outside the range of int8 \(-128 to 127\)",
                 id="300->np.int8"),
    pytest.param(lambda: np.zeros((), np.uint8), -1, r"-1 is outside the range of uint8",
                 id="-1->uint8"),
    pytest.param(lambda: jnp.zeros((), jnp.float16), 1e10,
                 r"10000000000.0 does not fit float16 \(it would be inf\)",
                 id="1e10->float16"),
    pytest.param(lambda: np.int64(0), 2**70,
                 r"1180591620717411303424 is outside the range of int64", id="2**70->int64"),
]


@pytest.mark.parametrize("cast", [False, True])
@pytest.mark.parametrize("target, value, why", MISFITS)
def test_a_python_scalar_that_does_not_fit_is_a_mismatch_in_plan(target, value, why, cast):
    state = {"step": target()}
    with pytest.raises(tg.MismatchError, match=r"'step' in the state is .*, 'step' in the "
                       r"source is (int|float) \(python\)\[\] = ") as info:
        tg.plan(state, {"step": value}, {"": ""}, cast=cast)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].kind == "dtype"
    # The message says why, and what to do.
    with pytest.raises(tg.MismatchError, match=why):
        tg.graft(state, {"step": value}, {"": ""}, cast=cast)


@pytest.mark.parametrize(
    "target, value, want",
    [
        pytest.param(lambda: jnp.int32(0), 2**31 - 1, np.int32(2**31 - 1), id="int32-max"),
        pytest.param(lambda: np.zeros((), np.uint8), 255, np.uint8(255), id="uint8-max"),
        pytest.param(lambda: jnp.zeros((), jnp.float16), 0.5, np.float16(0.5), id="0.5->float16"),
        pytest.param(lambda: jnp.zeros((), jnp.float16), float("inf"), np.float16(np.inf),
                     id="inf->float16"),
        pytest.param(lambda: 0, 2**70, 2**70, id="2**70->python-int"),
        pytest.param(lambda: jnp.int4(0), -8, ml_dtypes.int4(-8), id="-8->int4"),
    ],
)
def test_a_python_scalar_that_fits_is_grafted_exactly(target, value, want):
    out = tg.graft({"s": target()}, {"s": value}, {"": ""})["s"]
    assert np.asarray(out).dtype == np.asarray(want).dtype
    assert out == want


def test_an_inexact_python_float_needs_cast_true_which_rounds_it():
    state = {"lr": jnp.zeros((), jnp.float32)}
    with pytest.raises(tg.MismatchError, match=r"0.1 is not exactly a float32 value .*pass "
                       r"cast=True to round it"):
        tg.plan(state, {"lr": 0.1}, {"": ""})
    out = tg.graft(state, {"lr": 0.1}, {"": ""}, cast=True)["lr"]
    assert out.dtype == jnp.float32 and out == np.float32(0.1)
    # A Python int into a float needs cast=True, and never becomes inf.
    with pytest.raises(tg.MismatchError, match=r"int -> float16: casting is never implicit"):
        tg.plan({"x": jnp.zeros((), jnp.float16)}, {"x": 3}, {"": ""})
    with pytest.raises(tg.MismatchError, match=r"100000 does not fit float16 \(it would be inf\)"):
        tg.plan({"x": jnp.zeros((), jnp.float16)}, {"x": 100000}, {"": ""}, cast=True)


def test_unsafe_wraps_ints_as_numpy_would_and_never_raises_overflow_error():
    out = tg.graft({"a": jnp.int32(0), "b": np.int64(0), "c": np.zeros((), np.uint8)},
                   {"a": 2**40 + 7, "b": 2**70, "c": -1}, {"": ""}, cast="unsafe")
    assert out["a"] == 7 and out["a"].dtype == jnp.int32
    assert out["b"] == 0 and out["b"].dtype == np.int64
    assert out["c"] == 255 and out["c"].dtype == np.uint8


def test_an_int_too_large_for_a_python_float_is_a_mismatch_not_an_overflow_error():
    with pytest.raises(tg.MismatchError, match=r"\(603 digits\) is beyond the range of a Python "
                       r"float"):
        tg.plan({"x": 0.0}, {"x": 2**2000}, {"": ""}, cast=True)


@pytest.mark.skipif(np.dtype(np.longdouble).name != "float128",
                    reason="longdouble is float128 on x86-64 Linux only")
def test_a_numpy_longdouble_into_a_python_float_leaf_is_a_checked_narrowing():
    with pytest.raises(tg.MismatchError, match=r"float128 -> float: casting is never implicit"):
        tg.plan({"x": 0.0}, {"x": np.longdouble(1)}, {"": ""})
    assert tg.graft({"x": 0.0}, {"x": np.longdouble(2)}, {"": ""}, cast=True) == {"x": 2.0}
    with pytest.raises(tg.MismatchError, match=r"cannot place 'x': casting float128 to float64 "
                       r"makes np.longdouble\('1e\+400'\) inf"):
        tg.graft({"x": 0.0}, {"x": np.longdouble("1e400")}, {"": ""}, cast=True)


def test_propagate_sharding_refuses_a_scalar_that_does_not_fit():
    like = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(tg.MismatchError, match=r"cannot place 'step': the Python int 300"):
        tg.propagate_sharding({"step": 300}, {"step": np.int8(0)})
    assert tg.propagate_sharding({"step": 7}, like)["step"] == 7


@pytest.fixture(scope="module")
def scalars_ckpt(tmp_path_factory):
    """An orbax item with Python scalars: values known only once read."""
    root = tmp_path_factory.mktemp("scalars")
    return write_item(
        root / "item",
        {"step": 2**40 + 7, "small": 7, "lr": 0.5, "w": np.array([1, 1e5], np.float32)},
    )


def test_an_orbax_saved_step_that_does_not_fit_fails_as_it_is_read(scalars_ckpt):
    src = tg.OrbaxCheckpoint(scalars_ckpt)
    state = {"step": jnp.int32(0), "small": jnp.int32(0)}
    with pytest.raises(tg.MismatchError, match=r"cannot place 'step': the Python int "
                       r"1099511627783 is outside the range of int32"):
        tg.graft(state, src, {"": ""}, ignore_restored_keys=["lr", "w"])
    assert state["step"] == 0 and state["small"] == 0  # nothing of the state changed
    # A numpy target, and unsafe, as for in-memory scalars.
    with pytest.raises(tg.MismatchError, match=r"cannot place 'step': the Python int"):
        tg.graft({"step": np.int32(0)}, src, {"step": "step"})
    out = tg.graft(state, src, {"": ""}, ignore_restored_keys=["lr", "w"], cast="unsafe")
    assert out["step"] == 7


def test_an_orbax_saved_scalar_that_fits_is_grafted(scalars_ckpt):
    src = tg.OrbaxCheckpoint(scalars_ckpt)
    out = tg.graft({"step": 0, "small": jnp.int32(0), "lr": jnp.zeros((), jnp.bfloat16)},
                   src, {"": ""}, ignore_restored_keys=["w"])
    assert out["step"] == 2**40 + 7 and type(out["step"]) is int
    assert out["small"] == 7 and out["small"].dtype == jnp.int32
    assert out["lr"] == 0.5 and out["lr"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------
# Item 2: cast=True never overflows.
# ----------------------------------------------------------------------------

LOST = [
    pytest.param(np.array(100000, np.int32), jnp.float16, "float16 holds at most 65504",
                 id="int32->float16"),
    pytest.param(np.array(1000, np.float32), jnp.float8_e4m3fn,
                 "float8_e4m3fn holds at most 448, no inf", id="float32->float8_e4m3fn"),
    pytest.param(np.array(1000, np.float32), jnp.float8_e5m2, "float8_e5m2 holds at most 57344",
                 id="float32->float8_e5m2"),
    pytest.param(np.array(0, np.int32), jnp.float8_e8m0fnu,
                 "float8_e8m0fnu holds neither 0 nor negative numbers", id="int32->e8m0fnu"),
    pytest.param(np.array(-1.0, np.float32), jnp.float8_e8m0fnu,
                 "float8_e8m0fnu holds neither 0 nor negative numbers", id="float32->e8m0fnu"),
    pytest.param(False, jnp.float8_e8m0fnu, "float8_e8m0fnu holds neither 0 nor negative",
                 id="python-bool->e8m0fnu"),
    pytest.param(np.array(1, np.uint16), jnp.float16, "float16 holds at most 65504",
                 id="uint16->float16"),
]


@pytest.mark.parametrize("source, dtype, why", LOST)
def test_cast_true_refuses_in_plan_the_pairs_whose_range_cannot_hold_the_values(
    source, dtype, why
):
    state = {"x": jnp.zeros((), dtype)}
    with pytest.raises(tg.MismatchError, match=why + r".*; pass cast='unsafe'"):
        tg.plan(state, {"x": source}, {"": ""}, cast=True)
    tg.plan(state, {"x": source}, {"": ""}, cast="unsafe")  # asked for: allowed


@pytest.mark.parametrize(
    "value", [0, -1, 0.0, -2.0], ids=["0", "-1", "0.0", "-2.0"]
)
def test_cast_true_refuses_python_scalars_that_would_become_nan(value):
    with pytest.raises(tg.MismatchError, match=r"does not fit float8_e8m0fnu \(it would be nan\)"):
        tg.plan({"x": jnp.zeros((), jnp.float8_e8m0fnu)}, {"x": value}, {"": ""}, cast=True)
    out = tg.graft({"x": jnp.zeros((), jnp.float8_e8m0fnu)}, {"x": 4}, {"": ""}, cast=True)
    assert float(out["x"]) == 4.0


KINDS = {
    "numpy->jax": (np.asarray, lambda d: jnp.zeros(3, d)),
    "jax->jax": (jnp.asarray, lambda d: jnp.zeros(3, d)),
    "numpy->numpy": (np.asarray, lambda d: np.zeros(3, d)),
    "jax->abstract": (jnp.asarray, lambda d: jax.ShapeDtypeStruct((3,), d)),
}
NARROWINGS = [
    pytest.param(sdtype, tdtype, big, kind, id=f"{name}-{kind}")
    for sdtype, tdtype, big, name in [
        (np.float32, jnp.float16, 1e5, "float32->float16"),
        (np.float32, jnp.bfloat16, 3.4e38, "float32->bfloat16"),
        (np.float64, jnp.float32, 1e300, "float64->float32"),
    ]
    for kind in KINDS
    # jax holds no float64 without jax_enable_x64: float64 sources are numpy.
    if not (sdtype == np.float64 and kind.startswith("jax"))
]


@pytest.mark.parametrize("sdtype, tdtype, big, kind", NARROWINGS)
def test_cast_true_checks_float_narrowings_as_it_casts(sdtype, tdtype, big, kind):
    to_source, make_target = KINDS[kind]
    state = {"w": make_target(tdtype)}
    bad = {"w": to_source(np.array([1.0, -big, big], sdtype))}
    with pytest.raises(tg.MismatchError, match=r"cannot place 'w': casting \w+ to \w+ makes "
                       r"-[0-9.e+]+ \(the first such value, at \[1\]\) inf"):
        tg.graft(state, bad, {"": ""}, cast=True)
    # inf and NaN already in the source stay; values in range are rounded.
    fine = {"w": to_source(np.array([0.1, np.inf, np.nan], sdtype))}
    out = np.asarray(tg.graft(state, fine, {"": ""}, cast=True)["w"]).astype(np.float64)
    assert out[0] == pytest.approx(0.1, rel=1e-2) and np.isposinf(out[1]) and np.isnan(out[2])


def test_cast_true_checks_a_sharded_cast_on_its_devices():
    mesh = jax.make_mesh((8,), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    values = np.ones(16, np.float32)
    values[11] = 70000.0
    state = {"w": jax.device_put(jnp.zeros(16, jnp.float16), sharding)}
    source = {"w": jax.device_put(jnp.asarray(values), sharding)}
    with pytest.raises(tg.MismatchError,
                       match=r"makes 70000.0 \(the first such value, at \[11\]\)"):
        tg.graft(state, source, {"": ""}, cast=True)
    values[11] = 7.0
    out = tg.graft(state, {"w": jax.device_put(jnp.asarray(values), sharding)}, {"": ""},
                   cast=True)["w"]
    assert out.sharding == sharding and out.dtype == jnp.float16 and np.asarray(out)[11] == 7.0


def test_cast_true_checks_a_checkpoint_read_and_a_rule_operation(scalars_ckpt):
    src = tg.OrbaxCheckpoint(scalars_ckpt)
    with pytest.raises(tg.MismatchError, match=r"cannot place 'w': casting float32 to float16 "
                       r"makes 100000.0 \(the first such value, at \[1\]\)"):
        tg.graft({"w": jnp.zeros(2, jnp.float16)}, src, {"w": "w"}, cast=True)
    state = {"w": jnp.zeros((2, 2), jnp.float16)}
    source = {"l_0": np.ones(2, np.float32), "l_1": np.array([1, 1e6], np.float32)}
    with pytest.raises(tg.MismatchError, match=r"cannot place 'w': casting float32 to float16 "
                       r"makes 1000000.0 \(the first such value, at \[1, 1\]\)"):
        tg.graft(state, source, {"w": tg.stack("l_*")}, cast=True)


# ----------------------------------------------------------------------------
# Item 7: weak types stay.
# ----------------------------------------------------------------------------


def test_a_weakly_typed_target_leaf_stays_weak():
    state = {"scale": jnp.asarray(0.0), "w": jnp.zeros(2, jnp.bfloat16)}
    source = {"scale": np.float32(2.0), "w": np.ones(2, ml_dtypes.bfloat16)}
    out = tg.graft(state, source, {"": ""})
    assert out["scale"].weak_type and out["scale"] == 2.0
    assert not out["w"].weak_type
    assert (out["w"] + out["scale"]).dtype == jnp.bfloat16  # not promoted to float32
    assert_owns_buffers(out["scale"], state["scale"])


def test_a_grafted_weak_leaf_does_not_retrace_a_jitted_step():
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        return state["w"] * state["scale"]

    state = {"scale": jnp.asarray(1.0), "w": jnp.ones(2, jnp.bfloat16)}
    step(state)
    out = tg.graft(state, {"scale": jnp.float32(3.0)}, {"scale": "scale"})
    assert step(out).dtype == jnp.bfloat16
    assert len(traces) == 1


def test_weak_types_stay_for_abstract_sharded_and_transformed_targets(scalars_ckpt):
    abstract = jax.eval_shape(lambda: {"scale": jnp.asarray(0.0), "v": jnp.zeros(2) * 1.0})
    assert abstract["scale"].weak_type
    out = tg.graft(abstract, {"scale": np.float32(2), "v": np.ones(2, np.float32)}, {"": ""})
    assert out["scale"].weak_type and out["scale"] == 2.0
    mesh = jax.make_mesh((8,), ("d",))
    replicated = NamedSharding(mesh, P())
    state = {"scale": jax.device_put(jnp.asarray(0.0), replicated)}
    assert state["scale"].weak_type
    out = tg.graft(state, {"scale": jnp.float32(5)}, {"": ""})["scale"]
    assert out.weak_type and out.sharding == replicated and out == 5.0
    # Through a rule operation, and read from a checkpoint.
    out = tg.graft({"x": jnp.asarray(0.0)}, {"y": np.ones(1, np.float32)},
                   {"x": tg.reshape("y", ())})["x"]
    assert out.weak_type and out == 1.0
    out = tg.graft({"lr": jnp.asarray(0.0)}, tg.OrbaxCheckpoint(scalars_ckpt), {"lr": "lr"})
    assert out["lr"].weak_type and out["lr"] == 0.5


def test_a_weak_abstract_leaf_on_an_abstract_mesh_stays_weak():
    mesh = jax.make_mesh((8,), ("d",))
    like = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh.abstract_mesh, P()),
                                weak_type=True)
    with jax.set_mesh(mesh):
        out = tg.graft({"s": like}, {"s": np.float32(2)}, {"": ""})["s"]
    assert out.weak_type and out.sharding == NamedSharding(mesh, P()) and out == 2.0
