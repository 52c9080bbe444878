"""tg.convert without `like`: the layout derived from the mapping (docs/design.md section 15).

For every rule form the planner accepts (docs/design.md section 16), what
`convert(source, dest, mapping)` writes with no `like` is exactly what
`graft(like, source, mapping)` holds with the like written by hand: same
paths, shapes, dtypes and bits, read back by plain orbax and by treegraft.
Then the law of section 15 through two converts and `tg.invert`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_convert import assert_bits_equal

import treegraft as tg
from treegraft._app.cli import main

BF16 = np.dtype(ml_dtypes.bfloat16)


def rand(rng, *shape, dtype=np.float32):
    return (rng.normal(size=shape) * 10).astype(dtype)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def assert_converts_like_graft(tmp_path, source, mapping, like):
    """convert without like writes what graft(like, source, mapping) holds, bit for bit."""
    want = tg.graft(like, source, mapping)
    dest = str(tmp_path / "out")
    assert tg.convert(source, dest, mapping) == dest
    assert_bits_equal(ocp.StandardCheckpointer().restore(dest), want)
    assert_bits_equal(tg.graft(like, tg.OrbaxCheckpoint(dest), {"": ""}), want)
    # The derived layout is the hand-written one: no leaf more, none less.
    assert sorted(map(str, tg.flatten(tg.OrbaxCheckpoint(dest).metadata()))) == sorted(
        map(str, tg.flatten(like)))


# -- each rule form ----------------------------------------------------------------------


def case_stack_of_an_operation_choosing_a_non_last_star(rng):
    """The issue's reproducer: the layer '*' is the first of three, under a transpose."""
    source = {"model": {"layers": [
        {"self_attn": {p: {"weight": rand(rng, 4, 3)} for p in ("q_proj", "k_proj")}}
        for _ in range(2)]}}
    mapping = {"params.layers.*.*.kernel":
               tg.stack(tg.transpose("model.layers.*.*.*.weight", (1, 0)), axis=0)}
    like = {"params": {"layers": {"self_attn": {
        p: {"kernel": zeros((2, 3, 4))} for p in ("q_proj", "k_proj")}}}}
    return source, mapping, like


def case_nested_stacks_layers_by_experts(rng):
    source = {"layers": [{"experts": [{"w": rand(rng, 3, 2)} for _ in range(4)]}
                         for _ in range(2)]}
    mapping = {"moe.w": tg.stack(tg.stack("layers.*.experts.*.w", axis=0), axis=-1)}
    return source, mapping, {"moe": {"w": zeros((4, 3, 2, 2))}}


def case_experts_stacked_per_layer_keeping_the_layer_capture(rng):
    """Two integer '*': the last one is stacked, the layer index names the target."""
    source = {"layers": [{"experts": [{"w": rand(rng, 3, 2)} for _ in range(4)]}
                         for _ in range(2)]}
    mapping = {"layers.*.mlp.w": tg.stack("layers.*.experts.*.w", axis=1)}
    like = {"layers": [{"mlp": {"w": zeros((3, 4, 2))}} for _ in range(2)]}
    return source, mapping, like


def case_stack_of_a_cast_and_of_a_scale(rng):
    source = {f"l_{i}": {"w": rand(rng, 2, 3), "b": rand(rng, 3)} for i in range(3)}
    mapping = {"scan.w": tg.stack(tg.cast("l_*.w", BF16), axis=-1),
               "scan.b": tg.stack(tg.scale("l_*.b", 0.5), axis=0)}
    like = {"scan": {"w": zeros((2, 3, 3), BF16), "b": zeros((3, 3))}}
    return source, mapping, like


def case_unstack_of_a_transpose(rng):
    source = {"enc": {"w": rand(rng, 3, 2), "b": rand(rng, 2, 5)}}
    mapping = {"dec.l_*": tg.unstack(tg.transpose("enc", (1, 0)), axis=0)}
    # Each leaf is unstacked along its own axis 0: 'w' makes 2 layers, 'b' makes 5.
    like = {"dec": {f"l_{i}": ({"w": zeros(3)} if i < 2 else {}) | {"b": zeros(2)}
                    for i in range(5)}}
    return source, mapping, like


