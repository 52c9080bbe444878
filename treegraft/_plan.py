"""Resolve a mapping against a state and a source, on metadata only.

`plan` pairs each target leaf with the source leaf that will fill it, runs every
check (missing, unexpected, unmatched rules and ignore patterns, ties, shape,
dtype, structure) and raises once with all problems. No array byte is read: a
plan needs only paths, shapes and dtypes, so it works on `jax.ShapeDtypeStruct`
and on checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from treegraft import _leaves
from treegraft._leaves import format_bytes
from treegraft._errors import GraftError, MappingError, MismatchError, PathNotFoundError
from treegraft._gc import young_collections_only
from treegraft._index import TreeIndex, is_abstract, loose
from treegraft._paths import Part, Path, render_parts
from treegraft._patterns import Pattern
from treegraft._rules import Rule, parse_ignore, parse_mapping
from treegraft._source import Source
from treegraft._tree import resolve

__all__ = ["plan", "GraftPlan", "Entry", "Problem", "Pair"]

Parts = tuple[Part, ...]
_LISTED = 20  # problems listed per kind in a message before "... and N more"

# Problem kinds and what each one means for the user.
_KEY_KINDS = ("missing", "unexpected", "unmatched_rule", "unmatched_ignore")
_MISMATCH_KINDS = ("shape", "dtype", "structure")
_SECTIONS = {
    "unmatched_rule": "rules that match nothing",
    "unmatched_ignore": "ignore patterns that match nothing",
    "missing": "missing in the source: target leaves covered by a rule with no source leaf",
    "unexpected": "unexpected in the source: source leaves under a rule with no target leaf",
    "structure": "structure differs",
    "shape": "shape differs",
    "dtype": "dtype differs (casting is never implicit)",
    "tie": "rules tied on the same leaf (make one more specific)",
    "abstract": "source leaves without values",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a graft.

    Attributes:
      kind: "missing", "unexpected", "unmatched_rule", "unmatched_ignore",
        "shape", "dtype", "structure" or "tie".
      message: one line that names the paths and shows both sides.
      target: the path in the state, where there is one.
      source: the path in the source, where there is one.
      rule: the rule involved, as "'new' <- 'old'", where there is one.
      pattern: the ignore pattern involved, where there is one.
      remedy: the fix that fits this problem's cause, or "" when the message
        says it (a close name) or there is no generic fix.
    """

    kind: str
    message: str
    target: Path | None = None
    source: Path | None = None
    rule: str | None = None
    pattern: str | None = None
    remedy: str = ""


class Pair(NamedTuple):
    """One grafted target leaf and the source leaves that feed it (leaf indices).

    Attributes:
      target: the target leaf's index in the state's leaves.
      source: the (first) source leaf's index in the source's leaves.
      rule: the rule's index in the mapping.
      sources: for a stack rule, every source leaf, in index order; else ().
      layer: for an unstack rule, the index taken along its axis; else None.
    """

    target: int
    source: int
    rule: int
    sources: tuple[int, ...] = ()
    layer: int | None = None


@dataclass(frozen=True)
class Entry:
    """One grafted leaf: where it goes, where it comes from, by which rule.

    Attributes:
      target: the target leaf's path.
      source: the source leaf's path (the first one, for a stack).
      rule: the rule, as "'new' <- 'old'".
      shape: the source leaf's shape.
      dtype: the source leaf's dtype.
      nbytes: the bytes this entry reads from the source.
      operation: what happens on the way in ("" for a plain copy), e.g.
        "stack 4 along axis 0; cast float32 -> bfloat16".
      sources: every source leaf's path (more than one for a stack).
    """

    target: Path
    source: Path
    rule: str
    shape: tuple[int, ...] | None
    dtype: Any
    nbytes: int
    operation: str = ""
    sources: tuple[Path, ...] = ()


