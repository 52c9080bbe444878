"""tg.invert: the mapping that takes a graft's result back (docs/design.md section 15)."""

import copy

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import treegraft as tg
from treegraft._parse.ops import Cast, Reshape, Transpose

BF16 = np.dtype(ml_dtypes.bfloat16)


def meta(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def zeros(tree):
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)


def leaves(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def same_bits(a, b) -> bool:
    # graft may return a transposed array: compare the bytes in logical order
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    )


def round_trip(source, target, mapping):
    """graft forward into target's layout, then back with invert(mapping, like=source)."""
    result = tg.graft(zeros(target), source, mapping)
    back = tg.graft(zeros(source), result, tg.invert(mapping, like=meta(source)))
    return result, back


def assert_same_leaves(got, want):
    g, w = leaves(got), leaves(want)
    assert g.keys() == w.keys()
    bad = [k for k in w if not same_bits(g[k], w[k])]
    assert not bad, bad


# -- each rule kind --------------------------------------------------------------------


def test_paths_and_globs_swap_sides_with_their_captures():
    m = {"enc.layers_*.w": "encoder.block_*.weight", "head.**.b": "top.**.bias", "x": "y.z"}
    assert tg.invert(m) == {
        "encoder.block_*.weight": "enc.layers_*.w",
        "top.**.bias": "head.**.b",
        "y.z": "x",
    }


def test_a_glob_rename_round_trips():
    rng = np.random.default_rng(0)
    src = {"encoder": {f"block_{i}": {"weight": rng.normal(size=3)} for i in range(3)}}
    tgt = {"enc": {f"layers_{i}": {"w": np.zeros(3)} for i in range(3)}}
    _, back = round_trip(src, tgt, {"enc.layers_*.w": "encoder.block_*.weight"})
    assert_same_leaves(back, src)


def test_the_whole_tree_copy_is_its_own_inverse():
    assert tg.invert({"": ""}) == {"": ""}


def test_stack_and_unstack_swap_on_the_same_axis():
    assert tg.invert({"layers": tg.stack("layers_*", axis=1)}) == {
        "layers_*": tg.unstack("layers", axis=1)
    }
    assert tg.invert({"l_*.w": tg.unstack("stacked.w", axis=0)}) == {
        "stacked.w": tg.stack("l_*.w", axis=0)
    }


def test_stack_round_trips():
    rng = np.random.default_rng(1)
    src = {f"l_{i}": {"w": rng.normal(size=(2, 3)).astype(np.float32)} for i in range(4)}
    tgt = {"layers": {"w": np.zeros((2, 4, 3), np.float32)}}
    result, back = round_trip(src, tgt, {"layers": tg.stack("l_*", axis=1)})
    assert result["layers"]["w"].shape == (2, 4, 3)
    assert_same_leaves(back, src)


def test_transpose_inverts_to_the_argsort_of_its_axes():
    inv = tg.invert({"k": tg.transpose("w", (2, 0, 1)), "n": tg.transpose("v", (-1, 0, 1))})
    assert inv == {"w": tg.transpose("k", (1, 2, 0)), "v": tg.transpose("n", (1, 2, 0))}


def test_nested_operations_invert_in_the_reverse_order_each_inverted():
    src = {"w": np.ones((2, 3), np.float16)}
    inv = tg.invert({"k": tg.cast(tg.transpose("w", (1, 0)), np.float32)}, like=src)
    assert inv == {"w": Transpose(Cast("k", np.dtype(np.float16)), (1, 0))}


def test_cast_and_reshape_take_dtype_and_shape_from_like():
    src = {"a": np.ones((6,), BF16), "b": np.ones((2, 3), np.int8)}
    m = {"x": tg.cast("a", np.float32), "y": tg.reshape("b", (3, 2))}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"a": Cast("x", BF16), "y" if False else "b": Reshape("y", (2, 3))}
    _, back = round_trip(src, {"x": np.zeros(6, np.float32), "y": np.zeros((3, 2), np.int8)}, m)
    assert_same_leaves(back, src)


def test_like_may_be_a_lazy_source(tmp_path):
    from safetensors.numpy import save_file

    src = {"w": np.arange(6, dtype=np.float16).reshape(2, 3)}
    save_file({"w": src["w"]}, str(tmp_path / "m.safetensors"))
    with tg.SafetensorsCheckpoint(tmp_path / "m.safetensors") as ckpt:
        inv = tg.invert({"k": tg.reshape(tg.cast("w", np.float32), (-1,))}, like=ckpt)
    assert inv == {"w": Cast(Reshape("k", (2, 3)), np.dtype(np.float16))}


