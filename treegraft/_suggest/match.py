"""Matching: state leaves paired with source leaves, each pair with its evidence.

The second step of `suggest` (docs/design.md section 18). Leaves are first
gathered into units: the leaves of one template (`layers_*.attn.q.kernel`)
with one shape and dtype, so that a 48-layer model is matched as one unit per
kind of leaf, not 48 times. A state unit and a source unit are candidates when
their leaf kinds agree, their shapes fit (equal, transposed, or one side the
stack of the other's layer run) and their names share a token that tells
modules apart. A pair is taken only when each is the other's single best
candidate; a tie is never broken by a guess: those leaves are ambiguous.
Two weaker kinds of evidence follow: siblings (the `bias` beside a matched
`kernel`), and shape alone, only for Linen's auto-named modules (`Dense_0`),
whose names carry no meaning to read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from treegraft._suggest.names import Leaf, Wild, specific

__all__ = ["Unit", "Pair", "Matching", "units_of", "match_units"]


@dataclass(eq=False)
class Unit:
    """Leaves of one template with one leaf shape and dtype: matched as one."""

    template: tuple[Any, ...]
    leaves: list[Leaf]
    shape: tuple[int, ...]
    dtype: Any
    tokens: frozenset[str]
    kind: str
    raw_kind: str
    auto: bool
    indices: frozenset[tuple[int, ...]]

    @cached_property
    def depth(self) -> int:
        """How many layer indices each leaf has."""
        return len(next(iter(self.indices))) if self.indices else 0

    @cached_property
    def run(self) -> int | None:
        """N when the unit is one layer index running exactly 0..N-1, else None."""
        if self.depth != 1 or not any(isinstance(p, Wild) for p in self.template):
            return None  # a run is a glob over one layer index
        n = len(self.indices)
        return n if self.indices == {(i,) for i in range(n)} else None

    @cached_property
    def torch(self) -> bool | None:
        """True for a PyTorch `weight` [out, in], False for a JAX `kernel` [in, out], else None."""
        return _torch_side(self)

    def index_text(self) -> str:
        """The index runs, e.g. `0..47`, for `explain`."""
        if not self.depth:
            return "-"
        if self.run is not None:
            return f"0..{self.run - 1}"
        return ", ".join(f"{lo}..{hi}" for lo, hi in _ranges(sorted(i[0] for i in self.indices))) \
            if self.depth == 1 else f"{len(self.indices)} index tuples"


@dataclass(frozen=True)
class Pair:
    """A state unit fed by a source unit, how, and why."""

    state: Unit
    source: Unit
    relation: str  # "equal", "stack", "unstack"
    transposed: bool
    cast: Any  # the state dtype when the dtypes differ (both floating), else None
    tokens: tuple[str, ...]  # the shared name tokens
    evidence: str  # "names", "sibling", "shape"
    score: float


@dataclass
class Matching:
    """What matching found: the pairs, the ties, and the leaves left over."""

    pairs: list[Pair] = field(default_factory=list)
    ambiguous: list[tuple[Unit, list[Unit]]] = field(default_factory=list)  # with the ties
    state_left: list[Unit] = field(default_factory=list)
    source_left: list[Unit] = field(default_factory=list)


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _unit(template: tuple[Any, ...], leaves: list[Leaf]) -> Unit:
    first = leaves[0]
    return Unit(template, leaves, first.shape, first.dtype, first.tokens, first.kind,
                first.raw_kind, first.auto, frozenset(leaf.indices for leaf in leaves))


def units_of(leaves: Iterable[Leaf]) -> list[Unit]:
    """Leaves gathered by template; a template whose leaves differ in shape or dtype splits."""
    groups: dict[tuple[Any, ...], list[Leaf]] = defaultdict(list)
    for leaf in leaves:
        groups[leaf.template].append(leaf)
    units = []
    for template, group in groups.items():
        if len({(leaf.shape, str(leaf.dtype)) for leaf in group}) == 1:
            units.append(_unit(template, sorted(group, key=lambda leaf: leaf.indices)))
        else:
            # Differently shaped leaves under one template are not a layer run:
            # each is its own unit, its indices written out.
            for leaf in group:
                units.append(Unit(leaf.parts, [leaf], leaf.shape, leaf.dtype, leaf.tokens,
                                  leaf.kind, leaf.raw_kind, leaf.auto,
                                  frozenset({leaf.indices})))
    return units


def _torch_side(unit: Unit) -> bool | None:
    """True for a PyTorch `weight` [out, in], False for a JAX `kernel` [in, out], else None."""
    if "embed" in unit.tokens or "norm" in unit.tokens:
        return None  # embedding tables are [vocab, dim] in both
    raw = unit.raw_kind.lower()
    return True if raw == "weight" else False if raw == "kernel" else None


def _fit(state: Unit, source: Unit, s_shape: tuple[int, ...],
         r_shape: tuple[int, ...]) -> bool | None:
    """Whether the source leaf shape fits as is (False), transposed (True), or not (None)."""
    if len(s_shape) == 2 and len(r_shape) == 2:
        sides = (state.torch, source.torch)
        conventions_differ = None not in sides and sides[0] != sides[1]
        # A square kernel against a square weight is transposed by convention
        # (PyTorch stores [out, in], JAX [in, out]); other shapes say it alone.
        if s_shape == r_shape[::-1] and (s_shape != r_shape or conventions_differ):
            return True
    return False if s_shape == r_shape else None


def _dtype_fit(state: Unit, source: Unit) -> tuple[bool, Any]:
    try:
        s, r = np.dtype(state.dtype), np.dtype(source.dtype)
    except TypeError:  # jax's extended dtypes (PRNG keys): only the same one fits
        return (str(state.dtype) == str(source.dtype)), None
    if s == r:
        return True, None
    floating = all(np.issubdtype(d, np.floating) or "float" in d.name for d in (s, r))
    return (True, state.dtype) if floating else (False, None)


def relate(state: Unit, source: Unit) -> tuple[str, bool] | None:
    """How a source unit could feed a state unit: (relation, transposed), or None."""
    if state.kind != source.kind:
        return None
    if state.depth == source.depth and state.indices == source.indices:
        fit = _fit(state, source, state.shape, source.shape)
        return None if fit is None else ("equal", fit)
    n = source.run
    if state.depth == 0 and n is not None and state.shape[:1] == (n,):
        fit = _fit(state, source, state.shape[1:], source.shape)
        return None if fit is None else ("stack", fit)
    n = state.run
    if source.depth == 0 and n is not None and source.shape[:1] == (n,):
        fit = _fit(state, source, state.shape, source.shape[1:])
        return None if fit is None else ("unstack", fit)
    return None


def _score(a: frozenset[str], b: frozenset[str]) -> float:
    return 2 * len(a & b) / (len(a) + len(b)) if a or b else 0.0


@dataclass
class _Cand:
    source: Unit
    relation: str
    transposed: bool
    cast: Any
    score: float
    shared: tuple[str, ...]


def fitting(states: Sequence[Unit], sources: Sequence[Unit]) -> dict[int, list[_Fit]]:
    """For each state unit (by id), the source units whose shapes and dtypes fit it.

    Sources are looked up by shape, so this is linear in the number of units,
    not their product: a model of thousands of distinct leaves stays quick.
    """
    by_shape: dict[tuple[int, ...], list[Unit]] = defaultdict(list)
    for r in sources:
        by_shape[r.shape].append(r)
    out: dict[int, list[_Fit]] = {}
    for state in states:
        shapes = {state.shape, state.shape[::-1], state.shape[1:], state.shape[1:][::-1]}
        if state.run is not None:
            shapes |= {(state.run, *state.shape), (state.run, *state.shape[::-1])}
        fits = []
        seen: set[int] = set()
        for shape in sorted(shapes):
            for source in by_shape.get(shape, ()):
                if id(source) in seen:
                    continue
                seen.add(id(source))
                rel = relate(state, source)
                ok, cast = _dtype_fit(state, source)
                if rel is not None and ok:
                    fits.append(_Fit(source, rel[0], rel[1], cast))
        out[id(state)] = fits
    return out


@dataclass(frozen=True)
class _Fit:
    source: Unit
    relation: str
    transposed: bool
    cast: Any


def _candidates(state: Unit, fits: list[_Fit], available: set[int], *, evidence: str,
                parents: dict[tuple[Any, ...], tuple[Any, ...]]) -> list[_Cand]:
    """The fitting, still unmatched source units that this round's evidence allows."""
    parent = parents.get(state.template[:-1])
    if evidence == "sibling" and parent is None:
        return []  # beside a matched leaf only: its parent module is matched already
    out = []
    for fit in fits:
        source = fit.source
        if id(source) not in available:
            continue
        if evidence == "sibling" and source.template[:-1] != parent:
            continue  # in matched modules (the leaf kinds agree: `relate` checked)
        if evidence == "shape" and not (state.auto or source.auto) or \
                evidence == "shape" and not _same_container(state, source, parents):
            continue  # shape alone speaks only for auto-named modules, side by side
        shared = state.tokens & source.tokens
        # The same path on both sides is the best evidence there is, whatever
        # its tokens say (`params.b[0]` has none that tell modules apart).
        same = state.template == source.template
        if evidence == "names" and not same and not specific(shared):
            continue
        out.append(_Cand(source, fit.relation, fit.transposed, fit.cast,
                         _score(state.tokens, source.tokens) + (1.0 if same else 0.0),
                         tuple(sorted(shared))))
    return out


