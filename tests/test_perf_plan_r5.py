"""Issue #25 rows 5 and 4: planning against a large orbax checkpoint, its fast paths.

Each fast path is proved taken on the checkpoints orbax writes, equal to the
general path it stands in for (the same tree, leaves, plan entries), and not
taken where it must not be:

- `_METADATA` read by a scan of orbax's usual text instead of `json`
  (`metadata_scan`), with `_build`'s tree as the oracle;
"""

from __future__ import annotations

import json
import logging
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from kauldron_run import init_params, train_state, write_item, write_run

import treegraft as tg
from treegraft._formats.orbax import metadata as M
from treegraft._formats.orbax.headers import LazyLeaf, OrbaxStore
from treegraft._formats.orbax.metadata_scan import scan
from treegraft._storage.location import Location


def _tree_of(tree):
    """A tree's structure and, per leaf, what a `LazyLeaf` says before any read."""
    keyed, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return treedef, [
        (path, type(leaf).__name__, leaf.name, leaf.scalar, leaf.key_impl)
        if isinstance(leaf, LazyLeaf) else (path, leaf)
        for path, leaf in keyed
    ]


def _store(directory) -> OrbaxStore:
    location = Location.parse(os.path.abspath(directory))
    return OrbaxStore(location, key_impls=M._key_impls(location))


def _json_build(directory, text: bytes):
    """The general path: json, then `_build` (its tree, or the exception it raises)."""
    try:
        return M._build(_store(directory), json.loads(text)["tree_metadata"])
    except Exception as e:  # noqa: BLE001 - compared by type with the scan's refusal
        return e


def _scan_build(directory, text: bytes):
    """The fast path: `scan`, then `_build_scanned`; None where it leaves the text to json."""
    scanned = scan(text)
    if scanned is None:
        return None
    try:
        return M._build_scanned(_store(directory), scanned[1])
    except (M._Corrupt, ValueError):
        return None


def _mixed():
    return {
        "params": {"enc": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}},
        "count": jnp.asarray(7, jnp.int32),
        "epoch": 3,
        "lr": 0.25,
        "flag": True,
        "table": np.arange(6, dtype=np.float64).reshape(3, 2),
        "lst": [jnp.arange(3), None, {"x": jnp.ones(2)}, (jnp.ones(1), (), [])],
        "ints": {0: jnp.ones(3), 1: jnp.zeros(3)},
        "layers": [{"w": jnp.full((2,), float(i))} for i in range(12)],
        "empty": {},
        "none": None,
        "rng": jax.random.key(3),
    }


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("r5")
    out = {"mixed": write_item(root / "mixed", _mixed())}
    state = train_state(init_params({"dense": {"kernel": (4, 8)}}, seed=1), step=2)
    write_run(root / "run", {2: state})
    out["kauldron"] = str(root / "run" / "checkpoints" / "ckpt_2" / "default")
    return out


def _read(directory: str) -> bytes:
    with open(os.path.join(directory, "_METADATA"), "rb") as f:
        return f.read()


# --- _METADATA by a scan ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixed", "kauldron"])
def test_scan_is_taken_on_orbax_checkpoints_and_builds_jsons_tree(items, name):
    directory = os.path.abspath(items[name])
    text = _read(directory)
    fields, entries = scan(text)
    want = json.loads(text)
    assert fields == {**want, "tree_metadata": {}}
    assert [e[0] for e in entries] == list(want["tree_metadata"])
    assert _tree_of(_scan_build(directory, text)) == _tree_of(_json_build(directory, text))


def test_lazy_metadata_takes_the_scan_and_gives_orbaxs_tree(items, caplog):
    directory = os.path.abspath(items["mixed"])
    with caplog.at_level(logging.DEBUG, logger="treegraft"):
        tree = M.lazy_metadata(directory)
    assert "with json" not in caplog.text
    assert _tree_of(tree) == _tree_of(_json_build(directory, _read(directory)))
    # The key array's metadata came through the store the scan made.
    assert (tree["rng"].shape, str(tree["rng"].dtype)) == ((), "key<fry>")
    assert tree["layers"][11]["w"].shape == (2,)


def _rewrite(directory: str, tmp_path, text: bytes) -> str:
    """A copy of an orbax item whose `_METADATA` is text."""
    import shutil

    copy = str(tmp_path / "item")
    shutil.copytree(directory, copy)
    with open(os.path.join(copy, "_METADATA"), "wb") as f:
        f.write(text)
    return copy


