"""Round 3, errors (items 19 and 20): did-you-mean is one indexed search per mistake, and
problems repeated across layers are one line.

Proves, on behaviour only (the timings are in `benchmarks/error_path.py`):
- a mistyped stack pattern over a layered MoE-like source is searched once, not once per
  layer, and answered with a pattern (`model.layers.*.mlp.experts.*.up_proj.weight`);
- a mistyped key among thousands hands difflib a few candidates, not all of them, and
  still finds the right one;
- the message merges problems that differ only in path indices (`layers[0..3]`, with a
  count), keeps every problem in `GraftError.problems`, never merges different shapes,
  and gives one remedy per cause, as a pattern;
- ignore patterns with wildcards are answered with patterns, and a right stack pattern
  that misses one layer is not "corrected" to itself.
"""

from __future__ import annotations

import difflib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treegraft as tg

SDS = jax.ShapeDtypeStruct
LAYERS, EXPERTS = 4, 3


def _moe(*, missing_layer: int | None = None):
    """A Qwen-3-MoE-like source (layers x experts x projections) and a stacked state."""
    def leaf(*shape):
        return SDS(shape, jnp.float32)

    layers = []
    for i in range(LAYERS):
        experts = [
            {p: {"weight": leaf(2, 4)} for p in ("gate_proj", "up_proj", "down_proj")}
            for _ in range(EXPERTS)
        ]
        layers.append(
            {
                "self_attn": {"q_proj": {"weight": leaf(4, 4)}},
                "mlp": {"gate": {"weight": leaf(EXPERTS, 4)},
                        "experts": [] if i == missing_layer else experts},
            }
        )
    source = {"model": {"layers": layers, "norm": {"weight": leaf(4)}}}
    state = {
        "layers": [
            {"q": leaf(4, 4), "router": leaf(EXPERTS, 4),
             "experts": {p: leaf(EXPERTS, 2, 4) for p in ("gate", "up", "down")}}
            for _ in range(LAYERS)
        ],
        "norm": leaf(4),
    }
    mapping = {
        "norm": "model.norm.weight",
        "layers.*.q": "model.layers.*.self_attn.q_proj.weight",
        "layers.*.router": "model.layers.*.mlp.gate.weight",
    }
    for p in ("gate", "up", "down"):
        mapping[f"layers.*.experts.{p}"] = tg.stack(f"model.layers.*.mlp.experts.*.{p}_proj.weight")
    return state, source, mapping


@pytest.fixture
def searches(monkeypatch):
    """Records the candidates of every difflib search made while the test runs."""
    calls: list[int] = []
    real = difflib.get_close_matches

    def counted(word, possibilities, *args, **kwargs):
        possibilities = list(possibilities)
        calls.append(len(possibilities))
        return real(word, possibilities, *args, **kwargs)

    monkeypatch.setattr(difflib, "get_close_matches", counted)
    return calls


def test_moe_stack_typo_is_one_line_with_a_pattern_and_one_search(searches):
    state, source, mapping = _moe()
    tg.plan(state, source, mapping)  # the mapping without the mistake plans
    mapping["layers.*.experts.up"] = tg.stack("model.layers.*.mlp.experts.*.up_prj.weight")
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, source, mapping)
    e = info.value
    assert len(e.problems) == LAYERS  # the problems stay one per layer
    lines = str(e).splitlines()
    [line] = [x for x in lines if "has no source" in x]
    assert line.startswith(f"  'layers[0..{LAYERS - 1}].experts.up' has no source: ")
    assert line.endswith(f" (x{LAYERS})")
    # Answered with a pattern, not with one concrete leaf.
    assert "(did you mean 'model.layers.*.mlp.experts.*.up_proj.weight'" in line
    assert "layers[0].mlp" not in str(e) and "experts[" not in str(e)
    # One search for the one distinct mistake, over patterns (a few), not paths.
    assert len(searches) == 1, searches
    assert searches[0] < len(jax.tree_util.tree_leaves(source)) / 2
    # A typo is fixed, not ignored: no remedy that would hide it.
    assert "to fix:" not in str(e)


