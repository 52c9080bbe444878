"""The graft itself: plan, read what the plan needs, insert it into the state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from treegraft._errors import GraftError
from treegraft._insert.placement import concrete_likes
from treegraft._insert.sharding import place
from treegraft._insert.transform import Blocks, build
from treegraft._insert.x64 import check_x64
from treegraft._parse.paths import Path, render_parts
from treegraft._parse.rules import CastOption, MappingLike
from treegraft._plan import GraftPlan, plan
from treegraft._plan.checks import deleted_sources
from treegraft._read.progress import ProgressBar
from treegraft._read.source import ReadRequest, Source
from treegraft._tree import leaves as _leaves
from treegraft._tree.leaves import format_bytes

log = logging.getLogger("treegraft")
_BATCHED_FROM = 256 * 2**20  # reads this large are batched when progress is asked
_BATCH = 64 * 2**20

__all__ = ["graft", "execute"]


def graft(
    state: Any,
    source: Any,
    mapping: MappingLike,
    /,
    *,
    ignore_model_keys: Sequence[str] | str = (),
    ignore_restored_keys: Sequence[str] | str = (),
    strict: bool = True,
    cast: CastOption = False,
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
      source: a pytree, or a lazy `treegraft.Source` such as `OrbaxCheckpoint`,
        or a dict of them, `{name: source}` (paths then start with the name).
      mapping: `{new_path: old_path}` (new <- old); patterns allowed.
      ignore_model_keys: see `treegraft.plan`.
      ignore_restored_keys: see `treegraft.plan`.
      strict: see `treegraft.plan`.
      cast: see `treegraft.plan`: False, True (numpy 'same_kind' casts) or
        "unsafe".
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
    p = plan(
        state,
        source,
        mapping,
        ignore_model_keys=ignore_model_keys,
        ignore_restored_keys=ignore_restored_keys,
        strict=strict,
        cast=cast,
    )
    return execute(p, progress=progress)


def execute(p: GraftPlan, /, *, progress: bool | Callable[[int, int], None] = False) -> Any:
    """Runs a plan: reads the leaves it needs and returns the new state.

    `tg.graft(state, source, mapping)` is `tg.execute(tg.plan(state, source,
    mapping))`: plan once, look at it, then execute it without planning again.
    Each source leaf is read once, in its own dtype, and each target gets its
    own value, cast to its own dtype where the plan allows it.

    Args:
      p: a plan made by `treegraft.plan`.
      progress: as for `treegraft.graft`.

    Returns:
      The new state: the plan's state with every planned leaf replaced. The
      inputs are not modified.

    Raises:
      CheckpointError: reading the checkpoint failed.
      GraftError: a source leaf has no value: abstract, or a jax array
        deleted (donated) since the plan.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> p = tg.plan({'w': np.zeros(2)}, {'v': np.ones(2)}, {'w': 'v'})
      >>> tg.execute(p)['w']
      array([1., 1.])
    """
    if not isinstance(p, GraftPlan):
        raise GraftError(f"execute takes a plan made by tg.plan, got {type(p).__name__}")
    abstract = [pr for pr in p.report if pr.kind == "abstract"]
    if abstract:
        raise GraftError(abstract[0].message, problems=abstract)
    rec = p._record
    if rec.lazy is None and (gone := deleted_sources(rec.source, rec.pairs)):
        # Checked again: a source array may be donated between plan and execute.
        raise GraftError.from_problems(gone, rules=len(p.rules))
    tgt, src = rec.target, rec.source
    # Here, not in plan: convert writes 64-bit values from the host as they are.
    if narrowed := check_x64((pair.target for pair in rec.pairs), tgt.leaves, tgt.paths):
        raise GraftError.from_problems(narrowed, rules=len(p.rules))
    likes_of = concrete_likes([pair.target for pair in rec.pairs], tgt.leaves, tgt.paths)
    plain = [pair for pair in rec.pairs if rec.is_copy(pair)]
    changed = [pair for pair in rec.pairs if not rec.is_copy(pair)]
    first_use: dict[int, int] = {}
    for pair in plain:
        first_use.setdefault(pair.source, pair.target)
    if rec.lazy is not None:
        order = list(first_use)
        # Read in the source's own dtype: a checkpoint reader must never cast
        # unasked, and each target is cast to its own dtype afterwards.
        requests = [
            ReadRequest(
                Path(src.paths[si]),
                _read_like(_leaves.spec_of(src.leaves[si])[1], likes_of[first_use[si]]),
                _leaves.spec_of(src.leaves[si])[1],
            )
            for si in order
        ]
        sizes = [_leaves.nbytes(_leaves.spec_of(src.leaves[si])) for si in order]
        got = _read_batched(rec.lazy, requests, sizes, progress)
        value_of = {
            si: _as_python(value) if isinstance(requests[n].dtype, type) else value
            for n, (si, value) in enumerate(zip(order, got, strict=True))
        }
    else:
        value_of = {si: src.leaves[si] for si in first_use}
    values = [value_of[pair.source] for pair in plain]
    likes = [likes_of[pair.target] for pair in plain]
    # Values read from a checkpoint are fresh: each is used as is once (other
    # uses are copied); in-memory values belong to the caller and are copied.
    placed = place(
        values,
        likes,
        cast=rec.cast,
        owned=rec.lazy is not None,
        name_of=lambda k: render_parts(tgt.paths[plain[k].target]),
    )
    out = list(tgt.leaves)
    for pair, value in zip(plain, placed, strict=True):
        out[pair.target] = value
    if changed:
        blocks = Blocks(rec)
        for pair in changed:
            out[pair.target] = build(rec, pair, blocks, likes_of[pair.target])
    return tgt.treedef.unflatten(out)


def _read_like(dtype: Any, like: Any) -> Any:
    """What a read is placed like: the target leaf, or the host for a saved Python scalar.

    A Python scalar saved by orbax is read to the host and placed from there:
    its value must be checked against the target's dtype first (docs/design.md
    section 4), which a read straight into a device buffer would have wrapped
    (2**40 + 7 into int32 gave 7).
    """
    if isinstance(dtype, type):
        return np.zeros((), np.dtype(dtype))  # a host like: bool, int64, float64, complex128
    return like


def _as_python(value: Any) -> Any:
    """A saved Python scalar, read as a 0-d array, as the Python scalar it was saved as."""
    if isinstance(value, bool | int | float | complex):
        return value
    return np.asarray(value).item()


def _read_batched(
    source: Source,
    requests: list[ReadRequest],
    sizes: list[int],
    progress: bool | Callable[[int, int], None],
) -> list[Any]:
    total = sum(sizes)
    log.info(
        "reading %d %s, %s, from %s",
        len(requests),
        "leaf" if len(requests) == 1 else "leaves",
        format_bytes(total),
        source.describe(),
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
