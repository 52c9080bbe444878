"""Fuzzing: arbitrary text into the parsers, random mappings into graft.

Two promises are checked on inputs nobody wrote by hand:

* the parsers turn any text into a path or pattern, or raise `tg.PathSyntaxError`
  naming the column; nothing else escapes, and what parses renders back to itself;
* `tg.graft` with a random mapping (prefixes and patterns taken from the trees'
  own paths, mixed with garbage) over random trees either returns a valid graft
  (the state's structure, every leaf placed like the one it replaces, each
  grafted value the source leaf the plan names, every other leaf the very same
  object) or raises a `tg.GraftError`; never another exception, and never a
  mutated input. The same holds for a real checkpoint, which stays byte-identical.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trees
from helpers import assert_placed_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kauldron_run import init_params, snapshot, train_state, write_run

import treegraft as tg
from treegraft._parse.paths import render_parts

# ----------------------------------------------------------------------------
# Text into the parsers.
# ----------------------------------------------------------------------------

# Text for mappings (the parsers' own property on such text is in test_paths.py).
_TEXT = trees.path_texts()


@given(st.dictionaries(_TEXT, _TEXT, max_size=3), st.lists(_TEXT, max_size=2))
def test_random_text_mapping_raises_only_graft_errors(mapping, ignore):
    state = {"params": {"w": np.zeros(2, np.float32)}}
    source = {"params": {"w": np.ones(2, np.float32)}}
    snap = trees.snapshot(state), trees.snapshot(source)
    before = dict(mapping), list(ignore)
    try:
        out = tg.graft(state, source, mapping, ignore_model_keys=ignore)
    except tg.GraftError as e:
        check_graft_error(e)
    else:
        assert jax.tree.structure(out) == jax.tree.structure(state)
    trees.assert_unchanged(state, snap[0])
    trees.assert_unchanged(source, snap[1])
    assert (mapping, ignore) == before


# ----------------------------------------------------------------------------
# Random mappings over random trees.
# ----------------------------------------------------------------------------

_ABSTRACT = st.sampled_from([(), (2,), (3, 1)]).flatmap(
    lambda shape: st.sampled_from([jnp.float32, jnp.int32, jnp.bfloat16]).map(
        lambda dtype: jax.ShapeDtypeStruct(shape, dtype)
    )
)
_STATE_LEAVES = st.one_of(trees.leaves(), _ABSTRACT)
_GARBAGE = st.one_of(
    st.sampled_from(["", "**", "*", "a..b", "x[", "nope", "layers_*", "**.w", "*.*", "[0]"]),
    st.text(max_size=8),
)


def _render(segments: list[tuple[str, Any]]) -> str:
    """Pattern text from ('part', p) and ('wild', '*' | '**' | 'name*') segments."""
    out = []
    for i, (kind, value) in enumerate(segments):
        if kind == "part":
            out.append(render_parts([value]) if i == 0 else render_parts(["x", value])[1:])
        else:
            out.append(value if i == 0 else "." + value)
    return "".join(out)


def _wild_for(part: Any, choice: int) -> str:
    if choice == 0:
        return "*"
    if choice == 1:
        return "**"
    if isinstance(part, str) and part.isidentifier() and part.isascii():
        return part[: len(part) // 2] + "*"
    return "*"


def _wild_side(node: tg.Path, wild_at: list[tuple[int, int]], tail: str | None) -> str:
    """node's text with some segments (counted from the end) turned into wildcards."""
    segments: list[tuple[str, Any]] = [("part", p) for p in node.parts]
    for from_end, choice in wild_at:
        k = len(segments) - 1 - from_end
        if 0 <= k < len(segments) and segments[k][0] == "part":
            segments[k] = ("wild", _wild_for(segments[k][1], choice))
    if tail is not None:
        segments.append(("wild", tail))
    return _render(segments)


