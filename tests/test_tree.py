"""Pure tree operations: flatten, extract, insert."""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trees
from hypothesis import given
from hypothesis import strategies as st
from jax import tree_util
from trees import TREES, Box, Case, Dense, Pair, Unkeyed, case_id, renew

import treegraft as tg
from treegraft import GraftError, MismatchError, Path, PathNotFoundError, parse_path


def f32(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def make_state() -> dict:
    """A state touching every container kind; fresh arrays on every call."""
    return {
        "params": {
            "encoder": {"kernel": f32(2, 3), "bias": np.zeros(4, np.int8)},
            "decoder": {"layers_0": {"kernel": f32(2, 3)}},
        },
        "opt": (Pair(first=jnp.zeros((2, 2), jnp.int32), second={"w": f32(3)}), None, ()),
        "list": [np.float64(1.5), (f32(1), np.array([True]))],
        "ints": {0: 1, 3: 2.5},
        "digits": {"0": f32(2), "1": f32(2)},
        "dense": Dense(w=f32(2), b=jnp.ones(3, jnp.bfloat16)),
        "box": Box({"x": np.zeros(0, np.uint8)}),
        "raw": Unkeyed(f32(1), 7),
        "odd": {"x.y": 1, "b c": 2},
        "none": None,
        "empty": {},
    }


# ----------------------------------------------------------------------------
# flatten
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", TREES, ids=case_id)
def test_flatten_corpus(case: Case):
    flat = tg.flatten(case.tree)
    assert all(isinstance(p, Path) for p in flat)
    assert tuple(str(p) for p in flat) == case.paths
    # The leaves, in jax's order, are the tree's own objects.
    leaves = tree_util.tree_leaves(case.tree)
    assert len(flat) == len(leaves)
    assert all(a is b for a, b in zip(flat.values(), leaves, strict=True))
    keyed = tree_util.tree_flatten_with_path(case.tree)[0]
    assert list(flat) == [Path.from_keypath(kp) for kp, _ in keyed]
    # Every flattened path leads back to its leaf.
    for path, leaf in flat.items():
        assert tg.extract(case.tree, path) is leaf
        assert tg.extract(case.tree, str(path)) is leaf


def test_flatten_deep_trees_as_jax_does():
    tree: object = [np.ones(2), {"w": 1.0}]
    for i in range(300):
        tree = {"a": tree, "b": i} if i % 2 else [tree, None]
    keyed = tree_util.tree_flatten_with_path(tree)[0]
    flat = tg.flatten(tree)
    assert list(flat) == [Path.from_keypath(kp) for kp, _ in keyed]
    assert all(a is b for a, b in zip(flat.values(), (x for _, x in keyed), strict=True))


def test_flatten_documented_example():
    assert tg.flatten({"a": [1, 2], "b": {"c": 3}, "d": None}) == {
        Path(("a", 0)): 1,
        Path(("a", 1)): 2,
        Path(("b", "c")): 3,
    }


def test_flatten_tells_equal_keys_of_different_types_apart():
    # 1 == True == 1.0 in Python, but they are different dict keys in different dicts.
    flat = tg.flatten({"a": {1: "int"}, "b": {True: "bool"}, "c": {1.0: "float"}, "d": ["seq"]})
    assert [p.parts for p in flat] == [("a", 1), ("b", True), ("c", 1.0), ("d", 0)]
    assert [[type(x) for x in p.parts] for p in flat] == [
        [str, int],
        [str, bool],
        [str, float],
        [str, int],
    ]
    assert [str(p) for p in flat] == ["a[1]", "b[True]", "c[1.0]", "d[0]"]


def test_flatten_sees_a_type_registered_after_it_was_a_leaf():
    class Late:
        def __init__(self, v):
            self.v = v

    tree = {"a": Late(f32(2))}
    assert [str(p) for p in tg.flatten(tree)] == ["a"]  # not a pytree node yet: a leaf
    tree_util.register_pytree_with_keys(
        Late,
        lambda n: (((tree_util.GetAttrKey("v"), n.v),), None),
        lambda _, children: Late(*children),
    )
    assert [str(p) for p in tg.flatten(tree)] == ["a.v"]
    new = f32(2) + 1
    assert tg.insert(tree, "a.v", new)["a"].v is new


def test_flatten_is_leaf_reaches_every_level():
    tree = {"a": {"b": (1, 2), "c": [(3,), 4]}, "d": (5,)}
    flat = tg.flatten(tree, is_leaf=lambda x: isinstance(x, tuple))
    assert {str(p): v for p, v in flat.items()} == {
        "a.b": (1, 2),
        "a.c[0]": (3,),
        "a.c[1]": 4,
        "d": (5,),
    }


def test_flatten_does_not_modify_its_input():
    state = make_state()
    snap = trees.snapshot(state)
    tg.flatten(state)
    trees.assert_unchanged(state, snap)


# ----------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------

EXTRACTS = [
    ("", lambda t: t),
    ("params", lambda t: t["params"]),
    ("params.encoder.kernel", lambda t: t["params"]["encoder"]["kernel"]),
    ("opt[0].first", lambda t: t["opt"][0].first),
    ("opt[0]['second'].w", lambda t: t["opt"][0].second["w"]),
    ("opt[1]", lambda t: t["opt"][1]),
    ("opt[2]", lambda t: t["opt"][2]),
    ("list[1][0]", lambda t: t["list"][1][0]),
    ("list.1.1", lambda t: t["list"][1][1]),
    ("ints[3]", lambda t: t["ints"][3]),
    ("ints.0", lambda t: t["ints"][0]),
    ("digits.0", lambda t: t["digits"]["0"]),
    ("digits[1]", lambda t: t["digits"]["1"]),
    ("digits['1']", lambda t: t["digits"]["1"]),
    ("dense.w", lambda t: t["dense"].w),
    ("dense.b", lambda t: t["dense"].b),
    ("box.value.x", lambda t: t["box"].value["x"]),
    ("raw[1]", lambda t: t["raw"].b),
    ("odd['x.y']", lambda t: t["odd"]["x.y"]),
    ("odd['b c']", lambda t: t["odd"]["b c"]),
    ("none", lambda t: t["none"]),
    ("empty", lambda t: t["empty"]),
]


@pytest.mark.parametrize(("path", "get"), EXTRACTS, ids=[p or "root" for p, _ in EXTRACTS])
def test_extract(path, get):
    state = make_state()
    expected = get(state)
    # The very object in the tree, not a copy; from a string or a Path alike.
    assert tg.extract(state, path) is expected
    assert tg.extract(state, parse_path(path)) is expected


def test_extract_int_part_finds_digit_string_key():
    # Orbax may save int dict keys as strings: 0 finds '0' when there is no key 0.
    tree = {"layers": {"0": "zero", "1": "one"}}
    assert tg.extract(tree, "layers[0]") == "zero"
    assert tg.extract(tree, Path(("layers", 1))) == "one"


def test_extract_string_part_does_not_find_int_key():
    with pytest.raises(PathNotFoundError) as info:
        tg.extract({"a": [1]}, "a['0']")
    assert str(info.value) == (
        "path \"a['0']\" not found in the tree: 'a' has no key '0' (did you mean 0?); "
        "its keys are 0"
    )


def test_path_not_found_error_types():
    with pytest.raises(PathNotFoundError) as info:
        tg.extract(make_state(), "params.encoder.kernl")
    err = info.value
    assert isinstance(err, KeyError)
    assert isinstance(err, GraftError) and isinstance(err, ValueError)
    # KeyError's str() would quote the message; treegraft keeps it readable.
    assert str(err) == (
        "path 'params.encoder.kernl' not found in the tree: 'params.encoder' has no key "
        "'kernl' (did you mean 'kernel'?); its keys are 'bias', 'kernel'"
    )
    with pytest.raises(KeyError, match="did you mean 'kernel'"):
        tg.extract(make_state(), "params.encoder.kernl")


@pytest.mark.parametrize(
    ("tree", "path", "message"),
    [
        (
            {"params": {"encoder": 1}, "opt": 2},
            "parms.encoder",
            "path 'parms.encoder' not found in the tree: the root has no key 'parms' "
            "(did you mean 'params'?); its keys are 'opt', 'params'",
        ),
        (
            {"params": {"encoder": {"w": 1}, "decoder": {"w": 2}}},
            "params.encodr.w",
            "path 'params.encodr.w' not found in the tree: 'params' has no key 'encodr' "
            "(did you mean 'encoder' or 'decoder'?); its keys are 'decoder', 'encoder'",
        ),
        (
            {"a": {"b": {"c": 1}}},
            "a.b.zzz",
            "path 'a.b.zzz' not found in the tree: 'a.b' has no key 'zzz'; its keys are 'c'",
        ),
        (
            {"a": [1, 2]},
            "a[5]",
            "path 'a[5]' not found in the tree: 'a' has no key 5; its keys are 0, 1",
        ),
        (
            {"a": {"x": f32(2, 3)}},
            "a.x.y",
            "path 'a.x.y' not found in the tree: 'a.x' is a leaf (float32[2, 3]), "
            "it has no key 'y'",
        ),
        (
            {"a": {"n": 3}},
            "a.n[0]",
            "path 'a.n[0]' not found in the tree: 'a.n' is a leaf (int (python)[]), "
            "it has no key 0",
        ),
        (
            f32(2),
            "a",
            "path 'a' not found in the tree: the root is a leaf (float32[2]), it has no key 'a'",
        ),
        (
            {"a": None},
            "a.b",
            "path 'a.b' not found in the tree: 'a' is None, it has no key 'b'",
        ),
        (
            {"a": {}},
            "a[0]",
            "path 'a[0]' not found in the tree: 'a' is an empty dict, it has no key 0",
        ),
        (
            {"p": Pair(first=1, second=2)},
            "p[0]",
            "path 'p[0]' not found in the tree: 'p' has no key 0; its keys are 'first', 'second'",
        ),
    ],
    ids=[
        "root-key-suggested",
        "two-suggestions",
        "deep-no-suggestion",
        "index-out-of-range",
        "through-array-leaf",
        "through-scalar-leaf",
        "root-is-a-leaf",
        "through-None",
        "through-empty-dict",
        "namedtuple-by-index",
    ],
)
def test_extract_not_found_messages(tree, path, message):
    with pytest.raises(PathNotFoundError, match="^" + re.escape(message) + "$"):
        tg.extract(tree, path)


def test_extract_not_found_lists_at_most_twelve_keys():
    tree = {f"k{i:02d}": i for i in range(20)}
    with pytest.raises(PathNotFoundError) as info:
        tg.extract(tree, "zz")
    listed = ", ".join(repr(f"k{i:02d}") for i in range(12))
    assert str(info.value) == (
        f"path 'zz' not found in the tree: the root has no key 'zz'; its keys are {listed}, "
        "... (20 keys)"
    )


def test_extract_is_leaf_reaches_every_level():
    tree = {"a": {"b": (1, 2)}}
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    assert tg.extract(tree, "a.b", is_leaf=is_tuple) == (1, 2)
    assert tg.extract(tree, "a.b[1]") == 2
    with pytest.raises(
        PathNotFoundError,
        match=re.escape("'a.b' is a leaf (tuple), it has no key 1"),
    ):
        tg.extract(tree, "a.b[1]", is_leaf=is_tuple)


def test_extract_rejects_bad_path_syntax():
    with pytest.raises(tg.PathSyntaxError, match="invalid path 'a..b'"):
        tg.extract({"a": 1}, "a..b")


# ----------------------------------------------------------------------------
# insert
# ----------------------------------------------------------------------------


def _check_insert(tree, path: Path, subtree) -> None:
    """Inserts subtree at path and checks everything insert promises."""
    snap = trees.snapshot(tree)
    sub_snap = trees.snapshot(subtree)
    old_flat = tg.flatten(tree)
    out = tg.insert(tree, path, subtree)
    # Same treedef: containers, None and empty nodes, static fields all kept.
    assert tree_util.tree_structure(out) == tree_util.tree_structure(tree)
    # Inside path: exactly subtree's leaves; outside: the old leaves, untouched.
    new_leaves = iter(tree_util.tree_leaves(subtree))
    for (p, old), (q, new) in zip(old_flat.items(), tg.flatten(out).items(), strict=True):
        assert p == q
        if p.startswith(path):
            assert new is next(new_leaves)
            assert np.shape(new) == np.shape(old)
        else:
            assert new is old
    assert next(new_leaves, None) is None
    # extract(insert(t, p, s), p) == s.
    got = tg.extract(out, path)
    assert tree_util.tree_structure(got) == tree_util.tree_structure(subtree)
    assert all(
        a is b
        for a, b in zip(tree_util.tree_leaves(got), tree_util.tree_leaves(subtree), strict=True)
    )
    # Neither input was modified.
    trees.assert_unchanged(tree, snap)
    trees.assert_unchanged(subtree, sub_snap)


@pytest.mark.parametrize("case", TREES, ids=case_id)
def test_insert_at_every_node_of_the_corpus(case: Case):
    for path in trees.node_paths(case.tree):
        subtree = jax.tree.map(renew, tg.extract(case.tree, path))
        _check_insert(case.tree, path, subtree)


def test_insert_documented_example():
    t = {"enc": {"w": np.zeros(2)}, "dec": {"w": np.zeros(2)}}
    out = tg.insert(t, "dec", {"w": np.ones(2)})
    np.testing.assert_array_equal(out["dec"]["w"], np.ones(2))
    assert out["enc"]["w"] is t["enc"]["w"]
    np.testing.assert_array_equal(t["dec"]["w"], np.zeros(2))  # the input is as it was
    assert out is not t and out["dec"] is not t["dec"]


def test_insert_does_not_mutate_input():
    state = make_state()
    before = copy.deepcopy(state)
    snap = trees.snapshot(state)
    out = tg.insert(state, "params.encoder", {"kernel": f32(2, 3) + 1, "bias": np.ones(4, np.int8)})
    trees.assert_unchanged(state, snap)
    assert tree_util.tree_structure(state) == tree_util.tree_structure(before)
    for a, b in zip(tree_util.tree_leaves(state), tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(out["params"]["encoder"]["bias"], np.ones(4, np.int8))


def test_insert_keeps_container_types():
    state = make_state()
    out = tg.insert(
        state,
        "opt[0]",
        # A dict of fields replaces a namedtuple (orbax saves namedtuples as dicts).
        {"first": jnp.ones((2, 2), jnp.int32), "second": {"w": f32(3)}},
    )
    assert type(out["opt"][0]) is Pair
    assert type(out["opt"]) is tuple and out["opt"][1] is None and out["opt"][2] == ()

    out = tg.insert(state, "dense", {"w": f32(2), "b": jnp.zeros(3, jnp.bfloat16)})
    assert type(out["dense"]) is Dense and out["dense"].name == "dense"

    out = tg.insert(state, "list[1]", [f32(1), np.array([False])])  # a list for a tuple
    assert type(out["list"][1]) is tuple and out["list"][1][1][0] == np.False_

    out = tg.insert(state, "box", Box({"x": np.ones(0, np.uint8)}, label="other"))
    assert type(out["box"]) is Box and out["box"].label == "box"  # the tree's aux data

    out = tg.insert(state, "raw", Unkeyed(f32(1) + 1, 8))
    assert type(out["raw"]) is Unkeyed and out["raw"].b == 8

    # None and empty nodes stay, whatever the replacement holds there.
    out = tg.insert(state, "", jax.tree.map(renew, {**state, "none": {}, "empty": None}))
    assert out["none"] is None and out["empty"] == {}
    assert tree_util.tree_structure(out) == tree_util.tree_structure(state)


def test_insert_keeps_flax_containers():
    pytest.importorskip("flax")
    from flax.core import FrozenDict

    tree = {"model": FrozenDict({"params": {"w": f32(2)}}), "s": trees.Struct({"w": f32(1)}, 3)}
    out = tg.insert(tree, "model", {"params": {"w": f32(2) + 1}})
    assert type(out["model"]) is FrozenDict
    np.testing.assert_array_equal(out["model"]["params"]["w"], f32(2) + 1)
    out = tg.insert(tree, "s", {"params": {"w": f32(1) + 1}, "step": 4})
    assert type(out["s"]) is trees.Struct and out["s"].tag == "s" and out["s"].step == 4
    assert tree_util.tree_structure(out) == tree_util.tree_structure(tree)


def test_insert_int_part_finds_digit_string_key():
    state = make_state()
    new = f32(2) + 1
    out = tg.insert(state, "digits[0]", new)
    assert out["digits"]["0"] is new and out["digits"]["1"] is state["digits"]["1"]
    assert sorted(out["digits"]) == ["0", "1"]


def test_insert_python_scalar_targets_accept_same_kind():
    out = tg.insert({"step": 3, "lr": 0.5}, "step", np.int32(4))
    assert out["step"] == 4
    out = tg.insert({"step": 3, "lr": 0.5}, "lr", np.array(0.25, np.float32))
    assert out["lr"] == 0.25
    # ml_dtypes report numpy kind 'V'; they are still floats and ints.
    out = tg.insert({"step": 3, "lr": 0.5}, "lr", jnp.bfloat16(0.25))
    assert out["lr"].dtype == jnp.bfloat16
    out = tg.insert({"step": 3, "lr": 0.5}, "step", jnp.int4(2))
    assert out["step"] == 2
    with pytest.raises(
        MismatchError,
        match=re.escape(
            "'lr': dtype differs: in the tree float (python)[], in the subtree int32[]"
        ),
    ):
        tg.insert({"step": 3, "lr": 0.5}, "lr", np.int32(1))
    with pytest.raises(
        MismatchError,
        match=re.escape(
            "'step': dtype differs: in the tree int (python)[], in the subtree bfloat16[]"
        ),
    ):
        tg.insert({"step": 3, "lr": 0.5}, "step", jnp.bfloat16(1))


def test_insert_mismatch_lists_every_problem():
    state = make_state()
    snap = trees.snapshot(state)
    subtree = {
        "kernel": f32(3, 2),  # shape
        # "bias" is missing
        "extra": f32(1),  # not in the tree
    }
    with pytest.raises(MismatchError) as info:
        tg.insert(state, "params", {"encoder": subtree, "decoder": {"layers_0": {"kernel": 1}}})
    err = info.value
    assert str(err) == (
        "cannot insert at 'params': the subtree differs from the one it replaces "
        "(4 problem(s)):\n"
        "  'params.decoder.layers_0.kernel': shape differs: in the tree float32[2, 3], "
        "in the subtree int (python)[]\n"
        "  'params.encoder.bias': in the tree, missing from the subtree\n"
        "  'params.encoder.kernel': shape differs: in the tree float32[2, 3], "
        "in the subtree float32[3, 2]\n"
        "  'params.encoder.extra': in the subtree, not a leaf of the tree"
    )
    assert len(err.problems) == 4
    assert isinstance(err, GraftError) and isinstance(err, ValueError)
    assert not isinstance(err, KeyError)
    trees.assert_unchanged(state, snap)  # a failed insert leaves the input as it was


def test_insert_mismatch_shape_dtype_missing_extra():
    tree = {"a": {"b": f32(2), "c": np.zeros(3), "d": 1, "w": jnp.ones(3, jnp.bfloat16)}}
    sub = {"b": f32(3), "c": np.zeros(3, np.int32), "e": 2, "w": jnp.ones(3, jnp.float32)}
    with pytest.raises(MismatchError) as info:
        tg.insert(tree, "a", sub)
    assert str(info.value) == (
        "cannot insert at 'a': the subtree differs from the one it replaces (5 problem(s)):\n"
        "  'a.b': shape differs: in the tree float32[2], in the subtree float32[3]\n"
        "  'a.c': dtype differs: in the tree float64[3], in the subtree int32[3]\n"
        "  'a.d': in the tree, missing from the subtree\n"
        "  'a.w': dtype differs: in the tree bfloat16[3], in the subtree float32[3]\n"
        "  'a.e': in the subtree, not a leaf of the tree"
    )
    problems = info.value.problems
    assert tuple("  " + p.message for p in problems) == tuple(str(info.value).split("\n")[1:])
    assert {p.kind for p in problems} == {"insert"}
    assert [str(p.target) for p in problems] == ["a.b", "a.c", "a.d", "a.w", "a.e"]


@pytest.mark.parametrize(
    ("tree", "path", "subtree", "problems"),
    [
        (
            {"a": {"x": f32(2)}},
            "a",
            f32(2),
            [
                "'a.x': in the tree, missing from the subtree",
                "'a': in the subtree, not a leaf of the tree",
            ],
        ),
        (
            {"a": {"x": f32(2), "y": 1}},
            "a",
            None,
            [
                "'a.x': in the tree, missing from the subtree",
                "'a.y': in the tree, missing from the subtree",
            ],
        ),
        (
            {"a": None},
            "a",
            {"x": 1},
            ["'a.x': in the subtree, not a leaf of the tree"],
        ),
        (
            {"a": True},
            "a",
            1,
            ["'a': dtype differs: in the tree bool (python)[], in the subtree int (python)[]"],
        ),
        (
            {"a": 3},
            "a",
            2.5,
            ["'a': dtype differs: in the tree int (python)[], in the subtree float (python)[]"],
        ),
        (
            {"a": "text"},
            "a",
            1,
            ["'a': type differs: in the tree str, in the subtree int (python)[]"],
        ),
        (
            {"a": [f32(1), f32(1)]},
            "a",
            [f32(1)],
            ["'a[1]': in the tree, missing from the subtree"],
        ),
        (
            {"a": {"0": f32(1)}},
            "a",
            [f32(1)],
            [
                "\"a['0']\": in the tree, missing from the subtree",
                "'a[0]': in the subtree, not a leaf of the tree",
            ],
        ),
    ],
    ids=[
        "leaf-for-subtree",
        "None-for-subtree",
        "subtree-for-None",
        "bool-vs-int",
        "int-vs-float",
        "opaque-type",
        "shorter-list",
        "list-for-digit-keys",
    ],
)
def test_insert_mismatch_cases(tree, path, subtree, problems):
    snap = trees.snapshot(tree)
    with pytest.raises(MismatchError) as info:
        tg.insert(tree, path, subtree)
    lines = str(info.value).split("\n")
    assert lines[0] == (
        f"cannot insert at {path!r}: the subtree differs from the one it replaces "
        f"({len(problems)} problem(s)):"
    )
    assert lines[1:] == ["  " + p for p in problems]
    trees.assert_unchanged(tree, snap)


def test_insert_path_not_found():
    with pytest.raises(
        PathNotFoundError,
        match=re.escape(
            "path 'params.encodr' not found in the tree: 'params' has no key 'encodr' "
            "(did you mean 'encoder' or 'decoder'?); its keys are 'decoder', 'encoder'"
        )
        + "$",
    ):
        tg.insert(make_state(), "params.encodr", {})


# ----------------------------------------------------------------------------
# Properties over generated pytrees.
# ----------------------------------------------------------------------------


@given(trees.pytrees(), st.data())
def test_insert_then_extract_round_trips(tree, data):
    path = data.draw(st.sampled_from(trees.node_paths(tree)), label="path")
    subtree = jax.tree.map(renew, tg.extract(tree, path))
    _check_insert(tree, path, subtree)


@given(trees.pytrees())
def test_flatten_agrees_with_jax(tree):
    flat = tg.flatten(tree)
    keyed = tree_util.tree_flatten_with_path(tree)[0]
    assert list(flat) == [Path.from_keypath(kp) for kp, _ in keyed]
    assert all(a is b for a, b in zip(flat.values(), (x for _, x in keyed), strict=True))


@given(trees.pytrees())
def test_extract_finds_every_node(tree):
    flat = tg.flatten(tree)
    for path in trees.node_paths(tree):
        node = tg.extract(tree, path)
        if path in flat:
            assert node is flat[path]
        else:  # an inner node: its leaves are the flattened leaves under path
            under = [leaf for p, leaf in flat.items() if p.startswith(path)]
            assert all(a is b for a, b in zip(tree_util.tree_leaves(node), under, strict=True))


@given(trees.pytrees())
def test_insert_identity_at_root_keeps_everything(tree):
    out = tg.insert(tree, "", tree)
    assert tree_util.tree_structure(out) == tree_util.tree_structure(tree)
    assert all(
        a is b for a, b in zip(tree_util.tree_leaves(out), tree_util.tree_leaves(tree), strict=True)
    )


# ----------------------------------------------------------------------------
# Reliability, round 2.
# ----------------------------------------------------------------------------


def test_insert_key_arrays():
    tree = {"rng": jax.random.split(jax.random.key(0), 2), "w": np.zeros(2)}
    new = jax.random.split(jax.random.key(5), 2)
    out = tg.insert(tree, "rng", new)
    assert out["rng"] is new
    with pytest.raises(
        MismatchError,
        match=r"'rng': dtype differs: in the tree key<fry>\[2\], in the subtree uint32\[2\]",
    ):
        tg.insert(tree, "rng", jnp.zeros(2, jnp.uint32))
    with pytest.raises(
        MismatchError,
        match=r"'rng': dtype differs: in the tree key<fry>\[2\], in the subtree key<rbg>\[2\]",
    ):
        tg.insert(tree, "rng", jax.random.split(jax.random.key(0, impl="rbg"), 2))


class TwoUnderOneKey:
    """A custom node whose flatten function gives both children the key 'x'."""

    def __init__(self, a, b):
        self.a, self.b = a, b


tree_util.register_pytree_with_keys(
    TwoUnderOneKey,
    lambda t: (((tree_util.GetAttrKey("x"), t.a), (tree_util.GetAttrKey("x"), t.b)), None),
    lambda _, kids: TwoUnderOneKey(*kids),
)

_TWO_KEYS = (
    r"the TwoUnderOneKey node at 'm\[0\]' has two children under the key 'x': a path can "
    r"reach only one of them, and a graft would give both the same value\. Give every child "
    r"its own key in the node's flatten function \(jax\.tree_util\.register_pytree_with_keys\)"
)


@pytest.mark.parametrize(
    "children",
    [
        pytest.param((np.zeros(2), np.ones(2)), id="two-leaves"),
        pytest.param((np.zeros(2), {"y": np.ones(2)}), id="a-leaf-and-a-subtree"),
    ],
)
def test_two_children_under_one_key_are_an_error(children):
    tree = {"m": [TwoUnderOneKey(*children)]}
    with pytest.raises(tg.TreeError, match=_TWO_KEYS):
        tg.flatten(tree)
    with pytest.raises(GraftError, match=_TWO_KEYS):
        tg.flatten(tree, is_leaf=lambda x: False)  # the keyed (slow) flatten
    with pytest.raises(GraftError, match=_TWO_KEYS):
        tg.plan(tree, {"m": [{"x": np.zeros(2)}]}, {"": ""})


@pytest.mark.parametrize(
    "tree, message",
    [
        pytest.param({0: 1, "0": 2}, r"the dict at the root mixes keys that do not sort "
                     r"together \(int and str: 0, '0'\)", id="0-and-'0'"),
        pytest.param({"a": [{None: 1, "n": 2}]}, r"the dict at 'a\[0\]' mixes keys that do not "
                     r"sort together \(NoneType and str: None, 'n'\)", id="None-and-'n'"),
    ],
)
def test_dicts_mixing_key_types_are_a_typed_error(tree, message):
    full = message + r"; jax sorts dict keys, so a pytree dict needs keys that compare with " \
        r"each other: make them all str"
    for call in (tg.flatten, lambda t: tg.flatten(t, is_leaf=lambda x: False),
                 lambda t: tg.plan(t, t, {"": ""})):
        with pytest.raises(tg.TreeError, match=full):
            call(tree)


def _chain(depth):
    tree = node = {}
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    node["w"] = np.zeros(1)
    return tree


def test_a_tree_too_deep_for_jax_is_a_typed_error_with_its_depth():
    message = (
        r"tree too deep: 1200 levels, at 'a\.a\.a\.a' \.\.\. 'a\.a\.w' \(1200 keys\); jax cannot "
        r"flatten pytrees deeper than about 1000 levels\. Keep long chains as a list"
    )
    with pytest.raises(tg.TreeError, match=message):
        tg.flatten(_chain(1200))
    with pytest.raises(tg.TreeError, match=message):
        tg.plan(_chain(1200), {"w": np.zeros(1)}, {"": ""})
    # A deep tree under jax's limit still works.
    assert len(tg.flatten(_chain(600))) == 1