def test_right_stack_pattern_missing_one_layer_is_not_corrected_to_itself():
    state, source, mapping = _moe(missing_layer=1)
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, source, mapping)
    msg = str(info.value)
    assert "did you mean" not in msg
    assert (
        "'layers[1].experts.up' has no source: no subtree of the source matches "
        "'model.layers.*.mlp.experts.*.up_proj.weight' with the captures of "
        "'layers[1].experts.up'" in msg
    )
    assert "map them to None" in msg


def test_typo_among_thousands_of_keys_searches_few_candidates(searches):
    leaf = SDS((2,), jnp.float32)
    keys = [f"model.layers.{i // 100}.block_{i % 100}.weight" for i in range(3000)]
    source = {k: leaf for k in keys}
    state = {"w": leaf}
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, source, {"w": "['model.layers.7.block_42.wieght']"})
    assert "(did you mean 'model.layers.7.block_42.weight'" in str(info.value)
    assert searches and max(searches) <= 64, searches
    assert len(searches) == 1, searches  # memoized: the same key is looked up twice


def test_one_search_per_distinct_ignore_pattern(searches):
    leaf = np.zeros(1, np.float32)
    state = {"a": {f"l{i}": {"w": leaf} for i in range(500)}}
    patterns = [f"nomatch_{j % 5}" for j in range(20)]
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, state, {"a": "a"}, ignore_model_keys=patterns)
    assert len(info.value.problems) == 20
    assert len(searches) == 5, searches
    assert max(searches) <= 64


def test_wildcard_ignore_pattern_is_answered_with_a_pattern():
    leaf = np.zeros(1, np.float32)
    layers = [{"mlp": {"kernel": leaf, "bias": leaf}} for _ in range(30)]
    with pytest.raises(tg.PathNotFoundError, match=r"did you mean 'layers\.\*\.mlp\.bias'"):
        tg.plan({"layers": layers}, {"layers": layers}, {"layers": "layers"},
                ignore_model_keys=["layers.*.mlp.bais"])


def _problem(kind, message, remedy=""):
    return tg.Problem(kind, message, remedy=remedy)


def test_problems_differing_in_indices_are_one_line_with_ranges():
    keep = "to keep the state's values, map them to None ({{'l[{i}].w': None}})"
    problems = [
        _problem("missing", f"'l[{i}].w' <- 'm[{i}].w': not found", keep.format(i=i))
        for i in (0, 1, 2, 3, 7, 9, 10)
    ]
    e = tg.GraftError.from_problems(problems, rules=1)
    assert len(e.problems) == 7
    assert str(e) == (
        "cannot graft (1 rule): 7 problems\n"
        "missing in the source: target leaves covered by a rule with no source leaf: 7\n"
        "  'l[0..3,7,9..10].w' <- 'm[0..3,7,9..10].w': not found (x7)\n"
        "to fix:\n"
        "  - to keep the state's values, map them to None ({'l.*.w': None})"
    )


def test_grouping_keeps_what_differs_besides_indices():
    shape = "'a[{0}].{1}' in the state is float32[2], 'b[{0}].{1}' in the source is float32[{2}]"
    problems = [_problem("shape", shape.format(*x)) for x in ((0, "w", 3), (1, "w", 3), (2, "w", 4),
                                                               (3, "v", 3))]
    lines = str(tg.GraftError.from_problems(problems, rules=1)).splitlines()[2:]
    assert lines == [
        "  'a[0..1].w' in the state is float32[2], 'b[0..1].w' in the source is float32[3] (x2)",
        "  'a[2].w' in the state is float32[2], 'b[2].w' in the source is float32[4]",
        "  'a[3].v' in the state is float32[2], 'b[3].v' in the source is float32[3]",
    ]


def test_an_index_that_does_not_vary_stays_and_a_first_index_becomes_star():
    problems = [
        _problem("missing", f"'[{i}].e[5]' has no source", f"map {{'[{i}].e[5]': None}}")
        for i in range(3)
    ]
    text = str(tg.GraftError.from_problems(problems, rules=1))
    assert "  '[0..2].e[5]' has no source (x3)" in text
    assert "  - map {'*.e[5]': None}" in text


def test_repeated_identical_problems_are_counted():
    problems = [_problem("tie", "rules 'a' and 'b' both cover 'x'")] * 3
    text = str(tg.GraftError.from_problems(problems, rules=2))
    assert text.splitlines()[-1] == "  rules 'a' and 'b' both cover 'x' (x3)"