def test_like_may_be_an_orbax_checkpoint_read_back_through_the_inverse(tmp_path):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(6)
    src = {
        "layers": {f"l_{i}": {"w": rng.normal(size=(2, 3)).astype(BF16)} for i in range(3)},
        "embed": rng.normal(size=(4,)).astype(np.float16),
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "item", src)
        ckptr.wait_until_finished()
    m = {
        "scan.w": tg.cast(tg.transpose(tg.stack("layers.l_*.w", axis=0), (0, 2, 1)), np.float32),
        "emb": tg.cast(tg.reshape("embed", (2, 2)), np.float32),
    }
    target = {"scan": {"w": np.zeros((3, 3, 2), np.float32)}, "emb": np.zeros((2, 2), np.float32)}
    with tg.OrbaxCheckpoint(tmp_path / "item") as ckpt:
        inv = tg.invert(m, like=ckpt)
        result = tg.graft(target, ckpt, m)
    assert inv == {
        "layers.l_*.w": tg.transpose(tg.cast(tg.unstack("scan.w", axis=0), BF16), (1, 0)),
        "embed": tg.reshape(tg.cast("emb", np.float16), (4,)),
    }
    assert_same_leaves(tg.graft(zeros(src), result, inv), src)


def test_leaves_of_different_shapes_under_one_rule_get_one_entry_each():
    src = {"enc": {"a": np.ones((2, 2), BF16), "b": np.ones((4,), np.float16)}}
    m = {"dec": tg.cast("enc", np.float32)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"enc.a": tg.cast("dec.a", BF16), "enc.b": tg.cast("dec.b", np.float16)}
    tgt = {"dec": {"a": np.zeros((2, 2), np.float32), "b": np.zeros(4, np.float32)}}
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_a_stack_of_leaves_of_different_dtypes_is_split_with_its_index_kept():
    src = {f"l_{i}": {"w": np.full(2, i, BF16), "b": np.full(3, i, np.float16)} for i in range(2)}
    m = {"s": tg.cast(tg.stack("l_*", axis=0), np.float32)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {
        "l_*.w": tg.cast(tg.unstack("s.w", axis=0), BF16),
        "l_*.b": tg.cast(tg.unstack("s.b", axis=0), np.float16),
    }
    tgt = {"s": {"w": np.zeros((2, 2), np.float32), "b": np.zeros((2, 3), np.float32)}}
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_split_entries_bind_the_other_captures_and_keep_the_layer_index():
    rng = np.random.default_rng(5)
    src = {
        "enc": {
            "a": {f"l_{i}": rng.normal(size=2).astype(BF16) for i in range(3)},
            "b": {f"l_{i}": rng.normal(size=2).astype(np.float16) for i in range(2)},
        },
        "flat": {"a": rng.normal(size=(2, 3)).astype(BF16), "b": np.arange(4, dtype=np.int8)},
    }
    m = {
        "dec.*.s": tg.cast(tg.stack("enc.*.l_*", axis=0), np.float32),
        "out.*.l_*": tg.cast(tg.unstack("flat.*", axis=0), np.float64),
    }
    inv = tg.invert(m, like=meta(src))
    assert inv == {
        "enc.a.l_*": tg.cast(tg.unstack("dec.a.s", axis=0), BF16),
        "enc.b.l_*": tg.cast(tg.unstack("dec.b.s", axis=0), np.float16),
        "flat.a": tg.cast(tg.stack("out.a.l_*", axis=0), BF16),
        "flat.b": tg.cast(tg.stack("out.b.l_*", axis=0), np.int8),
    }
    tgt = {
        "dec": {"a": {"s": np.zeros((3, 2), np.float32)}, "b": {"s": np.zeros((2, 2), np.float32)}},
        "out": {
            "a": {f"l_{i}": np.zeros(3) for i in range(2)},
            "b": {f"l_{i}": np.zeros(()) for i in range(4)},
        },
    }
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_split_entries_under_a_double_star_name_each_leaf():
    src = {"x": {"p": {"q": {"w": np.ones(2, BF16)}}, "r": {"w": np.ones(2, np.float16)}}}
    m = {"y.**.w": tg.cast("x.**.w", np.float32)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"x.p.q.w": tg.cast("y.p.q.w", BF16), "x.r.w": tg.cast("y.r.w", np.float16)}


def test_a_transpose_after_a_stack_moves_the_unstacked_axis():
    rng = np.random.default_rng(2)
    src = {f"l_{i}": rng.normal(size=(2, 3)) for i in range(4)}  # stacked: (4, 2, 3)
    m = {"s": tg.transpose(tg.stack("l_*", axis=0), (2, 0, 1))}  # (3, 4, 2)
    inv = tg.invert(m)
    assert inv == {"l_*": tg.transpose(tg.unstack("s", axis=1), (1, 0))}
    _, back = round_trip(src, {"s": np.zeros((3, 4, 2))}, m)
    assert_same_leaves(back, src)


def test_a_reshape_after_an_unstack_is_undone_on_the_stack():
    rng = np.random.default_rng(3)
    src = {"w": rng.normal(size=(4, 3, 2)).astype(np.float32)}
    m = {"l_*": tg.reshape(tg.unstack("w", axis=1), (8,))}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"w": tg.transpose(tg.reshape(tg.stack("l_*", axis=0), (-1, 4, 2)), (1, 0, 2))}
    tgt = {f"l_{i}": np.zeros(8, np.float32) for i in range(3)}
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_a_reshape_after_a_stack_that_keeps_the_stacked_axis_is_undone():
    rng = np.random.default_rng(4)
    src = {f"l_{i}": rng.normal(size=(6,)).astype(np.float32) for i in range(2)}
    m = {"s": tg.reshape(tg.stack("l_*", axis=0), (2, 3, 2))}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"l_*": tg.reshape(tg.unstack("s", axis=0), (6,))}
    _, back = round_trip(src, {"s": np.zeros((2, 3, 2), np.float32)}, m)
    assert_same_leaves(back, src)


