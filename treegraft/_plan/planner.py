"""`plan`: resolve a mapping against a state and a source, on metadata only.

The steps, each a function of the one before:

    parse_mapping, parse_ignore      the mapping as rules, the ignore patterns
    Inputs                           both trees indexed (the source's metadata tree)
    resolve                          -> Resolution: winners, pairs, instances, strays
    source.prefetch                  the shapes and dtypes of the paired leaves, once
    CHECKS (a chain of pure checks)  Resolution -> problems
    make_record                      the pairs and their byte counts, once (`PlanRecord`)
    GraftPlan                        or one error listing every fatal problem

No array byte is read: a plan needs only paths, shapes and dtypes, so it works
on `jax.ShapeDtypeStruct` and on checkpoint metadata. Under several processes
sharing global arrays, every process fails together (`_multihost`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from treegraft._errors import MappingError
from treegraft._multihost import plan_on_every_process
from treegraft._parse.rules import CastOption, MappingLike, parse_ignore, parse_mapping
from treegraft._plan import cache, checks, coverage, divisible
from treegraft._plan.checks import deleted_sources
from treegraft._plan.context import Inputs
from treegraft._plan.problems import _KEY_KINDS, Problem, raise_problems
from treegraft._plan.record import make_record
from treegraft._plan.resolution import Resolution
from treegraft._plan.resolve import resolve
from treegraft._plan.result import GraftPlan
from treegraft._read.several import SeveralIndex, as_source, source_index
from treegraft._tree.gc import young_collections_only
from treegraft._tree.index import TreeIndex


def plan(
    state: Any,
    source: Any,
    mapping: MappingLike,
    /,
    *,
    ignore_model_keys: Sequence[str] | str = (),
    ignore_restored_keys: Sequence[str] | str = (),
    strict: bool = True,
    cast: CastOption = False,
    check_ignores: bool = True,
) -> GraftPlan:
    """Resolves a `{new: old}` mapping and checks everything, reading no array.

    Each rule `new <- old` works on prefixes: a target leaf at `new + suffix`
    takes the source leaf at `old + suffix` (after substituting captures). When
    several rules cover a leaf, the one with the longest matched prefix wins,
    then the one with more literal segments; still equal is an error.

    Args:
      state: the pytree to graft into (arrays or `jax.ShapeDtypeStruct`s).
      source: a pytree, or a lazy `treegraft.Source` such as `OrbaxCheckpoint`,
        or a dict of them, `{name: source}` (paths then start with the name).
      mapping: `{new_path: old_path}`; keys and values may be patterns.
      ignore_model_keys: patterns of target leaves that may lack a source leaf
        (they keep their value); matched against the key relative to the
        rule's new prefix, or the absolute path; a match on a prefix covers
        the subtree.
      ignore_restored_keys: patterns of source leaves that may lack a target
        leaf; relative to the rule's old prefix, or absolute.
      strict: when False, missing, unexpected and unmatched entries, and
        abstract target leaves that no rule fills (they stay abstract),
        become entries of `plan.report` instead of errors. Shape and dtype
        mismatches stay errors. In strict mode, a keep rule (`{path: None}`)
        keeps an abstract leaf abstract on purpose.
      cast: False (dtypes must match), True (numpy 'same_kind' casts that
        keep values in range, such as float32 -> bfloat16 or int32 ->
        float32; a float narrowing checks its values for overflow as it
        casts) or "unsafe" (any cast that can change values, such as float32
        -> int8 or int32 -> float16). A rule can cast its own leaves with
        `tg.cast`. A Python scalar source must fit its target by value.
      check_ignores: when False, an ignore pattern that matches nothing is a
        `report` entry, not an error: for callers that split one mapping into
        several grafts and check the patterns over all of them.

    Returns:
      A `GraftPlan`. The inputs are not modified.

    Raises:
      MappingError: the mapping is invalid, or two rules tie on a leaf.
      PathNotFoundError: missing, unexpected or unmatched paths (also a
        `KeyError`).
      MismatchError: shape, dtype or structure differs, or an operation
        meets typed PRNG keys.
      GraftError: an abstract target leaf no rule fills (strict mode), a
        source array deleted or donated, or problems of several kinds at
        once, all listed.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'enc': {'w': np.zeros(2)}, 'dec': {'w': np.zeros(2)}}
      >>> p = tg.plan(state, {'encoder': {'w': np.ones(2)}}, {'enc': 'encoder'})
      >>> [(str(e.target), str(e.source)) for e in p.entries]
      [('enc.w', 'encoder.w')]
    """

    def run() -> GraftPlan:
        # Everything, checks of the options included, inside the agreement:
        # a process given another mapping must fail with the others.
        if not (cast is False or cast is True or (isinstance(cast, str) and cast == "unsafe")):
            raise MappingError(
                f"cast must be False (the default: dtypes must match), True (numpy 'same_kind' "
                f"casts, such as float32 -> bfloat16) or 'unsafe' (any cast, such as float32 -> "
                f"int8); got {cast!r}"
            )
        if isinstance(source, str | os.PathLike):
            raise MappingError(_wrap_path_hint(os.fspath(source)))
        lazy = as_source(source)  # a dict holding a Source is several (docs/design.md section 17)
        key = None
        if lazy is None:
            with young_collections_only():
                key, state_leaves, source_leaves = _cache_key(state, source)
            if key is not None:
                kept = cache.lookup(key)
                if kept is not None:
                    again = _rebind(
                        kept, state, source, state_leaves, source_leaves, strict=strict, cast=cast
                    )
                    if again is not None:
                        return again
        rules = tuple(parse_mapping(mapping))
        ignore_model = tuple(parse_ignore(ignore_model_keys, name="ignore_model_keys"))
        ignore_restored = tuple(parse_ignore(ignore_restored_keys, name="ignore_restored_keys"))
        with young_collections_only():
            inputs = Inputs(
                rules,
                ignore_model,
                ignore_restored,
                TreeIndex(state, "the state"),
                source_index(source, lazy, rules, ignore_restored),
                cast,
                lazy,
            )
            res = resolve(inputs)
            if lazy is not None and (needed := res.source_leaves()):
                # The one metadata read: every source leaf a check looks at, in one batch.
                lazy.prefetch(needed)
            problems = CHECKS(res)
            if isinstance(inputs.src, SeveralIndex):
                problems = inputs.src.restate(problems, res.pairs)
        # The conclusion too: a failing plan formats every problem, and a full
        # collection there walks everything alive (plans kept by the cache among it).
        with young_collections_only():
            made = _conclude(res, source, problems, strict=strict, check_ignores=check_ignores)
        if key is not None:
            rec = made._record
            cache.keep(
                key,
                rules=rec.rules,
                target=rec.target,
                source=rec.source,
                pairs=rec.pairs,
                report=made.report,
            )
        return made

    def _cache_key(state: Any, source: Any) -> tuple[Any, list[Any], list[Any]]:
        """The cache key of this call, with both trees' leaves; (None, [], []) if it has none."""
        options = cache.options_key(
            mapping,
            ignore_model_keys,
            ignore_restored_keys,
            strict=strict,
            cast=cast,
            check_ignores=check_ignores,
        )
        if options is None:
            return None, [], []
        state_key = cache.tree_key(state)
        source_key = cache.tree_key(source) if state_key is not None else None
        if state_key is None or source_key is None:
            return None, [], []
        return (options, state_key[1], source_key[1]), state_key[0], source_key[0]

    return plan_on_every_process(state, run)