def _same_container(state: Unit, source: Unit,
                    parents: dict[tuple[Any, ...], tuple[Any, ...]]) -> bool:
    """Whether two leaves' modules sit in the same place (`params.Dense_0`, `params.encode`)."""
    s, r = state.template[:-2], source.template[:-2]
    if s == r:
        return True
    return any(k[:-1] == s and v[:-1] == r for k, v in parents.items())


def _best(cands: list[_Cand]) -> list[_Cand]:
    if not cands:
        return []
    top = max(c.score for c in cands)
    return [c for c in cands if c.score == top]


def _round(states: list[Unit], sources: list[Unit], evidence: str, found: Matching,
           parents: dict[tuple[Any, ...], tuple[Any, ...]],
           fits: dict[int, list[_Fit]]) -> dict[int, list[Unit]]:
    """Takes every mutual single best pair, repeatedly; returns the ties left."""
    ties: dict[int, list[Unit]] = {}
    while True:
        available = {id(r) for r in sources}
        cands = {id(s): _candidates(s, fits[id(s)], available, evidence=evidence,
                                    parents=parents) for s in states}
        best_for_source: dict[int, list[tuple[Unit, _Cand]]] = defaultdict(list)
        for s in states:
            for c in cands[id(s)]:
                best_for_source[id(c.source)].append((s, c))
        taken = []
        for s in states:
            best = _best(cands[id(s)])
            if len(best) != 1:
                continue
            c = best[0]
            rivals = best_for_source[id(c.source)]
            top = max(other.score for _, other in rivals)
            if c.score == top and sum(1 for _, other in rivals if other.score == top) == 1:
                taken.append((s, c))
        for s, c in taken:
            found.pairs.append(Pair(s, c.source, c.relation, c.transposed, c.cast, c.shared,
                                    evidence, c.score))
        gone = {id(s) for s, _ in taken} | {id(c.source) for _, c in taken}
        states[:] = [s for s in states if id(s) not in gone]
        sources[:] = [r for r in sources if id(r) not in gone]
        for s, c in taken:
            if evidence != "sibling":
                parents.setdefault(s.template[:-1], c.source.template[:-1])
        if not taken:
            for s in states:
                best = _best(cands[id(s)])
                if len(best) > 1 or best and len(best_for_source[id(best[0].source)]) > 1:
                    ties[id(s)] = [c.source for c in cands[id(s)]]
            return ties


