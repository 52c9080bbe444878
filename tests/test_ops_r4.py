"""Operations for real conversions (docs/design.md section 16): take, slice, pad, scale,
offset, concat, stack of a list, operations nested in stack/unstack/concat, nested
stacks, negative axes.

Every operation is checked against numpy on generated inputs (shape, dtype, values),
unsharded and on an 8-device mesh; every refusal in `plan` names the path and the rule;
a slice of an orbax leaf stored in chunks along the sliced axis reads only those chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import treegraft as tg

MESH = (2, 4)


def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh(MESH, ("a", "b"))


def sharding_for(shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    """A NamedSharding over the 2x4 mesh splitting whichever axes divide evenly."""
    spec: list[str | None] = []
    free = {"a": 2, "b": 4}
    for d in shape:
        name = next((n for n, k in free.items() if d % k == 0 and d >= k), None)
        spec.append(name)
        if name is not None:
            free.pop(name)
    return jax.sharding.NamedSharding(mesh(), jax.sharding.PartitionSpec(*spec))


def target(shape: tuple[int, ...], dtype, sharded: bool):
    """A target leaf: an abstract sharded array, or a numpy array."""
    if sharded:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_for(shape))
    return np.zeros(shape, dtype)


def values(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    """Distinct values of dtype (a bool array alternates)."""
    n = int(np.prod(shape))
    if np.dtype(dtype) == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    base = np.arange(n, dtype=np.float64) + 7 * seed
    if np.issubdtype(np.dtype(dtype), np.integer):
        base = base % 100
    else:
        base = base / 8 - 3
    return base.astype(dtype).reshape(shape)


def graft_one(value, source, expected: np.ndarray, sharded: bool, dtype=None):
    """Grafts one target leaf 'y' and checks its shape, dtype, values and sharding."""
    dtype = dtype or expected.dtype
    like = {"y": target(expected.shape, dtype, sharded)}
    snap = jax.tree.map(np.copy, source)
    out = tg.graft(like, source, {"y": value})["y"]
    assert out.shape == expected.shape and out.dtype == dtype
    if sharded:
        assert out.sharding == like["y"].sharding
        for shard in out.addressable_shards:  # each device holds only its own block
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    np.testing.assert_array_equal(np.asarray(out), expected)
    jax.tree.map(np.testing.assert_array_equal, source, snap)  # the input is not mutated
    return out


DTYPES = [np.float32, np.int8, jnp.bfloat16, np.bool_, np.uint32]
FLOATS = [np.float32, np.float64, jnp.bfloat16, np.float16, ml_dtypes.float8_e4m3fn]
shapes = st.lists(st.sampled_from([1, 2, 3, 4, 8]), min_size=1, max_size=3).map(tuple)


# ----------------------------------------------------------------------------
# Per-leaf operations against numpy.
# ----------------------------------------------------------------------------


@given(shape=shapes, data=st.data(), dtype=st.sampled_from(DTYPES), sharded=st.booleans())
def test_take_matches_numpy(shape, data, dtype, sharded):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    n = shape[axis]
    index = data.draw(st.integers(-n, n - 1))
    x = values(shape, dtype)
    graft_one(tg.take("x", index, axis=axis), {"x": x}, np.take(x, index, axis=axis), sharded)


@given(shape=shapes, data=st.data(), dtype=st.sampled_from(DTYPES), sharded=st.booleans())
def test_slice_matches_numpy(shape, data, dtype, sharded):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    n = shape[axis]
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    x = values(shape, dtype)
    expected = x[(slice(None),) * (axis % ndim) + (slice(start, stop),)]
    graft_one(tg.slice("x", start, stop, axis=axis), {"x": x}, expected, sharded)


@given(shape=shapes, data=st.data(), dtype=st.sampled_from(DTYPES), sharded=st.booleans())
def test_pad_matches_numpy(shape, data, dtype, sharded):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    n = shape[axis]
    size = data.draw(st.integers(n, n + 9))
    constant = data.draw(st.sampled_from([0, 1]))
    x = values(shape, dtype)
    widths = [(0, 0)] * ndim
    widths[axis % ndim] = (0, size - n)
    expected = np.pad(x, widths, constant_values=np.array(constant).astype(dtype))
    graft_one(tg.pad("x", size, axis=axis, constant=constant), {"x": x}, expected, sharded)


@given(
    shape=shapes,
    dtype=st.sampled_from(FLOATS),
    amount=st.sampled_from([0.125, -3.0, 1.0, 0.1, 1 / 3]),
    which=st.sampled_from(["scale", "offset"]),
    sharded=st.booleans(),
)
def test_scale_and_offset_compute_in_float32_and_round_once(shape, dtype, amount, which, sharded):
    sharded = sharded and dtype is not np.float64  # jax arrays hold no float64 without x64
    x = values(shape, dtype)
    work = np.float32 if np.dtype(dtype).itemsize < 4 else dtype
    if which == "scale":
        expected = (x.astype(work) * np.dtype(work).type(amount)).astype(dtype)
        value = tg.scale("x", amount)
    else:
        expected = (x.astype(work) + np.dtype(work).type(amount)).astype(dtype)
        value = tg.offset("x", amount)
    out = graft_one(value, {"x": x}, expected, sharded)
    # Bit for bit: the one rounding, to the leaf's dtype.
    assert np.asarray(out).tobytes() == expected.tobytes()


def test_bfloat16_scale_rounds_once_not_twice():
    # 1 + 2**-8 is not a bfloat16; times 3 in float32 then rounded once differs from
    # rounding the product's bfloat16 factors first.
    x = np.array([1.0 + 2**-7, 3.0, -5.5], dtype=jnp.bfloat16)
    out = tg.graft({"y": np.zeros(3, jnp.bfloat16)}, {"x": x}, {"y": tg.scale("x", 1 + 2**-8)})
    expected = (x.astype(np.float32) * np.float32(1 + 2**-8)).astype(jnp.bfloat16)
    assert out["y"].tobytes() == expected.tobytes()


# ----------------------------------------------------------------------------
# Several values: concat and stack of a list.
# ----------------------------------------------------------------------------


@given(
    base=shapes,
    data=st.data(),
    count=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    sharded=st.booleans(),
    wrap=st.booleans(),
)
def test_concat_matches_numpy(base, data, count, dtype, sharded, wrap):
    ndim = len(base)
    axis = data.draw(st.integers(-ndim, ndim - 1))
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=count, max_size=count))
    parts = []
    for k, size in enumerate(sizes):
        shape = list(base)
        shape[axis] = size
        parts.append(values(tuple(shape), dtype, seed=k))
    source = {f"p{k}": {"w": p} for k, p in enumerate(parts)}
    if wrap:  # operations as the values: each part stored transposed, turned back
        perm = tuple(reversed(range(ndim)))
        source = {f"p{k}": {"w": np.transpose(p, perm)} for k, p in enumerate(parts)}
        refs = [tg.transpose(f"p{k}.w", perm) for k in range(count)]
    else:
        refs = [f"p{k}.w" for k in range(count)]
    expected = np.concatenate(parts, axis=axis)
    graft_one(tg.concat(refs, axis=axis), source, expected, sharded)


@given(shape=shapes, data=st.data(), count=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       sharded=st.booleans())
def test_stack_of_a_list_matches_numpy(shape, data, count, dtype, sharded):
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim - 1, ndim))
    parts = [values(shape, dtype, seed=k) for k in range(count)]
    source = {"k_proj": parts[0]} | {f"v{k}": p for k, p in enumerate(parts[1:])}
    names = ["k_proj"] + [f"v{k}" for k in range(count - 1)]
    graft_one(tg.stack(names, axis=axis), source, np.stack(parts, axis=axis), sharded)


def test_gemma_kv_einsum_from_k_and_v_per_layer_with_patterns():
    """[2, K, D, H] from two named leaves per layer: one rule for every layer."""
    L, K, D, H = 3, 2, 8, 4
    src = {"model": {"layers": [
        {"k_proj": {"weight": values((K * H, D), np.float32, seed=2 * i)},
         "v_proj": {"weight": values((K * H, D), np.float32, seed=2 * i + 1)}}
        for i in range(L)]}}

    def kdh(w):  # torch [K*H, D] -> [K, D, H]
        return w.reshape(K, H, D).transpose(0, 2, 1)

    state = {"layers": [{"kv_einsum": jax.ShapeDtypeStruct(
        (2, K, D, H), jnp.float32, sharding=sharding_for((2, K, D, H)))} for _ in range(L)]}
    kv = [tg.transpose(tg.reshape(f"model.layers.*.{n}_proj.weight", (K, H, D)), (0, 2, 1))
          for n in ("k", "v")]
    p = tg.plan(state, src, {"layers.*.kv_einsum": tg.stack(kv, axis=0)})
    assert p.entries[0].sources == (tg.parse_path("model.layers[0].k_proj.weight"),
                                    tg.parse_path("model.layers[0].v_proj.weight"))
    assert p.entries[0].operation.startswith("stack 2 along axis 0 of (reshape (2, 4, 8)")
    out = tg.execute(p)
    for i in range(L):
        layer = src["model"]["layers"][i]
        expected = np.stack([kdh(layer["k_proj"]["weight"]), kdh(layer["v_proj"]["weight"])])
        np.testing.assert_array_equal(np.asarray(out["layers"][i]["kv_einsum"]), expected)


def test_fused_qkv_split_and_gate_up_unfused_in_one_mapping():
    q, kv, d = 8, 4, 6
    qkv = values((q + 2 * kv, d), np.float32)
    gate_up = values((10, d), np.float32, seed=3)
    state = {"q": np.zeros((d, q), np.float32), "k": np.zeros((d, kv), np.float32),
             "v": np.zeros((d, kv), np.float32), "gate": np.zeros((5, d), np.float32),
             "up": np.zeros((5, d), np.float32)}
    mapping = {
        "q": tg.transpose(tg.slice("qkv_proj", 0, q), (1, 0)),
        "k": tg.transpose(tg.slice("qkv_proj", q, q + kv), (1, 0)),
        "v": tg.transpose(tg.slice("qkv_proj", q + kv, q + 2 * kv), (1, 0)),
        "gate": tg.slice("gate_up_proj", 0, 5),
        "up": tg.slice("gate_up_proj", 5, 10, axis=-2),
    }
    out = tg.graft(state, {"qkv_proj": qkv, "gate_up_proj": gate_up}, mapping)
    np.testing.assert_array_equal(out["q"], qkv[:q].T)
    np.testing.assert_array_equal(out["v"], qkv[q + kv:].T)
    np.testing.assert_array_equal(out["up"], gate_up[5:])
    # And back: the fused leaf from its parts.
    back = tg.graft({"qkv_proj": np.zeros_like(qkv)}, out, {"qkv_proj": tg.concat(
        [tg.transpose(n, (1, 0)) for n in ("q", "k", "v")])})
    np.testing.assert_array_equal(back["qkv_proj"], qkv)


def test_vocab_padding_to_a_multiple_of_128_sharded():
    vocab, d = 250, 16
    emb = values((vocab, d), jnp.bfloat16)
    size = -(-vocab // 128) * 128
    out = graft_one(tg.pad("embed_tokens.weight", size, axis=0), {"embed_tokens": {"weight": emb}},
                    np.pad(emb, [(0, size - vocab), (0, 0)]), sharded=True)
    assert out.shape == (256, 16)


# ----------------------------------------------------------------------------
# Nesting: operations inside stack and unstack; nested stacks; the MoE forms.
# ----------------------------------------------------------------------------


@given(L=st.integers(1, 4), E=st.integers(1, 4), outer=st.integers(-3, 2),
       inner=st.integers(-3, 2), sharded=st.booleans())
def test_nested_stacks_make_layers_by_experts(L, E, outer, inner, sharded):
    src = {f"layers_{i}": {f"experts_{e}": {"w": values((2, 4), np.float32, seed=10 * i + e)}
                           for e in range(E)} for i in range(L)}
    # The inner stack takes the last '*' (experts), the outer the one before (layers);
    # both stack the transposed leaves [4, 2].
    inner_n, outer_n = inner % 3, outer % 4
    per_layer = [np.stack([src[f"layers_{i}"][f"experts_{e}"]["w"].T for e in range(E)],
                          axis=inner_n) for i in range(L)]
    expected = np.stack(per_layer, axis=outer_n)
    value = tg.stack(tg.stack(tg.transpose("layers_*.experts_*.w", (1, 0)), axis=inner),
                     axis=outer)
    graft_one(value, src, expected, sharded)


def test_stack_and_unstack_take_operations_as_inputs():
    src = {f"l_{i}": {"w": values((3, 4), np.float32, seed=i)} for i in range(4)}
    value = tg.stack(tg.transpose("l_*.w", (1, 0)), axis=-1)
    expected = np.stack([src[f"l_{i}"]["w"].T for i in range(4)], axis=-1)
    stacked = graft_one(value, src, expected, sharded=True)
    state = {f"l_{i}": {"w": np.zeros((3, 4), np.float32)} for i in range(4)}
    back = tg.graft(state, {"y": stacked},
                    {"l_*.w": tg.unstack(tg.transpose("y", (1, 0, 2)), axis=2)})
    for i in range(4):
        np.testing.assert_array_equal(back[f"l_{i}"]["w"], src[f"l_{i}"]["w"])


def _hf_moe(L: int, E: int):
    """A Hugging Face MoE layout: model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight."""
    projs = ("gate", "up", "down")
    return {"model": {"layers": [{"mlp": {"experts": [
        {f"{p}_proj": {"weight": values((3, 2), np.float32, seed=100 * i + 10 * e + k)}
         for k, p in enumerate(projs)} for e in range(E)]}} for i in range(L)]}}


def test_moe_per_layer_experts_in_one_rule():
    """Three rules before (one per projection: the stacked '*' had to be the last); one now."""
    L, E = 3, 4
    src = _hf_moe(L, E)
    state = {"layers": [{"experts": {p: np.zeros((E, 2, 3), np.float32)
                                     for p in ("gate", "up", "down")}} for _ in range(L)]}
    rule = tg.stack(tg.transpose("model.layers.*.mlp.experts.*.*_proj.weight", (1, 0)))
    out = tg.graft(state, src, {"layers.*.experts.*": rule})
    for i in range(L):
        for p in ("gate", "up", "down"):
            expected = np.stack([src["model"]["layers"][i]["mlp"]["experts"][e][f"{p}_proj"]
                                 ["weight"].T for e in range(E)])
            np.testing.assert_array_equal(out["layers"][i]["experts"][p], expected)


def test_moe_scanned_layers_by_experts_in_one_rule():
    L, E = 2, 3
    src = _hf_moe(L, E)
    state = {"experts": {p: jax.ShapeDtypeStruct((L, E, 2, 3), jnp.float32,
                                                 sharding=sharding_for((L, E, 2, 3)))
                         for p in ("gate", "up", "down")}}
    rule = tg.stack(tg.stack(tg.transpose("model.layers.*.mlp.experts.*.*_proj.weight", (1, 0))))
    p = tg.plan(state, src, {"experts.*": rule})
    assert [e.operation for e in p.entries][0] == (
        "transpose (1, 0); stack 3 along axis 0; stack 2 along axis 0")
    out = tg.execute(p)
    layers = src["model"]["layers"]
    expected = np.stack([np.stack([layers[i]["mlp"]["experts"][e]["up_proj"]["weight"].T
                                   for e in range(E)]) for i in range(L)])
    np.testing.assert_array_equal(np.asarray(out["experts"]["up"]), expected)


def test_maxtext_scan_axis_one_with_a_negative_axis():
    """MaxText scans on axis 1: [D, L, F] from per-layer [F, D] kernels, with axis=-2."""
    src = {f"layers_{i}": {"w": values((5, 4), np.float32, seed=i)} for i in range(6)}
    expected = np.stack([src[f"layers_{i}"]["w"].T for i in range(6)], axis=1)
    graft_one(tg.stack(tg.transpose("layers_*.w", (1, 0)), axis=-2), src, expected, sharded=True)


def test_concat_of_stacks_and_of_unstacks():
    src = {f"a_{i}": values((2,), np.float32, seed=i) for i in range(3)}
    src |= {f"b_{i}": values((2,), np.float32, seed=9 + i) for i in range(3)}
    expected = np.concatenate([np.stack([src[f"a_{i}"] for i in range(3)]),
                               np.stack([src[f"b_{i}"] for i in range(3)])], axis=-1)
    graft_one(tg.concat([tg.stack("a_*"), tg.stack("b_*")], axis=-1), src, expected, True)
    scanned = {"a": expected[:, :2], "b": expected[:, 2:]}
    state = {f"ab_{i}": np.zeros(4, np.float32) for i in range(3)}
    out = tg.graft(state, scanned, {"ab_*": tg.concat([tg.unstack("a"), tg.unstack("b")])})
    np.testing.assert_array_equal(out["ab_2"], expected[2])


# ----------------------------------------------------------------------------
# The plan shows each operation; strictness counts every source leaf consumed.
# ----------------------------------------------------------------------------


def test_each_operation_is_shown_on_its_plan_entry():
    src = {"x": np.zeros((4, 6), np.float32), "y": np.zeros((4, 6), np.float32)}
    state = {
        "take": np.zeros(6, np.float32), "slice": np.zeros((4, 2), np.float32),
        "pad": np.zeros((8, 6), np.float32), "scale": np.zeros((4, 6), np.float32),
        "offset": np.zeros((4, 6), np.float32), "concat": np.zeros((8, 6), np.float32),
        "stacked": np.zeros((4, 2, 6), np.float32),
    }
    p = tg.plan(state, src, {
        "take": tg.take("x", 3), "slice": tg.slice("x", 2, 4, axis=-1),
        "pad": tg.pad("x", 8, constant=-1), "scale": tg.scale("x", 0.125),
        "offset": tg.offset("y", 1.0), "concat": tg.concat(["x", "y"]),
        "stacked": tg.stack(["x", "y"], axis=1),
    }, strict=False)
    shown = {str(e.target): e.operation for e in p.entries}
    assert shown == {
        "take": "take [3] along axis 0",
        "slice": "slice 2:4 along axis -1",
        "pad": "pad axis 0 to 8 with -1",
        "scale": "scale by 0.125",
        "offset": "offset by 1.0",
        "concat": "concat 2 along axis 0",
        "stacked": "stack 2 along axis 1",
    }
    assert {str(e.target): tuple(map(str, e.sources)) for e in p.entries}["concat"] == ("x", "y")
    nbytes = {str(e.target): e.nbytes for e in p.entries}
    assert nbytes["take"] == 6 * 4 and nbytes["slice"] == 4 * 2 * 4  # only their boxes
    assert nbytes["pad"] == 4 * 6 * 4 and nbytes["concat"] == 2 * 4 * 6 * 4
    assert p.nbytes == 2 * 4 * 6 * 4  # x and y, each read once for all
    text = str(p)
    assert "'slice' <- slice('x', 2, 4, axis=-1)" in text
    assert "concat(['x', 'y'], axis=0)" in text
    assert p.unused == []


def test_strictness_counts_every_source_leaf_a_join_consumes():
    src = {"q": np.ones(2, np.float32), "k": np.ones(2, np.float32), "v": np.ones(2, np.float32)}
    state = {"qk": np.zeros(4, np.float32)}
    with pytest.raises(tg.GraftError, match=r"'v'") as info:
        tg.plan(state, src, {"qk": tg.concat(["q", "k"]), "": ""})
    assert "'q'" not in str(info.value) and "'k'" not in str(info.value)
    p = tg.plan(state, {"q": src["q"], "k": src["k"]}, {"qk": tg.concat(["q", "k"])})
    assert p.unused == [] and p.nbytes == 16


def test_a_missing_second_value_names_its_path():
    state = {"layers": [{"kv": np.zeros((2, 3), np.float32)} for _ in range(2)]}
    src = {"layers": [{"k": np.ones(3, np.float32), "v": np.ones(3, np.float32)},
                      {"k": np.ones(3, np.float32)}]}
    with pytest.raises(tg.PathNotFoundError, match=r"'layers\[1\]\.kv' <- 'layers\[1\]\.v'"):
        tg.plan(state, src, {"layers.*.kv": tg.stack(["layers.*.k", "layers.*.v"])})


# ----------------------------------------------------------------------------
# Refusals in plan: typed, naming the target path and the rule, all at once.
# ----------------------------------------------------------------------------

F = np.float32
KEYS = jax.random.split(jax.random.key(0), 4)

REFUSALS = {
    "concat-shapes": ({"y": np.zeros((5, 3), F)},
                      {"a": np.zeros((2, 3), F), "b": np.zeros((3, 2), F)},
                      tg.concat(["a", "b"]), tg.MismatchError,
                      r"'y' <- 'a' \(float32\[2, 3\]\): the values to concat along axis 0 must "
                      r"agree on every other axis: float32\[2, 3\], float32\[3, 2\] "
                      r"\[rule 'y' <- concat\(\['a', 'b'\], axis=0\)\]"),
    "concat-dtypes": ({"y": np.zeros(4, F)},
                      {"a": np.zeros(2, F), "b": np.zeros(2, np.float16)},
                      tg.concat(["a", "b"]), tg.MismatchError,
                      r"'y' <- 'a' \(float32\[2\]\): the values to concat differ in dtype: "
                      r"float32\[2\], float16\[2\]; cast them to one dtype first \[rule"),
    "stack-list-shapes": ({"y": np.zeros((2, 2), F)},
                          {"a": np.zeros(2, F), "b": np.zeros(3, F)},
                          tg.stack(["a", "b"]), tg.MismatchError,
                          r"the values to stack along axis 0 must have one shape"),
    "slice-range": ({"y": np.zeros(3, F)}, {"x": np.zeros(4, F)}, tg.slice("x", 2, 5),
                    tg.MismatchError,
                    r"'y' <- 'x' \(float32\[4\]\): slice 2:5 is out of range: the value has 4 "
                    r"along axis 0 \[rule 'y' <- slice\('x', 2, 5, axis=0\)\]"),
    "take-range": ({"y": np.zeros((), F)}, {"x": np.zeros(4, F)}, tg.take("x", -5),
                   tg.MismatchError,
                   r"take index -5 is out of range: the value has 4 along axis 0 "
                   r"\[rule 'y' <- take\('x', -5, axis=0\)\]"),
    "take-axis": ({"y": np.zeros((), F)}, {"x": np.zeros(4, F)}, tg.take("x", 0, axis=1),
                  tg.MismatchError, r"take axis 1 is out of range for a 1-d value"),
    "pad-smaller": ({"y": np.zeros(3, F)}, {"x": np.zeros(4, F)}, tg.pad("x", 3),
                    tg.MismatchError,
                    r"pad to 3 along axis 0 is smaller than the value's 4: pad only grows an "
                    r"axis \(use slice to cut it\) \[rule 'y' <- pad\('x', 3"),
    "pad-constant": ({"y": np.zeros(5, np.int8)}, {"x": np.zeros(4, np.int8)},
                     tg.pad("x", 5, constant=0.5), tg.MismatchError,
                     r"pad constant 0\.5 is not a value of int8: it would change when cast"),
    "scale-int": ({"y": np.zeros(4, np.int32)}, {"x": np.zeros(4, np.int32)},
                  tg.scale("x", 2.0), tg.MismatchError,
                  r"'y' <- 'x' \(int32\[4\]\): scale applies to floating leaves only, the leaf "
                  r"is int32; integer, bool and key leaves are refused \[rule 'y' <- scale"),
    "offset-bool": ({"y": np.zeros(4, bool)}, {"x": np.zeros(4, bool)}, tg.offset("x", 1.0),
                    tg.MismatchError, r"offset applies to floating leaves only, the leaf is bool"),
    "key-take": ({"y": KEYS[0]}, {"x": KEYS}, tg.take("x", 0), tg.MismatchError,
                 r"typed PRNG keys cannot go through take \[rule"),
    "key-concat": ({"y": jax.random.split(jax.random.key(1), 8)}, {"a": KEYS, "b": KEYS},
                   tg.concat(["a", "b"]), tg.MismatchError,
                   r"typed PRNG keys cannot go through concat \[rule"),
    "key-scale": ({"y": KEYS}, {"x": KEYS}, tg.scale("x", 2.0), tg.MismatchError,
                  r"typed PRNG keys cannot go through scale \[rule"),
}


@pytest.mark.parametrize("case", list(REFUSALS.values()), ids=list(REFUSALS))
def test_refusals_in_plan_name_the_path_and_the_rule(case):
    state, source, value, error, match = case
    with pytest.raises(error, match=match) as info:
        tg.plan(state, source, {"y": value})
    [problem] = info.value.problems
    assert str(problem.target) == "y" and problem.rule.startswith("'y' <- ")


def test_all_refusals_of_one_mapping_come_at_once():
    state = {"a": np.zeros(5, F), "b": np.zeros(4, np.int8), "c": np.zeros(2, F)}
    source = {"x": np.zeros(4, F), "i": np.zeros(4, np.int8)}
    with pytest.raises(tg.MismatchError) as info:
        tg.plan(state, source, {"a": tg.slice("x", 0, 5), "b": tg.scale("i", 2.0),
                                "c": tg.pad("x", 2)})
    assert sorted(str(p.target) for p in info.value.problems) == ["a", "b", "c"]


def test_nested_stacks_need_a_full_grid_of_indices():
    src = {f"l_{i}": {f"e_{e}": {"w": np.zeros(2, F)} for e in range(3 if i == 0 else 2)}
           for i in range(2)}
    with pytest.raises(tg.GraftError, match=r"cannot be stacked: nested stacks need every "
                       r"index 0\.\.N-1 at each level \(2 x 3\); missing \(1, 2\) \(1 in all\)"):
        tg.plan({"w": np.zeros((2, 3, 2), F)}, src, {"w": tg.stack(tg.stack("l_*.e_*.w"))})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: tg.slice("a", 3, 3), r"slice: needs 0 <= start < stop, got start=3, stop=3"),
        (lambda: tg.pad("a", -1), r"pad: size must be >= 0"),
        (lambda: tg.scale("a", "2"), r"scale: factor must be a real number, got str"),
        (lambda: tg.offset("a", float("nan")), r"offset: amount must be finite"),
        (lambda: tg.concat("a"), r"concat takes a list of values"),
        (lambda: tg.concat([]), r"concat takes at least one value"),
        (lambda: tg.take("a", 1.5), r"take: index must be an int, got float"),
        (lambda: tg.stack([3]), r"stack takes a source path or pattern string, got int 3"),
    ],
)
def test_operation_arguments_are_checked_when_built(make, match):
    with pytest.raises(tg.MappingError, match=match):
        make()


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"a": tg.stack(tg.concat(["b_*", "c_*"]))},
         r"a stack of a pattern takes one source pattern, this one holds 2"),
        ({"a_*": tg.unstack(tg.unstack("b"))}, r"already unstacked"),
        ({"a": tg.stack(tg.stack("b_*"))}, r"plus 2 '\*' for the stacked indices"),
        ({"a": tg.concat(["b", "c_*"])}, r"the wildcards of 'a' \(none\) and 'c_\*' \(\*\) do "
                                         r"not correspond"),
    ],
)
def test_nesting_mistakes_are_mapping_errors_before_anything_is_read(mapping, match):
    with pytest.raises(tg.MappingError, match=match):
        tg.plan(object(), object(), mapping)


# ----------------------------------------------------------------------------
# Bytes read: a slice of a chunked orbax leaf reads only its chunks.
# ----------------------------------------------------------------------------


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """An orbax item with w [16, 64, 128] float32 stored one chunk per index of axis 0."""
    import orbax.checkpoint as ocp

    w = np.random.default_rng(4).standard_normal((16, 64, 128)).astype(np.float32)
    path = tmp_path_factory.mktemp("chunked") / "item"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"w": w}, save_args={"w": ocp.SaveArgs(
            chunk_byte_size=w[0].nbytes, shard_axes=(0,))})
        ckptr.wait_until_finished()
    return path, w


@pytest.mark.parametrize("sharded", [False, True])
def test_a_slice_reads_only_the_chunks_it_covers(chunked, sharded):
    path, w = chunked
    row = w[0].nbytes
    shape = (4, 64, 128)
    # Sharded: two boxes of 2 rows along the sliced axis, each read once for its 4
    # replicas. (A box split along the other axes reads its rows' chunks once per
    # device: the reader keeps no chunk cache between target shards.)
    sharding = (jax.sharding.NamedSharding(mesh(), jax.sharding.PartitionSpec("a"))
                if sharded else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    like = {"part": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}
    p = tg.plan(like, tg.OrbaxCheckpoint(path), {"part": tg.slice("w", 5, 9)})
    assert p.entries[0].operation == "slice 5:9 along axis 0"
    assert p.nbytes == 4 * row  # the plan counts the chunks the slice lives in
    before = _rchar()
    out = tg.execute(p)
    read = _rchar() - before
    np.testing.assert_array_equal(np.asarray(out["part"]), w[5:9])
    if sharded:
        for shard in out["part"].addressable_shards:
            assert shard.data.shape == (2, 64, 128)
    assert read <= 1.1 * 4 * row + 64 * 1024, (read, 4 * row)  # 4 of 16 rows


def test_a_take_of_a_chunked_leaf_reads_one_chunk_and_a_full_read_reads_all(chunked):
    path, w = chunked
    row = w[0].nbytes
    like = {"one": jax.ShapeDtypeStruct((64, 128), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
    before = _rchar()
    out = tg.graft(like, tg.OrbaxCheckpoint(path), {"one": tg.take("w", -2)})
    read = _rchar() - before
    np.testing.assert_array_equal(np.asarray(out["one"]), w[-2])
    assert read <= 1.1 * row + 64 * 1024, (read, row)
    # The measure can fail: a transposed read of the whole leaf reads every row (the
    # chunks are compressed: a little less than their raw bytes).
    whole = {"all": jax.ShapeDtypeStruct((128, 64, 16), jnp.float32,
                                         sharding=jax.sharding.SingleDeviceSharding(
                                             jax.devices()[0]))}
    before = _rchar()
    tg.graft(whole, tg.OrbaxCheckpoint(path), {"all": tg.transpose("w", (2, 1, 0))})
    assert _rchar() - before >= 0.8 * 16 * row


def test_a_stray_non_integer_beside_indices_is_reported_not_skipped_over():
    """The stacked '*' captures integers somewhere: 'l_x' among them is refused by name."""
    leaf = np.zeros(2, F)
    src = {b: {"l_0": leaf, "l_1": leaf, "l_x": leaf} for b in ("0", "1")}
    state = {"y": {b: np.zeros((2, 2), F) for b in ("0", "1")}}
    with pytest.raises(tg.MismatchError, match=r"\"\['0'\]\.l_x\" captured no integer index"):
        tg.plan(state, src, {"y.*": tg.stack("*.l_*")})
    del src["0"]["l_x"], src["1"]["l_x"]
    out = tg.graft(state, src, {"y.*": tg.stack("*.l_*")})
    assert out["y"]["1"].shape == (2, 2)


def test_joins_and_nested_stacks_from_an_orbax_checkpoint_land_sharded(tmp_path):
    """Several named leaves of a real checkpoint, pulled box by box into sharded targets."""
    import orbax.checkpoint as ocp

    tree = {"k": values((4, 8), F, seed=1), "v": values((4, 8), F, seed=2),
            "l": {str(i): {"e": {str(e): values((2, 4), F, seed=10 * i + e) for e in range(2)}}
                  for i in range(4)}}
    path = tmp_path / "item"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
    state = {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding_for(s))
             for n, s in (("kv", (2, 4, 8)), ("cat", (4, 16)), ("moe", (4, 2, 4, 2)))}
    mapping = {"kv": tg.stack(["k", "v"]), "cat": tg.concat(["k", "v"], axis=-1),
               "moe": tg.stack(tg.stack(tg.transpose("l.*.e.*", (1, 0))))}
    out = tg.graft(state, tg.OrbaxCheckpoint(path), mapping)
    np.testing.assert_array_equal(np.asarray(out["kv"]), np.stack([tree["k"], tree["v"]]))
    np.testing.assert_array_equal(np.asarray(out["cat"]),
                                  np.concatenate([tree["k"], tree["v"]], axis=-1))
    moe = np.stack([np.stack([tree["l"][str(i)]["e"][str(e)].T for e in range(2)])
                    for i in range(4)])
    np.testing.assert_array_equal(np.asarray(out["moe"]), moe)
    for name in state:
        assert out[name].sharding == state[name].sharding
