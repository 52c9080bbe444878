"""Issue #25 rows 5 and 4, second pass: the plan's per-leaf steps made in bulk.

Each fast path against the step it stands in for, on the same inputs, and
where it must give way:

- `prefix_groups`: a prefix's leaves as runs of neighbours, against grouping
  path by path; a prefix in two runs falls back;
- `flatten_index`: str-only paths known from the walk, against looking at
  every part; a list or tuple holding a child is never called str-only;
- `TreeIndex.under` of a leaf's own path, against the table of every path;
  an int part, or a tree with int parts, takes the table;
- `source_indices` and the copy pairs made as tuples, against pair by pair;
- `_build_scanned` finding a parent from the longest parent text met,
  against `_build` on entries in any order.
"""

from __future__ import annotations

import json
import os
import random
from typing import NamedTuple

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given
from test_perf_plan_r5 import _entry, _json_build, _scan_build, _text, _tree_of

import treegraft as tg
from treegraft._plan.record import Pair, source_indices
from treegraft._tree.flat import flatten_index, flatten_plain
from treegraft._tree.index import TreeIndex, prefix_groups


def _grouped_one_by_one(paths, k):
    """The grouping `prefix_groups` stands in for: one path at a time."""
    groups = {}
    for i, p in enumerate(paths):
        if len(p) >= k:
            groups.setdefault(p[:k], []).append(i)
    return groups


_KEYS = st.sampled_from(["a", "b", "c", "0", "10"])
_LEAF = st.just(np.zeros(1))
_TREE = st.recursive(
    _LEAF | st.none(),
    lambda kids: st.dictionaries(_KEYS, kids, max_size=4)
    | st.lists(kids, max_size=3)
    | st.lists(kids, max_size=3).map(tuple),
    max_leaves=24,
)


@given(_TREE, st.integers(0, 4))
def test_prefix_groups_of_a_flattened_tree_are_the_path_by_path_groups(tree, k):
    paths = flatten_plain(tree)[0]
    got = prefix_groups(paths, k)
    assert got == _grouped_one_by_one(paths, k)
    assert list(got) == list(_grouped_one_by_one(paths, k))  # in first-seen order


@given(st.lists(st.tuples(st.sampled_from(["a", "b", 1, True, 1.0]),
                          st.sampled_from(["x", "y"])).map(tuple)
                | st.tuples(st.sampled_from(["a", "b", 1])), max_size=8),
       st.integers(0, 3))
def test_prefix_groups_of_any_paths_are_the_path_by_path_groups(paths, k):
    # Not in leaf order, and 1, True and 1.0 equal: the runs are no proof here.
    got = prefix_groups(paths, k)
    want = _grouped_one_by_one(paths, k)
    assert got == want
    assert [type(p[0]) for p in got if p] == [type(p[0]) for p in want if p]


def test_a_prefix_in_two_runs_is_grouped_path_by_path():
    paths = [("a", "x"), ("b",), ("a", "y")]
    # The runs alone would say ('a',): [2], losing the first leaf.
    assert prefix_groups(paths, 1) == {("a",): [0, 2], ("b",): [1]}
    # 1 and True are one key of a dict: two runs of one key.
    assert prefix_groups([(1, "x"), ("b",), (True, "y")], 1) == {(1,): [0, 2], ("b",): [1]}
    assert prefix_groups([], 0) == {} and prefix_groups([()], 0) == {(): [0]}


def _str_parts(paths):
    return all(type(part) is str for p in paths for part in p)


@given(_TREE)
def test_str_only_from_the_walk_is_what_the_parts_say(tree):
    paths, _, _, plain, str_only = flatten_index(tree)
    assert str_only in (True, None)
    if str_only:
        assert plain and _str_parts(paths)
    assert TreeIndex(tree, "t").str_only() is _str_parts(paths)


