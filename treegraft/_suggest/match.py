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
from dataclasses import dataclass, field
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

    @property
    def depth(self) -> int:
        """How many layer indices each leaf has."""
        return len(next(iter(self.indices))) if self.indices else 0

    @property
    def run(self) -> int | None:
        """N when the unit is one layer index running exactly 0..N-1, else None."""
        if self.depth != 1 or not any(isinstance(p, Wild) for p in self.template):
            return None  # a run is a glob over one layer index
        n = len(self.indices)
        return n if self.indices == {(i,) for i in range(n)} else None

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
        sides = (_torch_side(state), _torch_side(source))
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


def _candidates(state: Unit, sources: Sequence[Unit], *, evidence: str,
                parents: dict[tuple[Any, ...], tuple[Any, ...]]) -> list[_Cand]:
    out = []
    for source in sources:
        rel = relate(state, source)
        if rel is None:
            continue
        ok, cast = _dtype_fit(state, source)
        if not ok:
            continue
        shared = state.tokens & source.tokens
        # The same path on both sides is the best evidence there is, whatever
        # its tokens say (`params.b[0]` has none that tell modules apart).
        same = state.template == source.template
        if evidence == "names":
            if not specific(shared) and not same:
                continue
        elif evidence == "sibling":
            # Beside a matched leaf: its parent module is matched already.
            if parents.get(state.template[:-1]) != source.template[:-1]:
                continue
        elif not (state.auto or source.auto):
            continue  # shape alone speaks only for auto-named modules
        out.append(_Cand(source, rel[0], rel[1], cast,
                         _score(state.tokens, source.tokens) + (1.0 if same else 0.0),
                         tuple(sorted(shared))))
    return out


def _best(cands: list[_Cand]) -> list[_Cand]:
    if not cands:
        return []
    top = max(c.score for c in cands)
    return [c for c in cands if c.score == top]


def _round(states: list[Unit], sources: list[Unit], evidence: str, found: Matching,
           parents: dict[tuple[Any, ...], tuple[Any, ...]]) -> dict[int, list[Unit]]:
    """Takes every mutual single best pair, repeatedly; returns the ties left."""
    ties: dict[int, list[Unit]] = {}
    while True:
        cands = {id(s): _candidates(s, sources, evidence=evidence, parents=parents)
                 for s in states}
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
            states.remove(s)
            sources.remove(c.source)
            if evidence != "sibling":
                parents.setdefault(s.template[:-1], c.source.template[:-1])
        if not taken:
            for s in states:
                best = _best(cands[id(s)])
                if len(best) > 1 or best and len(best_for_source[id(best[0].source)]) > 1:
                    ties[id(s)] = [c.source for c in cands[id(s)]]
            return ties


def match_units(states: list[Unit], sources: list[Unit]) -> Matching:
    """Pairs state units with source units by names, then siblings, then auto-names' shapes."""
    found = Matching()
    states, sources = list(states), list(sources)
    parents: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    ties: dict[int, list[Unit]] = {}
    for evidence in ("names", "sibling", "shape", "sibling"):
        ties.update(_round(states, sources, evidence, found, parents))
    # What is left with two or more equally fitting candidates is ambiguous,
    # whatever the evidence: never a guess.
    for s in states:
        fitting = [r for r in sources if relate(s, r) is not None and _dtype_fit(s, r)[0]]
        if id(s) in ties or len(fitting) > 1 and len({_score(s.tokens, r.tokens)
                                                      for r in fitting}) == 1:
            found.ambiguous.append((s, ties.get(id(s)) or fitting))
        else:
            found.state_left.append(s)
    found.source_left = sources
    return found
