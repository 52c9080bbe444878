"""Check, before a graft reads anything, that jax can hold every grafted target's dtype.

With 64-bit types off (`jax_enable_x64` False, jax's default), jax still makes
a `jax.ShapeDtypeStruct` of float64, but puts a float64 host value on a device
as float32: a silent cast of every value read (docs/design.md section 4:
values change only when asked). `convert` writes from the host and keeps
64-bit values, so this is a check of `execute`, not of `plan`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import Problem
from treegraft._parse.paths import Path, render_parts
from treegraft._tree import leaves as _leaves

__all__ = ["check_x64"]


def check_x64(targets: Iterable[int], leaves: Sequence[Any],
              paths: Sequence[tuple[Any, ...]], *, where: str = "the state") -> list[Problem]:
    """One problem per device target (by index into leaves) of a dtype jax would narrow.

    Empty whenever 64-bit types are on for the calling thread, or no target
    is a `jax.Array` or `jax.ShapeDtypeStruct` of a 64-bit dtype. Messages
    name the leaves as in `where`.

    Example:
      >>> import jax, numpy as np
      >>> with jax.enable_x64(False):
      ...     [p.kind for p in check_x64([0], [jax.ShapeDtypeStruct((2,), np.float64)], [("w",)])]
      ['x64']
    """
    if jax.config.read("jax_enable_x64"):
        return []
    problems = []
    for target in targets:
        leaf = leaves[target]
        if not isinstance(leaf, jax.ShapeDtypeStruct | jax.Array):
            continue
        narrowed = _narrowed(leaf.dtype)
        if narrowed is None:
            continue
        path = render_parts(paths[target])
        problems.append(
            Problem(
                "x64",
                f"{path!r} in {where} is {_leaves.describe(_leaves.spec_of(leaf))}, which "
                f"jax puts on a device as {narrowed} while its 64-bit types are off",
                target=Path(paths[target]),
                remedy="turn jax's 64-bit types on for the graft and the code that uses its "
                "result (jax.config.update('jax_enable_x64', True), or `with "
                "jax.enable_x64(True):`), or give the target the narrower dtype and pass "
                "cast=True",
            )
        )
    return problems


@functools.lru_cache(maxsize=64)
def _narrowed(dtype: Any) -> str | None:
    """The dtype jax makes of dtype with 64-bit types off, where that differs; else None."""
    if _leaves.is_key_dtype(dtype):
        return None
    try:
        wanted = np.dtype(dtype)
    except TypeError:
        return None
    with jax.enable_x64(False):
        made = np.dtype(jax.dtypes.canonicalize_dtype(wanted))
    return None if made == wanted else str(made)