def _rebind(
    kept: cache.Kept,
    state: Any,
    source: Any,
    state_leaves: list[Any],
    source_leaves: list[Any],
    *,
    strict: bool,
    cast: CastOption,
) -> GraftPlan | None:
    """A kept plan on new leaves of the same structure; None when a source leaf it reads is gone.

    A deleted (donated) source array is the one thing the cache key cannot
    see: then the full plan runs, and reports it as always.
    """
    target = kept.target.holding(state, state_leaves)
    src = kept.source.holding(source, source_leaves)
    if deleted_sources(src, kept.pairs):
        return None
    record = make_record(
        rules=kept.rules, target=target, source=src, lazy=None, pairs=kept.pairs, cast=cast
    )
    return GraftPlan(record, source=source, report=kept.report, strict=strict)


Check = Callable[[Resolution], list[Problem]]


def chain(*checks: Check) -> Check:
    """One check running each of checks in turn; their problems concatenated.

    Example:
      >>> from treegraft import Problem
      >>> first = lambda res: [Problem('tie', 'a')]
      >>> second = lambda res: [Problem('tie', 'b'), Problem('tie', 'c')]
      >>> [p.message for p in chain(first, second)(None)]
      ['a', 'b', 'c']
    """

    def run(res: Resolution) -> list[Problem]:
        return [problem for check in checks for problem in check(res)]

    return run


# Every check of a plan, in the order their problems are listed within a kind.
CHECKS = chain(
    checks.check_ties,
    checks.check_stacks,
    checks.check_missing,
    checks.check_copies,
    checks.check_operations,
    checks.check_concrete,
    checks.check_deleted,
    checks.check_unfilled,
    divisible.check_divisible,
    coverage.check_outranked_rules,
    coverage.check_unmatched_rules,
    coverage.check_unexpected,
    coverage.check_unmatched_ignores,
)


def _conclude(
    res: Resolution,
    source: Any,
    problems: list[Problem],
    *,
    strict: bool,
    check_ignores: bool,
) -> GraftPlan:
    """The plan, or one error listing every problem that fails it."""
    fatal = [
        p
        for p in problems
        if (strict or p.kind not in _KEY_KINDS)
        and (check_ignores or p.kind != "unmatched_ignore")
        # A plan on shapes alone is fine to look at; executing it is not.
        and p.kind != "abstract"
    ]
    if fatal:
        raise_problems(fatal, len(res.inputs.rules))
    inputs = res.inputs
    record = make_record(
        rules=inputs.rules,
        target=inputs.tgt,
        source=inputs.src,
        lazy=inputs.lazy,
        pairs=res.pairs,
        cast=inputs.cast,
    )
    return GraftPlan(
        record, source=source, report=[p for p in problems if p not in fatal], strict=strict
    )


def _wrap_path_hint(path: str) -> str:
    """What to wrap a path given as the source in: the kind it holds first, when it shows.

    Only a local look (a name, a listing): a remote path gets the three kinds.
    """
    kinds = [
        f"tg.OrbaxCheckpoint({path!r}) for an orbax checkpoint folder",
        f"tg.KauldronCheckpoint({path!r}) for a Kauldron workdir",
        f"tg.SafetensorsCheckpoint({path!r}) for safetensors weights",
    ]
    if _holds_safetensors(path):
        return (
            f"the source {path!r} is a path, not a tree: it holds safetensors weights, so wrap "
            f"it in tg.SafetensorsCheckpoint({path!r})"
        )
    return (
        f"the source {path!r} is a path, not a tree: wrap it in "
        f"{kinds[0]}, {kinds[1]}, or {kinds[2]}"
    )


def _holds_safetensors(path: str) -> bool:
    """A local `.safetensors` file, or a local folder of them (or their index)."""
    if path.endswith(".safetensors"):
        return True
    try:
        names = os.listdir(path)
    except OSError:  # remote, missing or unreadable: no claim
        return False
    return "_METADATA" not in names and any(
        n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names
    )
