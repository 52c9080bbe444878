"""The graft itself: plan, read what the plan needs, insert it into the state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from treegraft import _leaves
from treegraft._display import ProgressBar
from treegraft._errors import GraftError
from treegraft._index import is_abstract
from treegraft._paths import Path, render_parts
from treegraft._plan import GraftPlan, format_bytes, plan
from treegraft._sharding import place
from treegraft._source import ReadRequest, Source

log = logging.getLogger("treegraft")
_BATCHED_FROM = 256 * 2**20  # reads this large are batched when progress is asked
_BATCH = 64 * 2**20

__all__ = ["graft", "execute", "plan_on_every_process"]


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
    progress: bool | Callable[[int, int], None] = False,
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
      progress: for a checkpoint source, report reading progress: True draws a
        bar on stderr (on a terminal), a callable is called with
        `(bytes_done, bytes_total)`. Reads of at least 256 MiB are then done
        in batches; progress is also logged to the `treegraft` logger.

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
    def make_plan() -> GraftPlan:
        return plan(
            state,
            source,
            mapping,
            ignore_model_keys=ignore_model_keys,
            ignore_restored_keys=ignore_restored_keys,
            strict=strict,
            cast=cast,
        )

    return execute(plan_on_every_process(state, make_plan), progress=progress)


def plan_on_every_process(state: Any, make_plan: Callable[[], GraftPlan]) -> GraftPlan:
    """Runs make_plan; under several processes sharing global targets, all fail together.

    A plan depends only on inputs every process shares, so verdicts agree; but
    if one process cannot see the checkpoint, or was given another mapping, it
    would raise alone and leave the others waiting in the read's collectives.
    One byte per process is exchanged to make every process raise instead.
    """
    if jax.process_count() == 1 or not _spans_processes(state):
        return make_plan()
    error: Exception | None = None
    try:
        p = make_plan()
    except Exception as e:  # re-raised below, after the others have heard of it
        error = e
    from jax.experimental import multihost_utils

    with jax.transfer_guard("allow"):  # one byte per process, not array data
        flags = np.asarray(
            multihost_utils.process_allgather(np.array([error is not None], np.uint8))
        ).ravel()
    if error is not None:
        raise error
    failed = [i for i, flag in enumerate(flags) if flag]
    if failed:
        raise GraftError(
            f"the graft failed on process(es) {failed} (see their errors); this process "
            f"(#{jax.process_index()}) planned it fine, but none reads: the processes must "
            "share the state's structure, the mapping and the checkpoint"
        )
    return p


def _spans_processes(state: Any) -> bool:
    for leaf in jax.tree_util.tree_leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding) and not sharding.is_fully_addressable:
            return True
    return False


def execute(p: GraftPlan, *, progress: bool | Callable[[int, int], None] = False) -> Any:
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
        sizes = [_leaves.nbytes(_leaves.spec_of(src.leaves[si])) for si in order]
        got = _read_batched(p.lazy, requests, sizes, progress)
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


def _read_batched(
    source: Source,
    requests: list[ReadRequest],
    sizes: list[int],
    progress: bool | Callable[[int, int], None],
) -> list[Any]:
    total = sum(sizes)
    log.info(
        "reading %d leaf(s), %s, from %s", len(requests), format_bytes(total), source.describe()
    )
    if not progress or total < _BATCHED_FROM:
        return list(source.read(requests))
    report = ProgressBar() if progress is True else progress
    out: list[Any] = []
    done = 0
    start = 0
    while start < len(requests):
        end, batch_bytes = start, 0
        while end < len(requests) and (end == start or batch_bytes + sizes[end] <= _BATCH):
            batch_bytes += sizes[end]
            end += 1
        out.extend(source.read(requests[start:end]))
        done += batch_bytes
        start = end
        log.info("read %s of %s", format_bytes(done), format_bytes(total))
        report(done, total)
    return out


def _read_dtype(source_leaf: Any, target_leaf: Any, cast: bool) -> Any:
    # Read in the source's own dtype: a checkpoint reader must never cast unasked.
    spec = _leaves.spec_of(target_leaf if cast else source_leaf)
    return spec[1]
