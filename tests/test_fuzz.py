"""Fuzzing: random text and random mappings into graft, and a reference model.

* `tg.graft` with random text as mapping or ignore patterns raises only
  `tg.GraftError`s (the parsers' own properties on such text are in test_paths.py);
* `tg.graft` with a random mapping (prefixes and patterns taken from the trees'
  own paths, mixed with garbage) over random trees either returns a valid graft
  (the state's structure, every leaf placed like the one it replaces, each
  grafted value the source leaf the plan names, every other leaf the very same
  object) or raises a `tg.GraftError`; never another exception, and never a
  mutated input. The same holds for a real checkpoint, which stays byte-identical;
* on grafts drawn so that the outcome can be worked out (glob rules, ties, keep
  rules, missing and unexpected leaves, strict or not), an independent model of
  docs/design.md sections 4 and 5 predicts it exactly: the error type and problem kinds, or
  every leaf of the result. Most of these grafts must succeed
  (`--hypothesis-show-statistics` shows the share).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import hypothesis
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
# Random text into graft.
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


# ----------------------------------------------------------------------------
# Random grafts against a reference model.
# ----------------------------------------------------------------------------

# The model states docs/design.md section 4 on its own, for the grafts `modelled_grafts`
# draws: a state {'enc': module, 'dec': {'layers_i': module}}, a source of the same
# skeleton (more or fewer layers, a leaf dropped, an extra leaf, a reshaped leaf,
# all perhaps under 'pre'), and 1-3 rules with `*`, `name*`, `**` and keep rules that
# overlap and tie. Per target leaf the rule whose matched new prefix is longest wins,
# then the one with more literal segments; equal on both is a tie, reported with the
# problems the first tied rule finds on the leaf (all problems come at once). It
# predicts the problem kinds, hence the error type, and otherwise every leaf's value.

# Pattern segments: ("lit", part), ("one",) for `*`, ("glob", head) for `head*`, ("any",)
# for `**` (at most one per pattern).
Seg = tuple
Pat = tuple[Seg, ...]

_NAMES = ["w", "b", "kernel", "scale"]
_SHAPES_M = [(2,), (4, 2), ()]
_DTYPES_M = [np.float32, np.int32]
_SHARDING = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y")),
    jax.sharding.PartitionSpec(),
)


def _lit(*parts: Any) -> Pat:
    return tuple(("lit", p) for p in parts)


def _pattern_text(pat: Pat) -> str:
    wild = {"one": lambda s: "*", "glob": lambda s: s[1] + "*", "any": lambda s: "**"}
    return _render([("part", s[1]) if s[0] == "lit" else ("wild", wild[s[0]](s)) for s in pat])


def _match_fixed(pat: Pat, parts: tuple) -> tuple | None:
    caps: list[Any] = []
    for seg, part in zip(pat, parts, strict=True):
        if seg[0] == "lit":
            if type(part) is not type(seg[1]) or part != seg[1]:
                return None
        elif seg[0] == "one":
            caps.append(part)
        elif isinstance(part, str) and part.startswith(seg[1]):
            caps.append(part[len(seg[1]) :])
        else:
            return None
    return tuple(caps)


def _match_prefix(pat: Pat, parts: tuple) -> tuple[int, tuple] | None:
    """The shortest prefix of parts that pat matches whole: (its length, the captures)."""
    kinds = [s[0] for s in pat]
    if "any" not in kinds:
        if len(parts) < len(pat):
            return None
        caps = _match_fixed(pat, parts[: len(pat)])
        return None if caps is None else (len(pat), caps)
    i = kinds.index("any")
    before, after = pat[:i], pat[i + 1 :]
    for n in range(len(pat) - 1, len(parts) + 1):
        width = n - len(pat) + 1
        head = _match_fixed(before, parts[:i])
        tail = _match_fixed(after, parts[i + width : n])
        if head is not None and tail is not None:
            return n, (*head, parts[i : i + width], *tail)
    return None


def _substitute(pat: Pat, caps: tuple) -> tuple:
    out: list[Any] = []
    it = iter(caps)
    for seg in pat:
        if seg[0] == "lit":
            out.append(seg[1])
        elif seg[0] == "one":
            out.append(next(it))
        elif seg[0] == "glob":
            out.append(seg[1] + next(it))
        else:
            out.extend(next(it))
    return tuple(out)


def _literals(pat: Pat) -> int:
    return sum(s[0] == "lit" for s in pat)


def _node_paths(flat: dict[tuple, Any]) -> set[tuple]:
    return {parts[:k] for parts in flat for k in range(len(parts) + 1)}


def _predict(state: dict, source: dict, rules: list[tuple[Pat, Pat | None]], strict: bool):
    """(problem kinds, {target parts: source parts} of the grafted leaves)."""
    tflat = {p.parts: x for p, x in tg.flatten(state).items()}
    sflat = {p.parts: x for p, x in tg.flatten(source).items()}
    kinds: set[str] = set()
    grafted: dict[tuple, tuple] = {}
    covered: set[int] = set()
    won: set[int] = set()
    used: set[tuple] = set()
    instances: dict[int, list[tuple]] = {}  # rule -> the old prefixes of its covered leaves
    for t, like in tflat.items():
        ranked = []
        for r, (new, old) in enumerate(rules):
            m = _match_prefix(new, t)
            if m is not None:
                ranked.append(((m[0], _literals(new)), r, m))
                covered.add(r)
                if old is not None:
                    instances.setdefault(r, []).append(_substitute(old, m[1]))
        if not ranked:
            if isinstance(like, jax.ShapeDtypeStruct):
                kinds.add("unfilled")  # an abstract leaf no rule fills (docs/design.md section 5)
            continue
        best = max(rank for rank, _, _ in ranked)
        top = [(r, m) for rank, r, m in ranked if rank == best]
        if len(top) > 1:
            kinds.add("tie")  # and the first of them still pairs the leaf, for its problems
        (r, (n, caps)), old = top[0], rules[top[0][0]][1]
        won.add(r)
        if old is None:
            continue  # a keep rule
        s = _substitute(old, caps) + t[n:]
        if s not in sflat:
            kinds.add("missing")
            continue
        used.add(s)
        if sflat[s].shape != like.shape:
            kinds.add("shape")
            continue
        grafted[t] = s
    tnodes, snodes = _node_paths(tflat), _node_paths(sflat)
    for r, (new, old) in enumerate(rules):
        if r not in covered:
            matches = [_match_prefix(new, node) for node in tnodes]
            found = [m for node, m in zip(tnodes, matches, strict=True) if m and m[0] == len(node)]
            if not found:
                kinds.add("unmatched_rule")
                continue
            if old is not None and any(_substitute(old, m[1]) not in snodes for m in found):
                kinds.add("unmatched_rule")
        elif r not in won and old is not None:
            if not any(o in snodes for o in instances.get(r, [])):
                kinds.add("unmatched_rule")
        if old is None or (r not in covered and "unmatched_rule" in kinds):
            continue
        for s in sflat:
            m = _match_prefix(old, s)
            if m is None or s in used:
                continue
            if _substitute(new, m[1]) + s[m[0] :] not in tflat:
                kinds.add("unexpected")
    if not strict:
        kinds -= {"missing", "unexpected", "unmatched_rule", "unfilled"}
    return kinds, grafted


def _error_type(kinds: set[str]) -> type[tg.GraftError]:
    if kinds <= {"missing", "unexpected", "unmatched_rule"}:
        return tg.PathNotFoundError
    if kinds <= {"shape"}:
        return tg.MismatchError
    if kinds <= {"tie", "unfilled"}:  # both call for a rule to change or be added
        return tg.MappingError
    return tg.GraftError


@st.composite
def _skeleton(draw) -> dict:
    """A module: {name: (shape, dtype)}, perhaps with an 'attn' level of its own."""
    def leaves(min_size: int) -> dict:
        names = draw(st.lists(st.sampled_from(_NAMES), min_size=min_size, max_size=3,
                              unique=True))
        return {n: (draw(st.sampled_from(_SHAPES_M)), draw(st.sampled_from(_DTYPES_M)))
                for n in names}

    module = leaves(1)
    if draw(st.booleans()):
        module["attn"] = leaves(1)
    return module


def _count(skeleton: dict) -> int:
    return sum(_count(v) if isinstance(v, dict) else 1 for v in skeleton.values())


def _build(skeleton: dict, seed: int, kinds: list[str] | None) -> dict:
    """The module's leaves, valued by seed; kinds[i] places the i-th (else numpy)."""
    out = {}
    for name, spec in skeleton.items():
        if isinstance(spec, dict):
            out[name] = _build(spec, seed + 100, kinds)
            continue
        shape, dtype = spec
        value = (np.arange(int(np.prod(shape))).reshape(shape) + seed).astype(dtype)
        kind = kinds.pop() if kinds else "numpy"
        if kind == "abstract":
            out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=_SHARDING)
        elif kind == "jax":
            out[name] = jax.device_put(value, _SHARDING)
        else:
            out[name] = value
    return out


