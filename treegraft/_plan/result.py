"""The result of planning: `GraftPlan` and its `Entry` rows.

A plan is inspectable (entries with their operations, untouched, unused,
abstract, report, nbytes, executable) and printable; `treegraft.execute` runs
it. Its public attributes hold public types; what the execute and insert steps
run on is one `PlanRecord` (record.py), `GraftPlan._record`, byte counts
included: looking at a plan does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treegraft._parse.paths import Part, Path, render_parts
from treegraft._plan.layout import layout_line
from treegraft._plan.problems import Problem, _count
from treegraft._plan.record import Pair, PlanRecord
from treegraft._plan.specs import operation_shown
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import is_abstract
from treegraft._tree.leaves import format_bytes

Parts = tuple[Part, ...]


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

    Attributes:
      rules: the rules, in the mapping's order, each as "'new' <- 'old'".
      state: the state the plan grafts into, as given to `plan`.
      source: the source, as given to `plan`: a pytree or a `treegraft.Source`.
      report: the problems that did not fail the plan (with `strict=False`,
        abstract target leaves no rule fills among them; and an abstract
        source leaf, which `executable` reports).
      cast: the `cast` option the plan was made with.
      strict: the `strict` option the plan was made with.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> p = tg.plan({'w': np.zeros(2)}, {'v': np.ones(2)}, {'w': 'v'})
      >>> [(str(e.target), str(e.source), e.nbytes) for e in p.entries]
      [('w', 'v', 16)]
      >>> tg.execute(p)['w']
      array([1., 1.])
    """

    def __init__(
        self,
        record: PlanRecord,
        *,
        source: Any,
        report: Sequence[Problem],
        strict: bool,
    ):
        self._record = record
        self.rules: tuple[str, ...] = tuple(str(rule) for rule in record.rules)
        self.state: Any = record.target.root
        self.source: Any = source
        self.report: tuple[Problem, ...] = tuple(report)
        self.cast = record.cast
        self.strict = strict

    # -- inspection ----------------------------------------------------------

    def _operation(self, pair: Pair) -> str:
        """What happens to a pair's values on the way in ("" for a plain copy)."""
        rec = self._record
        out, spec = operation_shown(rec.rules[pair.rule], rec.source, pair)
        tdtype = _leaves.spec_of(rec.target.leaves[pair.target])[1]
        if spec[1] != tdtype and not isinstance(tdtype, type):
            out.append(f"cast {spec[1]} -> {tdtype}")
        return "; ".join(out)

    @property
    def entries(self) -> list[Entry]:
        """Each grafted target leaf with its source path, rule and operation."""
        rec = self._record
        out = []
        for k, pair in enumerate(rec.pairs):
            spec = _leaves.spec_of(rec.source.leaves[pair.source])
            sources = pair.sources or (pair.source,)
            out.append(
                Entry(
                    target=Path(rec.target.paths[pair.target]),
                    source=Path(rec.source.paths[pair.source]),
                    rule=str(rec.rules[pair.rule]),
                    shape=spec[0],
                    dtype=spec[1],
                    nbytes=rec.pair_nbytes[k],
                    operation=self._operation(pair),
                    sources=tuple(Path(rec.source.paths[si]) for si in sources),
                )
            )
        return out

    @property
    def executable(self) -> bool:
        """Whether `treegraft.execute` can run this plan (every source leaf has a value)."""
        return not any(p.kind == "abstract" for p in self.report)

    def _taken(self) -> set[int]:
        return {pair.target for pair in self._record.pairs}

    @property
    def untouched(self) -> list[Path]:
        """Target leaves that keep their current value (keep rules included)."""
        taken = self._taken()
        return [Path(p) for i, p in enumerate(self._record.target.paths) if i not in taken]

    @property
    def abstract(self) -> list[Path]:
        """Untouched target leaves that are abstract and stay so."""
        taken = self._taken()
        target = self._record.target
        return [
            Path(p)
            for i, p in enumerate(target.paths)
            if i not in taken and is_abstract(target.leaves[i])
        ]

    def _used(self) -> set[int]:
        used: set[int] = set()
        for pair in self._record.pairs:
            used.update(pair.sources or (pair.source,))
        return used

    @property
    def unused(self) -> list[Path]:
        """Source leaves the graft does not read."""
        used = self._used()
        return [Path(p) for i, p in enumerate(self._record.source.paths) if i not in used]

    @property
    def nbytes(self) -> int:
        """Array bytes to read: each needed source leaf (or slice) counted once.

        For an unstack rule over a checkpoint, the bytes of the chunks that
        hold each slice: a slice of an array stored as one chunk costs it whole.
        Counted once, by `plan`.
        """
        return self._record.nbytes

    def rule_counts(self) -> list[tuple[str, int, int]]:
        """Per rule: its text, how many leaves it feeds, and their bytes."""
        rec = self._record
        counts = [[0, 0] for _ in rec.rules]
        for k, pair in enumerate(rec.pairs):
            counts[pair.rule][0] += 1
            counts[pair.rule][1] += rec.pair_nbytes[k]
        return [(str(rule), n, b) for rule, (n, b) in zip(rec.rules, counts, strict=True)]

    def summary(self, *, max_rows: int = 40) -> str:
        """A readable table: rules, grafted leaves, untouched and unused counts."""
        rec = self._record
        pairs = rec.pairs
        n_target = len(rec.target)
        reads = len(self._used())
        lines = [
            f"GraftPlan: {len(pairs)} of {n_target} target leaves from "
            f"{rec.source.what}; {reads} source leaves to read ({format_bytes(self.nbytes)})",
        ]
        placed = layout_line([rec.target.leaves[pair.target] for pair in pairs])
        lines += [placed, ""] if placed else [""]
        rule_rows = [("rule", "leaves", "bytes")] + [
            (text, str(n), format_bytes(b)) for text, n, b in self.rule_counts()
        ]
        lines += _table(rule_rows)
        lines.append("")
        ops = [self._operation(pair) for pair in pairs[:max_rows]]
        show_ops = any(ops)
        rows = [("target", "source", "shape/dtype") + (("operation",) if show_ops else ())]
        for pair, op in zip(pairs[:max_rows], ops, strict=True):
            spec = _leaves.spec_of(rec.source.leaves[pair.source])
            source = render_parts(rec.source.paths[pair.source])
            if pair.sources:
                source += f" (+{len(pair.sources) - 1})"
            rows.append(
                (
                    render_parts(rec.target.paths[pair.target]),
                    source,
                    _leaves.describe(spec),
                )
                + ((op,) if show_ops else ())
            )
        lines += _table(rows)
        if len(pairs) > max_rows:
            lines.append(f"... and {len(pairs) - max_rows} more")
        untouched = n_target - len(pairs)
        n_abstract = len(self.abstract)
        lines.append("")
        lines.append(
            f"untouched target leaves: {untouched}"
            + (f" ({n_abstract} stay abstract)" if n_abstract else "")
        )
        lines.append(f"unused source leaves: {len(rec.source) - reads}")
        if self.report:
            # A strict plan's report holds only the abstract leaves execute refuses.
            label = "report" if self.strict else "report (strict=False)"
            lines.append(f"{label}: {_count(len(self.report), 'problem')}")
            lines += ["  " + p.message for p in self.report[:max_rows]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"GraftPlan(rules={len(self.rules)}, grafted={len(self._record.pairs)}, "
            f"target_leaves={len(self._record.target)}, bytes={self.nbytes})"
        )


GraftPlan.__module__ = "treegraft"
Pair.__module__ = "treegraft"
Entry.__module__ = "treegraft"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