def test_keep_rules_drop_out():
    m = {"params": "params", "params.head": None}
    assert tg.invert(m) == {"params": "params"}


def test_a_source_leaf_no_rule_reads_is_kept_with_like():
    src = {"params": {"body": np.ones(2), "head": np.ones(3)}}
    m = {"params": "params", "params.head": None}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"params": "params", "params.head": None}
    result = tg.graft({"params": {"body": np.zeros(2), "head": np.full(5, 7.0)}}, src, m)
    back = tg.graft(zeros(src), result, inv)
    assert same_bits(back["params"]["body"], src["params"]["body"])
    assert same_bits(back["params"]["head"], np.zeros(3))  # not the result's head


def test_a_more_specific_rule_refining_a_broader_one_is_not_ambiguous():
    src = {"head": np.ones(2, np.float32), "body": np.ones(3, np.float32)}
    m = {"": "", "head": tg.cast("head", np.float64)}
    assert tg.invert(m, like=src) == {"": "", "head": tg.cast("head", np.float32)}


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, what",
    [
        (tg.cast("a", np.float32), "cast to float32 cannot be undone without the source's dtype"),
        (tg.reshape("a", (4,)), r"reshape to \(4,\) cannot be undone without the source's shape"),
    ],
    ids=["cast", "reshape"],
)
def test_cast_and_reshape_without_like_name_the_rule(value, what):
    with pytest.raises(tg.MappingError, match=rf"rule 'x' <- .*{what}.*pass like="):
        tg.invert({"x": value})


def test_every_rule_that_cannot_be_inverted_is_listed_at_once():
    m = {"x": tg.cast("a", np.float32), "y": tg.reshape("b", (4,)), "p": "q", "r": "q"}
    with pytest.raises(tg.MappingError) as e:
        tg.invert(m)
    text = str(e.value)
    assert text.startswith("cannot invert the mapping (3 problems):")
    assert "rule 'x' <- cast('a', float32)" in text
    assert "rule 'y' <- reshape('a'" not in text and "rule 'y' <- reshape('b', (4,))" in text
    assert "rules 'p' <- 'q' and 'r' <- 'q' both read every leaf under 'q'" in text
    assert len(e.value.problems) == 3


def test_without_like_a_rule_refining_a_broader_one_is_not_ambiguous():
    assert tg.invert({"a": "x", "a.y": "x.y"}) == {"x": "a", "x.y": "a.y"}


