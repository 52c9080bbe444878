"""Resolve a mapping against a state and a source, on metadata only.

`plan` pairs each target leaf with the source leaf that will fill it, runs every
check (missing, unexpected, unmatched rules and ignore patterns, ties, shape,
dtype, structure) and raises once with all problems. No array byte is read: a
plan needs only paths, shapes and dtypes, so it works on `jax.ShapeDtypeStruct`
and on checkpoint metadata.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft import _leaves
from treegraft._errors import GraftError, MappingError, MismatchError, PathNotFoundError
from treegraft._gc import young_collections_only
from treegraft._index import TreeIndex, is_abstract
from treegraft._paths import Part, Path, render_parts
from treegraft._patterns import Pattern
from treegraft._rules import Rule, parse_ignore, parse_mapping
from treegraft._source import Source
from treegraft._tree import resolve

__all__ = ["plan", "GraftPlan", "Entry", "Problem"]

Parts = tuple[Part, ...]
_LISTED = 20  # problems listed per kind in a message before "... and N more"

# Problem kinds and what each one means for the user.
_KEY_KINDS = ("missing", "unexpected", "unmatched_rule", "unmatched_ignore")
_MISMATCH_KINDS = ("shape", "dtype", "structure")
_SECTIONS = {
    "unmatched_rule": "rules that match nothing",
    "unmatched_ignore": "ignore patterns that match nothing",
    "missing": (
        "missing in the source: target leaves covered by a rule with no source leaf "
        "(to keep their current value, add them to ignore_model_keys)"
    ),
    "unexpected": (
        "unexpected in the source: source leaves under a rule with no target leaf "
        "(to skip them, add them to ignore_restored_keys)"
    ),
    "structure": "structure differs",
    "shape": "shape differs",
    "dtype": "dtype differs (casting is never implicit: pass cast=True to allow it)",
    "tie": "rules tied on the same leaf (make one more specific)",
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
    """

    kind: str
    message: str
    target: Path | None = None
    source: Path | None = None
    rule: str | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class Entry:
    """One grafted leaf: where it goes, where it comes from, by which rule."""

    target: Path
    source: Path
    rule: str
    shape: tuple[int, ...] | None
    dtype: Any
    nbytes: int


