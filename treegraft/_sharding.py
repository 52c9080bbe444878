"""Placing values like the leaves they replace: sharding, dtype, container kind.

A grafted leaf takes the sharding of the target leaf (`jax.Array.sharding`, or
`.sharding` of a `jax.ShapeDtypeStruct`); numpy targets stay numpy, Python
scalars stay Python scalars. Values already placed right are returned as they
are, without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from treegraft import _leaves
from treegraft._errors import GraftError, MismatchError
from treegraft._paths import render_parts
from treegraft._tree import flatten_parts

__all__ = ["propagate_sharding", "place"]

_PY_SCALARS = (bool, int, float, complex)


def place(values: Sequence[Any], likes: Sequence[Any], *, cast: bool = False) -> list[Any]:
    """Places each value like the corresponding leaf of likes.

    Args:
      values: the new values (arrays or scalars).
      likes: the leaves they replace.
      cast: cast values to the like's dtype where it differs.

    Returns:
      The placed values, in order. The inputs are not modified.
    """
    out: list[Any] = [None] * len(values)
    put_at: list[int] = []
    put_values: list[Any] = []
    put_shardings: list[Any] = []
    for k, (value, like) in enumerate(zip(values, likes, strict=True)):
        if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
            if cast or _same_kind_scalar(value, like):
                value = _as_dtype(value, like.dtype)
            sharding = like.sharding
            if isinstance(value, jax.Array) and (sharding is None or value.sharding == sharding):
                out[k] = value
            elif sharding is None:
                out[k] = jax.device_put(value)
            elif not sharding.is_fully_addressable and _is_local(value):
                out[k] = _local_to_global(value, like)
            else:
                put_at.append(k)
                put_values.append(value)
                put_shardings.append(sharding)
        elif isinstance(like, np.ndarray | np.generic):
            array = _to_host(value)
            if cast or array.dtype != like.dtype:
                array = array.astype(like.dtype)
            out[k] = array if isinstance(like, np.ndarray) else array[()]
        elif type(like) in _PY_SCALARS:
            out[k] = type(like)(_to_host(value).item())
        else:
            out[k] = value
    if put_at:
        placed = jax.device_put(put_values, put_shardings)
        for k, value in zip(put_at, placed, strict=True):
            out[k] = value
    return out


def _same_kind_scalar(value: Any, like: Any) -> bool:
    # A Python scalar of the target's kind (the plan allows it) must take the
    # target's dtype: jax alone would make it a weakly typed int32 or float32.
    return type(value) in _PY_SCALARS and (
        _leaves.mismatch(_leaves.spec_of(like), _leaves.spec_of(value)) is None
    )


def _as_dtype(value: Any, dtype: Any) -> Any:
    if getattr(value, "dtype", None) == dtype:
        return value
    if isinstance(value, jax.Array):
        return value.astype(dtype)
    return np.asarray(value, dtype=dtype)


def _is_local(value: Any) -> bool:
    return not isinstance(value, jax.Array) or value.is_fully_addressable


def _local_to_global(value: Any, like: Any) -> jax.Array:
    """Places a process-local value in a sharding that spans several processes.

    The value (numpy, a Python scalar, or a jax.Array on this process's devices)
    is the same on every process, as in any multi-controller program: each
    process places only the blocks its own devices hold. `jax.device_put` would
    instead gather the whole value from every process, to check that it is the
    same everywhere, and fetch it to the host: the full array's bytes times the
    number of processes, per leaf.
    """
    local = value if isinstance(value, jax.Array) else np.asarray(value, dtype=like.dtype)
    return jax.make_array_from_callback(
        tuple(like.shape), like.sharding, lambda index: local[index], dtype=like.dtype
    )


def _to_host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        raise GraftError(
            "cannot turn a global jax.Array that spans several processes into a numpy "
            f"array (shape {value.shape}, sharding {value.sharding}); make the target a "
            "jax.Array or jax.ShapeDtypeStruct with a sharding instead"
        )
    return np.asarray(value)


def propagate_sharding(values: Any, like: Any, /) -> Any:
    """Returns values placed like the leaves of `like` (same structure).

    Each leaf goes to the sharding of the corresponding leaf of `like`
    (`jax.Array` or `jax.ShapeDtypeStruct` with `.sharding`); numpy leaves of
    `like` give numpy arrays, Python scalars give Python scalars. Arrays
    already on the right sharding are not copied. The input is not modified;
    use the return value.

    Args:
      values: a pytree of arrays.
      like: a pytree of the same structure whose leaves say where to go.

    Returns:
      A pytree with the structure of `like`.

    Raises:
      MismatchError: the two trees do not have the same structure, or leaves
        differ in shape.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, treegraft as tg
      >>> one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      >>> like = {'w': jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one_device)}
      >>> out = tg.propagate_sharding({'w': np.ones(2, np.float32)}, like)
      >>> out['w'].sharding == like['w'].sharding
      True
    """
    vpaths, vleaves, _ = flatten_parts(values)
    lpaths, lleaves, ldef = flatten_parts(like)
    if vpaths != lpaths:
        extra = sorted(render_parts(p) for p in set(vpaths) - set(lpaths))
        missing = sorted(render_parts(p) for p in set(lpaths) - set(vpaths))
        raise MismatchError(
            "propagate_sharding: values and like differ in structure: "
            f"in like only: {missing[:10]}, in values only: {extra[:10]}"
        )
    # A sharding fits any shape it divides: check shapes, or a wrong-shaped
    # value would be placed silently.
    bad = []
    for parts, v, lk in zip(vpaths, vleaves, lleaves, strict=True):
        vspec, lspec = _leaves.spec_of(v), _leaves.spec_of(lk)
        if vspec[0] is not None and lspec[0] is not None and vspec[0] != lspec[0]:
            bad.append(
                f"  {render_parts(parts)!r}: in values {_leaves.describe(vspec)}, "
                f"in like {_leaves.describe(lspec)}"
            )
    if bad:
        raise MismatchError(
            f"propagate_sharding: values and like differ in shape ({len(bad)} leaves):\n"
            + "\n".join(bad[:20]),
            problems=bad,
        )
    return ldef.unflatten(place(vleaves, lleaves))