def test_a_sequence_holding_a_child_is_never_called_str_only():
    leaf = np.zeros(1)
    for tree in ({"a": [leaf]}, {"a": ({"b": leaf},)}, [leaf], {"a": {"b": [None, leaf]}}):
        assert flatten_index(tree)[4] is None, tree
        assert not TreeIndex(tree, "t").str_only()
    # Empty ones, or ones holding no leaf, leave every path str: looked at, not assumed.
    for tree in ({"a": [], "b": leaf}, {"a": [None], "b": leaf}):
        assert TreeIndex(tree, "t").str_only()
    # A custom node: its keys are not the walk's to vouch for.
    assert flatten_index(jax.tree_util.Partial(len, leaf))[4] is None


def _under_by_table(paths, prefix):
    return [i for i, p in enumerate(paths) if p[: len(prefix)] == prefix
            and tuple(map(type, p[: len(prefix)])) == tuple(map(type, prefix))]


@given(_TREE)
def test_under_a_path_is_the_leaves_below_it(tree):
    index = TreeIndex(tree, "t")
    prefixes = {p[:n] for p in index.paths for n in range(len(p) + 1)} | {("zz",)}
    for prefix in sorted(prefixes, key=repr):
        got = index.under(prefix)
        if index.str_only() or not prefix:
            assert got == _under_by_table(index.paths, prefix), prefix


def test_under_a_leaf_of_int_parts_takes_the_loose_table():
    leaf = np.zeros(1)
    index = TreeIndex({"layers": [leaf, leaf]}, "t")
    # An int part meets its digits: '0' finds 0, through the loose table.
    assert index.under(("layers", "0")) == [0]
    assert index.under(("layers", 1)) == [1]
    index = TreeIndex({"layers": {"0": leaf, "1": leaf}}, "t")
    assert index.str_only()
    assert index.under(("layers", 0)) == [0]  # an int part: not the str-only shortcut
    assert index.under(("layers", "1")) == [1]
    assert index.under(("layers", "1", "x")) == []


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9),
                          st.lists(st.integers(0, 9), max_size=3).map(tuple)), max_size=6))
def test_source_indices_are_each_pairs_sources_in_order(rows):
    pairs = [Pair(t, s, 0, sources) for t, s, sources in rows]
    assert source_indices(pairs) == [
        si for pair in pairs for si in (pair.sources or (pair.source,))
    ]


def test_copy_pairs_made_as_tuples_are_pairs():
    leaf = np.zeros(1)
    tree = {"p": {f"b{i}": {"w": leaf} for i in range(3)}}
    fast = tg.plan(tree, tree, {"p": "p"})._record.pairs  # one literal run
    slow = tg.plan(tree, tree, {"p.*": "p.*"})._record.pairs  # leaf by leaf
    assert all(type(p) is Pair for p in fast)
    assert [(p.target, p.source, p.sources, p.layer, p.grids) for p in fast] == [
        (p.target, p.source, p.sources, p.layer, p.grids) for p in slow
    ]
    assert fast[0] == Pair(0, 0, 0) and fast[0].sources == () and fast[0].layer is None


# --- _build_scanned: parents found from the longest parent text met ------------------

_PARTS = st.sampled_from([("a", 2), ("b", 2), ("0", 1), ("1", 1), ("x y", 2), ("0", 2)])


@given(st.lists(st.lists(_PARTS, min_size=1, max_size=4), min_size=1, max_size=10),
       st.randoms(use_true_random=False))
def test_entries_in_any_order_build_jsons_tree(tmp_path_factory, keys, rnd):
    directory = str(tmp_path_factory.getbasetemp())
    entries = dict(_entry(k, rnd.choice(["jax.Array", "scalar", "Dict"])) for k in keys)
    items = list(entries.items())
    rnd.shuffle(items)  # parents met, left, and met again
    text = _text(items)
    want = _json_build(directory, text)
    got = _scan_build(directory, text)
    if isinstance(want, Exception):
        assert got is None
    else:
        assert got is not None
        assert _tree_of(got) == _tree_of(want)