def case_unstack_into_a_list(rng):
    source = {"scan": {"w": rand(rng, 3, 2)}}
    mapping = {"layers.*": tg.cast(tg.unstack("scan", axis=0), np.float64)}
    like = {"layers": [{"w": zeros(2, np.float64)} for _ in range(3)]}
    return source, mapping, like


def case_concat_of_named_leaves(rng):
    source = {p: {"weight": rand(rng, n, 4)} for p, n in (("q", 4), ("k", 2), ("v", 2))}
    mapping = {"qkv_proj.weight": tg.concat(
        [tg.transpose(f"{p}.weight", (1, 0)) for p in ("q", "k", "v")], axis=-1)}
    return source, mapping, {"qkv_proj": {"weight": zeros((4, 8))}}


def case_concat_under_a_glob_and_of_stacks(rng):
    source = {"layers": {str(i): {"gate": rand(rng, 2, 3), "up": rand(rng, 2, 3)}
                         for i in range(2)},
              "a_0": rand(rng, 3), "a_1": rand(rng, 3), "b_0": rand(rng, 3)}
    mapping = {"layers.*.gate_up": tg.concat(["layers.*.gate", "layers.*.up"], axis=1),
               "ab": tg.concat([tg.stack("a_*"), tg.stack("b_*")], axis=0)}
    like = {"layers": {str(i): {"gate_up": zeros((2, 6))} for i in range(2)},
            "ab": zeros((3, 3))}
    return source, mapping, like


def case_stack_of_a_list_gemma_kv(rng):
    source = {"layers": [{"k_proj": rand(rng, 2, 4), "v_proj": rand(rng, 2, 4)}
                         for _ in range(2)]}
    mapping = {"layers.*.kv_einsum": tg.stack(["layers.*.k_proj", "layers.*.v_proj"], axis=0)}
    like = {"layers": [{"kv_einsum": zeros((2, 2, 4))} for _ in range(2)]}
    return source, mapping, like


def case_pad_scale_offset(rng):
    source = {"embed_tokens": rand(rng, 5, 3), "q_proj": rand(rng, 3, 3, dtype=BF16),
              "norm": rand(rng, 3)}
    mapping = {"embed": tg.pad("embed_tokens", 8, axis=0, constant=0),
               "q": tg.scale("q_proj", 0.125), "norm_scale": tg.offset("norm", 1.0)}
    like = {"embed": zeros((8, 3)), "q": zeros((3, 3), BF16), "norm_scale": zeros(3)}
    return source, mapping, like


def case_slices_partition_a_fused_qkv(rng):
    source = {"layers": [{"qkv": {"w": rand(rng, 8, 3)}} for _ in range(2)]}
    mapping = {
        f"layers.*.{name}.kernel": tg.transpose(tg.slice("layers.*.qkv.w", a, b), (1, 0))
        for name, a, b in (("q", 0, 4), ("k", 4, 6), ("v", 6, 8))
    }
    like = {"layers": [{"q": {"kernel": zeros((3, 4))}, "k": {"kernel": zeros((3, 2))},
                        "v": {"kernel": zeros((3, 2))}} for _ in range(2)]}
    return source, mapping, like


def case_take_and_reshape(rng):
    source = {"kv": rand(rng, 2, 6)}
    mapping = {"k": tg.reshape(tg.take("kv", 0, axis=0), (2, 3)), "v": tg.take("kv", -1)}
    return source, mapping, {"k": zeros((2, 3)), "v": zeros(6)}


def case_a_more_specific_operation_inside_a_copy(rng):
    source = {"body": {"w": rand(rng, 2), "head": rand(rng, 3, 2)}}
    mapping = {"out": "body", "out.head": tg.transpose("body.head", (1, 0))}
    return source, mapping, {"out": {"w": zeros(2), "head": zeros((2, 3))}}


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__[5:])
def test_convert_without_like_writes_what_graft_holds(tmp_path, case):
    source, mapping, like = case(np.random.default_rng(0))
    assert_converts_like_graft(tmp_path, source, mapping, like)


