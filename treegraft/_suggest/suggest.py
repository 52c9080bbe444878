"""`tg.suggest`: a proposed mapping from names, structure, shapes and dtypes alone."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from treegraft._parse.paths import render_parts
from treegraft._read.source import Source
from treegraft._suggest.compress import Leaves, Rule, keep_rules, merge, render, rules_for_pairs
from treegraft._suggest.match import Pair, Unit, match_units, units_of
from treegraft._suggest.names import Leaf, describe_leaf
from treegraft._suggest.result import Reason, Suggestion
from treegraft._tree.flat import flatten_parts

__all__ = ["suggest"]


def _metadata(source: Any) -> Any:
    """A source's tree of shapes and dtypes: a lazy source's metadata, else itself."""
    if isinstance(source, Source):
        return source.metadata()
    if isinstance(source, Mapping) and any(isinstance(v, Source) for v in source.values()):
        return {k: _metadata(v) for k, v in source.items()}  # several sources (section 17)
    return source


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        arr = np.asarray(leaf)
        return tuple(arr.shape), arr.dtype
    return tuple(int(d) for d in shape), dtype


def _leaves(tree: Any) -> list[Leaf]:
    paths, leaves, _ = flatten_parts(tree)
    return [describe_leaf(tuple(p), *_shape_dtype(leaf)) for p, leaf in zip(paths, leaves,
                                                                           strict=True)]


def _names(parts: frozenset[tuple[Any, ...]] | list[tuple[Any, ...]]) -> tuple[str, ...]:
    return tuple(sorted((render_parts(p) for p in parts), key=_natural))


def _natural(text: str) -> tuple[Any, ...]:
    """Sort key that puts `layers_2` before `layers_10`."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _shape_text(pair: Pair) -> str:
    n = pair.source.run if pair.relation == "stack" else pair.state.run
    base = {"equal": "equal", "stack": f"stacked ({n})", "unstack": f"unstacked ({n})"}
    text = base[pair.relation] + (", transposed" if pair.transposed else "")
    return text + (f", cast to {np.dtype(pair.cast).name}" if pair.cast is not None else "")


def _reason(rule: Rule) -> Reason:
    new = render(rule.new)
    if rule.old is None:
        return Reason(new, None, len(rule.new_leaves), "kept", (), "-",
                      "nothing to graft (no source leaf, or ambiguous)")
    pairs = rule.pairs
    shapes = sorted({_shape_text(p) for p in pairs})
    tokens = tuple(sorted({t for p in pairs for t in p.tokens}))
    runs = sorted({p.state.index_text() if p.relation != "stack" else p.source.index_text()
                   for p in pairs})
    weakest = min(pairs, key=lambda p: ("shape", "sibling", "names").index(p.evidence))
    sure = {"names": "high (names and shapes agree)",
            "sibling": "high (beside a matched leaf)",
            "shape": "medium (shape only: auto-named modules)"}[weakest.evidence]
    return Reason(new, rule.value(), len(rule.new_leaves), "; ".join(shapes), tokens,
                  ", ".join(runs), sure)


def _candidates(unit_leaf: Leaf, candidates: list[Unit]) -> tuple[str, ...]:
    out = []
    for cand in candidates:
        same = [leaf.parts for leaf in cand.leaves if leaf.indices == unit_leaf.indices]
        out.append(render_parts(same[0]) if same else render(cand.template))
    return tuple(sorted(out, key=_natural))


def suggest(state: Any, source: Any, /) -> Suggestion:
    """Proposes the mapping a person would write from `source` into `state`.

    Deterministic, from names, structure, shapes and dtypes alone (no array is
    read, nothing learned, no network). Names are compared as normalised tokens
    (separators and case; layer indices as `layers_3`, `layers.3`, `h.3`,
    `blocks.3`; `kernel`/`weight`/`scale`, `embedding`/`embed_tokens`,
    `attention`/`attn`); a PyTorch `weight` `[out, in]` meets a JAX `kernel`
    `[in, out]` transposed; a layer run `layers_0..N-1` meets a scanned
    `[N, ...]` leaf by `stack` or `unstack`. Linen's auto-named modules
    (`Dense_0`) are matched by shape when the shape has one candidate. Where
    two candidates are equally good, the state leaf goes to `ambiguous`:
    nothing is guessed.

    Args:
      state: the pytree to fill: arrays or `jax.ShapeDtypeStruct`s.
      source: a pytree, a tree of `jax.ShapeDtypeStruct`s, a lazy source
        (`tg.OrbaxCheckpoint`, `tg.SafetensorsCheckpoint`: only its metadata
        is read), or a dict of those (section 17).

    Returns:
      A `Suggestion`: `mapping` (globs, operations and keep rules; its number
      of rules does not grow with the number of layers), `explain()`,
      `as_code()`, `unmatched_state`, `unmatched_source`, `ambiguous`. The
      inputs are not modified.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'encoder': {'dense': {'kernel': np.zeros((3, 2))}}, 'head': np.zeros(2)}
      >>> source = {'model': {'encoder': {'dense': {'weight': np.ones((2, 3))}}}}
      >>> s = tg.suggest(state, source)
      >>> print(s.as_code())
      {
          "encoder.dense.kernel": tg.transpose("model.encoder.dense.weight", (1, 0)),
          "head": None,
      }
      >>> tg.graft(state, source, s.mapping)['encoder']['dense']['kernel'].sum()
      np.float64(6.0)
    """
    state_leaves = _leaves(state)
    source_leaves = _leaves(_metadata(source))
    state_all = Leaves([leaf.parts for leaf in state_leaves])
    source_all = Leaves([leaf.parts for leaf in source_leaves])
    found = match_units(units_of(state_leaves), units_of(source_leaves))
    rules, dropped = rules_for_pairs(found.pairs, state_all, source_all)
    left = found.state_left + [p.state for p in dropped]
    kept_units = left + [unit for unit, _ in found.ambiguous]
    rules = merge(rules + keep_rules(kept_units, state_all), state_all, source_all)
    rules.sort(key=lambda r: _natural(render(r.new)))

    used = frozenset().union(*(r.old_leaves for r in rules)) if rules else frozenset()
    ambiguous: dict[str, tuple[str, ...]] = {}
    for unit, candidates in found.ambiguous:
        for leaf in unit.leaves:
            ambiguous[render_parts(leaf.parts)] = _candidates(leaf, candidates)
    return Suggestion(
        mapping={render(r.new): r.value() for r in rules},
        unmatched_state=_names([leaf.parts for u in left for leaf in u.leaves]),
        unmatched_source=_names([leaf.parts for leaf in source_leaves if leaf.parts not in used]),
        ambiguous=dict(sorted(ambiguous.items(), key=lambda kv: _natural(kv[0]))),
        reasons=tuple(_reason(r) for r in rules),
    )