@pytest.mark.parametrize(
    "keys",
    [
        # a parent met again after another: the memo of its node is reused
        [[("a", 2), ("b", 2), ("x", 2)], [("c", 2), ("y", 2)], [("a", 2), ("b", 2), ("z", 2)]],
        # a deeper parent under a parent met before: found from it
        [[("a", 2), ("x", 2)], [("a", 2), ("b", 2), ("0", 1)], [("a", 2), ("b", 2), ("1", 1)]],
        # a key type of a parent conflicting with a leaf's: refused as _build does
        [[("a", 2), ("0", 1), ("x", 2)], [("a", 2), ("y", 2)]],
        [[("a", 2), ("y", 2)], [("a", 2), ("0", 1), ("x", 2)]],
        # a leaf, then the same key as a parent: refused
        [[("a", 2), ("b", 2)], [("a", 2), ("b", 2), ("c", 2)]],
        # a key with braces and colons (no quote): not a key start
        [[("{key: x}", 2), ("b", 2)], [("{key: x}", 2), ("c", 2)], [("{", 2), ("0", 1)]],
    ],
)
def test_parents_from_memo_build_what_build_builds(tmp_path, keys):
    text = _text([_entry(k) for k in keys])
    want = _json_build(tmp_path, text)
    got = _scan_build(tmp_path, text)
    if isinstance(want, Exception):
        assert got is None
    else:
        assert got is not None and _tree_of(got) == _tree_of(want)


def test_a_key_holding_a_key_start_is_left_to_json(tmp_path):
    # A quote in a key is escaped in the text: the scan never reads such a key,
    # so a key start is found only where a key starts.
    text = _text([_entry([('{"key": "', 2), ("b", 2)]), _entry([("c", 2)])])
    assert _scan_build(tmp_path, text) is None
    assert not isinstance(_json_build(tmp_path, text), Exception)


def test_a_checkpoint_plans_the_same_however_its_entries_are_ordered(tmp_path):
    from kauldron_run import write_item

    leaf = np.arange(4, dtype=np.float32)
    tree = {"params": {f"b{i}": {"w": leaf + i, "v": leaf - i} for i in range(6)},
            "layers": [{"k": leaf * i} for i in range(3)], "step": 4}
    item = write_item(tmp_path / "ckpt", tree)
    path = os.path.join(item, "_METADATA")
    with open(path, "rb") as f:
        meta = json.loads(f.read())
    state = jax.tree.map(lambda x: np.zeros_like(x), tree)
    want = tg.graft(state, tg.OrbaxCheckpoint(item), {"params": "params", "layers": "layers"})
    entries = list(meta["tree_metadata"].items())
    random.Random(0).shuffle(entries)
    meta["tree_metadata"] = dict(entries)
    with open(path, "w") as f:
        json.dump(meta, f)
    got = tg.graft(state, tg.OrbaxCheckpoint(item), {"params": "params", "layers": "layers"})
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_lazy_leafs_shape_is_read_on_first_touch_and_then_kept(tmp_path):
    from kauldron_run import write_item

    from treegraft._formats.orbax.metadata import lazy_metadata

    item = write_item(tmp_path / "ckpt", {"w": np.ones((2, 3), np.float32), "n": 4})
    meta = lazy_metadata(os.path.abspath(item))
    leaf = meta["w"]
    # Other attributes are not the header's: asking for them reads nothing.
    assert getattr(leaf, "sharding", None) is None and not hasattr(leaf, "nbytes")
    assert leaf._spec is None
    assert leaf.shape == (2, 3)  # read now
    assert leaf._spec == ((2, 3), np.dtype("float32"))
    # Kept in the slot itself from now on (the slot's own descriptor finds it).
    assert type(leaf).shape.__get__(leaf) == (2, 3)
    with pytest.raises(AttributeError):
        type(leaf).shape.__get__(meta["n"])  # not read yet: no value in the slot
    assert (meta["n"].shape, meta["n"].dtype) == ((), int)


class _Pair(NamedTuple):
    """A node whose str keys jax keeps in field order, not sorted."""

    zeta: object
    alpha: object