@st.composite
def _rule(draw, new_nodes: list[tg.Path], old_nodes: list[tg.Path]) -> tuple[str, str]:
    """One rule: mostly two real paths with wildcards at the same places, else garbage."""
    new = draw(st.sampled_from(new_nodes))
    old = draw(st.sampled_from(old_nodes + new_nodes))
    room = min(len(new), len(old))
    wild_at = draw(
        st.lists(
            st.tuples(st.integers(0, max(room - 1, 0)), st.integers(0, 2)),
            max_size=2 if room else 0,
            unique_by=lambda t: t[0],
        )
    )
    tail = draw(st.sampled_from([None, None, None, None, "*", "**"]))
    new_text, old_text = _wild_side(new, wild_at, tail), _wild_side(old, wild_at, tail)
    spoil = draw(st.integers(0, 9))
    if spoil == 0:
        new_text = draw(_GARBAGE)
    elif spoil == 1:
        old_text = draw(_GARBAGE)
    elif spoil == 2:  # wildcards that may no longer correspond
        old_text = _wild_side(old, draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                                                  max_size=2)), None)
    return new_text, old_text


@st.composite
def _mappings(draw, state: Any, source: Any) -> dict[str, str]:
    new_nodes = trees.node_paths(state)
    old_nodes = trees.node_paths(source)
    rules = draw(st.lists(_rule(new_nodes, old_nodes), min_size=1, max_size=3))
    return dict(rules)


@st.composite
def _ignores(draw, state: Any, source: Any) -> list[str]:
    paths = [str(p) for p in trees.node_paths(state) + trees.node_paths(source) if len(p)]
    pool = st.one_of(
        st.sampled_from(paths) if paths else _GARBAGE,
        st.sampled_from(paths).map(lambda p: "**." + p.split(".")[-1]) if paths else _GARBAGE,
        _GARBAGE,
    )
    return draw(st.lists(pool, max_size=2))


@st.composite
def _sources(draw, state: Any) -> Any:
    kind = draw(st.sampled_from(["renewed", "renewed", "retyped", "nested", "random"]))
    if kind == "random":
        return draw(trees.pytrees())
    renewed = jax.tree.map(trees.renew, state)
    if kind == "nested":
        return {"pre": renewed, "other": draw(trees.pytrees(max_leaves=3))}
    if kind == "retyped":
        # Same structure and shapes, other dtypes: what `cast` is for, and beyond.
        leaves, treedef = jax.tree.flatten(renewed)
        dtypes = st.sampled_from(_RETYPES)
        return treedef.unflatten([_retype(x, draw(dtypes)) for x in leaves])
    return renewed


