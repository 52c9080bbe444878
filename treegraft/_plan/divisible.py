"""Check that every abstract target's sharding divides its shape.

A `jax.ShapeDtypeStruct` accepts any sharding, but jax can only place an array
whose sharded axes its mesh axes divide evenly. Without this check such a
target passes `plan` and fails in `execute` with jax's own `IndivisibleError`,
after the reads (docs/design.md section 12: shardings are the target's).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax.sharding import NamedSharding

from treegraft._errors import Problem
from treegraft._parse.paths import Path, render_parts
from treegraft._plan.resolution import Resolution
from treegraft._tree import leaves as _leaves

__all__ = ["check_divisible", "uneven_split"]


def check_divisible(res: Resolution) -> list[Problem]:
    """One problem per grafted abstract target whose sharding does not divide its shape."""
    tgt = res.inputs.tgt
    problems = []
    for pair in res.pairs:
        leaf = tgt.leaves[pair.target]
        if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
            continue
        sharding = leaf.sharding
        shape = tuple(leaf.shape)
        cut = uneven_split(shape, sharding)
        if cut is None:
            continue
        path = render_parts(tgt.paths[pair.target])
        problems.append(
            Problem(
                "indivisible",
                f"{path!r} in the state is {_leaves.describe(_leaves.spec_of(leaf))} "
                f"with sharding {_sharding_text(sharding)}: {cut}",
                target=Path(tgt.paths[pair.target]),
                remedy="give the target a sharding whose mesh axes divide each axis they "
                "split (or None to replicate that axis), or a shape that is a multiple",
            )
        )
    return problems


@functools.lru_cache(maxsize=1024)
def uneven_split(shape: tuple[int, ...], sharding: Any) -> str | None:
    """Which axes of `shape` `sharding` splits unevenly, in words; None when it fits.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
      >>> print(uneven_split((5,), NamedSharding(mesh, P("x"))))
      None
    """
    try:
        sharding.shard_shape(shape)
        return None
    except ValueError as e:  # jax's IndivisibleError (a ValueError)
        refusal = str(e)
    ways = _ways(sharding, len(shape))
    uneven = [(a, n) for a, n in enumerate(ways or ()) if n > 1 and shape[a] % n]
    if not uneven:  # not a mesh spec: jax's own words
        return refusal
    return "; ".join(f"axis {a} of size {shape[a]} cannot be split {n} ways evenly"
                     for a, n in uneven)


def _ways(sharding: Any, ndim: int) -> tuple[int, ...] | None:
    """How many ways a NamedSharding splits each of `ndim` axes; None for other shardings."""
    if not isinstance(sharding, NamedSharding):
        return None
    sizes = dict(sharding.mesh.shape)
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    out = []
    for entry in spec[:ndim]:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(math.prod(sizes[n] for n in names))
    return tuple(out)


def _sharding_text(sharding: Any) -> str:
    if isinstance(sharding, NamedSharding):
        mesh = ", ".join(f"{k}={v}" for k, v in dict(sharding.mesh.shape).items())
        return f"{sharding.spec} over a mesh of {mesh}"
    return repr(sharding)
