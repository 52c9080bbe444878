"""What treegraft knows about a leaf without reading it: shape and dtype.

Works on anything with `.shape` and `.dtype` (jax and numpy arrays,
`jax.ShapeDtypeStruct`, orbax metadata) and on Python scalars, whose dtype is
their Python type: a Python `int` leaf accepts any scalar integer source.
Typed PRNG key arrays (`jax.random.key`) keep their key dtype (`key<fry>`),
which numpy cannot interpret: nothing here calls `np.dtype` on it.
"""

from __future__ import annotations

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
    "CAST_OPTIONS",
]

_PY_KINDS = {bool: "b", int: "iu", float: "f", complex: "c"}

# The values the `cast` option takes (DESIGN section 10).
CAST_OPTIONS = (False, True, "unsafe")

Spec = tuple[tuple[int, ...] | None, Any]


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

    The casting policy (DESIGN section 10): `cast=False` allows no dtype
    change (beyond a Python scalar meeting a dtype of its kind); `cast=True`
    allows `same_kind` casts that keep every value in range (float32 to
    bfloat16, int32 to float32, int8 to int32); anything that can change values
    (float to int, a narrower int, int to uint, complex to real) needs
    `cast="unsafe"`. Object and string arrays, and PRNG key arrays of another
    implementation or against plain arrays, are never cast.

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
    tk, sk = _kind(tdtype), _kind(sdtype)
    if isinstance(tdtype, type) or isinstance(sdtype, type):
        # A Python scalar on either side: any dtype of the same kind fits.
        if tk and sk and (sk in tk or tk in sk):
            return None
    arrow = f"{_name(sdtype)} -> {_name(tdtype)}"
    if not (_numeric(tk) and _numeric(sk)):
        return Mismatch(
            "dtype", f"{arrow}: only numeric arrays are cast (object and string arrays never are)"
        )
    safe = _same_kind(sdtype, tdtype)
    if cast == "unsafe" or (safe and not isinstance(cast, str) and bool(cast)):
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