def _leaf_paths(skeleton: dict) -> list[tuple]:
    return [(k, *rest) if rest else (k,) for k, v in skeleton.items()
            for rest in (_leaf_paths(v) if isinstance(v, dict) else [()])]


@st.composite
def modelled_grafts(draw):
    module = draw(_skeleton())
    n = draw(st.integers(1, 3))
    place = st.sampled_from(["numpy", "numpy", "jax", "abstract"])
    def placed(seed: int) -> dict:
        return _build(module, seed, [draw(place) for _ in range(_count(module))])

    state = {"enc": placed(0), "dec": {f"layers_{i}": placed(10 * (i + 1)) for i in range(n)}}
    n_src = draw(st.sampled_from([n, n, n, 1, 2, 3]))
    source = {"enc": _build(module, 1000, None),
              "dec": {f"layers_{i}": _build(module, 1000 + 10 * (i + 1), None)
                      for i in range(n_src)}}
    where = draw(st.sampled_from(["enc"] + [f"layers_{i}" for i in range(n_src)]))
    sub = source["enc"] if where == "enc" else source["dec"][where]
    change = draw(st.sampled_from([None, None, None, "drop", "extra", "reshape"]))
    leaf = draw(st.sampled_from(_leaf_paths(module)))
    holder = sub[leaf[0]] if len(leaf) == 2 else sub
    if change == "drop" and _count(module) > 1 and len(holder) > 1:
        del holder[leaf[-1]]
    elif change == "extra":
        holder["extra"] = np.zeros(3, np.float32)
    elif change == "reshape":
        holder[leaf[-1]] = np.zeros((5,), holder[leaf[-1]].dtype)
    pre = _lit("pre") if draw(st.integers(0, 3)) == 0 else ()
    if pre:
        source = {"pre": source}
    k = draw(st.integers(0, 2))
    name = draw(st.sampled_from(_NAMES))
    layer = ("dec", f"layers_{k}")
    menu: list[tuple[Pat, Pat | None]] = [
        ((("lit", "dec"), ("glob", "layers_")), pre + (("lit", "dec"), ("glob", "layers_"))),
        ((("lit", "dec"), ("one",)), pre + (("lit", "dec"), ("one",))),  # ties the one above
        (_lit(*layer), pre + _lit("enc")),
        (_lit("enc"), pre + _lit(*layer)),
        ((("any",),), pre + (("any",),)),
        (_lit("dec"), pre + _lit("dec")),
        ((), pre),
        (_lit(*layer, *leaf), pre + _lit("enc", *leaf)),
        ((("any",), ("lit", name)), pre + (("any",), ("lit", name))),
        ((("one",), *_lit(*leaf)), pre + (("one",), *_lit(*leaf))),
        (_lit(*layer), None),
    ]
    chosen = draw(st.lists(st.sampled_from(range(len(menu))), min_size=1, max_size=3,
                           unique=True))
    rules = {_pattern_text(menu[c][0]): menu[c] for c in chosen}
    mapping = {new: None if old is None else _pattern_text(old)
               for new, (_, old) in rules.items()}
    return state, source, mapping, list(rules.values()), draw(st.booleans())