def test_a_checkpoint_source_is_derived_the_same(tmp_path):
    """A lazy source's metadata gives the same layout (here: a stack of operations)."""
    source, mapping, like = case_stack_of_an_operation_choosing_a_non_last_star(
        np.random.default_rng(1))
    src = tg.save(source, str(tmp_path / "src"))
    want = tg.graft(like, source, mapping)
    dest = tg.convert(tg.OrbaxCheckpoint(src), str(tmp_path / "out"), mapping)
    assert_bits_equal(ocp.StandardCheckpointer().restore(dest), want)


def test_hugging_face_names_from_safetensors_into_one_scanned_tree(tmp_path):
    """The issue's reproducer on a safetensors checkpoint, with experts stacked per layer.

    Its layer keys are ints; the layout mixes them with names under `layers`,
    so they are written as '0', '1' (as orbax writes int keys).
    """
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    flat = {f"model.layers.{i}.self_attn.{p}.weight": rand(rng, 4, 3)
            for i in range(2) for p in ("q_proj", "k_proj")}
    flat |= {f"model.layers.{i}.mlp.experts.{e}.w": rand(rng, 3) for i in range(2)
             for e in range(3)}
    (tmp_path / "hf").mkdir()
    safetensors_numpy.save_file(flat, str(tmp_path / "hf" / "model.safetensors"))
    source = tg.SafetensorsCheckpoint(str(tmp_path / "hf"))
    mapping = {
        "params.layers.*.*.kernel":
            tg.stack(tg.transpose("model.layers.*.*.*.weight", (1, 0)), axis=0),
        "params.layers.*.moe": tg.stack("model.layers.*.mlp.experts.*.w", axis=0),
    }
    like = {"params": {"layers": {
        "self_attn": {p: {"kernel": zeros((2, 3, 4))} for p in ("q_proj", "k_proj")},
        "0": {"moe": zeros((3, 3))}, "1": {"moe": zeros((3, 3))}}}}
    assert_converts_like_graft(tmp_path, source, mapping, like)
    kernel = ocp.StandardCheckpointer().restore(str(tmp_path / "out"))["params"]["layers"]
    np.testing.assert_array_equal(kernel["self_attn"]["k_proj"]["kernel"][1],
                                  flat["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(kernel["1"]["moe"][2], flat["model.layers.1.mlp.experts.2.w"])


def test_a_stack_finds_its_layer_capture_under_a_string_key_as_a_copy_does():
    """A state's '0' finds a source's int key 0 in a stack's other captures too."""
    source = {"layers": {0: {"experts": {0: {"w": np.ones(2)}, 1: {"w": np.zeros(2)}}}}}
    got = tg.graft({"layers": {"0": {"moe": zeros((2, 2), np.float64)}}}, source,
                   {"layers.*.moe": tg.stack("layers.*.experts.*.w")})
    np.testing.assert_array_equal(got["layers"]["0"]["moe"], [[1, 1], [0, 0]])


def test_a_stack_of_a_list_missing_one_value_names_it(tmp_path):
    source = {"layers": [{"k_proj": zeros(2), "v_proj": zeros(2)}, {"k_proj": zeros(2)}]}
    mapping = {"layers.*.kv": tg.stack(["layers.*.k_proj", "layers.*.v_proj"])}
    with pytest.raises(tg.GraftError, match=r"layers\[1\]\.kv") as e:
        tg.convert(source, str(tmp_path / "out"), mapping)
    assert "v_proj" in str(e.value) and "pass like=" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_an_operation_that_does_not_fit_names_the_leaf_and_the_rule(tmp_path):
    source = {"a": zeros((2, 3)), "b": zeros((2, 4))}
    mapping = {"ab": tg.concat(["a", "b"], axis=0), "p": tg.pad("a", 1, axis=1),
               "u.*": tg.unstack("b", axis=2)}
    with pytest.raises(tg.MismatchError) as e:
        tg.convert(source, str(tmp_path / "out"), mapping)
    message = str(e.value)
    assert "'ab'" in message and "'p'" in message and "'u[0]'" in message  # all at once
    assert "unstack axis 2 is out of range" in message
    assert not (tmp_path / "out").exists()


def test_a_stack_that_is_no_full_grid_is_named(tmp_path):
    source = {"l_0": zeros(2), "l_2": zeros(2)}
    with pytest.raises(tg.GraftError, match="0..N-1"):
        tg.convert(source, str(tmp_path / "out"), {"s": tg.stack("l_*")})


def test_two_equally_specific_rules_are_left_to_the_plan(tmp_path):
    source = {"a": {"w": zeros(2)}, "x": {"v": zeros(2)}}
    with pytest.raises(tg.MappingError, match="both cover 'x.w'"):
        tg.convert(source, str(tmp_path / "out"), {"x.*": "a.*", "*.w": "*.v"})
    assert not (tmp_path / "out").exists()


# -- the command line --------------------------------------------------------------------


def test_cli_convert_with_a_nested_operation_map(tmp_path, capsys):
    source, mapping, like = case_stack_of_an_operation_choosing_a_non_last_star(
        np.random.default_rng(2))
    src = tg.save(source, str(tmp_path / "src"))
    dest = str(tmp_path / "out")
    rule = "params.layers.*.*.kernel=stack(transpose(model.layers.*.*.*.weight, 1, 0), axis=0)"
    assert main(["convert", src, dest, "--map", rule]) == 0, capsys.readouterr().err
    assert_bits_equal(ocp.StandardCheckpointer().restore(dest),
                      tg.graft(like, source, mapping))


# -- the law of section 15, through convert ------------------------------------------------


WIDE = {np.dtype(np.float16): np.dtype(np.float32), BF16: np.dtype(np.float32),
        np.dtype(np.int8): np.dtype(np.int32)}


def _values(rng, shape, dtype):
    if dtype.kind == "i":
        return rng.integers(-128, 127, size=shape, endpoint=True).astype(dtype)
    return (rng.normal(size=shape) * 100).astype(dtype)


@st.composite
def blocks(draw, k: int):
    """One invertible rule over its own source subtree: (source, mapping)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(sorted(WIDE, key=str)))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    names = draw(st.lists(st.sampled_from(["w", "b", "kernel"]), min_size=1, max_size=2,
                          unique=True))
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["rename", "dstar", "stack", "unstack", "copy"]))
    src, dst = f"src{k}", f"dst{k}"

    def group():
        return {x: _values(rng, shape, dtype) for x in names}

    value: str | tg.Operation
    ndim = len(shape)
    if kind == "rename":
        source = {f"block_{i}": group() for i in range(n)}
        value, new = f"{src}.block_*", f"{dst}.layers_*"
    elif kind == "dstar":
        source = {"a": {"b": group()}, "c": group()}
        value, new = f"{src}.**.{names[0]}", f"{dst}.**.{names[0]}"
        for sub in (source["a"]["b"], source["c"]):  # the other names: no rule reads them
            for x in names[1:]:
                del sub[x]
    elif kind == "stack":
        source = {f"l_{i}": group() for i in range(n)}
        value, new = tg.stack(f"{src}.l_*", axis=draw(st.integers(-ndim - 1, ndim))), dst
        ndim += 1
    elif kind == "unstack":
        source = group()
        value, new = tg.unstack(src, axis=draw(st.integers(-ndim, ndim - 1))), f"{dst}.l_*"
        ndim -= 1
    else:
        source = group()
        value, new = src, dst
    if ndim > 1 and draw(st.booleans()):
        value = tg.transpose(value, tuple(draw(st.permutations(range(ndim)))))
    if draw(st.booleans()):
        value = tg.cast(value, WIDE[dtype])
    return {src: source}, {new: value}


@settings(max_examples=12)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=2, unique=True).flatmap(
    lambda ks: st.tuples(*[blocks(k) for k in ks])))
def test_law_convert_then_convert_back_with_the_inverse_reproduces_every_leaf(tmp_path_factory,
                                                                               drawn):
    source, mapping = {}, {}
    for s, m in drawn:
        source.update(s)
        mapping.update(m)
    where = tmp_path_factory.mktemp("law")
    a = tg.convert(source, str(where / "a"), mapping)
    back = tg.invert(mapping, like=source)
    b = tg.convert(tg.OrbaxCheckpoint(a), str(where / "b"), back)
    assert_bits_equal(ocp.StandardCheckpointer().restore(b), source)