def _retype(x: Any, dtype: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind == "c" and np.dtype(dtype).kind != "c":
        a = a.real  # numpy would warn: the test data must not
    return a.astype(dtype)


_RETYPES = [np.float32, np.float16, np.int8, np.uint8, np.int64, np.bool_, np.complex64,
            jnp.bfloat16]


@st.composite
def random_grafts(draw):
    state = draw(trees.pytrees(_STATE_LEAVES))
    source = draw(_sources(state))
    mapping = draw(_mappings(state, source))
    options = {
        "ignore_model_keys": draw(_ignores(state, source)),
        "ignore_restored_keys": draw(_ignores(state, source)),
        "strict": draw(st.booleans()),
        "cast": draw(st.integers(0, 4)) == 0,
    }
    return state, source, mapping, options


# The first line of every error a graft can raise on bad input: one error, one headline,
# then the problems. Anything else (an internal message leaking out) fails.
_HEADLINE = re.compile(
    r"(cannot graft \(\d+ rules?\): \d+ problems?"
    r"|invalid mapping \(\d+ problems?\):"
    r"|invalid ignore_(model|restored)_keys \(\d+ problems?\):"
    r"|the mapping must be a dict \{new_path: old_path\}, got \w+"
    r"|the mapping is empty: nothing would be grafted"
    r"|ignore_(model|restored)_keys must be a sequence of path patterns"
    r"|\d+ source (leaf is|leaves are) abstract)"
)


def check_graft_error(e: tg.GraftError) -> None:
    """A GraftError from random input: a known headline, every problem listed below it."""
    message = str(e)
    first = message.split("\n", 1)[0]
    assert _HEADLINE.match(first), message
    m = re.search(r"(\d+) problems?", first)
    if m and e.problems:
        assert int(m.group(1)) == len(e.problems)


def check_valid_graft(state: Any, source: Any, p: tg.GraftPlan, out: Any) -> None:
    """The invariants of a successful graft, leaf by leaf, against its plan."""
    assert jax.tree.structure(out) == jax.tree.structure(state)
    flat_in, flat_out = tg.flatten(state), tg.flatten(out)
    assert list(flat_out) == list(flat_in)
    fed = {e.target: e.source for e in p.entries}
    assert len(fed) == len(p.entries)  # each target leaf fed once
    assert set(p.untouched) == set(flat_in) - set(fed)
    for path, like in flat_in.items():
        got = flat_out[path]
        if path not in fed:
            assert got is like  # untouched leaves are the caller's own objects
            continue
        assert_placed_like(got, like)
        want = tg.extract(source, fed[path])
        expected = np.asarray(want)
        if hasattr(like, "dtype"):
            expected = expected.astype(np.dtype(like.dtype))
        elif type(like) in (bool, int, float, complex):
            expected = np.asarray(type(like)(expected.item()))
        np.testing.assert_array_equal(np.asarray(got), expected)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(random_grafts())
def test_random_graft_is_valid_or_a_graft_error(case):
    state, source, mapping, options = case
    snaps = trees.snapshot(state), trees.snapshot(source)
    given_args = copy.deepcopy((mapping, options))
    try:
        p = tg.plan(state, source, mapping, **options)
        out = tg.graft(state, source, mapping, **options)
    except tg.GraftError as e:
        check_graft_error(e)
    else:
        check_valid_graft(state, source, p, out)
    trees.assert_unchanged(state, snaps[0])
    trees.assert_unchanged(source, snaps[1])
    assert (mapping, options) == given_args


def test_random_grafts_reach_both_outcomes():
    """The generator is not degenerate: it makes valid grafts and errors, of each kind."""
    outcomes: dict[str, int] = {}

    # 300 examples: enough that every outcome shows up whichever optional
    # container types (flax) the generator can draw from.
    @settings(max_examples=300, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(random_grafts())
    def run(case):
        state, source, mapping, options = case
        try:
            tg.graft(state, source, mapping, **options)
        except tg.GraftError as e:
            key = type(e).__name__
        else:
            key = "graft"
        outcomes[key] = outcomes.get(key, 0) + 1

    run()
    assert outcomes.get("graft", 0) >= 10, outcomes
    for kind in ("MappingError", "PathNotFoundError"):
        assert outcomes.get(kind, 0) >= 3, outcomes


# ----------------------------------------------------------------------------
# Random mappings over a real checkpoint.
# ----------------------------------------------------------------------------

_SHAPES = {
    "encoder": {"dense": {"kernel": (4, 8), "bias": (8,)}},
    "decoder": {"layers_0": {"kernel": (8, 4)}, "layers_1": {"kernel": (8, 4)}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_run")
    import optax

    state = train_state(init_params(_SHAPES, seed=5), step=2, opt=optax.sgd(0.1, momentum=0.9))
    write_run(root / "run", {2: state})
    return str(root / "run"), state


def _checkpoint_state(saved: Any) -> Any:
    """A fresh state shaped like the saved one, as orbax reads it back."""
    fresh = jax.tree.map(jnp.zeros_like, saved)
    return fresh.replace(opt_state=None)


@st.composite
def _checkpoint_mappings(draw):
    shapes_tree = init_params(_SHAPES, seed=0)
    state_like = {"step": 0, "params": shapes_tree, "collections": {}}
    return draw(_mappings(state_like, state_like)), draw(st.booleans())


@settings(max_examples=25, deadline=None)
@given(case=_checkpoint_mappings())
def test_random_graft_from_a_checkpoint(run_dir, case):
    workdir, saved = run_dir
    mapping, strict = case
    state = _checkpoint_state(saved)
    snap = trees.snapshot(state)
    before = snapshot(os.path.dirname(workdir))
    source = tg.KauldronCheckpoint(workdir)
    try:
        p = tg.plan(state, source, mapping, strict=strict)
        out = tg.graft(state, source, mapping, strict=strict)
    except tg.GraftError as e:
        check_graft_error(e)
    else:
        check_valid_graft(state, saved, p, out)
    trees.assert_unchanged(state, snap)
    assert snapshot(os.path.dirname(workdir)) == before