def _same_paths(states: list[Unit], sources: list[Unit], found: Matching,
                parents: dict[tuple[Any, ...], tuple[Any, ...]]) -> None:
    """Pairs the units whose templates are equal and whose shapes fit: no rival can beat that.

    The names round would take them too (an equal path scores above any
    other); taken first, identical parts of two trees cost no comparison.
    """
    by_template = {r.template: r for r in sources}
    taken: set[int] = set()
    for s in states:
        r = by_template.get(s.template)
        if r is None:
            continue
        rel = relate(s, r)
        ok, cast = _dtype_fit(s, r)
        if rel is None or not ok:
            continue
        found.pairs.append(Pair(s, r, rel[0], rel[1], cast,
                                tuple(sorted(s.tokens & r.tokens)), "names", 2.0))
        parents.setdefault(s.template[:-1], r.template[:-1])
        taken.update((id(s), id(r)))
    states[:] = [s for s in states if id(s) not in taken]
    sources[:] = [r for r in sources if id(r) not in taken]


def match_units(states: list[Unit], sources: list[Unit]) -> Matching:
    """Pairs state units with source units by names, then siblings, then auto-names' shapes."""
    found = Matching()
    states, sources = list(states), list(sources)
    parents: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    ties: dict[int, list[Unit]] = {}
    _same_paths(states, sources, found, parents)
    fits = fitting(states, sources)
    # Names evidence needs a shared token: filtered once, not in every pass.
    named = {id(s): [f for f in fits[id(s)] if specific(s.tokens & f.source.tokens)]
             for s in states}
    auto = any(u.auto for u in states) or any(u.auto for u in sources)
    for evidence in ("names", "sibling", "shape", "sibling"):
        if evidence == "shape" and not auto:
            continue
        ties.update(_round(states, sources, evidence, found, parents,
                           named if evidence == "names" else fits))
    # What is left with two or more equally fitting candidates is ambiguous,
    # whatever the evidence: never a guess.
    available = {id(r) for r in sources}
    for s in states:
        left = [f.source for f in fits[id(s)] if id(f.source) in available]
        if id(s) in ties or len(left) > 1 and len({_score(s.tokens, r.tokens)
                                                   for r in left}) == 1:
            found.ambiguous.append((s, ties.get(id(s)) or left))
        else:
            found.state_left.append(s)
    found.source_left = sources
    found.pairs = _oriented(found.pairs)
    return found


