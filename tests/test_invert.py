"""tg.invert: the mapping that takes a graft's result back (docs/design.md section 15)."""

import copy
from typing import Any

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


# -- the operations of docs/design.md section 16 ----------------------------------------


def test_a_stack_of_a_list_inverts_to_one_take_per_element():
    rng = np.random.default_rng(10)
    src = {"k": rng.normal(size=(3, 2)).astype(np.float32), "v": rng.normal(size=(2, 3))
           .astype(np.float32)}
    m = {"kv": tg.stack([tg.transpose("k", (1, 0)), "v"], axis=-1)}
    assert tg.invert(m) == {
        "k": tg.transpose(tg.take("kv", 0, axis=-1), (1, 0)),
        "v": tg.take("kv", 1, axis=-1),
    }
    _, back = round_trip(src, {"kv": np.zeros((2, 3, 2), np.float32)}, m)
    assert_same_leaves(back, src)


def test_a_stack_of_patterns_with_captures_inverts_per_element_pattern():
    rng = np.random.default_rng(11)
    src = {f"l_{i}": {"k": rng.normal(size=4), "v": rng.normal(size=4)} for i in range(3)}
    m = {"layers_*.kv": tg.stack(["l_*.k", "l_*.v"], axis=0)}
    assert tg.invert(m, like=meta(src)) == {
        "l_*.k": tg.take("layers_*.kv", 0, axis=0),
        "l_*.v": tg.take("layers_*.kv", 1, axis=0),
    }
    tgt = {f"layers_{i}": {"kv": np.zeros((2, 4))} for i in range(3)}
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_a_stack_of_capture_stacks_inverts_to_an_unstack_of_each_take():
    rng = np.random.default_rng(12)
    src = {**{f"k_{i}": rng.normal(size=3) for i in range(2)},
           **{f"v_{i}": rng.normal(size=3) for i in range(2)}}
    m = {"kv": tg.stack([tg.stack("k_*", axis=0), tg.stack("v_*", axis=0)], axis=0)}
    assert tg.invert(m) == {
        "k_*": tg.unstack(tg.take("kv", 0, axis=0), axis=0),
        "v_*": tg.unstack(tg.take("kv", 1, axis=0), axis=0),
    }
    _, back = round_trip(src, {"kv": np.zeros((2, 2, 3))}, m)
    assert_same_leaves(back, src)


