"""The graft itself: plan, read what the plan needs, insert it into the state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from treegraft import _leaves
from treegraft._errors import GraftError
from treegraft._index import is_abstract
from treegraft._paths import Path, render_parts
from treegraft._plan import GraftPlan, plan
from treegraft._sharding import place
from treegraft._source import ReadRequest

__all__ = ["graft", "execute"]


def graft(
    state: Any,
    source: Any,
    mapping: Mapping[str, str],
    /,
    *,
    ignore_model_keys: Sequence[str] | str = (),
    ignore_restored_keys: Sequence[str] | str = (),
    strict: bool = True,
    cast: bool = False,
) -> Any:
    """Returns state with the leaves named by mapping taken from source.

    Plans first (every check, on metadata only, all problems in one error),
    then reads only the source leaves the plan needs, each once, placed with
    the sharding of the target leaf they replace. The result has exactly the
    state's structure, shapes and dtypes; leaves not grafted are the same
    objects as in state. The inputs are not modified; on error nothing is.

    Args:
      state: the pytree to graft into (arrays or `jax.ShapeDtypeStruct`s).
      source: a pytree, or a lazy `treegraft.Source` such as `OrbaxCheckpoint`.
      mapping: `{new_path: old_path}` (new <- old); patterns allowed.
      ignore_model_keys: see `treegraft.plan`.
      ignore_restored_keys: see `treegraft.plan`.
      strict: see `treegraft.plan`.
      cast: allow dtype differences, casting to the target's dtype.

    Returns:
      The new state.

    Raises:
      GraftError: as `treegraft.plan`, or when a source leaf has no value.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'enc': {'w': np.zeros(2)}, 'dec': {'w': np.zeros(2)}}
      >>> new = tg.graft(state, {'encoder': {'w': np.ones(2)}}, {'enc': 'encoder'})
      >>> new['enc']['w'], new['dec']['w']
      (array([1., 1.]), array([0., 0.]))
    """
    return execute(
        plan(
            state,
            source,
            mapping,
            ignore_model_keys=ignore_model_keys,
            ignore_restored_keys=ignore_restored_keys,
            strict=strict,
            cast=cast,
        )
    )


def execute(p: GraftPlan) -> Any:
    """Reads the leaves a plan needs and returns the new state."""
    tgt, src = p.target, p.source
    first_use: dict[int, int] = {}
    for ti, si, _ in p.pairs:
        first_use.setdefault(si, ti)
    if p.lazy is not None:
        order = list(first_use)
        requests = [
            ReadRequest(
                Path(src.paths[si]),
                tgt.leaves[first_use[si]],
                _read_dtype(src.leaves[si], tgt.leaves[first_use[si]], p.cast),
            )
            for si in order
        ]
        got = p.lazy.read(requests)
        value_of = dict(zip(order, got, strict=True))
    else:
        value_of = {si: src.leaves[si] for si in first_use}
        abstract = [si for si, v in value_of.items() if is_abstract(v)]
        if abstract:
            names = ", ".join(repr(render_parts(src.paths[si])) for si in abstract[:10])
            raise GraftError(
                f"{len(abstract)} source leaf(s) are abstract (jax.ShapeDtypeStruct) and have "
                f"no value to graft: {names}"
            )
    values = [value_of[si] for _, si, _ in p.pairs]
    likes = [tgt.leaves[ti] for ti, _, _ in p.pairs]
    placed = place(values, likes, cast=p.cast)
    out = list(tgt.leaves)
    for (ti, _, _), value in zip(p.pairs, placed, strict=True):
        out[ti] = value
    return tgt.treedef.unflatten(out)


def _read_dtype(source_leaf: Any, target_leaf: Any, cast: bool) -> Any:
    # Read in the source's own dtype: a checkpoint reader must never cast unasked.
    spec = _leaves.spec_of(target_leaf if cast else source_leaf)
    return spec[1]