def test_other_spacing_goes_to_json_and_plans_the_same(items, tmp_path, caplog):
    directory = os.path.abspath(items["kauldron"])
    meta = json.loads(_read(directory))
    compact = json.dumps(meta, separators=(",", ":")).encode()
    assert scan(compact) is None
    copy = _rewrite(directory, tmp_path, compact)
    with caplog.at_level(logging.DEBUG, logger="treegraft"):
        slow = M.lazy_metadata(copy)
    assert "with json: not orbax's usual text" in caplog.text
    assert _tree_of(slow)[0] == _tree_of(M.lazy_metadata(directory))[0]
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), slow)
    mapping = {"params": "params", "step": "step"}
    plans = [tg.plan(state, tg.OrbaxCheckpoint(d), mapping) for d in (copy, directory)]
    assert [(str(e.target), str(e.source), e.shape) for e in plans[0].entries] == [
        (str(e.target), str(e.source), e.shape) for e in plans[1].entries
    ]


def _entry(keys, value_type="jax.Array", **extra):
    value = {"value_type": value_type, "skip_deserialize": value_type not in M._ARRAYS, **extra}
    return str(tuple(k for k, _ in keys)), {
        "key_metadata": [{"key": k, "key_type": t} for k, t in keys],
        "value_metadata": value,
    }


def _text(entries, **fields) -> bytes:
    tree = dict(entries)
    return json.dumps({"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False, **fields}
                      ).encode()


GOOD = [_entry([("a", 2), ("w", 2)]), _entry([("a", 2), ("b", 2)], "scalar"),
        _entry([("l", 2), ("0", 1)], write_shape=[2, 3]), _entry([("e", 2)], "Dict")]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(_text(GOOD).replace(b'"w"', b'"w\\"x"'), id="escaped-quote"),
        pytest.param(_text(GOOD).replace(b'"w"', b'"w\\u00e9"'), id="unicode-escape"),
        pytest.param(_text(GOOD).replace(b'"w"', b'"w\x01"'), id="control-char"),
        pytest.param(_text(GOOD).replace(b'"use_ocdbt"', b'"tree_metadata": {}, "x"'),
                     id="two-tree-metadata"),
        pytest.param(_text(GOOD).replace(b"\"('a', 'b')\"", b"\"('a', 'w')\""),
                     id="duplicate-name"),
        pytest.param(b"\xef\xbb\xbf" + _text(GOOD), id="bom"),
        pytest.param(_text(GOOD) + b" x", id="trailing-garbage"),
        pytest.param(_text(GOOD).replace(b'"w"', b'"\xff"'), id="not-utf8"),
        pytest.param(_text(GOOD).replace(b'"skip_deserialize": false',
                                         b'"skip_deserialize": 0'), id="other-field-value"),
        pytest.param(_text(GOOD).replace(b'[2, 3]', b'[2, 03]'), id="bad-number"),
        pytest.param(b" " + _text(GOOD), id="leading-space"),
    ],
)
def test_texts_orbax_does_not_write_are_left_to_json(text):
    assert scan(text) is None


def test_the_scanned_text_reads_the_names_orbax_gives():
    fields, entries = scan(_text(GOOD))
    assert fields == {"tree_metadata": {}, "use_ocdbt": True, "use_zarr3": False}
    assert entries == [
        ("('a', 'w')", '{"key": "a", "key_type": 2}, ', "w", "", "jax.Array"),
        ("('a', 'b')", '{"key": "a", "key_type": 2}, ', "b", "", "scalar"),
        ("('l', '0')", '{"key": "l", "key_type": 2}, ', "0", "1", "jax.Array"),
        ("('e',)", "", "e", "", "Dict"),
    ]


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([_entry([("a", 2), ("0", 1)]), _entry([("a", 2), ("x", 2)])],
                     id="mixed-kinds"),
        pytest.param([_entry([("a", 2)]), _entry([("a", 2), ("x", 2)])], id="leaf-and-node"),
        pytest.param([_entry([("a", 2), ("x", 2)]), _entry([("a", 2)])], id="node-and-leaf"),
        pytest.param([_entry([("a", 2), ("1", 1)])], id="list-gap"),
        pytest.param([_entry([("a", 2), ("x", 1)])], id="index-not-digits"),
        pytest.param([_entry([("a", 2)], "Custom")], id="unknown-type"),
        pytest.param([_entry([("e", 2)], "Dict"), _entry([("e", 2), ("x", 2)])],
                     id="empty-node-and-node"),
        pytest.param([_entry([("a", 2), ("0", 1)]), _entry([("a", 2), ("00", 1)])],
                     id="one-index-twice"),
    ],
)
def test_trees_build_refuses_are_left_to_it(tmp_path, entries):
    text = _text(entries)
    assert scan(text) is not None  # the text is orbax's form: the tree is what is wrong
    assert _scan_build(tmp_path, text) is None
    assert isinstance(_json_build(tmp_path, text), Exception)


_KEY_CHARS = st.sampled_from(["a", "b", "0", "1", "01", "x y", '"', "\\", "é", "\x01", "'"])