class GraftPlan:
    """The resolved graft: every target leaf's source, checked, nothing read yet.

    Print it for a table; inspect `entries`, `untouched`, `unused`, `abstract`,
    `report` and `nbytes` in code; run it with `treegraft.execute`. Made by
    `treegraft.plan`.

    A plan whose in-memory source holds `jax.ShapeDtypeStruct`s where it has
    leaves to graft can be looked at but not executed: `executable` is False
    and `report` says which leaves.
    """

    def __init__(
        self,
        *,
        rules: Sequence[Rule],
        target: TreeIndex,
        source: TreeIndex,
        lazy: Source | None,
        pairs: list[Pair],
        report: Sequence[Problem],
        cast: bool | str,
        strict: bool,
    ):
        self.rules = tuple(rules)
        self.target = target
        self.source = source
        self.lazy = lazy
        self.pairs = pairs
        self.report: tuple[Problem, ...] = tuple(report)
        self.cast = cast
        self.strict = strict

    # -- inspection ----------------------------------------------------------

    def operation(self, pair: Pair) -> str:
        """What happens to a pair's values on the way in ("" for a plain copy)."""
        rule = self.rules[pair.rule]
        spec = _leaves.spec_of(self.source.leaves[pair.source])
        out = []
        if rule.gather == "stack":
            out.append(f"stack {len(pair.sources)} along axis {rule.axis}")
        elif rule.gather == "unstack":
            out.append(f"[{pair.layer}] along axis {rule.axis}")
        spec = gathered_spec(rule, spec, len(pair.sources), pair.layer)[0] or spec
        for step in rule.steps:
            out.append(step.describe(spec))  # type: ignore[arg-type]
            spec = step.spec(spec)[0] or spec  # type: ignore[arg-type]
        tdtype = _leaves.spec_of(self.target.leaves[pair.target])[1]
        if spec[1] != tdtype and not isinstance(tdtype, type):
            out.append(f"cast {spec[1]} -> {tdtype}")
        return "; ".join(out)

    def _pair_reads(self, pair: Pair) -> list[tuple[tuple[int, Any], int]]:
        """The reads a pair needs, each as (key, bytes); equal keys are read once."""
        leaves = self.source.leaves
        if pair.sources:
            return [((si, None), _leaves.nbytes(_leaves.spec_of(leaves[si]))) for si in pair.sources]
        si = pair.source
        whole = _leaves.nbytes(_leaves.spec_of(leaves[si]))
        if pair.layer is None:
            return [((si, None), whole)]
        rule = self.rules[pair.rule]
        shape = _leaves.spec_of(leaves[si])[0] or ()
        axis = rule.axis + len(shape) if rule.axis < 0 else rule.axis
        box = index_box(shape, axis, pair.layer)
        box_bytes = getattr(self.lazy, "box_nbytes", None)
        if self.lazy is None:
            return [((si, pair.layer), whole // max(shape[axis], 1))]
        if box_bytes is None:
            return [((si, None), whole)]  # this source reads whole leaves
        return [((si, pair.layer), int(box_bytes(Path(self.source.paths[si]), box)))]

    @property
    def entries(self) -> list[Entry]:
        """Each grafted target leaf with its source path, rule and operation."""
        out = []
        for pair in self.pairs:
            spec = _leaves.spec_of(self.source.leaves[pair.source])
            sources = pair.sources or (pair.source,)
            out.append(
                Entry(
                    target=Path(self.target.paths[pair.target]),
                    source=Path(self.source.paths[pair.source]),
                    rule=str(self.rules[pair.rule]),
                    shape=spec[0],
                    dtype=spec[1],
                    nbytes=sum(n for _, n in self._pair_reads(pair)),
                    operation=self.operation(pair),
                    sources=tuple(Path(self.source.paths[si]) for si in sources),
                )
            )
        return out

    @property
    def executable(self) -> bool:
        """Whether `treegraft.execute` can run this plan (every source leaf has a value)."""
        return not any(p.kind == "abstract" for p in self.report)

    def _taken(self) -> set[int]:
        return {pair.target for pair in self.pairs}

    @property
    def untouched(self) -> list[Path]:
        """Target leaves that keep their current value (keep rules included)."""
        taken = self._taken()
        return [Path(p) for i, p in enumerate(self.target.paths) if i not in taken]

    @property
    def abstract(self) -> list[Path]:
        """Untouched target leaves that are abstract and stay so."""
        taken = self._taken()
        return [
            Path(p)
            for i, p in enumerate(self.target.paths)
            if i not in taken and is_abstract(self.target.leaves[i])
        ]

    def _used(self) -> set[int]:
        used: set[int] = set()
        for pair in self.pairs:
            used.update(pair.sources or (pair.source,))
        return used

    @property
    def unused(self) -> list[Path]:
        """Source leaves the graft does not read."""
        used = self._used()
        return [Path(p) for i, p in enumerate(self.source.paths) if i not in used]

    @property
    def nbytes(self) -> int:
        """Array bytes to read: each needed source leaf (or slice) counted once.

        For an unstack rule over a checkpoint, the bytes of the chunks that
        hold each slice: a slice of an array stored as one chunk costs it whole.
        """
        reads: dict[tuple[int, Any], int] = {}
        for pair in self.pairs:
            for key, n in self._pair_reads(pair):
                reads[key] = n
        whole = {si for si, index in reads if index is None}
        return sum(n for (si, index), n in reads.items() if index is None or si not in whole)

    def rule_counts(self) -> list[tuple[str, int, int]]:
        """Per rule: its text, how many leaves it feeds, and their bytes."""
        counts = [[0, 0] for _ in self.rules]
        for pair in self.pairs:
            counts[pair.rule][0] += 1
            counts[pair.rule][1] += sum(n for _, n in self._pair_reads(pair))
        return [(str(rule), n, b) for rule, (n, b) in zip(self.rules, counts, strict=True)]

    def summary(self, *, max_rows: int = 40) -> str:
        """A readable table: rules, grafted leaves, untouched and unused counts."""
        n_target = len(self.target)
        reads = len(self._used())
        lines = [
            f"GraftPlan: {len(self.pairs)} of {n_target} target leaves from "
            f"{self.source.what}; {reads} source leaves to read ({format_bytes(self.nbytes)})",
            "",
        ]
        rule_rows = [("rule", "leaves", "bytes")] + [
            (text, str(n), format_bytes(b)) for text, n, b in self.rule_counts()
        ]
        lines += _table(rule_rows)
        lines.append("")
        ops = [self.operation(pair) for pair in self.pairs[:max_rows]]
        show_ops = any(ops)
        rows = [("target", "source", "shape/dtype") + (("operation",) if show_ops else ())]
        for pair, op in zip(self.pairs[:max_rows], ops, strict=True):
            spec = _leaves.spec_of(self.source.leaves[pair.source])
            source = render_parts(self.source.paths[pair.source])
            if pair.sources:
                source += f" (+{len(pair.sources) - 1})"
            rows.append(
                (
                    render_parts(self.target.paths[pair.target]),
                    source,
                    _leaves.describe(spec),
                )
                + ((op,) if show_ops else ())
            )
        lines += _table(rows)
        if len(self.pairs) > max_rows:
            lines.append(f"... and {len(self.pairs) - max_rows} more")
        untouched = n_target - len(self.pairs)
        n_abstract = len(self.abstract)
        lines.append("")
        lines.append(
            f"untouched target leaves: {untouched}"
            + (f" ({n_abstract} stay abstract)" if n_abstract else "")
        )
        lines.append(f"unused source leaves: {len(self.source) - reads}")
        if self.report:
            lines.append(f"report (strict=False): {_count(len(self.report), 'problem')}")
            lines += ["  " + p.message for p in self.report[:max_rows]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"GraftPlan(rules={len(self.rules)}, grafted={len(self.pairs)}, "
            f"target_leaves={len(self.target)}, bytes={self.nbytes})"
        )


GraftPlan.__module__ = "treegraft"
Pair.__module__ = "treegraft"
Entry.__module__ = "treegraft"
Problem.__module__ = "treegraft"


def index_box(shape: Sequence[int], axis: int, index: int) -> tuple[slice, ...]:
    """The box of `x[index]` along axis, as one slice per axis."""
    return tuple(slice(index, index + 1) if k == axis else slice(0, d) for k, d in enumerate(shape))


def gathered_spec(
    rule: Rule, spec: Any, count: int, index: int | None
) -> tuple[Any | None, str]:
    """The spec a stack or unstack makes of a source spec, or None and why not."""
    shape, dtype = spec
    if rule.gather not in ("stack", "unstack"):
        return spec, ""
    if shape is None:
        return None, f"{rule.gather} needs array leaves, the source leaf is {_leaves.describe(spec)}"
    ndim = len(shape)
    if rule.gather == "stack":
        axis = rule.axis + ndim + 1 if rule.axis < 0 else rule.axis
        if not 0 <= axis <= ndim:
            return None, f"stack axis {rule.axis} is out of range for {ndim}-d source leaves"
        return (tuple(shape[:axis]) + (count,) + tuple(shape[axis:]), dtype), ""
    axis = rule.axis + ndim if rule.axis < 0 else rule.axis
    if not 0 <= axis < ndim:
        return None, f"unstack axis {rule.axis} is out of range for a {ndim}-d source leaf"
    if index is None or not 0 <= index < shape[axis]:
        return None, (
            f"unstack index {index} is out of range: the source has {shape[axis]} along "
            f"axis {rule.axis}"
        )
    return (tuple(shape[:axis]) + tuple(shape[axis + 1 :]), dtype), ""


def output_spec(
    rule: Rule, spec: Any, count: int = 0, index: int | None = None
) -> tuple[Any | None, str]:
    """The spec of what a rule makes of a source spec: gather, then each step."""
    out, why = gathered_spec(rule, spec, count, index)
    for step in rule.steps:
        if out is None:
            break
        if out[0] is None:
            return None, f"{step.kind} needs an array, the source leaf is {_leaves.describe(out)}"
        out, why = step.spec(out)
    return out, why


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


# ----------------------------------------------------------------------------
# Planning.
# ----------------------------------------------------------------------------


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


class _Planner:
    """One planning run; holds the intermediate tables."""

    def __init__(
        self,
        rules: list[Rule],
        ignore_model: list[Pattern],
        ignore_restored: list[Pattern],
        tgt: TreeIndex,
        src: TreeIndex,
        *,
        cast: bool | str,
    ):
        self.rules = rules
        self.ignore_model = ignore_model
        self.ignore_restored = ignore_restored
        self.tgt = tgt
        self.src = src
        self.cast = cast
        self.lazy: Source | None = None
        self.problems: list[Problem] = []
        self.used_model = [False] * len(ignore_model)
        self.used_restored = [False] * len(ignore_restored)
        self._structure_seen: set[tuple[Parts, Parts]] = set()
        # (rule, target leaf, prefix length) where a rule matched but a more
        # specific one took the leaf: usually few, only with overlapping rules.
        self._outranked: list[tuple[int, int, int]] = []
        # Per stack rule: {captures of new: [(index capture, old prefix)]}.
        self._stack_groups: dict[int, dict[tuple[Any, ...], list[tuple[Any, Parts]]]] = {}
        # (rule, new prefix, old prefix) of each stacked source subtree.
        self._stack_instances: list[tuple[int, Parts, Parts]] = []
        self._members: dict[tuple[int, Parts], dict[int, Parts] | None] = {}
        self._literal: dict[int, Parts] = {}
        # (rule, target subtree) -> [leaves, index of its problem, source subtree].
        self._missing_groups: dict[tuple[int, Parts], list[Any]] = {}
        self._captures: list[tuple[Any, ...]] = []

    # The steps, in order.

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

    def _assign_rules(self) -> tuple[list[int], list[int], list[int]]:
        """Finds, per target leaf, the most specific rule covering it."""
        n = len(self.tgt)
        winner = [-1] * n
        prefix_len = [0] * n
        rank: list[tuple[int, int]] = [(-1, -1)] * n
        hits = [0] * len(self.rules)
        # Per leaf, the rules tied with its current winner; a more specific rule
        # found later clears them, so the result does not depend on rule order.
        tied: dict[int, list[int]] = {}
        paths = self.tgt.paths
        everything = range(n)
        # The winning rule's captures, so that pairing need not match again.
        captures = self._captures = [()] * n
        for r, rule in enumerate(self.rules):
            match = rule.new.prefix_matcher()
            literals = rule.new.literal_count
            # Only the leaves under a rule's literal prefix can match it: with
            # one rule per subtree, planning stays linear in rules + leaves.
            head = rule.new.literal_prefix()
            for i in self.tgt.under(head) if head else everything:
                parts = paths[i]
                m = match(parts)
                if m is None:
                    continue
                hits[r] += 1
                key = (m[0], literals)
                if key > rank[i]:
                    if winner[i] >= 0:
                        self._outranked.append((winner[i], i, prefix_len[i]))
                    rank[i], winner[i], prefix_len[i] = key, r, m[0]
                    captures[i] = m[1]
                    tied.pop(i, None)
                elif key == rank[i]:
                    tied.setdefault(i, []).append(r)
                else:
                    self._outranked.append((r, i, m[0]))
        ties: dict[tuple[int, int], int] = {}
        for i, others in tied.items():
            for b in others:
                ties.setdefault((winner[i], b), i)
        for (a, b), i in ties.items():
            self.problems.append(
                Problem(
                    "tie",
                    f"{self.rules[a]} and {self.rules[b]} both cover "
                    f"{render_parts(paths[i])!r} with a prefix of the same length and as "
                    "many literal segments",
                    target=Path(paths[i]),
                    rule=str(self.rules[b]),
                )
            )
        return winner, prefix_len, hits

    def _pair_leaves(
        self, winner: list[int], prefix_len: list[int]
    ) -> tuple[dict[tuple[int, Parts], Parts | None], list[Pair]]:
        """Pairs each covered target leaf with its source leaves; checks specs."""
        tgt, src = self.tgt, self.src
        # (rule, new prefix) -> old prefix, or None when it is not in the source.
        instances: dict[tuple[int, Parts], Parts | None] = {}
        # (rule, new prefix) -> {index: old prefix} of a stack rule.
        members: dict[tuple[int, Parts], dict[int, Parts] | None] = {}
        # (rule, new prefix) -> the index an unstack rule takes.
        taken: dict[tuple[int, Parts], int | None] = {}
        pairs: list[Pair] = []
        reported: set[tuple[int, Parts]] = set()
        rules = self.rules
        for i, r in enumerate(winner):
            if r < 0:
                continue
            rule = rules[r]
            if rule.old is None:
                continue  # a keep rule: the leaf keeps its value
            parts = tgt.paths[i]
            n = prefix_len[i]
            new_prefix = parts[:n]
            key = (r, new_prefix)
            if rule.gather == "stack":
                if key not in members:
                    members[key] = self._stack_members(r, new_prefix)
                group = members[key]
                if not group:
                    instances.setdefault(key, None)
                    if group is None and not self._ignored_model(parts, n) and key not in reported:
                        reported.add(key)
                        self._missing_prefix(r, new_prefix)
                    continue
                found = [src.find(op + parts[n:]) for op in group.values()]
                if any(si is None for si in found):
                    for op, si in zip(group.values(), found, strict=True):
                        if si is None:
                            self._missing_leaf(i, r, n, op)
                            break
                    continue
                pairs.append(Pair(i, found[0], r, tuple(found)))  # type: ignore[arg-type]
                continue
            if key in instances:
                old_prefix = instances[key]
            else:
                old_prefix = self._old_prefix(r, new_prefix, self._captures[i])
                instances[key] = old_prefix
                if rule.gather == "unstack":
                    taken[key] = self._unstack_index(r, new_prefix)
            if old_prefix is None:
                if not self._ignored_model(parts, n) and key not in reported:
                    reported.add(key)
                    self._missing_prefix(r, new_prefix)
                continue
            si = src.find(parts if old_prefix == new_prefix else old_prefix + parts[n:])
            if si is None:
                self._missing_leaf(i, r, n, old_prefix)
                continue
            if rule.gather == "unstack":
                index = taken[key]
                if index is None:
                    continue  # reported by _unstack_index
                pairs.append(Pair(i, si, r, (), index))
            else:
                pairs.append(Pair(i, si, r))
        for key, group in members.items():
            for op in (group or {}).values():
                self._stack_instances.append((key[0], key[1], op))
            if group:
                instances[key] = next(iter(group.values()))
        tleaves, sleaves = tgt.leaves, src.leaves
        if self.lazy is not None and pairs:
            # One batch for the metadata of every paired source leaf.
            needed: list[Any] = []
            for pair in pairs:
                needed.extend(sleaves[si] for si in (pair.sources or (pair.source,)))
            self.lazy.prefetch(needed)
        agreed = []
        for pair in pairs:
            rule = rules[pair.rule]
            if rule.gather == "copy" and not rule.steps:
                if self._specs_agree(tleaves[pair.target], sleaves[pair.source]):
                    agreed.append(pair)
                else:
                    self._mismatch(pair.target, pair.source, pair.rule)
            elif self._op_agrees(pair):
                agreed.append(pair)
        return instances, agreed

    def _check_concrete(self, pairs: list[Pair]) -> None:
        """In-memory source leaves to graft must hold values, not only shapes."""
        abstract = sorted(
            {
                si
                for pair in pairs
                for si in (pair.sources or (pair.source,))
                if is_abstract(self.src.leaves[si])
            }
        )
        if abstract:
            names = ", ".join(repr(render_parts(self.src.paths[si])) for si in abstract[:10])
            more = f", ... ({len(abstract)} in all)" if len(abstract) > 10 else ""
            self.problems.append(
                Problem(
                    "abstract",
                    f"{_count(len(abstract), 'source leaf', 'source leaves')} "
                    f"{'is' if len(abstract) == 1 else 'are'} abstract (jax.ShapeDtypeStruct) "
                    f"and {'has' if len(abstract) == 1 else 'have'} no value to graft: "
                    f"{names}{more}",
                    source=Path(self.src.paths[abstract[0]]),
                )
            )

    def _stack_members(self, r: int, new_prefix: Parts) -> dict[int, Parts] | None:
        """{index: old prefix} of a stack rule at new_prefix, or None if it has none.

        The indices must run 0..N-1; a gap or a capture that is not an integer
        is reported once (and {} returned).
        """
        key = (r, new_prefix)
        if key not in self._members:
            self._members[key] = self._find_members(r, new_prefix)
        return self._members[key]

    def _find_members(self, r: int, new_prefix: Parts) -> dict[int, Parts] | None:
        rule = self.rules[r]
        caps = rule.new.match(new_prefix) or ()
        groups = self._stack_groups.get(r)
        if groups is None:
            groups = self._stack_groups[r] = {}
            assert rule.old is not None
            for prefix, found in _source_prefixes(rule.old, self.src).items():
                groups.setdefault(found[:-1], []).append((found[-1], prefix))
        group = groups.get(tuple(caps))
        if not group:
            return None
        indices: dict[int, Parts] = {}
        bad = []
        for cap, prefix in group:
            index = _as_index(cap)
            if index is None:
                bad.append(repr(render_parts(prefix)))
            else:
                indices[index] = prefix
        ordered = dict(sorted(indices.items()))
        gaps = [k for k in range(max(ordered, default=-1) + 1) if k not in ordered]
        if bad or gaps:
            why = []
            if bad:
                why.append(f"{', '.join(bad[:5])} captured no integer index")
            if gaps:
                shown = ", ".join(map(str, gaps[:10]))
                why.append(
                    f"indices found {_ranges(list(ordered))}, missing {shown}: a stack needs "
                    "exactly 0..N-1"
                )
            self.problems.append(
                Problem(
                    "structure",
                    f"{render_parts(new_prefix)!r}: the source subtrees matching "
                    f"{rule.old.text if rule.old else ''!r} cannot be stacked: "
                    f"{'; '.join(why)} [rule {rule}]",
                    target=Path(new_prefix),
                    rule=str(rule),
                )
            )
            return {}
        return ordered

    def _unstack_index(self, r: int, new_prefix: Parts) -> int | None:
        rule = self.rules[r]
        caps = rule.new.match(new_prefix) or ()
        index = _as_index(caps[-1]) if caps else None
        if index is None:
            self.problems.append(
                Problem(
                    "structure",
                    f"{render_parts(new_prefix)!r}: the last '*' of {rule.new.text!r} captured "
                    f"{caps[-1] if caps else None!r}, not an integer index to unstack [rule {rule}]",
                    target=Path(new_prefix),
                    rule=str(rule),
                )
            )
        return index

    def _op_agrees(self, pair: Pair) -> bool:
        """Whether what a rule's operation makes of its source fits the target."""
        rule = self.rules[pair.rule]
        sleaves = self.src.leaves
        specs = [_leaves.spec_of(sleaves[si]) for si in (pair.sources or (pair.source,))]
        tspec = _leaves.spec_of(self.tgt.leaves[pair.target])
        tp = render_parts(self.tgt.paths[pair.target])
        sp = render_parts(self.src.paths[pair.source])
        if any(spec != specs[0] for spec in specs[1:]):
            differ = [
                f"{render_parts(self.src.paths[si])!r} is {_leaves.describe(spec)}"
                for si, spec in zip(pair.sources, specs, strict=True)
                if spec != specs[0]
            ]
            self.problems.append(
                Problem(
                    "shape",
                    f"{tp!r}: the {len(specs)} source leaves to stack differ: {sp!r} is "
                    f"{_leaves.describe(specs[0])} but {', '.join(differ[:3])} [rule {rule}]",
                    target=Path(self.tgt.paths[pair.target]),
                    source=Path(self.src.paths[pair.source]),
                    rule=str(rule),
                )
            )
            return False
        out, why = output_spec(rule, specs[0], len(specs), pair.layer)
        if out is None:
            self.problems.append(
                Problem(
                    "shape",
                    f"{tp!r} <- {sp!r} ({_leaves.describe(specs[0])}): {why} [rule {rule}]",
                    target=Path(self.tgt.paths[pair.target]),
                    source=Path(self.src.paths[pair.source]),
                    rule=str(rule),
                )
            )
            return False
        problem = _leaves.mismatch(tspec, out, cast=self.cast)
        if problem is None:
            return True
        kind = problem if problem in ("shape", "dtype") else "structure"
        self.problems.append(
            Problem(
                kind,
                f"{tp!r} in the state is {_leaves.describe(tspec)}, {rule.shown} makes "
                f"{_leaves.describe(out)} of {sp!r} ({_leaves.describe(specs[0])})",
                target=Path(self.tgt.paths[pair.target]),
                source=Path(self.src.paths[pair.source]),
                rule=str(rule),
            )
        )
        return False

    def _old_of(self, r: int, new_prefix: Parts, caps: tuple[Any, ...] | None = None) -> Parts:
        """The old path a rule's new side, matched at new_prefix, points to.

        `caps` are new's captures at new_prefix, when already known. For a
        stack rule, the literal part of its old side (before the index).
        """
        rule = self.rules[r]
        assert rule.old is not None
        if rule.gather == "stack":
            return rule.old.literal_prefix()
        if rule.old.is_literal:
            return self._literal_old(r)
        if caps is None:
            caps = rule.new.match(new_prefix) or ()
        return rule.old.substitute(rule.old_captures(caps)).parts

    def _literal_old(self, r: int) -> Parts:
        old = self._literal.get(r)
        if old is None:
            old = self._literal[r] = self.rules[r].old.as_path().parts  # type: ignore[union-attr]
        return old

    def _old_prefix(
        self, r: int, new_prefix: Parts, caps: tuple[Any, ...] | None = None
    ) -> Parts | None:
        if self.rules[r].gather == "stack":
            group = self._stack_members(r, new_prefix)
            return next(iter(group.values())) if group else None
        old = self._old_of(r, new_prefix, caps)
        return old if self.src.node_exists(old) else None

    def _specs_agree(self, tleaf: Any, sleaf: Any) -> bool:
        # Fast path for arrays: plain attribute compares, no spec objects.
        try:
            if tleaf.shape == sleaf.shape and tleaf.dtype == sleaf.dtype:
                return True
        except (AttributeError, TypeError):
            pass
        # Every dtype difference goes through the casting policy (DESIGN section 10).
        tspec, sspec = _leaves.spec_of(tleaf), _leaves.spec_of(sleaf)
        return _leaves.mismatch(tspec, sspec, cast=self.cast) is None

    def _ignored_model(self, parts: Parts, n: int) -> bool:
        return _ignored(self.ignore_model, self.used_model, parts, n)

    def _ignored_restored(self, parts: Parts, n: int) -> bool:
        return _ignored(self.ignore_restored, self.used_restored, parts, n)

    def _missing_prefix(self, r: int, new_prefix: Parts) -> None:
        rule = self.rules[r]
        old = self._old_of(r, new_prefix)
        if rule.gather == "stack" and rule.old is not None:
            why = f"no subtree of {self.src.what} matches {rule.old.text!r}" + _close_paths(
                rule.old.text, self.src.node_paths()
            )
        else:
            why = self.src.why_missing(old)
        # A close name for a literal rule's source means a typo: fix it, as
        # ignoring would only hide it. A glob rule found its other instances.
        typo = "did you mean" in why and rule.old is not None and rule.old.is_literal
        self.problems.append(
            Problem(
                "missing",
                f"{render_parts(new_prefix)!r} has no source: {why}"
                f" [rule {rule}]",
                target=Path(new_prefix),
                source=Path(old),
                rule=str(rule),
                remedy=""
                if typo
                else _keep_remedy(new_prefix)
                if rule.old is None or not rule.old.is_literal
                else "check the rule's source path or, " + _keep_remedy(new_prefix),
            )
        )

    def _missing_leaf(self, i: int, r: int, n: int, old_prefix: Parts) -> None:
        parts = self.tgt.paths[i]
        sparts = old_prefix + parts[n:]
        rule = self.rules[r]
        below = self.src.under(sparts)
        if below:
            self.problems.append(
                Problem(
                    "structure",
                    f"{render_parts(parts)!r} is a leaf in the state "
                    f"({_leaves.describe(_leaves.spec_of(self.tgt.leaves[i]))}) but "
                    f"{render_parts(sparts)!r} is a subtree in the source "
                    f"({_count(len(below), 'leaf', 'leaves')}) [rule {rule}]",
                    target=Path(parts),
                    source=Path(sparts),
                    rule=str(rule),
                )
            )
            return
        if self._ignored_model(parts, n):
            return
        # A leaf in the source where the state has a subtree: at the old prefix
        # or below it. Reported once per subtree, not once per target leaf.
        for j in range(len(old_prefix), len(sparts)):
            leaf_at = self.src.find(sparts[:j])
            if leaf_at is None:
                continue
            tsub = parts[: n + j - len(old_prefix)]
            if (tsub, sparts[:j]) in self._structure_seen:
                return
            self._structure_seen.add((tsub, sparts[:j]))
            self.problems.append(
                Problem(
                    "structure",
                    f"{render_parts(tsub)!r} is a subtree in the state but "
                    f"{render_parts(sparts[:j])!r} is a leaf in the source "
                    f"({_leaves.describe(_leaves.spec_of(self.src.leaves[leaf_at]))}) "
                    f"[rule {rule}]",
                    target=Path(tsub),
                    source=Path(sparts[:j]),
                    rule=str(rule),
                )
            )
            return
        # Where the source stops: a whole missing subtree is one problem, with
        # its leaf count, not one line per leaf.
        k = len(old_prefix) + 1
        while k < len(sparts) and self.src.node_exists(sparts[:k]):
            k += 1
        sroot = sparts[:k]
        troot = parts[: n + k - len(old_prefix)]
        group = self._missing_groups.get((r, troot))
        if group is not None:
            group[0] += 1
            return
        self._missing_groups[(r, troot)] = [1, len(self.problems), sroot, parts, sparts]
        self.problems.append(
            Problem(
                "missing",
                f"{render_parts(troot)!r} <- {render_parts(sroot)!r}: "
                f"{self.src.why_missing(sroot)} [rule {rule}]",
                target=Path(troot),
                source=Path(sroot),
                rule=str(rule),
                remedy=_keep_remedy(troot),
            )
        )

    def _count_missing_subtrees(self) -> None:
        """Adds the leaf count to each missing subtree's problem."""
        for (r, troot), (count, at, sroot, parts, sparts) in self._missing_groups.items():
            problem = self.problems[at]
            if count == 1:  # one leaf: name it
                message = (
                    f"{render_parts(parts)!r} <- {render_parts(sparts)!r}: "
                    f"{self.src.why_missing(sparts)} [rule {self.rules[r]}]"
                )
                target, source = Path(parts), Path(sparts)
            else:
                message = (
                    f"{render_parts(troot)!r} ({count} leaves) <- {render_parts(sroot)!r}: "
                    f"{self.src.why_missing(sroot)} [rule {self.rules[r]}]"
                )
                target, source = problem.target, problem.source
            self.problems[at] = dataclasses.replace(
                problem,
                message=message,
                target=target,
                source=source,
                remedy=_keep_remedy(target.parts if target is not None else troot),
            )

    def _mismatch(self, i: int, si: int, r: int) -> None:
        tspec = _leaves.spec_of(self.tgt.leaves[i])
        sspec = _leaves.spec_of(self.src.leaves[si])
        why = _leaves.mismatch(tspec, sspec, cast=self.cast)
        kind = str(why) if why in ("shape", "dtype") else "structure"
        # The cast option that would allow it, once per pair of dtypes, under "to fix".
        remedy = why.detail if why is not None and kind == "dtype" else ""
        tp, sp = self.tgt.paths[i], self.src.paths[si]
        self.problems.append(
            Problem(
                kind,
                f"{render_parts(tp)!r} in the state is {_leaves.describe(tspec)}, "
                f"{render_parts(sp)!r} in the source is {_leaves.describe(sspec)}",
                target=Path(tp),
                source=Path(sp),
                rule=str(self.rules[r]),
                remedy=remedy,
            )
        )

    def _check_unexpected(
        self,
        instances: dict[tuple[int, Parts], Parts | None],
        pairs: list[Pair],
    ) -> None:
        """Source leaves under a rule's old prefix that mirror no target leaf."""
        paired: set[int] = set()
        for pair in pairs:
            paired.update(pair.sources or (pair.source,))
        # Compared loosely: a structure problem names the source path with the
        # state's int keys, where a checkpoint holds their strings.
        accounted = {
            loose(p.source.parts)
            for p in self.problems
            if p.kind in ("structure", "shape", "dtype") and p.source
        }
        every = [(r, new, old) for (r, new), old in instances.items()] + self._stack_instances
        for r, new_prefix, old_prefix in dict.fromkeys(every):
            if old_prefix is None or self.rules[r].old is None:
                continue
            k = len(old_prefix)
            hint: str | None = None
            for si in self.src.under(old_prefix):
                if si in paired:
                    continue
                sparts = self.src.paths[si]
                if self.tgt.find(new_prefix + sparts[k:]) is not None:
                    continue  # taken by a more specific rule, or reported already
                if accounted and any(
                    loose(sparts[:j]) in accounted for j in range(1, len(sparts) + 1)
                ):
                    continue
                if self._ignored_restored(sparts, k):
                    continue
                if hint is None:
                    hint = self._empty_target_hint(new_prefix)
                self.problems.append(
                    Problem(
                        "unexpected",
                        f"{render_parts(sparts)!r} in the source has no target: the state "
                        f"has no {render_parts(new_prefix + sparts[k:])!r}{hint} "
                        f"[rule {self.rules[r]}]",
                        target=Path(new_prefix + sparts[k:]),
                        source=Path(sparts),
                        rule=str(self.rules[r]),
                        remedy=(
                            "a rule's target is an empty node of the state: graft it once it "
                            "is built (a Kauldron loader grafts opt_state entries in "
                            "transform_after_optimizer), or drop the rule"
                            if hint
                            else "to skip source leaves the state has no place for, add them "
                            "to ignore_restored_keys"
                        ),
                    )
                )

    def _empty_target_hint(self, new_prefix: Parts) -> str:
        """' (X is None in the state)' when a rule's whole target is an empty node.

        The usual cause is a state built without that part, such as a TrainState
        whose `opt_state` is still None: saying so beats a list of every leaf.
        """
        if self.tgt.under(new_prefix):
            return ""
        try:
            _, node = resolve(self.tgt.root, Path(new_prefix))
        except PathNotFoundError:
            return ""
        where = repr(render_parts(new_prefix)) if new_prefix else "the root"
        if node is None:
            return f" ({where} is None in the state)"
        return f" ({where} is an empty {type(node).__name__} in the state)"

    def _check_outranked_rules(self, instances: dict[tuple[int, Parts], Parts | None]) -> None:
        """Rule instances whose every leaf a more specific rule took.

        Their source subtree still counts for the unexpected check; and a rule
        that wins no leaf at all must still name something in the source, or a
        typo in it would pass silently.
        """
        if not self._outranked:
            return
        won = {r for r, _ in instances}
        missing: dict[int, Parts] = {}
        for r, i, n in self._outranked:
            new_prefix = self.tgt.paths[i][:n]
            if (r, new_prefix) in instances or self.rules[r].old is None:
                continue
            old_prefix = self._old_prefix(r, new_prefix)
            instances[(r, new_prefix)] = old_prefix
            if old_prefix is None and r not in won:
                missing.setdefault(r, new_prefix)
        found = {r for (r, _), old in instances.items() if old is not None}
        for r, new_prefix in missing.items():
            if r in found:
                continue
            rule = self.rules[r]
            old = self._old_of(r, new_prefix)
            self.problems.append(
                Problem(
                    "unmatched_rule",
                    f"rule {rule}: {self.src.why_missing(old)} (more specific rules "
                    "take all its target leaves)",
                    target=Path(new_prefix),
                    source=Path(old),
                    rule=str(rule),
                )
            )

    def _add_source_instances(self, instances: dict[tuple[int, Parts], Parts | None]) -> None:
        """Instances of glob rules that only the source has, for the unexpected check.

        A glob rule's instances come from the target leaves it covers. Where
        the source has one more (`enc.layers_5` for `dec.layers_* <- enc.layers_*`
        and a state without `dec.layers_5`), its leaves mirror no target leaf.
        """
        by_rule: dict[int, set[Parts]] = {}
        for (k, _), known_old in instances.items():
            if known_old is not None:
                by_rule.setdefault(k, set()).add(known_old)
        for r, rule in enumerate(self.rules):
            if rule.old is None or rule.old.is_literal or rule.gather == "unstack":
                # A keep rule reads nothing; an unstack takes the layers it is
                # asked for; a literal rule's one instance is known when it matched.
                continue
            known = by_rule.get(r, set())
            for old_prefix, caps in _source_prefixes(rule.old, self.src, known).items():
                try:
                    new_prefix = rule.new.substitute(
                        caps[:-1] if rule.gather == "stack" else caps
                    ).parts
                except GraftError:  # a capture the new side cannot take
                    continue
                if rule.gather == "stack":
                    if (r, new_prefix) not in instances:
                        self._stack_instances.append((r, new_prefix, old_prefix))
                else:
                    instances.setdefault((r, new_prefix), old_prefix)

    def _check_unmatched_rules(
        self, hits: list[int], instances: dict[tuple[int, Parts], Parts | None]
    ) -> None:
        """Rules whose new side matches no target leaf must name empty nodes.

        Such a rule grafts nothing, but the source leaves under its old side
        still have no target: its instances are added for the unexpected check.
        """
        for r, rule in enumerate(self.rules):
            if hits[r]:
                continue
            new_nodes = _matching_nodes(rule.new, self.tgt)
            if not new_nodes:
                self.problems.append(
                    Problem(
                        "unmatched_rule",
                        f"rule {rule}: {_nothing_matches(rule.new, self.tgt)}",
                        rule=str(rule),
                    )
                )
                continue
            if rule.old is None or rule.gather == "stack":
                continue  # a keep rule needs no source; a stack finds its members
            for parts in new_nodes:
                old = self._old_of(r, parts)
                if self.src.node_exists(old):
                    instances.setdefault((r, parts), old)
                else:
                    self.problems.append(
                        Problem(
                            "unmatched_rule",
                            f"rule {rule}: {self.src.why_missing(old)}",
                            target=Path(parts),
                            source=Path(old),
                            rule=str(rule),
                        )
                    )

    def _check_unmatched_ignores(self, instances: dict[tuple[int, Parts], Parts | None]) -> None:
        """An ignore pattern must match some existing key, or it is likely a typo."""
        sides = (
            ("ignore_model_keys", self.ignore_model, self.used_model, self.tgt, True),
            ("ignore_restored_keys", self.ignore_restored, self.used_restored, self.src, False),
        )
        for name, patterns, used, index, is_new in sides:
            prefixes = []
            every = [(new, old) for (_, new), old in instances.items()]
            every += [(new, old) for _, new, old in self._stack_instances]
            for new_prefix, old_prefix in every:
                p = new_prefix if is_new else old_prefix
                if p is not None:
                    prefixes.append(p)
            names: list[str] | None = None
            lengths = sorted({len(p) for p in prefixes})
            for pat, was_used in zip(patterns, used, strict=True):
                if was_used or _matches_any(pat, index, lengths):
                    continue
                if names is None:
                    # Keys as the user may have meant them: absolute, or relative
                    # to a rule's prefix; rendered once for every pattern.
                    parts = list(index.paths) + [
                        index.paths[i][len(p) :] for p in set(prefixes) for i in index.under(p)
                    ]
                    names = sorted({render_parts(p) for p in parts[:40000]})
                shown = sorted({render_parts(p) for p in prefixes})
                where = ", ".join(repr(s) for s in shown[:3]) + (", ..." if len(shown) > 3 else "")
                relative = f" relative to a rule's prefix ({where}) or" if shown else ""
                self.problems.append(
                    Problem(
                        "unmatched_ignore",
                        f"{name} pattern {pat.text!r} matches no key of {index.what},"
                        f"{relative} from the root{_close_names(pat.text, names)}",
                        pattern=pat.text,
                    )
                )


def _keep_remedy(target: Parts) -> str:
    return (
        f"to keep the state's values where the source has none, map them to None "
        f"({{{render_parts(target)!r}: None}}) or add them to ignore_model_keys"
    )


def _count(n: int, one: str, many: str | None = None) -> str:
    """'1 problem', '2 problems': a count with its noun in the right number."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def _as_index(capture: Any) -> int | None:
    """A capture as a layer index: an int, or a string of ASCII digits."""
    if type(capture) is int:
        return capture if capture >= 0 else None
    if isinstance(capture, str) and capture.isascii() and capture.isdigit():
        return int(capture)
    return None


def _ranges(indices: list[int]) -> str:
    """'0, 2, 3' or, past ten, '0, 1, 2, ..., 31' (indices ascending)."""
    if not indices:
        return "none"
    if len(indices) <= 10:
        return ", ".join(map(str, indices))
    return ", ".join(map(str, indices[:3])) + f", ..., {indices[-1]}"


def _source_prefixes(
    pattern: Pattern, index: TreeIndex, skip: set[Parts] | frozenset[Parts] = frozenset()
) -> dict[Parts, tuple[Any, ...]]:
    """Each distinct prefix of the index's leaf paths that pattern matches, with captures.

    Prefixes in `skip` (already known) are left out without being matched.
    """
    found: dict[Parts, tuple[Any, ...]] = {}
    head = pattern.literal_prefix()
    paths = [index.paths[i] for i in index.under(head)] if head else index.paths
    n = pattern.length
    if n is not None:  # match each distinct prefix once, in leaf order
        for prefix in dict.fromkeys(p[:n] for p in paths if len(p) >= n):
            if prefix in skip:
                continue
            caps = pattern.match(prefix)
            if caps is not None:
                found[prefix] = caps
        return found
    match = pattern.prefix_matcher()
    for parts in paths:
        m = match(parts)
        if m is not None and parts[: m[0]] not in skip:
            found.setdefault(parts[: m[0]], m[1])
    return found


def _ignored(patterns: list[Pattern], used: list[bool], parts: Parts, n: int) -> bool:
    hit = False
    rel = parts[n:]
    for k, pat in enumerate(patterns):
        if pat.match_prefix(rel) is not None or pat.match_prefix(parts) is not None:
            used[k] = True
            hit = True
    return hit


def _matches_any(pat: Pattern, index: TreeIndex, lengths: list[int]) -> bool:
    """Whether pat matches a prefix of some path, from the root or after n parts.

    Only paths holding the pattern's literal head where it would start are
    matched, so a pattern costs about the size of the subtree it names.
    """
    head = pat.literal_prefix()
    paths = index.paths
    for i in index.under(head) if head else range(len(paths)):
        if pat.match_prefix(paths[i]) is not None:
            return True
    for n in lengths:
        for i in index.under_at(n, head) if head else range(len(paths)):
            parts = paths[i]
            if n <= len(parts) and pat.match_prefix(parts[n:]) is not None:
                return True
    return False


def _matching_nodes(pattern: Pattern, index: TreeIndex) -> list[Parts]:
    if pattern.is_literal:
        parts = pattern.as_path().parts
        return [parts] if index.node_exists(parts) else []
    return [p for p in index.node_paths() if pattern.match(p) is not None]


def _nothing_matches(pattern: Pattern, index: TreeIndex) -> str:
    if pattern.is_literal:
        return index.why_missing(pattern.as_path().parts)
    return f"{pattern.text!r} matches nothing in {index.what}" + _close_paths(
        pattern.text, index.node_paths()
    )


def _close_paths(text: str, paths: Sequence[Parts]) -> str:
    return _close_names(text, sorted({render_parts(p) for p in paths[:20000]}))


def _close_names(text: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else ""


def raise_problems(problems: Sequence[Problem], n_rules: int) -> None:
    """Raises one error listing every problem, typed by their kinds."""
    raise _error(problems, n_rules)


def _error(problems: Sequence[Problem], n_rules: int) -> GraftError:
    kinds = {p.kind for p in problems}
    lines = [f"cannot graft ({_count(n_rules, 'rule')}): {_count(len(problems), 'problem')}"]
    for kind, title in _SECTIONS.items():
        group = [p for p in problems if p.kind == kind]
        if not group:
            continue
        lines.append(f"{title}: {len(group)}")
        lines += ["  " + p.message for p in group[:_LISTED]]
        if len(group) > _LISTED:
            lines.append(f"  ... and {len(group) - _LISTED} more")
    remedies = list(dict.fromkeys(p.remedy for p in problems if p.remedy))
    if remedies:
        lines.append("to fix:")
        lines += [f"  - {remedy}" for remedy in remedies[:_LISTED]]
    message = "\n".join(lines)
    cls: type[GraftError]
    if kinds <= set(_KEY_KINDS):
        cls = PathNotFoundError
    elif kinds <= set(_MISMATCH_KINDS):
        cls = MismatchError
    elif kinds == {"tie"}:
        cls = MappingError
    else:
        cls = GraftError
    return cls(message, problems=problems)