def test_concat_inverts_to_one_slice_per_part_sized_from_like():
    rng = np.random.default_rng(13)
    src = {"q": rng.normal(size=(4, 8)).astype(BF16), "k": rng.normal(size=(4, 2)).astype(BF16),
           "v": rng.normal(size=(4, 2)).astype(BF16)}
    m = {"qkv": tg.cast(tg.concat(["q", "k", "v"], axis=-1), np.float32)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {
        "q": tg.slice(tg.cast("qkv", BF16), 0, 8, axis=-1),
        "k": tg.slice(tg.cast("qkv", BF16), 8, 10, axis=-1),
        "v": tg.slice(tg.cast("qkv", BF16), 10, 12, axis=-1),
    }
    _, back = round_trip(src, {"qkv": np.zeros((4, 12), np.float32)}, m)
    assert_same_leaves(back, src)


def test_a_concat_of_operations_undoes_each_part_after_its_slice():
    rng = np.random.default_rng(14)
    src = {"gate": rng.normal(size=(3, 2)), "up": rng.normal(size=(2, 3))}
    m = {"gate_up": tg.concat(["gate", tg.transpose("up", (1, 0))], axis=1)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"gate": tg.slice("gate_up", 0, 2, axis=1),
                   "up": tg.transpose(tg.slice("gate_up", 2, 4, axis=1), (1, 0))}
    _, back = round_trip(src, {"gate_up": np.zeros((3, 4))}, m)
    assert_same_leaves(back, src)


def test_pad_inverts_to_a_slice_of_the_size_before_it():
    rng = np.random.default_rng(15)
    src = {"embed": rng.normal(size=(5, 4)).astype(np.float16)}
    m = {"emb": tg.pad("embed", 8, axis=0, constant=0)}
    assert tg.invert(m, like=meta(src)) == {"embed": tg.slice("emb", 0, 5, axis=0)}
    result, back = round_trip(src, {"emb": np.zeros((8, 4), np.float16)}, m)
    assert same_bits(result["emb"][5:], np.zeros((3, 4), np.float16))
    assert_same_leaves(back, src)


def test_scale_and_offset_invert_to_the_reciprocal_and_the_negation():
    src = {"q": (np.arange(-8, 8) / 4).astype(BF16), "n": (np.arange(16) / 8).astype(np.float16)}
    m = {"q2": tg.scale("q", 0.125), "n2": tg.scale(tg.offset("n", 1.0), 4.0)}
    assert tg.invert(m) == {"q": tg.scale("q2", 8.0), "n": tg.offset(tg.scale("n2", 0.25), -1.0)}
    _, back = round_trip(src, {"q2": np.zeros(16, BF16), "n2": np.zeros(16, np.float16)}, m)
    assert_same_leaves(back, src)


def test_operations_inside_a_stack_or_unstack_invert_in_the_natural_order():
    rng = np.random.default_rng(16)
    src = {"l": {f"l_{i}": rng.normal(size=(2, 3)).astype(np.float32) for i in range(3)},
           "w": rng.normal(size=(2, 4)).astype(np.float32)}
    m = {
        "s": tg.stack(tg.transpose("l.l_*", (1, 0)), axis=0),
        "u_*": tg.unstack(tg.scale("w", 2.0), axis=1),
    }
    assert tg.invert(m) == {
        "l.l_*": tg.transpose(tg.unstack("s", axis=0), (1, 0)),
        "w": tg.scale(tg.stack("u_*", axis=1), 0.5),
    }
    tgt = {"s": np.zeros((3, 3, 2), np.float32), **{f"u_{i}": np.zeros(2, np.float32)
                                                    for i in range(4)}}
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_slices_that_partition_an_axis_invert_to_one_concat_of_the_parts_in_order():
    rng = np.random.default_rng(17)
    src = {f"l_{i}": {"qkv": rng.normal(size=(2, 12)).astype(np.float32)} for i in range(2)}
    m = {  # written out of order, one part transposed
        "layers_*.v": tg.slice("l_*.qkv", 8, 12, axis=-1),
        "layers_*.q": tg.slice("l_*.qkv", 0, 6, axis=1),
        "layers_*.k": tg.transpose(tg.slice("l_*.qkv", 6, 8, axis=-1), (1, 0)),
    }
    inv = tg.invert(m, like=meta(src))
    assert inv == {
        "l_*.qkv": tg.concat(
            ["layers_*.q", tg.transpose("layers_*.k", (1, 0)), "layers_*.v"], axis=1
        )
    }
    tgt = {f"layers_{i}": {"q": np.zeros((2, 6), np.float32), "k": np.zeros((2, 2), np.float32),
                           "v": np.zeros((2, 4), np.float32)} for i in range(2)}
    _, back = round_trip(src, tgt, m)
    assert_same_leaves(back, src)


def test_takes_that_partition_an_axis_invert_to_one_stack_of_a_list():
    rng = np.random.default_rng(18)
    src = {"kv": rng.normal(size=(4, 2, 3)).astype(np.float32)}
    m = {"v": tg.take("kv", -1, axis=1), "k": tg.cast(tg.take("kv", 0, axis=1), np.float64)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"kv": tg.stack([tg.cast("k", np.float32), "v"], axis=1)}
    _, back = round_trip(src, {"k": np.zeros((4, 3)), "v": np.zeros((4, 3), np.float32)}, m)
    assert_same_leaves(back, src)


def test_a_partition_under_operations_is_joined_before_they_are_undone():
    rng = np.random.default_rng(19)
    src = {"w": rng.normal(size=(6, 2)).astype(BF16)}
    m = {"a": tg.slice(tg.cast(tg.transpose("w", (1, 0)), np.float32), 0, 2, axis=1),
         "b": tg.slice(tg.cast(tg.transpose("w", (1, 0)), np.float32), 2, 6, axis=1)}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"w": tg.transpose(tg.cast(tg.concat(["a", "b"], axis=1), BF16), (1, 0))}
    _, back = round_trip(src, {"a": np.zeros((2, 2), np.float32),
                               "b": np.zeros((2, 4), np.float32)}, m)
    assert_same_leaves(back, src)