def _convention_question(pair: Pair) -> bool | None:
    """For a `weight` against a `kernel`: whether its shapes showed it transposed (None: square)."""
    s = pair.state.shape[1:] if pair.relation == "unstack" else pair.state.shape
    s = s[1:] if pair.relation == "stack" else s
    sides = (pair.state.torch, pair.source.torch)
    if len(s) != 2 or None in sides or sides[0] == sides[1]:
        return None
    return None if s[0] == s[1] else pair.transposed


def _oriented(pairs: list[Pair]) -> list[Pair]:
    """Square `weight`s against `kernel`s oriented as the model's other such pairs show.

    A square shape cannot tell `[out, in]` from `[in, out]`; PyTorch's
    convention says transposed, but some PyTorch modules store `[in, out]`
    (GPT-2's `Conv1D`). When every non-square weight/kernel pair fits as is,
    the square ones are taken as is too.
    """
    shown = {_convention_question(p) for p in pairs} - {None}
    if shown != {False}:
        return pairs
    out = []
    for p in pairs:
        s = p.state.shape[1:] if p.relation == "unstack" else p.state.shape
        s = s[1:] if p.relation == "stack" else s
        square = len(s) == 2 and s[0] == s[1] and None not in (p.state.torch, p.source.torch) \
            and p.state.torch != p.source.torch
        out.append(replace(p, transposed=False) if square else p)
    return out
