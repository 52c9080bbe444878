"""Leaf specs: the casting policy, typed PRNG keys, and exact byte counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from treegraft._tree import leaves as _leaves
from treegraft._tree.leaves import Mismatch, describe, format_bytes, mismatch, nbytes, spec_of


def spec(dtype):
    """A scalar's spec as spec_of gives it: Python scalar types stay types."""
    if dtype in (int, float, bool, complex):
        return (), dtype
    return (), np.dtype(dtype)


# (source dtype, target dtype): allowed under cast=True (numpy same_kind, in range).
SAME_KIND = [
    (np.float32, ml_dtypes.bfloat16),
    (np.float64, np.float32),
    (ml_dtypes.bfloat16, np.float32),
    (np.int32, np.float32),
    (np.int8, np.int32),
    (np.uint8, np.int16),
    (np.uint8, np.uint32),
    (np.bool_, np.int8),
    (np.float32, np.complex64),
    (np.complex128, np.complex64),
    (ml_dtypes.int4, np.int8),
    (np.int32, float),
]

# Casts that can change values: they need cast="unsafe".
UNSAFE = [
    (np.float32, np.uint8),
    (np.float32, np.int32),
    (ml_dtypes.bfloat16, np.int8),
    (np.int64, np.int32),
    (np.int32, np.uint32),
    (np.int8, np.uint8),
    (np.uint32, np.int32),
    (np.int8, ml_dtypes.int4),
    (np.complex64, np.float32),
    (np.int32, np.bool_),
    (np.float64, int),
]


def _name(dtype):
    return dtype.__name__ if dtype in (int, float) else np.dtype(dtype).name


def _id(pair):
    return f"{_name(pair[0])}->{_name(pair[1])}"


@pytest.mark.parametrize("pair", SAME_KIND, ids=[_id(p) for p in SAME_KIND])
def test_cast_true_allows_same_kind_casts(pair):
    source, target = pair
    assert mismatch(spec(target), spec(source), cast=True) is None
    assert mismatch(spec(target), spec(source), cast="unsafe") is None
    why = mismatch(spec(target), spec(source), cast=False)
    if why is not None:  # a Python scalar of the same kind needs no cast
        assert why == "dtype" and why.detail.endswith("casting is never implicit; pass cast=True")


@pytest.mark.parametrize("pair", UNSAFE, ids=[_id(p) for p in UNSAFE])
def test_casts_that_can_change_values_need_unsafe(pair):
    source, target = pair
    for cast in (False, True):
        why = mismatch(spec(target), spec(source), cast=cast)
        assert isinstance(why, Mismatch) and why == "dtype"
        lost = "drops the imaginary part" if source == np.complex64 else "can change values"
        assert why.detail.endswith(f"{lost}; pass cast='unsafe'"), why.detail
    assert mismatch(spec(target), spec(source), cast="unsafe") is None


def test_the_reason_names_both_dtypes_source_first():
    why = mismatch(spec(np.uint8), spec(np.float32), cast=True)
    assert why.detail == "float32 -> uint8 can change values; pass cast='unsafe'"


@pytest.mark.parametrize("cast", [False, True, "unsafe"])
@pytest.mark.parametrize(
    "source, target",
    [(object, np.float32), (np.float32, object), ("U3", np.float32), (np.int32, "S4"),
     ("U3", "U5")],
    ids=["object->float32", "float32->object", "str->float32", "int32->bytes", "str->str"],
)
def test_object_and_string_arrays_are_never_cast(source, target, cast):
    why = mismatch(spec(target), spec(source), cast=cast)
    assert why == "dtype"
    assert "only numeric arrays are cast (object and string arrays never are)" in why.detail


def test_shape_is_checked_before_dtype_and_says_both_sides():
    why = mismatch(((3,), np.dtype(np.float32)), ((2,), np.dtype(np.float32)), cast="unsafe")
    assert why == "shape" and why.detail == "shape (2,) in the source, (3,) in the state"


# ----------------------------------------------------------------------------
# Typed PRNG keys.
# ----------------------------------------------------------------------------

KEY = jax.random.key(0)
KEYS = jax.random.split(jax.random.key(1), 4)
RBG = jax.random.key(0, impl="rbg")


def test_spec_of_a_key_array_keeps_the_key_dtype():
    shape, dtype = spec_of(KEYS)
    assert shape == (4,) and _leaves.is_key_dtype(dtype) and dtype == KEYS.dtype
    assert describe(spec_of(KEYS)) == "key<fry>[4]"
    assert describe(spec_of(jax.eval_shape(lambda: KEY))) == "key<fry>[]"
    assert not _leaves.is_key_dtype(np.dtype(np.uint32))


def test_key_nbytes_counts_the_key_data():
    assert nbytes(spec_of(KEYS)) == 4 * 8  # threefry: two uint32 per key
    assert nbytes(spec_of(RBG)) == 16  # rbg: four uint32


@pytest.mark.parametrize("cast", [False, True, "unsafe"])
def test_keys_of_another_impl_are_never_cast(cast):
    why = mismatch(spec_of(KEY), spec_of(RBG), cast=cast)
    assert why == "dtype"
    assert why.detail == (
        "key<rbg> -> key<fry>: PRNG keys of different implementations are never cast"
    )


@pytest.mark.parametrize("cast", [False, True, "unsafe"])
def test_a_key_array_and_a_plain_array_do_not_mix(cast):
    data = jax.random.key_data(KEYS[0])  # uint32[2]
    one = jax.random.split(KEY, 2)  # key<fry>[2]
    for target, source in ((one, data), (data, one)):
        why = mismatch(spec_of(target), spec_of(source), cast=cast)
        assert why == "dtype"
        assert "a PRNG key array and a plain array are never cast" in why.detail


def test_same_keys_match():
    assert mismatch(spec_of(KEYS), spec_of(jax.random.split(KEY, 4)), cast=False) is None


# ----------------------------------------------------------------------------
# Byte counts.
# ----------------------------------------------------------------------------


def test_nbytes_never_overflows():
    huge = jax.ShapeDtypeStruct((2**32, 2**32), jnp.float32)
    assert nbytes(spec_of(huge)) == 2**66
    assert format_bytes(nbytes(spec_of(huge))) == "64.0 EiB"


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
     (5 * 2**30, "5.0 GiB"), (3 * 2**40, "3.0 TiB"), (2**50, "1.0 PiB"),
     (2**70, "1.0 ZiB"), (2**90, "1024.0 YiB")],
)
def test_format_bytes_units(n, text):
    assert format_bytes(n) == text
