"""`plan`: resolve a mapping against a state and a source, on metadata only.

`plan` pairs each target leaf with the source leaves that will fill it, runs
every check (missing, unexpected, unmatched rules and ignore patterns, ties,
shape, dtype, structure, operations) and raises once with all problems. No
array byte is read: a plan needs only paths, shapes and dtypes, so it works on
`jax.ShapeDtypeStruct` and on checkpoint metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from treegraft._errors import MappingError
from treegraft._parse.paths import Part
from treegraft._parse.rules import parse_ignore, parse_mapping
from treegraft._plan.coverage import Coverage
from treegraft._plan.problems import _KEY_KINDS, raise_problems
from treegraft._plan.result import GraftPlan
from treegraft._read.source import Source
from treegraft._tree.gc import young_collections_only
from treegraft._tree.index import TreeIndex

Parts = tuple[Part, ...]


def plan(
    state: Any,
    source: Any,
    mapping: Mapping[str, str],
    /,
    *,
    ignore_model_keys: Sequence[str] | str = (),
    ignore_restored_keys: Sequence[str] | str = (),
    strict: bool = True,
    cast: bool | str = False,
    check_ignores: bool = True,
) -> GraftPlan:
    """Resolves a `{new: old}` mapping and checks everything, reading no array.

    Each rule `new <- old` works on prefixes: a target leaf at `new + suffix`
    takes the source leaf at `old + suffix` (after substituting captures). When
    several rules cover a leaf, the one with the longest matched prefix wins,
    then the one with more literal segments; still equal is an error.

    Args:
      state: the pytree to graft into (arrays or `jax.ShapeDtypeStruct`s).
      source: a pytree, or a lazy `treegraft.Source` such as `OrbaxCheckpoint`.
      mapping: `{new_path: old_path}`; keys and values may be patterns.
      ignore_model_keys: patterns of target leaves that may lack a source leaf
        (they keep their value); matched against the key relative to the
        rule's new prefix, or the absolute path; a match on a prefix covers
        the subtree.
      ignore_restored_keys: patterns of source leaves that may lack a target
        leaf; relative to the rule's old prefix, or absolute.
      strict: when False, missing, unexpected and unmatched entries become
        entries of `plan.report` instead of errors. Shape and dtype
        mismatches stay errors.
      cast: False (dtypes must match), True (numpy 'same_kind' casts only,
        such as float32 -> bfloat16 or int32 -> float32) or "unsafe" (any
        cast that can change values, such as float32 -> int8). A rule can
        cast its own leaves with `tg.cast`.
      check_ignores: when False, an ignore pattern that matches nothing is a
        `report` entry, not an error: for callers that split one mapping into
        several grafts and check the patterns over all of them.

    Returns:
      A `GraftPlan`. The inputs are not modified.

    Raises:
      MappingError: the mapping is invalid, or two rules tie on a leaf.
      PathNotFoundError: missing, unexpected or unmatched paths (also a
        `KeyError`).
      MismatchError: shape, dtype or structure differs.
      GraftError: problems of several of those kinds at once, all listed.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'enc': {'w': np.zeros(2)}, 'dec': {'w': np.zeros(2)}}
      >>> p = tg.plan(state, {'encoder': {'w': np.ones(2)}}, {'enc': 'encoder'})
      >>> [(str(e.target), str(e.source)) for e in p.entries]
      [('enc.w', 'encoder.w')]
    """
    if not (cast is False or cast is True or (isinstance(cast, str) and cast == "unsafe")):
        raise MappingError(
            f"cast must be False (the default: dtypes must match), True (numpy 'same_kind' "
            f"casts, such as float32 -> bfloat16) or 'unsafe' (any cast, such as float32 -> "
            f"int8); got {cast!r}"
        )
    if isinstance(source, str | os.PathLike):
        raise MappingError(
            f"the source {os.fspath(source)!r} is a path, not a tree: wrap it in "
            f"tg.OrbaxCheckpoint({os.fspath(source)!r}) for an orbax checkpoint folder, or "
            f"tg.KauldronCheckpoint({os.fspath(source)!r}) for a Kauldron workdir"
        )
    rules = parse_mapping(mapping)
    ignore_model = parse_ignore(ignore_model_keys, name="ignore_model_keys")
    ignore_restored = parse_ignore(ignore_restored_keys, name="ignore_restored_keys")
    lazy = source if isinstance(source, Source) else None
    with young_collections_only():
        src_tree = lazy.metadata() if lazy is not None else source
        tgt = TreeIndex(state, "the state")
        src = TreeIndex(src_tree, lazy.describe() if lazy is not None else "the source")
        return _Planner(rules, ignore_model, ignore_restored, tgt, src, cast=cast).run(
            lazy, strict=strict, check_ignores=check_ignores
        )


class _Planner(Coverage):
    """One planning run: the steps, in order, over one `PlanState`."""

    def run(self, lazy: Source | None, *, strict: bool, check_ignores: bool = True) -> GraftPlan:
        self.lazy = lazy
        winner, prefix_len, rule_hits = self._assign_rules()
        instances, pairs = self._pair_leaves(winner, prefix_len)
        self._count_missing_subtrees()
        if lazy is None:
            self._check_concrete(pairs)
        self._check_outranked_rules(instances)
        self._check_unmatched_rules(rule_hits, instances)
        self._add_source_instances(instances)
        self._check_unexpected(instances, pairs)
        self._check_unmatched_ignores(instances)
        fatal = [
            p
            for p in self.problems
            if (strict or p.kind not in _KEY_KINDS)
            and (check_ignores or p.kind != "unmatched_ignore")
            # A plan on shapes alone is fine to look at; executing it is not.
            and p.kind != "abstract"
        ]
        if fatal:
            raise_problems(fatal, len(self.rules))
        report = [p for p in self.problems if p not in fatal]
        return GraftPlan(
            rules=self.rules,
            target=self.tgt,
            source=self.src,
            lazy=lazy,
            pairs=pairs,
            report=report,
            cast=self.cast,
            strict=strict,
        )
