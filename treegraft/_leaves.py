"""What treegraft knows about a leaf without reading it: shape and dtype.

Works on anything with `.shape` and `.dtype` (jax and numpy arrays,
`jax.ShapeDtypeStruct`, orbax metadata) and on Python scalars, whose dtype is
their Python type: a Python `int` leaf accepts any scalar integer source.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import dtypes as jax_dtypes

from treegraft._errors import describe_leaf

__all__ = ["spec_of", "mismatch", "describe", "nbytes"]

_PY_KINDS = {bool: "b", int: "iu", float: "f", complex: "c"}

Spec = tuple[tuple[int, ...] | None, Any]


def spec_of(leaf: Any) -> Spec:
    """Returns `(shape, dtype)`; dtype is a Python type for Python scalars.

    Objects that are neither arrays nor scalars get `(None, type)`.
    """
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
        if isinstance(dtype, type) and dtype in _PY_KINDS:
            return tuple(shape), dtype  # a Python scalar saved by orbax
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


def mismatch(target: Spec, source: Spec, *, cast: bool = False) -> str | None:
    """Why a source leaf cannot fill a target leaf, or None when it can.

    Args:
      target: `(shape, dtype)` of the target leaf.
      source: `(shape, dtype)` of the source leaf.
      cast: allow different dtypes (the value is then cast to the target's).

    Returns:
      "shape", "dtype", "type" or None.
    """
    tshape, tdtype = target
    sshape, sdtype = source
    if tshape is None or sshape is None:
        # Opaque leaves (strings, objects): the types must agree.
        return None if (tshape, tdtype) == (sshape, sdtype) else "type"
    if tshape != sshape:
        return "shape"
    if tdtype == sdtype or cast:
        return None
    if isinstance(tdtype, type) or isinstance(sdtype, type):
        # A Python scalar on either side: any dtype of the same kind fits.
        tk, sk = _kind(tdtype), _kind(sdtype)
        if tk and sk and (sk in tk or tk in sk):
            return None
    return "dtype"


def describe(spec: Spec) -> str:
    """Renders a spec as `float32[3, 4]`, `int (python)[]`, or a type name."""
    shape, dtype = spec
    if isinstance(dtype, type):
        name = f"{dtype.__name__} (python)" if dtype in _PY_KINDS else dtype.__name__
        return name if shape is None else describe_leaf(shape, name)
    return describe_leaf(shape, dtype)


def nbytes(spec: Spec) -> int:
    """Bytes of an array leaf of this spec (0 for scalars and objects)."""
    shape, dtype = spec
    if shape is None or not isinstance(dtype, np.dtype):
        return 0
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