@given(modelled_grafts())
def test_random_graft_matches_the_reference_model(case):
    state, source, mapping, rules, strict = case
    snaps = trees.snapshot(state), trees.snapshot(source)
    kinds, grafted = _predict(state, source, rules, strict)
    hypothesis.note(f"mapping {mapping}, strict={strict}: predicted problems {sorted(kinds)}")
    if kinds:
        expected = _error_type(kinds)
        hypothesis.event(f"predicted: {expected.__name__}")
        with pytest.raises(tg.GraftError) as info:
            tg.graft(state, source, mapping, strict=strict)
        check_graft_error(info.value)
        assert type(info.value) is expected, info.value
        assert {p.kind for p in info.value.problems} == kinds, info.value
    else:
        hypothesis.event("predicted: success")
        p = tg.plan(state, source, mapping, strict=strict)
        out = tg.graft(state, source, mapping, strict=strict)
        assert {e.target.parts: e.source.parts for e in p.entries} == grafted
        assert jax.tree.structure(out) == jax.tree.structure(state)
        flat_src = tg.flatten(source)
        for path, like in tg.flatten(state).items():
            got = tg.extract(out, path)
            if path.parts not in grafted:
                assert got is like, path
                continue
            assert_placed_like(got, like)
            np.testing.assert_array_equal(
                np.asarray(got), np.asarray(flat_src[tg.Path(grafted[path.parts])])
            )
    trees.assert_unchanged(state, snaps[0])
    trees.assert_unchanged(source, snaps[1])