class GraftPlan:
    """The resolved graft: every target leaf's source, checked, nothing read yet.

    Print it for a table; inspect `entries`, `untouched`, `unused`, `abstract`,
    `report` and `nbytes` in code. Made by `treegraft.plan`.
    """

    def __init__(
        self,
        *,
        rules: Sequence[Rule],
        target: TreeIndex,
        source: TreeIndex,
        lazy: Source | None,
        pairs: list[tuple[int, int, int]],
        report: Sequence[Problem],
        cast: bool,
        strict: bool,
    ):
        self.rules = tuple(rules)
        self.target = target
        self.source = source
        self.lazy = lazy
        self.pairs = pairs  # (target index, source index, rule index)
        self.report: tuple[Problem, ...] = tuple(report)
        self.cast = cast
        self.strict = strict

    # -- inspection ----------------------------------------------------------

    @property
    def entries(self) -> list[Entry]:
        """Each grafted target leaf with its source path and rule."""
        out = []
        for ti, si, r in self.pairs:
            spec = _leaves.spec_of(self.source.leaves[si])
            out.append(
                Entry(
                    target=Path(self.target.paths[ti]),
                    source=Path(self.source.paths[si]),
                    rule=str(self.rules[r]),
                    shape=spec[0],
                    dtype=spec[1],
                    nbytes=_leaves.nbytes(spec),
                )
            )
        return out

    @property
    def untouched(self) -> list[Path]:
        """Target leaves that keep their current value."""
        taken = {ti for ti, _, _ in self.pairs}
        return [Path(p) for i, p in enumerate(self.target.paths) if i not in taken]

    @property
    def abstract(self) -> list[Path]:
        """Untouched target leaves that are abstract and stay so."""
        taken = {ti for ti, _, _ in self.pairs}
        return [
            Path(p)
            for i, p in enumerate(self.target.paths)
            if i not in taken and is_abstract(self.target.leaves[i])
        ]

    @property
    def unused(self) -> list[Path]:
        """Source leaves the graft does not read."""
        used = {si for _, si, _ in self.pairs}
        return [Path(p) for i, p in enumerate(self.source.paths) if i not in used]

    @property
    def nbytes(self) -> int:
        """Array bytes to read: each needed source leaf counted once."""
        used = {si for _, si, _ in self.pairs}
        return sum(_leaves.nbytes(_leaves.spec_of(self.source.leaves[i])) for i in used)

    def rule_counts(self) -> list[tuple[str, int, int]]:
        """Per rule: its text, how many leaves it feeds, and their bytes."""
        counts = [[0, 0] for _ in self.rules]
        for _, si, r in self.pairs:
            counts[r][0] += 1
            counts[r][1] += _leaves.nbytes(_leaves.spec_of(self.source.leaves[si]))
        return [(str(rule), n, b) for rule, (n, b) in zip(self.rules, counts, strict=True)]

    def summary(self, *, max_rows: int = 40) -> str:
        """A readable table: rules, grafted leaves, untouched and unused counts."""
        n_target = len(self.target)
        reads = len({si for _, si, _ in self.pairs})
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
        rows = [("target", "source", "shape/dtype")]
        for ti, si, _ in self.pairs[:max_rows]:
            spec = _leaves.spec_of(self.source.leaves[si])
            rows.append(
                (
                    render_parts(self.target.paths[ti]),
                    render_parts(self.source.paths[si]),
                    _leaves.describe(spec),
                )
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
            lines.append(f"report (strict=False): {len(self.report)} problem(s)")
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
Entry.__module__ = "treegraft"
Problem.__module__ = "treegraft"


def format_bytes(n: int) -> str:
    """Renders a byte count as B, KiB, MiB or GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


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
    cast: bool = False,
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
      cast: allow dtype differences; values are then cast to the target dtype.
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
        cast: bool,
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

    # The steps, in order.

    def run(self, lazy: Source | None, *, strict: bool, check_ignores: bool = True) -> GraftPlan:
        self.lazy = lazy
        winner, prefix_len, rule_hits = self._assign_rules()
        instances, pairs = self._pair_leaves(winner, prefix_len)
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
        for r, rule in enumerate(self.rules):
            match = rule.new.prefix_matcher()
            literals = rule.new.literal_count
            for i, parts in enumerate(paths):
                m = match(parts)
                if m is None:
                    continue
                hits[r] += 1
                key = (m[0], literals)
                if key > rank[i]:
                    if winner[i] >= 0:
                        self._outranked.append((winner[i], i, prefix_len[i]))
                    rank[i], winner[i], prefix_len[i] = key, r, m[0]
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
    ) -> tuple[dict[tuple[int, Parts], Parts | None], list[tuple[int, int, int]]]:
        """Pairs each covered target leaf with its source leaf; checks specs."""
        tgt, src = self.tgt, self.src
        # (rule, new prefix) -> old prefix, or None when it is not in the source.
        instances: dict[tuple[int, Parts], Parts | None] = {}
        pairs: list[tuple[int, int, int]] = []
        reported: set[tuple[int, Parts]] = set()
        for i, r in enumerate(winner):
            if r < 0:
                continue
            parts = tgt.paths[i]
            n = prefix_len[i]
            new_prefix = parts[:n]
            key = (r, new_prefix)
            if key in instances:
                old_prefix = instances[key]
            else:
                old_prefix = self._old_prefix(r, new_prefix)
                instances[key] = old_prefix
            if old_prefix is None:
                if not self._ignored_model(parts, n) and key not in reported:
                    reported.add(key)
                    self._missing_prefix(r, new_prefix)
                continue
            si = src.find(parts if old_prefix == new_prefix else old_prefix + parts[n:])
            if si is None:
                self._missing_leaf(i, r, n, old_prefix)
                continue
            pairs.append((i, si, r))
        tleaves, sleaves = tgt.leaves, src.leaves
        if self.lazy is not None and pairs:
            # One batch for the metadata of every paired source leaf.
            self.lazy.prefetch([sleaves[si] for _, si, _ in pairs])
        agreed = []
        for pair in pairs:
            if self._specs_agree(tleaves[pair[0]], sleaves[pair[1]]):
                agreed.append(pair)
            else:
                self._mismatch(*pair)
        return instances, agreed

    def _old_of(self, r: int, new_prefix: Parts) -> Parts:
        """The old path a rule's new side, matched at new_prefix, points to."""
        rule = self.rules[r]
        return rule.old.substitute(rule.new.match(new_prefix) or ()).parts

    def _old_prefix(self, r: int, new_prefix: Parts) -> Parts | None:
        old = self._old_of(r, new_prefix)
        return old if self.src.node_exists(old) else None

    def _specs_agree(self, tleaf: Any, sleaf: Any) -> bool:
        # Fast path for arrays: plain attribute compares, no spec objects.
        try:
            if tleaf.shape == sleaf.shape and (
                tleaf.dtype == sleaf.dtype
                or (self.cast and not _drops_imaginary(tleaf.dtype, sleaf.dtype))
            ):
                return True
        except AttributeError:
            pass
        tspec, sspec = _leaves.spec_of(tleaf), _leaves.spec_of(sleaf)
        if self.cast and _drops_imaginary(tspec[1], sspec[1]):
            return False
        return _leaves.mismatch(tspec, sspec, cast=self.cast) is None

    def _ignored_model(self, parts: Parts, n: int) -> bool:
        return _ignored(self.ignore_model, self.used_model, parts, n)

    def _ignored_restored(self, parts: Parts, n: int) -> bool:
        return _ignored(self.ignore_restored, self.used_restored, parts, n)

    def _missing_prefix(self, r: int, new_prefix: Parts) -> None:
        rule = self.rules[r]
        old = self._old_of(r, new_prefix)
        self.problems.append(
            Problem(
                "missing",
                f"{render_parts(new_prefix)!r} has no source: {self.src.why_missing(old)}"
                f" [rule {rule}]",
                target=Path(new_prefix),
                source=Path(old),
                rule=str(rule),
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
                    f"({len(below)} leaves) [rule {rule}]",
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
        self.problems.append(
            Problem(
                "missing",
                f"{render_parts(parts)!r} <- {render_parts(sparts)!r}: "
                f"{self.src.why_missing(sparts)} [rule {rule}]",
                target=Path(parts),
                source=Path(sparts),
                rule=str(rule),
            )
        )

    def _mismatch(self, i: int, si: int, r: int) -> None:
        tspec = _leaves.spec_of(self.tgt.leaves[i])
        sspec = _leaves.spec_of(self.src.leaves[si])
        why = _leaves.mismatch(tspec, sspec, cast=self.cast) or "type"
        note = ""
        if why == "type" and self.cast and _drops_imaginary(tspec[1], sspec[1]):
            why, note = "dtype", " (cast=True never drops an imaginary part)"
        kind = why if why in ("shape", "dtype") else "structure"
        tp, sp = self.tgt.paths[i], self.src.paths[si]
        self.problems.append(
            Problem(
                kind,
                f"{render_parts(tp)!r} in the state is {_leaves.describe(tspec)}, "
                f"{render_parts(sp)!r} in the source is {_leaves.describe(sspec)}{note}",
                target=Path(tp),
                source=Path(sp),
                rule=str(self.rules[r]),
            )
        )

    def _check_unexpected(
        self,
        instances: dict[tuple[int, Parts], Parts | None],
        pairs: list[tuple[int, int, int]],
    ) -> None:
        """Source leaves under a rule's old prefix that mirror no target leaf."""
        paired = {si for _, si, _ in pairs}
        accounted = {p.source for p in self.problems if p.kind in ("structure", "shape", "dtype")}
        for (r, new_prefix), old_prefix in instances.items():
            if old_prefix is None:
                continue
            k = len(old_prefix)
            hint: str | None = None
            for si in self.src.under(old_prefix):
                if si in paired:
                    continue
                sparts = self.src.paths[si]
                if self.tgt.find(new_prefix + sparts[k:]) is not None:
                    continue  # taken by a more specific rule, or reported already
                if accounted and any(Path(sparts).startswith(a) for a in accounted if a):
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
            if (r, new_prefix) in instances:
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
        for r, rule in enumerate(self.rules):
            if rule.old.is_literal:
                continue  # its one instance is known whenever the rule matched
            n = rule.old.length
            found: dict[Parts, tuple[Any, ...]] = {}
            if n is not None:  # match each distinct prefix once, in leaf order
                for prefix in dict.fromkeys(p[:n] for p in self.src.paths if len(p) >= n):
                    caps = rule.old.match(prefix)
                    if caps is not None:
                        found[prefix] = caps
            else:
                match = rule.old.prefix_matcher()
                for parts in self.src.paths:
                    m = match(parts)
                    if m is not None:
                        found.setdefault(parts[: m[0]], m[1])
            for old_prefix, caps in found.items():
                try:
                    new_prefix = rule.new.substitute(caps).parts
                except GraftError:  # a capture the new side cannot take
                    continue
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
            for (_r, new_prefix), old_prefix in instances.items():
                p = new_prefix if is_new else old_prefix
                if p is not None:
                    prefixes.append(p)
            for pat, was_used in zip(patterns, used, strict=True):
                if was_used or _matches_any(pat, index, [len(p) for p in prefixes]):
                    continue
                # Suggest keys as the user may have meant them: absolute, or
                # relative to a rule's prefix.
                names = list(index.paths) + [
                    index.paths[i][len(p) :] for p in set(prefixes) for i in index.under(p)
                ]
                shown = sorted({render_parts(p) for p in prefixes})
                where = ", ".join(repr(s) for s in shown[:3]) + (", ..." if len(shown) > 3 else "")
                relative = f" relative to a rule's prefix ({where}) or" if shown else ""
                self.problems.append(
                    Problem(
                        "unmatched_ignore",
                        f"{name} pattern {pat.text!r} matches no key of {index.what},"
                        f"{relative} from the root{_close_paths(pat.text, names)}",
                        pattern=pat.text,
                    )
                )


def _drops_imaginary(target_dtype: Any, source_dtype: Any) -> bool:
    """Whether casting source to target would drop an imaginary part (complex to real).

    numpy and jax do it with a ComplexWarning, Python's int() and float() refuse
    it: `cast=True` allows precision changes, not losing half of every value.
    """
    return _is_complex(source_dtype) and not _is_complex(target_dtype)


def _is_complex(dtype: Any) -> bool:
    try:
        return np.dtype(dtype).kind == "c"
    except TypeError:  # not a dtype: an opaque leaf's type
        return False


def _ignored(patterns: list[Pattern], used: list[bool], parts: Parts, n: int) -> bool:
    hit = False
    rel = parts[n:]
    for k, pat in enumerate(patterns):
        if pat.match_prefix(rel) is not None or pat.match_prefix(parts) is not None:
            used[k] = True
            hit = True
    return hit


def _matches_any(pat: Pattern, index: TreeIndex, prefix_lengths: list[int]) -> bool:
    lengths = sorted(set(prefix_lengths))
    for parts in index.paths:
        if pat.match_prefix(parts) is not None:
            return True
        for n in lengths:
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
    names = sorted({render_parts(p) for p in paths[:20000]})
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else ""


def raise_problems(problems: Sequence[Problem], n_rules: int) -> None:
    """Raises one error listing every problem, typed by their kinds."""
    raise _error(problems, n_rules)


def _error(problems: Sequence[Problem], n_rules: int) -> GraftError:
    kinds = {p.kind for p in problems}
    lines = [f"cannot graft ({n_rules} rule(s)): {len(problems)} problem(s)"]
    for kind, title in _SECTIONS.items():
        group = [p for p in problems if p.kind == kind]
        if not group:
            continue
        lines.append(f"{title}: {len(group)}")
        lines += ["  " + p.message for p in group[:_LISTED]]
        if len(group) > _LISTED:
            lines.append(f"  ... and {len(group) - _LISTED} more")
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