def test_two_rules_reading_one_source_leaf_are_ambiguous():
    with pytest.raises(tg.MappingError, match=r"'a' <- 'x' and 'b' <- 'x.y' both read 'x.y'"):
        tg.invert({"a": "x", "b": "x.y"})


def test_with_like_overlapping_globs_reading_one_leaf_are_named_with_the_leaf():
    src = {"enc": {"l_0": {"w": np.ones(2)}, "l_1": {"w": np.ones(2)}}}
    m = {"a.*": "enc.*", "b": "enc.l_1"}
    with pytest.raises(tg.MappingError, match=r"both read 'enc.l_1.w' from the source"):
        tg.invert(m, like=meta(src))


def test_a_reshape_that_mixes_the_stacked_axis_cannot_be_inverted():
    src = {f"l_{i}": np.ones((3,), np.float32) for i in range(2)}
    m = {"s": tg.reshape(tg.stack("l_*", axis=1), (6,))}
    with pytest.raises(tg.MappingError, match=r"rule 's' <- .*mixes the stacked axis"):
        tg.invert(m, like=meta(src))


def test_a_cast_rule_with_nothing_under_it_in_like_is_named():
    with pytest.raises(tg.MappingError, match=r"rule 'x' <- .*like has no leaf under 'a'"):
        tg.invert({"x": tg.cast("a", np.float32)}, like={"b": np.ones(2)})


def test_transpose_axes_that_are_not_a_permutation_are_named():
    with pytest.raises(tg.MappingError, match=r"rule 'k' <- .*axes \(5, 0\) are not a permutation"):
        tg.invert({"k": tg.transpose("w", (5, 0))})


def test_a_split_entry_whose_capture_a_glob_cannot_hold_is_named():
    like = {"e": {"a.b_0": np.ones(2, BF16), "c_0": np.ones(2, np.float16)}}
    m = {"d.*": tg.cast(tg.stack("e.*_*"), np.float32)}
    with pytest.raises(tg.MappingError, match=r"the captures \('a.b',\) cannot be written"):
        tg.invert(m, like=like)


def test_an_invalid_mapping_is_a_mapping_error():
    with pytest.raises(tg.MappingError, match="do not correspond"):
        tg.invert({"a.*": "b"})
    with pytest.raises(tg.MappingError, match="must be a dict"):
        tg.invert("a")


def test_invert_never_mutates_its_input():
    m = {
        "a.l": tg.cast(tg.stack("b.x_*", axis=0), np.float32),
        "k": tg.transpose("w", (1, 0)),
        "h": None,
    }
    before = copy.deepcopy(m)
    like = {"b": {"x_0": np.ones(2, np.float16)}, "w": np.ones((2, 3))}
    like_before = copy.deepcopy(like)
    tg.invert(m, like=like)
    assert m == before and list(m) == list(before)
    assert leaves(like).keys() == leaves(like_before).keys()
    assert all(same_bits(leaves(like)[k], leaves(like_before)[k]) for k in leaves(like))
    with pytest.raises(tg.MappingError):
        tg.invert({**m, "z": tg.reshape("q", (2,))})
    assert m == before


# -- the law, property-tested ----------------------------------------------------------

# Families of dtypes that widen exactly into one wide dtype: a block's leaves
# draw their dtypes from one family (so a cast rule over them may need one
# inverse entry per leaf), and its cast, when drawn, widens into the family's
# wide dtype, so that narrowing back is exact.
FAMILIES = [
    (np.dtype(np.float32), [BF16, np.dtype(np.float16)]),
    (np.dtype(np.float64), [np.dtype(np.float32), BF16]),
    (np.dtype(np.int32), [np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)]),
]
KINDS = ["copy", "rename", "dstar", "stack", "unstack", "refine"]


def _values(rng, shape, dtype):
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return (rng.normal(size=shape) * 100).astype(dtype)


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], np.dtype)


def _specs(tree):
    return jax.tree.leaves(tree, is_leaf=_is_spec)


def _each(tree, f):
    return jax.tree.map(f, tree, is_leaf=_is_spec)