def test_str_paths_out_of_order_are_not_bisected():
    leaf = np.zeros(1)
    tree = {"m": _Pair({"y": leaf, "x": leaf}, {"b": leaf, "a": leaf}), "n": leaf}
    index = TreeIndex(tree, "t")
    assert index.str_only() and not index.sorted_str()
    assert [index.paths[i] for i in index.under(("m", "alpha"))] == [
        ("m", "alpha", "a"), ("m", "alpha", "b")]
    assert index.under(("m", "zeta", "x")) == [0]
    assert index.under(("n",)) == [4]
    plain = TreeIndex({"m": {"zeta": {"y": leaf, "x": leaf}, "alpha": leaf}}, "t")
    assert plain.sorted_str()
    assert plain.under(("m", "zeta")) == [1, 2] and plain.under(("m", "zz")) == []


@given(st.recursive(_LEAF, lambda kids: st.dictionaries(_KEYS, kids, min_size=1, max_size=3)
                    | st.tuples(kids, kids).map(lambda t: _Pair(*t)), max_leaves=16))
def test_under_in_str_trees_sorted_or_not_is_the_leaves_below(tree):
    index = TreeIndex(tree, "t")
    for prefix in {p[:n] for p in index.paths for n in range(len(p) + 1)} | {("zz",)}:
        assert index.under(prefix) == _under_by_table(index.paths, prefix), prefix


@pytest.mark.parametrize("mapping", [{"p": "p"}, {"p": "q"}])
def test_a_run_as_long_as_the_source_range_but_other_names_is_looked_up(mapping):
    leaf = np.zeros(1)
    state = {"p": {"a": leaf, "b": leaf}}
    old = mapping["p"]
    source = {old: {"a": leaf, "c": leaf}}
    with pytest.raises(tg.GraftError) as info:
        tg.plan(state, source, mapping)
    text = str(info.value)
    assert "p.b" in text and f"{old}.c" in text  # b missing, c unexpected: not paired by place
    plan = tg.plan(state, source, mapping, strict=False)
    assert [(str(e.target), str(e.source)) for e in plan.entries] == [("p.a", f"{old}.a")]
    same = tg.plan(state, {old: {"a": leaf, "b": leaf}}, mapping)
    assert [(str(e.target), str(e.source)) for e in same.entries] == [
        ("p.a", f"{old}.a"), ("p.b", f"{old}.b")]


# --- the early index walk: the manifest read on tensorstore's threads -----------------


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    from kauldron_run import write_item

    tree = {"w": {f"k{i:03d}": np.full(3, i, np.float32) for i in range(300)}, "n": 5}
    return os.path.abspath(write_item(tmp_path_factory.mktemp("r6") / "many", tree))


def test_a_walk_not_waited_for_reads_what_a_waited_walk_reads(many):
    import tensorstore as ts

    from treegraft._formats.orbax.ocdbt_index import start_walk

    waited = start_walk(many, ts.Context())
    early = start_walk(many, ts.Context(), wait=False)
    assert waited is not None and early is not None
    assert early.ready() and early.num_keys == waited.num_keys > 300
    keys = {f"w.k{i:03d}/.zarray".encode() for i in range(0, 300, 7)} | {b"no/such"}
    assert early.values(keys) == waited.values(keys)
    assert len(early.values(keys)) == len(keys) - 1


def test_an_early_walk_of_an_unreadable_manifest_plans_as_the_late_one(many, tmp_path,
                                                                     monkeypatch):
    import shutil

    import tensorstore as ts

    from treegraft._formats.orbax import metadata as M
    from treegraft._formats.orbax.ocdbt_index import start_walk

    copy = str(tmp_path / "copy")
    shutil.copytree(many, copy)
    with open(os.path.join(copy, "manifest.ocdbt"), "wb") as f:
        f.write(b"not a manifest")
    early = start_walk(copy, ts.Context(), wait=False)
    assert early is not None and early.ready() is False  # known only once waited for
    state = {"w": {"k001": np.zeros(3, np.float32)}}
    errors = []
    for threshold in (100, 1 << 40):  # the walk started early, then late
        monkeypatch.setattr(M, "_EARLY_WALK_BYTES", threshold)
        with pytest.raises(tg.CheckpointError) as info:
            tg.plan(state, tg.OrbaxCheckpoint(copy), {"w.k001": "w.k001"})
        errors.append(str(info.value))
    assert "w.k001" in errors[0] and errors[0] == errors[1]
