"""Checks of single pairs: values, shapes, dtypes, operations; missing leaves and subtrees."""

from __future__ import annotations

import dataclasses
from typing import Any

from treegraft._parse.paths import Part, Path, render_parts
from treegraft._plan.problems import Problem, _close_paths, _count, _keep_remedy
from treegraft._plan.result import Pair
from treegraft._plan.specs import output_spec
from treegraft._plan.state import PlanState
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import is_abstract

Parts = tuple[Part, ...]


class LeafChecks(PlanState):
    """Checks of each paired leaf, and of the target leaves that found no source leaf."""

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

    def _op_agrees(self, pair: Pair) -> bool:
        """Whether what a rule's operation makes of its source fits the target."""
        rule = self.rules[pair.rule]
        sleaves = self.src.leaves
        specs = [_leaves.spec_of(sleaves[si]) for si in (pair.sources or (pair.source,))]
        tspec = _leaves.spec_of(self.tgt.leaves[pair.target])
        tp = render_parts(self.tgt.paths[pair.target])
        sp = render_parts(self.src.paths[pair.source])

        def refuse(kind: str, message: str, remedy: str = "") -> bool:
            self.problems.append(
                Problem(
                    kind,
                    message,
                    target=Path(self.tgt.paths[pair.target]),
                    source=Path(self.src.paths[pair.source]),
                    rule=str(rule),
                    remedy=remedy,
                )
            )
            return False

        if any(spec != specs[0] for spec in specs[1:]):
            differ = [
                f"{render_parts(self.src.paths[si])!r} is {_leaves.describe(spec)}"
                for si, spec in zip(pair.sources, specs, strict=True)
                if spec != specs[0]
            ]
            return refuse(
                "shape",
                f"{tp!r}: the {len(specs)} source leaves to stack differ: {sp!r} is "
                f"{_leaves.describe(specs[0])} but {', '.join(differ[:3])} [rule {rule}]",
            )
        out, why = output_spec(rule, specs[0], len(specs), pair.layer)
        if out is None:
            return refuse(
                "shape", f"{tp!r} <- {sp!r} ({_leaves.describe(specs[0])}): {why} [rule {rule}]"
            )
        problem = _leaves.mismatch(tspec, out, cast=self.cast)
        if problem is None:
            return True
        kind = str(problem) if problem in ("shape", "dtype") else "structure"
        return refuse(
            kind,
            f"{tp!r} in the state is {_leaves.describe(tspec)}, {rule.shown} makes "
            f"{_leaves.describe(out)} of {sp!r} ({_leaves.describe(specs[0])})",
            problem.detail if kind == "dtype" else "",
        )

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
                remedy=_missing_remedy(new_prefix, typo, literal=rule.old is not None
                                       and rule.old.is_literal),
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
        # Its message and paths are written once the group's leaves are counted.
        self.problems.append(Problem("missing", "", rule=str(rule)))

    def _count_missing_subtrees(self) -> None:
        """Writes each missing subtree's problem: the leaf alone, or the subtree and its count."""
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
                target, source = Path(troot), Path(sroot)
            self.problems[at] = dataclasses.replace(
                problem,
                message=message,
                target=target,
                source=source,
                remedy=_keep_remedy(target.parts),
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


def _missing_remedy(new_prefix: Parts, typo: bool, *, literal: bool) -> str:
    """The remedy for a rule whose source is missing: none for a typo (its close
    name says it); a keep rule or ignore pattern, after checking a literal path."""
    if typo:
        return ""
    if literal:
        return "check the rule's source path or, " + _keep_remedy(new_prefix)
    return _keep_remedy(new_prefix)