@st.composite
def blocks(draw, k: int):
    """One rule (two for "refine") with the source subtree it reads and the target it writes.

    Returns (source, target, mapping); k names the block's subtrees.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    wide, narrow = draw(st.sampled_from(FAMILIES))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    names = draw(
        st.lists(st.sampled_from(["w", "b", "kernel"]), min_size=1, max_size=3, unique=True)
    )
    dtypes = {x: draw(st.sampled_from(narrow)) for x in names}
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(KINDS))
    src, dst = f"src{k}", f"dst{k}"

    def group():
        return {x: _values(rng, shape, dtypes[x]) for x in names}

    def specs(shape_):
        return {x: (shape_, dtypes[x]) for x in names}

    value: str | tg.Operation
    if kind == "rename":
        source = {f"block_{i}": group() for i in range(n)}
        out = {f"layers_{i}": specs(shape) for i in range(n)}
        value, new = f"{src}.block_*", f"{dst}.layers_*"
    elif kind == "dstar":
        source = {"a": {"b": {names[0]: _values(rng, shape, dtypes[names[0]])}}}
        out = {"a": {"b": {names[0]: (shape, dtypes[names[0]])}}}
        value, new = f"{src}.**.{names[0]}", f"{dst}.**.{names[0]}"
    elif kind == "stack":
        source = {f"l_{i}": group() for i in range(n)}
        axis = draw(st.integers(-len(shape) - 1, len(shape)))
        a = axis % (len(shape) + 1)
        stacked = shape[:a] + (n,) + shape[a:]
        out = specs(stacked)
        value, new = tg.stack(f"{src}.l_*", axis=axis), dst
        if draw(st.booleans()):  # a reshape that keeps the stacked axis whole
            kept = (int(np.prod(stacked[:a])), n, int(np.prod(stacked[a + 1 :])))
            value = tg.reshape(value, kept)
            out = specs(kept)
    elif kind == "unstack":
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        a = axis % len(shape)
        source = group()
        out = {f"l_{i}": specs(shape[:a] + shape[a + 1 :]) for i in range(shape[a])}
        value, new = tg.unstack(src, axis=axis), f"{dst}.l_*"
    elif kind == "refine":  # a broader rule and a more specific one inside it
        source = {"body": group(), "head": group()}
        out = {"body": specs(shape), "head": specs(shape)}
        source_tree, target = {src: source}, {dst: _each(out, lambda s: np.zeros(*s))}
        if draw(st.booleans()):
            head: str | tg.Operation = tg.cast(f"{src}.head", wide)
            target[dst]["head"] = _each(specs(shape), lambda s: np.zeros(s[0], wide))
        else:
            head = tg.transpose(f"{src}.head", tuple(reversed(range(len(shape)))))
            target[dst]["head"] = _each(specs(shape[::-1]), lambda s: np.zeros(*s))
        return source_tree, target, {dst: src, f"{dst}.head": head}
    else:
        source = group()
        out = specs(shape)
        value, new = src, dst
    ndim = len(_specs(out)[0][0])
    if kind != "dstar" and ndim > 1 and draw(st.booleans()):
        # a rotation is its own inverse only for 2 axes: the others test argsort
        axes = tuple(draw(st.permutations(range(ndim))))
        if draw(st.booleans()):
            axes = axes[1:] + axes[:1]
        if draw(st.booleans()):
            axes = tuple(a - ndim for a in axes)
        value = tg.transpose(value, axes)
        out = _each(out, lambda s: (tuple(s[0][a] for a in axes), s[1]))
    if kind in ("copy", "unstack") and draw(st.booleans()):
        size = int(np.prod(_specs(out)[0][0]))
        new_shape, made = ((size,), (size,)) if draw(st.booleans()) else ((1, -1), (1, size))
        value = tg.reshape(value, new_shape)
        out = _each(out, lambda s: (made, s[1]))
    if draw(st.booleans()):
        value = tg.cast(value, wide)
        out = _each(out, lambda s: (s[0], wide))
    return {src: source}, {dst: _each(out, lambda s: np.zeros(*s))}, {new: value}


@given(
    st.lists(st.integers(0, 99), min_size=1, max_size=3, unique=True).flatmap(
        lambda ks: st.tuples(*[blocks(k) for k in ks])
    )
)
def test_law_graft_then_graft_back_with_the_inverse_reproduces_every_leaf(drawn):
    source, target, mapping = {}, {}, {}
    for s, t, m in drawn:
        source.update(s)
        target.update(t)
        mapping.update(m)
    before = copy.deepcopy(mapping)
    _, back = round_trip(source, target, mapping)
    assert mapping == before
    assert_same_leaves(back, source)