@st.composite
def _metadata_texts(draw):
    """_METADATA texts in orbax's layout: random trees, some damaged, some keys escaped."""
    entries = []
    for _ in range(draw(st.integers(1, 8))):
        depth = draw(st.integers(1, 3))
        keys = [(draw(_KEY_CHARS), draw(st.sampled_from([1, 2, 2]))) for _ in range(depth)]
        kind = draw(st.sampled_from(["jax.Array", "np.ndarray", "scalar", "Dict", "List",
                                     "None", "Tuple", "Other"]))
        entries.append(_entry(keys, kind))
    if draw(st.booleans()):
        entries.sort(key=lambda e: e[0])
    return _text(entries, use_zarr3=draw(st.booleans()))


@given(_metadata_texts())
def test_the_scan_builds_jsons_tree_or_leaves_the_text_to_it(tmp_path_factory, text):
    directory = str(tmp_path_factory.getbasetemp())
    want = _json_build(directory, text)
    got = _scan_build(directory, text)
    if got is not None:
        assert not isinstance(want, Exception)
        assert _tree_of(got) == _tree_of(want)
    elif scan(text) is not None and not isinstance(want, Exception):
        # The scan refuses a tree only where _build might differ: never a clean one.
        pytest.fail("the scan refused a tree _build reads")


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c0", "0", "1", "2"]),
                          st.sampled_from(["b", "w", "0", "1"])), min_size=1, max_size=10))
def test_clean_trees_take_the_scan(tmp_path_factory, pairs):
    directory = str(tmp_path_factory.getbasetemp())
    entries = dict(_entry([(a, 2), (b, 2)]) for a, b in pairs)
    text = _text(list(entries.items()))
    got = _scan_build(directory, text)
    assert got is not None
    assert _tree_of(got) == _tree_of(_json_build(directory, text))


# --- resolve: a literal rule's leaves as one run ---------------------------------------

from treegraft._parse.rules import parse_mapping  # noqa: E402
from treegraft._plan.context import Inputs  # noqa: E402
from treegraft._plan.resolve import _assign_rules, _copy_run, fresh_run, resolve  # noqa: E402
from treegraft._tree.index import TreeIndex  # noqa: E402


def _inputs(state, source, mapping):
    return Inputs(tuple(parse_mapping(mapping)), (), (), TreeIndex(state, "the state"),
                  TreeIndex(source, "the source"), False)


def _resolved(res, n_tgt):
    """What a resolution says about the first n_tgt target leaves, comparable across runs."""
    return (
        res.winner[:n_tgt], res.prefix_len[:n_tgt], res.hits, res.ties,
        [p for p in res.pairs if p.target < n_tgt],
        [u for u in res.unpaired if u.target < n_tgt],
        res.instances, res.bad_unstacks, res.outranked_unfound, res.unmatched,
    )


_NAMES = st.sampled_from(["a", "b", "0", "01"])  # "0" and "01": an int in a rule finds "0"
_TREES = st.dictionaries(_NAMES, st.dictionaries(_NAMES, st.just(0), min_size=1, max_size=3),
                         min_size=1, max_size=4)
_PATHS = st.one_of(_NAMES, st.tuples(_NAMES, _NAMES).map(".".join))


@given(_TREES, _TREES, st.dictionaries(_PATHS, st.one_of(_PATHS, st.none()), min_size=1,
                                       max_size=4))
def test_literal_runs_resolve_as_the_leaf_by_leaf_loop(state, source, mapping):
    """The run fast paths against the general loop, which a non-str key elsewhere forces."""
    leaf = np.zeros(1)
    state = jax.tree.map(lambda _: leaf, state)
    source = jax.tree.map(lambda _: leaf, source)
    fast = _inputs(state, source, mapping)
    # 'zz' sorts last: the other leaves keep their indices.
    slow = _inputs({**state, "zz": [leaf]}, {**source, "zz": [leaf]}, mapping)
    assert fast.tgt.str_only() and not slow.tgt.str_only()
    n = len(fast.tgt)
    assert _resolved(resolve(fast), n) == _resolved(resolve(slow), n)


def test_a_literal_rule_takes_its_leaves_as_one_run():
    leaf = np.zeros(1)
    state = {"p": {f"b{i}": {"w": leaf, "v": leaf} for i in range(5)}, "q": leaf}
    source = {"p": {f"b{i}": {"w": leaf, "v": leaf} for i in range(5)}}
    inputs = _inputs(state, source, {"p": "p"})
    members = inputs.tgt.under(("p",))
    assert fresh_run(inputs, 0, members, [-1] * len(inputs.tgt)) == (0, 10)
    assert _copy_run(inputs, 0, 10, 0, 1, (), {}) == [(i, i, 0, (), None, ()) for i in range(10)]
    winner = _assign_rules(inputs).winner
    assert winner == [0] * 10 + [-1]


