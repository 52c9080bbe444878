"""What treegraft knows about a leaf without reading it: shape and dtype.

Works on anything with `.shape` and `.dtype` (jax and numpy arrays,
`jax.ShapeDtypeStruct`, orbax metadata) and on Python scalars, whose dtype is
their Python type: a Python `int` leaf accepts any scalar integer source. A
Python scalar source has a value but no dtype: whether it fits a target is a
question of its value (`scalar_mismatch`), asked where the value is known.
Typed PRNG key arrays (`jax.random.key`) keep their key dtype (`key<fry>`),
which numpy cannot interpret: nothing here calls `np.dtype` on it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from jax import dtypes as jax_dtypes

from treegraft._errors import GraftError, describe_leaf
from treegraft._parse.paths import render_parts

__all__ = [
    "spec_of",
    "mismatch",
    "Mismatch",
    "describe",
    "nbytes",
    "format_bytes",
    "is_key_dtype",
    "check_not_traced",
    "scalar_mismatch",
    "scalar_array",
    "values_checked",
    "first_overflow",
]

_PY_KINDS = {bool: "b", int: "iu", float: "f", complex: "c"}
# The dtype a Python scalar type stands for where its range matters (an `int`
# has no bound, so it is not here).
_PY_DTYPES = {
    bool: np.dtype(np.bool_),
    float: np.dtype(np.float64),
    complex: np.dtype(np.complex128),
}


Spec = tuple[tuple[int, ...] | None, Any]


@functools.cache
def array_type() -> type[jax.Array]:
    """jax's concrete array type (`ArrayImpl`), looked up on first use.

    Fast paths compare `type(x) is array_type()`: an isinstance check against
    `jax.Array` (an ABC) costs some microseconds a leaf. Not at import: making
    an array starts jax's backend, which must wait for `jax.distributed`. A
    host value put on a device, not `jnp.zeros`: that compiles a program
    (30 ms of a fresh process's first graft). Made under
    `ensure_compile_time_eval`: a first use inside `jax.jit` would otherwise
    cache the tracer's type for the whole process. Allowed under any transfer
    guard: the one scalar is treegraft's own, not the caller's data.
    """
    with jax.ensure_compile_time_eval(), jax.transfer_guard("allow"):
        return type(jax.device_put(np.zeros((), np.float32)))


def is_key_dtype(dtype: Any) -> bool:
    """Whether dtype is a typed PRNG key dtype (`key<fry>`, `key<rbg>`, ...)."""
    if dtype is None or isinstance(dtype, type | np.dtype):
        return False
    try:
        return bool(jax_dtypes.issubdtype(dtype, jax_dtypes.prng_key))
    except TypeError:
        return False


def spec_of(leaf: Any) -> Spec:
    """Returns `(shape, dtype)`; dtype is a Python type for Python scalars.

    Key arrays keep their key dtype. Objects that are neither arrays nor
    scalars get `(None, type)`.
    """
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
        if isinstance(dtype, type) and dtype in _PY_KINDS:
            return tuple(shape), dtype  # a Python scalar saved by orbax
        if is_key_dtype(dtype):
            return tuple(shape), dtype
        return tuple(shape), np.dtype(dtype)
    t = type(leaf)
    if t in _PY_KINDS:
        return (), t
    return None, t


def _kind(dtype: Any) -> str:
    if isinstance(dtype, type) and dtype in _PY_KINDS:
        return _PY_KINDS[dtype]
    if not isinstance(dtype, np.dtype):
        return ""
    if dtype.kind == "V":
        # ml_dtypes (bfloat16, float8_*, int4, ...) report kind 'V'.
        for kind, base in (("f", np.floating), ("i", np.signedinteger), ("u", np.unsignedinteger)):
            if jax_dtypes.issubdtype(dtype, base):
                return kind
    return dtype.kind


def _bits(dtype: Any, kind: str) -> float:
    """Value bits of a numeric dtype (int4 has 4, though numpy stores it in a byte)."""
    if isinstance(dtype, type):
        return math.inf if dtype is int else {bool: 1, float: 64, complex: 128}[dtype]
    if kind in "iu":
        return float(jax.numpy.iinfo(dtype).bits)
    return float(dtype.itemsize * 8)


def _narrower(target: Any, source: Any) -> bool:
    """Whether a Python float or complex leaf cannot hold every value of a dtype of its kind."""
    wide = _PY_DTYPES.get(target) if target in (float, complex) else None
    return wide is not None and isinstance(source, np.dtype) and source.itemsize > wide.itemsize


def _same_kind(source: Any, target: Any) -> bool:
    """Whether casting source to target is a numpy `same_kind` cast that keeps range.

    Allowed: any cast within floats or within complex numbers (a precision
    change), bool to anything, ints to floats or complex, floats to complex,
    and ints to ints (or uints to ints) wide enough for every value. Not
    allowed: float to int, complex to real, narrower ints, int to uint.
    """
    ks, kt = _norm(_kind(source)), _norm(_kind(target))
    if not ks or not kt or ks not in "buifc" or kt not in "buifc":
        return False
    if ks == "b":
        return True
    if ks == kt:
        return ks in "fc" or _bits(target, kt) >= _bits(source, ks)
    if ks == "u" and kt == "i":
        return _bits(target, kt) > _bits(source, ks)
    return (ks in "ui" and kt in "fc") or (ks == "f" and kt == "c")


def _norm(kind: str) -> str:
    return "i" if kind == "iu" else kind  # a Python int


def _numeric(kind: str) -> bool:
    return kind in ("b", "u", "i", "f", "c", "iu")



def _component(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The float dtype of a complex dtype's parts; a float dtype itself."""
    return np.empty((), dtype).real.dtype if dtype.kind == "c" else dtype


@functools.cache
def _float_facts(dtype: np.dtype[Any]) -> tuple[float, bool, bool, bool]:
    """(largest finite value, holds inf, holds NaN, holds 0 and -1) of a float dtype.

    Probed by casting, since the ml_dtypes formats differ: float8_e4m3fn has no
    inf (inf becomes NaN), float4_e2m1fn neither inf nor NaN (inf becomes 6,
    NaN -0), float8_e8m0fnu neither 0 nor negative numbers (both become NaN).
    """
    import ml_dtypes

    with np.errstate(all="ignore"):
        probe = np.array([np.inf, np.nan, 0.0, -1.0]).astype(dtype).astype(np.float64)
    return (
        float(ml_dtypes.finfo(dtype).max),  # inf for a longdouble beyond float64
        bool(np.isposinf(probe[0])),
        bool(np.isnan(probe[1])),
        bool(probe[2] == 0 and probe[3] == -1),
    )


def _range(source: Any, target: Any) -> str:
    """What a `same_kind` cast does to the range of values (docs/design.md section 10).

    "kept": every source value has a finite value of the target (a precision
    change at most). "checked": values beyond the target's range become inf,
    which the cast checks for (float32 to float16 or bfloat16, float64 to
    float32), so no inf comes out of a finite value. "lost": values change
    beyond rounding, silently: an int range wider than the float's (int32 to
    float16), a narrow float format without inf (float32 to float8_e4m3fn
    gives NaN, to float4_e2m1fn saturates), any float8 narrowing, a target
    without zero or negative numbers (float8_e8m0fnu). Int and bool targets
    are decided by `_same_kind`.
    """
    kt = _norm(_kind(target))
    if kt not in "fc":
        return "kept"
    if isinstance(source, type) and source is not bool:
        return "checked"  # a Python scalar: its value is checked where it is known
    tdtype = _component(_PY_DTYPES.get(target, target))
    tmax, _, _, signed = _float_facts(tdtype)
    if not signed:
        return "lost"
    ks = _norm(_kind(source))
    if ks == "b":
        return "kept"
    if ks in "ui":
        info = jax.numpy.iinfo(source)
        return "kept" if max(int(info.max), -int(info.min)) <= tmax else "lost"
    sdtype = _component(_PY_DTYPES.get(source, source))
    if sdtype == tdtype:
        return "kept"
    smax, sinf, snan, _ = _float_facts(sdtype)
    tmax, tinf, tnan, _ = _float_facts(tdtype)
    if smax <= tmax and (tinf or not sinf) and (tnan or not snan):
        return "kept"
    # An overflow is seen as an inf only where the format has one; the 8-bit
    # and narrower formats hold unscaled values badly even with one.
    if tdtype.itemsize >= 2 and tinf and tnan:
        return "checked"
    return "lost"


def _lost_reason(source: Any, target: Any) -> str:
    """Why `_range` says "lost", in a few words."""
    tdtype = _component(_PY_DTYPES.get(target, target))
    tmax, tinf, tnan, signed = _float_facts(tdtype)
    if not signed:
        return f"{_name(target)} holds neither 0 nor negative numbers (they become NaN)"
    lacks = [name for name, held in (("inf", tinf), ("NaN", tnan)) if not held]
    missing = f", no {' or '.join(lacks)}" if lacks else ""
    return f"{_name(target)} holds at most {tmax:g}{missing}: values can overflow"


def values_checked(source: Any, target: Any, cast: bool | str) -> bool:
    """Whether a cast of arrays from source to target must check its values for overflow.

    True for the `cast=True` casts that `_range` calls "checked": float32 to
    bfloat16 or float16, float64 to float32. The cast then refuses a finite
    value that became inf (`first_overflow`).
    """
    if cast == "unsafe" or not cast or source == target:
        return False
    return _values_checked(source, target)


@functools.lru_cache(maxsize=1024)
def _values_checked(source: Any, target: Any) -> bool:
    if not (isinstance(source, np.dtype) and isinstance(target, np.dtype | type)):
        return False
    if is_key_dtype(source) or is_key_dtype(target):
        return False
    return _same_kind(source, target) and _range(source, target) == "checked"


def first_overflow(source: Any, result: Any) -> tuple[tuple[int, ...], Any] | None:
    """The first element a cast turned from finite to inf or NaN, or None.

    Args:
      source: the values before the cast (numpy).
      result: the same values after it (numpy, same shape).

    Returns:
      `(index, source value)` of the first such element, or None.
    """
    source, result = np.asarray(source), np.asarray(result)
    with np.errstate(all="ignore"):
        if source.dtype.kind == "f" and _kind(result.dtype) == "f":
            # Fast path: only a value beyond the target's largest can overflow,
            # and numpy compares float32 fast (isfinite on bfloat16 is slow).
            if not (np.abs(source) > _float_facts(result.dtype)[0]).any():
                return None
        bad = np.isfinite(source) & ~np.isfinite(result)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return index, source[index]


def _value_name(value: Any) -> str:
    """`the Python int 300`; a very long int by its first digits and length."""
    text = repr(value)
    if len(text) > 40:
        text = f"{text[:12]}... ({len(text.lstrip('-'))} digits)"
    return f"the Python {type(value).__name__} {text}"


def _as_float(value: Any, kind: str) -> complex | float | None:
    """value as a Python float (complex for a complex target), None if too large."""
    try:
        return complex(value) if kind == "c" else float(value)
    except OverflowError:  # an int beyond float's range (2**1024 and more)
        return None


def scalar_mismatch(value: Any, target: Any, *, cast: bool | str = False) -> Mismatch | None:
    """Why a Python scalar source value cannot fill a leaf of dtype target, or None.

    A Python scalar has no dtype: its value decides (docs/design.md section 4, "shape
    and dtype must match exactly"). With `cast=False` it fills a leaf of its
    kind (an `int` an int or uint dtype, a `float` a float dtype) that holds
    the value exactly: 300 does not fit int8, -1 no uint dtype, 2**40 not
    int32, 0.1 not float32 (0.5 does). With `cast=True` it also takes the
    `same_kind` casts of arrays (an `int` into a float dtype) and rounds to
    the nearest value, but never to inf or NaN: 1e10 does not fit float16, 0
    not float8_e8m0fnu. With `cast="unsafe"` any number fits (ints wrap, as
    numpy's casts do). A Python scalar leaf takes a value of its own type (a
    Python `float` leaf an `int` under `cast=True`, if a float holds it).

    Args:
      value: a `bool`, `int`, `float` or `complex`.
      target: the target leaf's dtype (a numpy dtype or a Python type).
      cast: False, True or "unsafe".

    Returns:
      None, or a "dtype" `Mismatch` whose detail says why and what to do.
    """
    why = mismatch(((), target), ((), type(value)), cast=cast)
    if why is not None or cast == "unsafe":
        return why
    shown = _value_name(value)
    if isinstance(target, type):
        # A Python scalar leaf: only an int too large for a float is out of range.
        if target in (float, complex) and _as_float(value, "f") is None:
            return Mismatch("dtype", f"{shown} is beyond the range of a Python {target.__name__}")
        return None
    kind = _norm(_kind(target))
    if kind == "b":
        return None  # a bool, or cast said the kind may change
    if kind in "ui":
        info = jax.numpy.iinfo(target)
        if int(info.min) <= int(value) <= int(info.max):
            return None
        return Mismatch(
            "dtype",
            f"{shown} is outside the range of {_name(target)} ({info.min} to {info.max}): "
            "make the state leaf a dtype that holds it, or pass cast='unsafe' to wrap it",
        )
    number = _as_float(value, kind)
    if number is None:
        return Mismatch("dtype", f"{shown} is beyond the range of any float; "
                        "make the state leaf an int, or pass cast='unsafe'")
    with np.errstate(all="ignore"):
        got = np.array(number).astype(target).astype(np.complex128 if kind == "c" else np.float64)
    tmax, tinf, _, _ = _float_facts(_component(target))
    pairs: list[tuple[float, float]] = (
        [(number.real, float(got.real)), (number.imag, float(got.imag))]
        if kind == "c"
        else [(float(number.real), float(got))]
    )
    inexact = False
    for want, have in pairs:
        if math.isnan(want):
            ok = math.isnan(have)
        elif math.isinf(want):
            ok = have == want
        else:
            ok = math.isfinite(have) and (tinf or abs(want) <= tmax)
            inexact = inexact or have != want
        if not ok:
            shown_got = complex(got) if kind == "c" else float(got)
            return Mismatch(
                "dtype",
                f"{shown} does not fit {_name(target)} (it would be {shown_got!r}); make the "
                "state leaf a dtype that holds it, or pass cast='unsafe'",
            )
    if inexact and not cast:
        return Mismatch(
            "dtype",
            f"{shown} is not exactly a {_name(target)} value (it would be "
            f"{complex(got) if kind == 'c' else float(got)!r}); pass cast=True to round it",
        )
    return None


def scalar_array(value: Any, dtype: Any) -> np.ndarray:
    """A Python scalar as a 0-d numpy array of dtype, cast as `cast='unsafe'` would.

    Call it once `scalar_mismatch` has allowed the value. Ints outside the
    dtype wrap around, as numpy's array casts do (numpy itself raises
    OverflowError for them); an int beyond float's range becomes inf; a
    complex loses its imaginary part in a real dtype.
    """
    dtype = np.dtype(dtype)
    kind = _norm(_kind(dtype))
    if isinstance(value, complex) and kind != "c":
        value = value.real
    if kind in "ui" and isinstance(value, int):
        info = jax.numpy.iinfo(dtype)
        value = int(value)
        if not int(info.min) <= value <= int(info.max):
            span = 1 << int(info.bits)
            value %= span
            if value > int(info.max):
                value -= span
    elif kind in "fc" and isinstance(value, int) and not isinstance(value, bool):
        number = _as_float(value, "f")
        value = (math.inf if value > 0 else -math.inf) if number is None else number
    with np.errstate(all="ignore"):
        return np.array(value).astype(dtype)


class Mismatch(str):
    """Why a source leaf cannot fill a target leaf: "shape", "dtype" or "type".

    It is the kind itself (a `str`, so `why == "dtype"` holds) and carries a
    short explanation in `.detail`, e.g. "float32 -> uint8 can change values;
    pass cast='unsafe'".
    """

    detail: str

    def __new__(cls, kind: str, detail: str = "") -> Mismatch:
        self = super().__new__(cls, kind)
        self.detail = detail
        return self

    # Shown as the plain kind, as it is stored (e.g. as a `Problem.kind`).
    __repr__ = str.__repr__

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (Mismatch, (str(self), self.detail))


def _name(dtype: Any) -> str:
    return dtype.__name__ if isinstance(dtype, type) else str(dtype)


def mismatch(target: Spec, source: Spec, *, cast: bool | str = False) -> Mismatch | None:
    """Why a source leaf cannot fill a target leaf, or None when it can.

    The casting policy (docs/design.md section 10): `cast=False` allows no dtype
    change (beyond a Python scalar meeting a dtype of its kind; a Python
    scalar source's value is checked by `scalar_mismatch`); `cast=True`
    allows `same_kind` casts that keep every value in range (float32 to
    bfloat16, int32 to float32, int8 to int32), where a float narrowing
    (float32 to bfloat16 or float16, float64 to float32) checks its values
    as it casts (`values_checked`); anything that can change values (float
    to int, a narrower int, int to uint, complex to real, an int range wider
    than the float's such as int32 to float16, a float into an 8-bit or
    narrower float, anything into float8_e8m0fnu) needs `cast="unsafe"`.
    Object and string arrays, and PRNG key arrays of another implementation
    or against plain arrays, are never cast.

    Args:
      target: `(shape, dtype)` of the target leaf.
      source: `(shape, dtype)` of the source leaf.
      cast: False, True or "unsafe" (the caller validates the value).

    Returns:
      None, or a `Mismatch`: "shape", "dtype" or "type", with a `.detail`
      saying why and what to pass (for dtypes).
    """
    tshape, tdtype = target
    sshape, sdtype = source
    if tshape is None or sshape is None:
        # Opaque leaves (strings, objects): the types must agree.
        if (tshape, tdtype) == (sshape, sdtype):
            return None
        return Mismatch("type", f"{_name(sdtype)} in the source, {_name(tdtype)} in the state")
    if tshape != sshape:
        return Mismatch("shape", f"shape {sshape} in the source, {tshape} in the state")
    tkey, skey = is_key_dtype(tdtype), is_key_dtype(sdtype)
    if tkey or skey:
        if tkey and skey and tdtype == sdtype:
            return None
        if tkey and skey:
            why = "PRNG keys of different implementations are never cast"
        else:
            why = (
                "a PRNG key array and a plain array are never cast into each other "
                "(convert with jax.random.key_data or jax.random.wrap_key_data first)"
            )
        return Mismatch("dtype", f"{_name(sdtype)} -> {_name(tdtype)}: {why}")
    if tdtype == sdtype:
        return None
    return _dtype_mismatch(tdtype, sdtype, cast)


@functools.lru_cache(maxsize=1024)
def _dtype_mismatch(tdtype: Any, sdtype: Any, cast: bool | str) -> Mismatch | None:
    """The dtype half of `mismatch`, for two different plain dtypes (cached per pair).

    Computed once per pair of dtypes: a graft of 50,000 leaves asks for a
    few pairs, 100,000 times.
    """
    tk, sk = _kind(tdtype), _kind(sdtype)
    if isinstance(tdtype, type) or isinstance(sdtype, type):
        # A Python scalar on either side: a dtype of the same kind fits (a
        # Python scalar source by value: `scalar_mismatch`), unless the Python
        # leaf cannot hold every value of the source dtype (a longdouble in a
        # Python float, which is a float64).
        if tk and sk and (sk in tk or tk in sk) and not _narrower(tdtype, sdtype):
            return None
    arrow = f"{_name(sdtype)} -> {_name(tdtype)}"
    if not (_numeric(tk) and _numeric(sk)):
        return Mismatch(
            "dtype", f"{arrow}: only numeric arrays are cast (object and string arrays never are)"
        )
    safe = _same_kind(sdtype, tdtype)
    if cast == "unsafe":
        return None
    if safe and _range(sdtype, tdtype) == "lost":
        return Mismatch(
            "dtype", f"{arrow}: {_lost_reason(sdtype, tdtype)}; pass cast='unsafe'"
        )
    if safe and not isinstance(cast, str) and bool(cast):
        return None
    if safe:
        return Mismatch("dtype", f"{arrow}: casting is never implicit; pass cast=True")
    if _norm(sk) == "c" and _norm(tk) != "c":
        return Mismatch("dtype", f"{arrow} drops the imaginary part; pass cast='unsafe'")
    return Mismatch("dtype", f"{arrow} can change values; pass cast='unsafe'")


def describe(spec: Spec) -> str:
    """Renders a spec as `float32[3, 4]`, `int (python)[]`, or a type name."""
    shape, dtype = spec
    if isinstance(dtype, type):
        name = f"{dtype.__name__} (python)" if dtype in _PY_KINDS else dtype.__name__
        return name if shape is None else describe_leaf(shape, name)
    return describe_leaf(shape, dtype)


def nbytes(spec: Spec) -> int:
    """Bytes of an array leaf of this spec (0 for scalars and objects).

    Computed with Python ints, so it never overflows (`float32[2**32, 2**32]`
    is 64 EiB, not 0).
    """
    shape, dtype = spec
    if shape is None or isinstance(dtype, type):
        return 0
    if not isinstance(dtype, np.dtype) and not is_key_dtype(dtype):
        return 0
    return math.prod(int(d) for d in shape) * int(dtype.itemsize)


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def format_bytes(n: int) -> str:
    """Renders a byte count as B, KiB, MiB, GiB, TiB, PiB (up to YiB).

    Exact for any Python int: the unit is chosen with integer arithmetic.

    Example:
      >>> format_bytes(1536), format_bytes(2**32 * 2**32 * 4)
      ('1.5 KiB', '64.0 EiB')
    """
    n = int(n)
    if abs(n) < 1024:
        return f"{n} B"
    unit = 0
    scale = 1024
    while unit < len(_UNITS) - 1 and abs(n) >= scale * 1024:
        scale *= 1024
        unit += 1
    return f"{n / scale:.1f} {_UNITS[unit]}"


def check_not_traced(leaves: list[Any], paths: list[tuple[Any, ...]], what: str) -> None:
    """Raises when a leaf is a jax tracer: treegraft runs outside `jax.jit`.

    Args:
      leaves: the leaves of a tree.
      paths: their parts, in the same order (for the message).
      what: how the message names the tree ("the state", "the source").

    Raises:
      GraftError: naming the first traced leaf and the remedy.
    """
    tracer = jax.core.Tracer
    # One isinstance per leaf type, not per leaf: this runs on every tree indexed.
    if not any(issubclass(t, tracer) for t in set(map(type, leaves))):
        return
    for parts, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, tracer):
            where = render_parts(parts) or "the root"
            raise GraftError(
                f"{what} holds a traced value at {where!r} ({type(leaf).__name__}): "
                "treegraft runs outside jax.jit / jax.grad / jax.vmap. Plan and graft "
                "outside the traced function, then pass the new state in as an argument"
            )