def test_a_fused_hugging_face_layout_round_trips_through_a_safetensors_checkpoint(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(20)
    tensors = {"model.embed_tokens.weight": rng.normal(size=(6, 4)).astype(np.float16),
               "model.norm.weight": (rng.integers(-8, 9, size=4) / 4).astype(BF16)}
    for i in range(2):
        pre = f"model.layers.{i}.self_attn."
        tensors[pre + "qkv_proj.weight"] = rng.normal(size=(8, 4)).astype(BF16)  # [out, in]
        tensors[pre + "k_proj.weight"] = rng.normal(size=(2, 4)).astype(BF16)
        tensors[pre + "v_proj.weight"] = rng.normal(size=(2, 4)).astype(BF16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    attn = "model.layers.*.self_attn"
    m = {
        "layers_*.q": tg.transpose(tg.slice(f"{attn}.qkv_proj.weight", 0, 4, axis=0), (1, 0)),
        "layers_*.k": tg.transpose(tg.slice(f"{attn}.qkv_proj.weight", 4, 6, axis=0), (1, 0)),
        "layers_*.v": tg.transpose(tg.slice(f"{attn}.qkv_proj.weight", 6, 8, axis=0), (1, 0)),
        "kv_einsum": tg.stack([tg.stack(f"{attn}.k_proj.weight"),
                               tg.stack(f"{attn}.v_proj.weight")], axis=0),
        "embed": tg.pad("model.embed_tokens.weight", 8, axis=0),
        "norm": tg.offset("model.norm.weight", -1.0),
    }
    target = {
        **{f"layers_{i}": {"q": np.zeros((4, 4), BF16), "k": np.zeros((4, 2), BF16),
                           "v": np.zeros((4, 2), BF16)} for i in range(2)},
        "kv_einsum": np.zeros((2, 2, 2, 4), BF16),
        "embed": np.zeros((8, 4), np.float16),
        "norm": np.zeros(4, BF16),
    }
    with tg.SafetensorsCheckpoint(tmp_path / "model.safetensors") as ckpt:
        result = tg.graft(target, ckpt, m)
        inverse = tg.invert(m, like=ckpt)
        layout = zeros(ckpt.metadata())
    assert inverse[f"{attn}.qkv_proj.weight"] == tg.concat(
        [tg.transpose(f"layers_*.{x}", (1, 0)) for x in "qkv"], axis=0
    )
    back = tg.graft(layout, result, inverse)
    flat = {".".join(map(str, path.parts)): leaf for path, leaf in tg.flatten(back).items()}
    assert len(flat) == len(tensors)
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
        for name in f.keys():
            assert same_bits(flat[name], f.get_tensor(name)), name


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


def test_a_reshape_that_mixes_the_stacked_axis_is_undone_on_the_whole_then_unstacked():
    rng = np.random.default_rng(8)
    src = {f"l_{i}": rng.normal(size=(3,)).astype(np.float32) for i in range(2)}
    m = {"s": tg.reshape(tg.stack("l_*", axis=1), (6,))}
    inv = tg.invert(m, like=meta(src))
    assert inv == {"l_*": tg.unstack(tg.reshape("s", (3, 2)), axis=1)}
    _, back = round_trip(src, {"s": np.zeros(6, np.float32)}, m)
    assert_same_leaves(back, src)


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


@pytest.mark.parametrize(
    ("mapping", "like", "reason"),
    [
        ({"q": tg.slice("qkv", 0, 4, axis=-1)}, None,
         r"rule 'q' <- slice\('qkv', 0, 4, axis=-1\): .*a slice drops data.*with like="),
        ({"q": tg.slice("qkv", 0, 4), "k": tg.slice("qkv", 6, 8)}, {"qkv": np.ones(8)},
         r"rule 'q' <- .*a slice drops data.*cover 0:4, 6:8 of its 8"),
        ({"q": tg.slice("qkv", 0, 4), "k": tg.slice("qkv", 2, 8)}, {"qkv": np.ones(8)},
         r"rule 'k' <- .*a slice drops data.*cover 0:4, 2:8 of its 8"),
        ({"k": tg.take("kv", 0)}, {"kv": np.ones((2, 3))},
         r"rule 'k' <- take\('kv', 0, axis=0\): .*a take drops data.*cover 0:1 of its 2"),
        ({"kv": tg.concat(["k", "v"])}, None,
         r"rule 'kv' <- concat\(\['k', 'v'\], axis=0\): concat along axis 0 cannot be split "
         r"back without the size of each part; pass like="),
        ({"e": tg.pad("emb", 8)}, None,
         r"rule 'e' <- pad\('emb', 8, .*cannot be cut back without the size before it; "
         r"pass like="),
        ({"q": tg.scale("q", 0.0)}, None, r"rule 'q' <- scale\('q', 0.0\): scale by 0 loses"),
        ({"s": tg.stack(tg.stack("l_*.e_*"))}, None,
         r"rule 's' <- .*nested stacks of 'l_\*.e_\*' \(2 levels\) cannot be undone"),
        ({"s": tg.concat([tg.slice("a", 0, 1), "b"])}, {"a": np.ones(2), "b": np.ones(2)},
         r"rule 's' <- .*slice\('a', 0, 1, axis=0\) keeps only part of its axis"),
        ({"p": tg.slice("w", 0, 2), "q": tg.slice("w", 2, 4)},
         {"w": {"a": np.ones(4), "b": np.ones(6)}},
         r"rule 'p' <- .*the leaves it reads differ in size along axis 0 \(shapes \(4,\), "
         r"\(6,\)\)"),
        ({"c": tg.concat(["x", "y"])}, {"x": np.ones(0), "y": np.ones(2)},
         r"rule 'c' <- .*value 0 of the concat is empty along axis 0"),
    ],
    ids=["slice-without-like", "slices-with-a-gap", "slices-overlapping", "one-take",
         "concat-without-like", "pad-without-like", "scale-by-zero", "nested-stacks",
         "slice-inside-a-join", "partition-of-unlike-leaves", "empty-concat-part"],
)
def test_what_cannot_be_undone_is_a_mapping_error_naming_the_rule(mapping, like, reason):
    with pytest.raises(tg.MappingError, match=reason):
        tg.invert(mapping, like=like)


def test_every_partition_rule_that_drops_data_is_listed_once():
    m = {"q": tg.slice("qkv", 0, 4), "k": tg.slice("qkv", 6, 8), "p": tg.pad("e", 4)}
    with pytest.raises(tg.MappingError) as e:
        tg.invert(m, like={"qkv": np.ones(8), "e": np.ones(3)})
    text = str(e.value)
    assert len(e.value.problems) == 2, text
    assert "rule 'q' <-" in text and "rule 'k' <-" in text and "rule 'p'" not in text


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
        "kv": tg.stack([tg.scale("k1", 2.0), tg.offset("v1", 1.0)]),
        "cat": tg.concat([tg.pad("p1", 4), "p2"], axis=0),
        "s0": tg.slice("f", 0, 1),
        "s1": tg.slice("f", 1, 3),
    }
    before = copy.deepcopy(m)
    like = {"b": {"x_0": np.ones(2, np.float16)}, "w": np.ones((2, 3)), "k1": np.ones(2),
            "v1": np.ones(2), "p1": np.ones(3), "p2": np.ones(2), "f": np.ones(3)}
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
KINDS = ["copy", "rename", "dstar", "stack", "unstack", "refine", "stacklist", "concat", "pad",
         "partition"]


def _values(rng, shape, dtype, quantized=False):
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    if quantized:  # quarters up to 2: a scale by 2**k and an exact offset keep every bit
        return (rng.integers(-8, 9, size=shape) / 4).astype(dtype)
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
    # scale and offset apply to floating leaves; their values are then quantized
    arith = wide.kind == "f" and draw(st.booleans())

    def group(shape_=shape):
        return {x: _values(rng, shape_, dtypes[x], arith) for x in names}

    def specs(shape_):
        return {x: (shape_, dtypes[x]) for x in names}

    value: str | tg.Operation
    if kind == "rename":
        source = {f"block_{i}": group() for i in range(n)}
        out = {f"layers_{i}": specs(shape) for i in range(n)}
        value, new = f"{src}.block_*", f"{dst}.layers_*"
    elif kind == "dstar":
        source = {"a": {"b": {names[0]: _values(rng, shape, dtypes[names[0]], arith)}}}
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
    elif kind == "stacklist":  # a stack of a list of named subtrees
        source = {f"p{j}": group() for j in range(n)}
        axis = draw(st.integers(-len(shape) - 1, len(shape)))
        a = axis % (len(shape) + 1)
        out = specs(shape[:a] + (n,) + shape[a:])
        elements: list[str | tg.Operation] = [f"{src}.p{j}" for j in range(n)]
        if arith and draw(st.booleans()):  # an operation inside the list
            elements[-1] = tg.scale(elements[-1], 2.0)
        value, new = tg.stack(elements, axis=axis), dst
    elif kind == "concat":  # parts of different sizes along one axis
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        a = axis % len(shape)
        sizes = [draw(st.integers(1, 3)) for _ in range(n)]
        source = {f"p{j}": group(shape[:a] + (m,) + shape[a + 1 :]) for j, m in enumerate(sizes)}
        out = specs(shape[:a] + (sum(sizes),) + shape[a + 1 :])
        value, new = tg.concat([f"{src}.p{j}" for j in range(n)], axis=axis), dst
    elif kind == "pad":
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        a = axis % len(shape)
        size = shape[a] + draw(st.integers(0, 3))
        source = group()
        out = specs(shape[:a] + (size,) + shape[a + 1 :])
        value, new = tg.pad(src, size, axis=axis), dst
    elif kind == "partition":  # takes or slices covering one axis, one rule each
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        a = axis % len(shape)
        takes = draw(st.booleans())
        if takes:
            bounds = list(range(shape[a] + 1))
        else:
            cuts = draw(st.sets(st.integers(1, shape[a] - 1))) if shape[a] > 1 else set()
            bounds = [0, *sorted(cuts), shape[a]]
        parts = list(zip(bounds[:-1], bounds[1:], strict=True))
        mapping: dict[str, str | tg.Operation] = {}
        target: dict[str, Any] = {}
        for j in draw(st.permutations(range(len(parts)))):  # rules in any order
            start, stop = parts[j]
            if takes:
                part: tg.Operation = tg.take(src, start, axis=axis)
                piece = shape[:a] + shape[a + 1 :]
            else:
                part = tg.slice(src, start, stop, axis=axis)
                piece = shape[:a] + (stop - start,) + shape[a + 1 :]
            target[f"p{j}"] = _each(specs(piece), lambda s: np.zeros(*s))
            if draw(st.booleans()):
                part = tg.cast(part, wide)
                target[f"p{j}"] = _each(specs(piece), lambda s: np.zeros(s[0], wide))
            mapping[f"{dst}.p{j}"] = part
        return {src: group()}, {dst: target}, mapping
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
    if arith:  # exact on the quantized values: a power of two, a multiple of a quarter
        for op in draw(st.permutations(["scale", "offset"])):
            if op == "scale" and draw(st.booleans()):
                value = tg.scale(value, 2.0 ** draw(st.integers(-2, 2)))
            elif op == "offset" and draw(st.booleans()):
                value = tg.offset(value, draw(st.sampled_from([0.5, -1.0, 2.25])))
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


def test_a_stack_over_a_wildcard_that_is_not_the_last_is_bound_per_later_value():
    # The stack takes the layer '*' (integers); '*_proj' carries over. The inverse
    # unstack indexes its new side's last '*', so the rule is split per projection.
    src = {"model": {"layers": {str(i): {"mlp": {
        "up_proj": {"weight": np.full((4, 2), i, np.float32)},
        "down_proj": {"weight": np.full((2, 4), 10 + i, np.float32)}}} for i in range(3)}}}
    m = {"params.layers.*.kernel": tg.transpose(tg.stack("model.layers.*.mlp.*_proj.weight"),
                                               (0, 2, 1))}
    like = {"params": {"layers": {"up": {"kernel": np.zeros((3, 2, 4), np.float32)},
                                  "down": {"kernel": np.zeros((3, 4, 2), np.float32)}}}}
    result = tg.graft(like, src, m)
    back = tg.invert(m, like=src)
    assert sorted(back) == ["model.layers.*.mlp.down_proj.weight",
                            "model.layers.*.mlp.up_proj.weight"]
    zeros = jax.tree.map(np.zeros_like, src)
    again = tg.graft(zeros, result, back)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(src), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(tg.MappingError, match="pass like="):
        tg.invert(m)
    # a single '*' needs no like
    assert tg.invert({"s": tg.stack("l_*.w")}) == {"l_*.w": tg.unstack("s", axis=0)}


def test_a_stack_refused_without_like_is_listed_with_the_other_problems():
    # Regression: the refused stack raised alone, before the other rules were looked at,
    # and its error had no `.problems`.
    m = {"params.layers.*.kernel": tg.stack("model.layers.*.mlp.*_proj.weight"),
         "q": tg.reshape("model.q.weight", (2, 2, 2)),
         "embed": "model.embed.weight"}
    with pytest.raises(tg.MappingError, match=r"\(2 problems\)") as info:
        tg.invert(m)
    assert [p.rule for p in info.value.problems] == [
        "'params.layers.*.kernel' <- stack('model.layers.*.mlp.*_proj.weight', axis=0)",
        "'q' <- reshape('model.q.weight', (2, 2, 2))"]
    assert "which '*'" in str(info.value) and "without the source's shape" in str(info.value)
    assert m["embed"] == "model.embed.weight" and len(m) == 3


def test_a_stack_of_several_sources_refused_with_like_is_a_problem_of_the_error():
    z = np.zeros((2, 2), np.float32)
    src = {"a": {"0": {"up_proj": z}, "1": {"up_proj": z}}, "b": {"0": {"up_proj": z}},
           "q": np.zeros((8,), np.float32)}
    m = {"p.*.k": tg.concat([tg.stack("a.*.*_proj"), tg.stack("b.*.*_proj")], axis=0),
         "r": tg.cast("q", np.float16)}
    with pytest.raises(tg.MappingError, match=r"\(1 problem\)") as info:
        tg.invert(m, like=src)
    (problem,) = info.value.problems
    assert problem.rule.startswith("'p.*.k' <- concat(") and "among several sources" in str(
        info.value)
    assert tg.invert({"r": m["r"]}, like=src) == {"q": tg.cast("r", np.float32)}