def test_the_runs_are_not_taken_where_a_leaf_would_differ():
    leaf = np.zeros(1)
    state = {"p": {"a": leaf, "b": leaf, "c": leaf}}
    # a leaf has a rule already (a more specific rule came first): not one fresh run
    inputs = _inputs(state, state, {"p.b": "p.b", "p": "p"})
    assert fresh_run(inputs, 1, inputs.tgt.under(("p",)), [-1, 0, -1]) is None
    # a pattern: its leaves may match at other lengths or capture
    inputs = _inputs(state, state, {"p.*": "p.*"})
    assert fresh_run(inputs, 0, inputs.tgt.under(("p",)), [-1] * 3) is None
    # int keys: a look-up may match loosely ('0' finds 0)
    inputs = _inputs({"p": [leaf, leaf]}, {"p": {"0": leaf, "1": leaf}}, {"p": "p"})
    assert fresh_run(inputs, 0, inputs.tgt.under(("p",)), [-1] * 2) is None
    # a source leaf missing: the run gives way to the loop, which says which one
    inputs = _inputs(state, {"p": {"a": leaf, "c": leaf}}, {"p": "p"})
    assert _copy_run(inputs, 0, 3, 0, 1, (), {}) is None
    res = resolve(inputs)
    assert [p.target for p in res.pairs] == [0, 2]
    assert [(u.target, u.why) for u in res.unpaired] == [(1, "absent")]


# --- fixed costs of a small checkpoint: the walk started only when wanted, key arrays --


def _store_of(tree) -> OrbaxStore:
    return next(x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, LazyLeaf))._store


def test_a_small_checkpoint_reads_a_few_headers_key_by_key_without_a_walk(items):
    from treegraft._formats.orbax.headers import prefetch

    directory = os.path.abspath(items["mixed"])
    tree = M.lazy_metadata(directory)
    store = _store_of(tree)
    assert store.index is None and store.walk_later
    prefetch([tree["params"]["enc"]["kernel"]])
    assert store.index is None and store.walk_later  # one header: read by its key
    assert tree["params"]["enc"]["kernel"].shape == (4, 8)


def test_a_small_checkpoint_walks_its_index_for_many_headers(items):
    from treegraft._formats.orbax.headers import prefetch

    directory = os.path.abspath(items["mixed"])
    tree = M.lazy_metadata(directory)
    store = _store_of(tree)
    prefetch(jax.tree_util.tree_leaves(tree))
    assert store.index is not None and not store.walk_later
    assert _specs(tree) == _orbax_specs(directory)


def _specs(tree):
    """Each leaf's shape and dtype; a key array's as saved (orbax's metadata gives its data)."""
    return [x.stored if x.key_impl else (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]


def _orbax_specs(directory):
    from test_read_metadata import orbax_metadata

    return [(tuple(x.shape), x.dtype) for x in jax.tree_util.tree_leaves(orbax_metadata(directory))]


def test_a_large_metadata_file_starts_the_walk_before_parsing(items, monkeypatch):
    directory = os.path.abspath(items["mixed"])
    monkeypatch.setattr(M, "_EARLY_WALK_BYTES", 100)  # the threshold, not a fake
    tree = M.lazy_metadata(directory)
    store = _store_of(tree)
    assert store.index is not None and not store.walk_later
    assert _specs(tree) == _orbax_specs(directory)


@pytest.mark.parametrize("spelling", ["escaped", "utf-16"])
def test_key_arrays_are_found_however_their_metadata_is_spelt(items, tmp_path, spelling):
    import shutil

    copy = str(tmp_path / "item")
    shutil.copytree(os.path.abspath(items["mixed"]), copy)
    folder = os.path.join(copy, "array_metadatas")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            text = f.read()
        assert b"random_key_impl" in text
        if spelling == "escaped":
            text = text.replace(b"random_key_impl", b"random\\u005fkey_impl")
        else:
            text = text.decode().encode("utf-16")
        with open(path, "wb") as f:
            f.write(text)
    impls = M._key_impls(Location.parse(copy))
    assert impls == M._key_impls(Location.parse(os.path.abspath(items["mixed"])))
    assert impls == {"rng": "threefry2x32"}


def test_array_metadata_naming_no_key_array_gives_none(items):
    folder = os.path.join(os.path.abspath(items["kauldron"]), "array_metadatas")
    texts = [_read_file(os.path.join(folder, n)) for n in os.listdir(folder)]
    assert texts and not any(b"random_key_impl" in t for t in texts)  # the skipped parse
    assert M._key_impls(Location.parse(os.path.abspath(items["kauldron"]))) == {}


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
