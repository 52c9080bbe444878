"""`tg.suggest` proposes mappings that graft every leaf right, or leave it alone.

Each model pair is built here from one set of canonical weights (JAX layout,
distinct random values per leaf), written out in two layouts: the source as a
checkpoint would hold it, and the state a model would want. The law every
test checks: `tg.graft(state, source, s.mapping)` succeeds (strict) and gives
exactly the expected state: every grafted leaf equals the source leaf it
should, converted as it should be; every leaf that must not be grafted (a new
head, an ambiguous pair) keeps its own value. A wrong leaf fails the test.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
import pytest

import treegraft as tg

D, F, V = 8, 12, 20  # model width, MLP width, vocabulary: all different, so shapes tell
ATTN = ("q", "k", "v", "o")  # square [D, D]: only the names tell them apart
MLP = {"gate": (D, F), "up": (D, F), "down": (F, D)}  # JAX [in, out]


# ----------------------------------------------------------------------------
# Model pairs.
# ----------------------------------------------------------------------------


def canonical(layers: int, seed: int = 0) -> dict[str, Any]:
    """One Llama-like model's weights, JAX layout, a distinct random array per leaf."""
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "embed": r(V, D),
        "final_norm": r(D),
        "lm_head": r(D, V),
        "layers": [
            {
                **{name: r(D, D) for name in ATTN},
                **{name: r(*shape) for name, shape in MLP.items()},
                "norm1": r(D),
                "norm2": r(D),
            }
            for _ in range(layers)
        ],
    }


def hf_layout(c: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face names and PyTorch `[out, in]` weights, layers keyed '0', '1'..."""
    layers = {
        str(i): {
            "self_attn": {f"{n}_proj": {"weight": layer[n].T} for n in ATTN},
            "mlp": {f"{n}_proj": {"weight": layer[n].T} for n in MLP},
            "input_layernorm": {"weight": layer["norm1"]},
            "post_attention_layernorm": {"weight": layer["norm2"]},
        }
        for i, layer in enumerate(c["layers"])
    }
    return {
        "model": {"embed_tokens": {"weight": c["embed"]}, "layers": layers,
                  "norm": {"weight": c["final_norm"]}},
        "lm_head": {"weight": c["lm_head"].T},
    }


def _flax_layer(layer: dict[str, Any]) -> dict[str, Any]:
    return {
        "attn": {n: {"kernel": layer[n]} for n in ATTN},
        "mlp": {n: {"kernel": layer[n]} for n in MLP},
        "input_norm": {"scale": layer["norm1"]},
        "post_attn_norm": {"scale": layer["norm2"]},
    }


def flax_layout(c: dict[str, Any], *, scanned: bool) -> dict[str, Any]:
    """Flax names and `[in, out]` kernels: `layers_0`, `layers_1`... or one scanned `layers`."""
    params: dict[str, Any] = {
        "embedder": {"embedding": c["embed"]},
        "final_norm": {"scale": c["final_norm"]},
        "lm_head": {"kernel": c["lm_head"]},
    }
    per_layer = [_flax_layer(layer) for layer in c["layers"]]
    if scanned:
        params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(per_layer)})
    return {"params": params}


def fresh(tree: Any, seed: int = 99) -> Any:
    """A state of the same shapes with other random values (what `init` would give)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype),
                        tree)


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def assert_law(state: Any, source: Any, expected: Any, s: tg.Suggestion) -> None:
    """The graft with `s.mapping` (strict) gives exactly `expected`, leaf by leaf."""
    out = tg.graft(state, source, s.mapping)
    got, want = tg.flatten(out), tg.flatten(expected)
    assert list(got) == list(want)
    wrong = [str(p) for p in want if not np.array_equal(_value(got[p]), _value(want[p]))]
    assert not wrong, f"wrongly grafted or left alone: {wrong}"


def _value(x: Any) -> np.ndarray:
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def leaf_count(tree: Any) -> int:
    return len(tg.flatten(tree))


# ----------------------------------------------------------------------------
# Hugging Face against Flax.
# ----------------------------------------------------------------------------


def test_hf_to_per_layer_flax_grafts_every_leaf():
    c = canonical(3)
    source, expected = hf_layout(c), flax_layout(c, scanned=False)
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    assert s.unmatched_state == () and s.unmatched_source == () and s.ambiguous == {}
    assert s.mapping["params.layers_*.attn.q.kernel"] == tg.transpose(
        "model.layers.*.self_attn.q_proj.weight", (1, 0))
    assert s.mapping["params.embedder.embedding"] == "model.embed_tokens.weight"
    assert s.mapping["params.lm_head.kernel"] == tg.transpose("lm_head.weight", (1, 0))


@pytest.mark.parametrize("scanned", [False, True], ids=["per_layer", "scanned"])
def test_number_of_rules_does_not_grow_with_layers(scanned):
    sizes = set()
    for layers in (2, 5, 9):
        c = canonical(layers)
        s = tg.suggest(abstract(flax_layout(c, scanned=scanned)), abstract(hf_layout(c)))
        sizes.add(len(s.mapping))
    assert len(sizes) == 1 and sizes.pop() <= 16


def test_hf_to_scanned_flax_stacks_and_transposes():
    c = canonical(4)
    source, expected = hf_layout(c), flax_layout(c, scanned=True)
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    assert s.mapping["params.layers.attn.k.kernel"] == tg.transpose(
        tg.stack("model.layers.*.self_attn.k_proj.weight", axis=0), (0, 2, 1))
    assert s.mapping["params.layers.input_norm.scale"] == tg.stack(
        "model.layers.*.input_layernorm.weight", axis=0)
    assert "stacked (4), transposed" in s.explain()


def test_scanned_flax_to_per_layer_unstacks():
    c = canonical(3)
    source, expected = flax_layout(c, scanned=True), flax_layout(c, scanned=False)
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    # Every leaf of a layer unstacks alike: one rule for the whole layer.
    assert s.mapping == {"params.embedder": "params.embedder",
                         "params.final_norm": "params.final_norm",
                         "params.layers_*": tg.unstack("params.layers", axis=0),
                         "params.lm_head": "params.lm_head"}


def test_per_layer_flax_to_hf_transposes_back():
    c = canonical(2)
    source, expected = flax_layout(c, scanned=False), hf_layout(c)
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)


def test_lists_of_layers_and_h_indices_meet_layers_n():
    # GPT-2 spells a layer `h.3`; a list of layers gives int keys `layers[3]`.
    rng = np.random.default_rng(1)
    blocks = [{"attn": {"c_attn": {"kernel": rng.standard_normal((D, 3 * D))}}}
              for _ in range(3)]
    source = {"h": {str(i): b for i, b in enumerate(blocks)}}
    expected = {"blocks": [{"attention": {"c_attn": {"kernel": b["attn"]["c_attn"]["kernel"]}}}
                           for b in blocks]}
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    assert len(s.mapping) == 1


def test_pytorch_weights_stored_in_out_keep_square_ones_as_is():
    # GPT-2's Conv1D stores `weight` as [in, out]: the non-square ones show
    # it, so the square `c_proj` is not transposed by PyTorch's convention.
    rng = np.random.default_rng(2)
    shapes = {("attn", "c_attn"): (D, 3 * D), ("attn", "c_proj"): (D, D),
              ("mlp", "c_fc"): (D, 4 * D), ("mlp", "c_proj"): (4 * D, D)}
    layers = [{(a, b): rng.standard_normal(s) for (a, b), s in shapes.items()} for _ in range(2)]
    source = {"h": {str(i): {a: {b: {"weight": w[a, b]} for (a2, b) in w if a2 == a}
                             for a in ("attn", "mlp")} for i, w in enumerate(layers)}}
    expected = {f"layers_{i}": {a: {b: {"kernel": w[a, b]} for (a2, b) in w if a2 == a}
                                for a in ("attn", "mlp")} for i, w in enumerate(layers)}
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    assert s.mapping["layers_*.attn.c_proj.kernel"] == "h.*.attn.c_proj.weight"


# ----------------------------------------------------------------------------
# Linen auto-names.
# ----------------------------------------------------------------------------


def _mlp(names: tuple[str, str, str], seed: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shapes = [(6, D), (D, D), (D, 4)]  # the biases of the first two share a shape
    return {"params": {n: {"kernel": rng.standard_normal(s).astype(np.float32),
                           "bias": rng.standard_normal(s[1]).astype(np.float32)}
                       for n, s in zip(names, shapes, strict=True)}}


AUTO = ("Dense_0", "Dense_1", "Dense_2")
HUMAN = ("encode", "hidden", "readout")


@pytest.mark.parametrize("state_names, source_names", [(AUTO, HUMAN), (HUMAN, AUTO)],
                         ids=["auto_from_human", "human_from_auto"])
def test_linen_auto_names_meet_human_names_by_shape(state_names, source_names):
    source = _mlp(source_names)
    # The same arrays under the state's names: module k is module k.
    expected = {"params": {new: source["params"][old]
                           for new, old in zip(state_names, source_names, strict=True)}}
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    assert s.ambiguous == {} and s.unmatched_state == ()
    # Module by module: the biases of the first two share a shape, and
    # follow their kernels (matched by shape) into one rule per module.
    assert s.mapping == dict(zip([f"params.{n}" for n in state_names],
                                 [f"params.{n}" for n in source_names], strict=True))
    assert "shape only: auto-named modules" in s.explain()


def test_a_bias_follows_its_kernel_when_only_the_bias_is_kept_apart():
    source = _mlp(HUMAN)
    source["params"]["hidden"]["extra"] = np.zeros(3, np.float32)  # no parent rule possible
    expected = {"params": {new: {k: source["params"][old][k] for k in ("kernel", "bias")}
                           for new, old in zip(AUTO, HUMAN, strict=True)}}
    s = tg.suggest(fresh(expected), source)
    assert_law(fresh(expected), source, expected, s)
    assert s.mapping["params.Dense_1.bias"] == "params.hidden.bias"
    assert s.unmatched_source == ("params.hidden.extra",)
    lines = s.explain().splitlines()
    row = lines[lines.index('params.Dense_1.bias <- "params.hidden.bias"') + 1]
    assert "beside a matched leaf" in row


def test_auto_named_new_head_of_a_new_shape_is_kept():
    source = _mlp(HUMAN)
    expected = {"params": {new: source["params"][old]
                           for new, old in zip(AUTO, HUMAN, strict=True)}}
    state = fresh(expected)
    rng = np.random.default_rng(10)
    state["params"]["Dense_3"] = {"kernel": rng.standard_normal((4, 3)),
                                  "bias": rng.standard_normal(3)}
    expected["params"]["Dense_3"] = state["params"]["Dense_3"]
    s = tg.suggest(state, source)
    assert_law(state, source, expected, s)
    assert s.mapping["params.Dense_3"] is None


def test_a_sibling_with_another_name_is_not_grafted():
    rng = np.random.default_rng(11)
    source = {"model": {"dense": {"weight": rng.standard_normal((3, 5)),
                                  "other": rng.standard_normal(3)}}}
    state = {"params": {"dense": {"kernel": np.zeros((5, 3)), "lora": np.zeros(3)}}}
    expected = {"params": {"dense": {"kernel": source["model"]["dense"]["weight"].T,
                                     "lora": np.zeros(3)}}}
    s = tg.suggest(state, source)
    assert_law(state, source, expected, s)
    assert s.unmatched_state == ("params.dense.lora",)


def test_auto_named_square_layers_of_one_shape_are_ambiguous():
    rng = np.random.default_rng(4)
    source = {"params": {n: {"kernel": rng.standard_normal((D, D))} for n in ("left", "right")}}
    state = {"params": {n: {"kernel": rng.standard_normal((D, D))}
                        for n in ("Dense_0", "Dense_1")}}
    s = tg.suggest(state, source)
    assert set(s.ambiguous) == {"params.Dense_0.kernel", "params.Dense_1.kernel"}
    assert_law(state, source, state, s)


# ----------------------------------------------------------------------------
# What must not be grafted.
# ----------------------------------------------------------------------------


def test_fine_tune_new_head_is_kept_never_grafted():
    c = canonical(2)
    pretrained = flax_layout(c, scanned=False)
    rng = np.random.default_rng(5)
    # The pretrained model had a 1000-class head; the new one has 10 classes,
    # and also a square adapter that no pretrained leaf names.
    pretrained["params"]["head"] = {"kernel": rng.standard_normal((D, 1000)),
                                    "bias": rng.standard_normal(1000)}
    state = fresh(flax_layout(c, scanned=False))
    state["params"]["head"] = {"kernel": rng.standard_normal((D, 10)),
                               "bias": rng.standard_normal(10)}
    state["params"]["adapter"] = {"kernel": rng.standard_normal((D, D))}
    expected = flax_layout(c, scanned=False)
    expected["params"]["head"] = state["params"]["head"]
    expected["params"]["adapter"] = state["params"]["adapter"]
    s = tg.suggest(state, pretrained)
    assert_law(state, pretrained, expected, s)
    assert s.mapping["params.head"] is None
    assert s.mapping["params.adapter"] is None
    assert set(s.unmatched_state) == {"params.head.kernel", "params.head.bias",
                                      "params.adapter.kernel"}
    assert set(s.unmatched_source) == {"params.head.kernel", "params.head.bias"}
    # Identical layouts compress to one rule per subtree, not one per leaf.
    assert len(s.mapping) <= 8


def test_two_square_layers_with_unreadable_names_are_ambiguous_not_guessed():
    rng = np.random.default_rng(6)
    state = {"params": {"a": {"kernel": rng.standard_normal((4, 4))},
                        "b": {"kernel": rng.standard_normal((4, 4))}}}
    source = {"params": {"x": {"kernel": rng.standard_normal((4, 4))},
                         "y": {"kernel": rng.standard_normal((4, 4))}}}
    s = tg.suggest(state, source)
    assert s.ambiguous == {
        "params.a.kernel": ("params.x.kernel", "params.y.kernel"),
        "params.b.kernel": ("params.x.kernel", "params.y.kernel"),
    }
    assert all(v is None for v in s.mapping.values())
    assert set(s.unmatched_source) == {"params.x.kernel", "params.y.kernel"}
    assert_law(state, source, state, s)
    assert "ambiguous: params.a.kernel could be any of" in s.explain()


def test_square_attention_with_unreadable_names_is_ambiguous():
    # q and k of a square model, named so that nothing tells which is which.
    c = canonical(2)
    source = hf_layout(c)
    for layer in source["model"]["layers"].values():
        attn = layer["self_attn"]
        attn["first"], attn["second"] = attn.pop("q_proj"), attn.pop("k_proj")
    expected = flax_layout(c, scanned=False)
    state = fresh(expected)
    for i in range(2):
        attn = expected["params"][f"layers_{i}"]["attn"]
        attn["q"] = state["params"][f"layers_{i}"]["attn"]["q"]
        attn["k"] = state["params"][f"layers_{i}"]["attn"]["k"]
    s = tg.suggest(state, source)
    assert "params.layers_0.attn.q.kernel" in s.ambiguous
    assert "params.layers_1.attn.k.kernel" in s.ambiguous
    assert_law(state, source, expected, s)


# ----------------------------------------------------------------------------
# Inputs, outputs, speed.
# ----------------------------------------------------------------------------


def test_safetensors_checkpoint_source(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    c = canonical(2)
    hf = hf_layout(c)
    flat = {str(p): np.ascontiguousarray(v) for p, v in tg.flatten(hf).items()}
    st.save_file(flat, str(tmp_path / "model.safetensors"))
    expected = flax_layout(c, scanned=True)
    with tg.SafetensorsCheckpoint(tmp_path / "model.safetensors") as ckpt:
        s = tg.suggest(abstract(expected), ckpt)
        assert s.unmatched_source == () and s.unmatched_state == ()
        assert_law(fresh(expected), ckpt, expected, s)


def test_orbax_checkpoint_source(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    c = canonical(2)
    saved = flax_layout(c, scanned=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
    expected = flax_layout(c, scanned=False)
    ckpt = tg.OrbaxCheckpoint(tmp_path / "ckpt")
    s = tg.suggest(abstract(expected), ckpt)
    assert s.unmatched_source == () and s.unmatched_state == ()
    assert_law(fresh(expected), ckpt, expected, s)


def test_as_code_evaluates_to_the_mapping():
    c = canonical(2)
    s = tg.suggest(abstract(flax_layout(c, scanned=True)), abstract(hf_layout(c)))
    code = s.as_code()
    assert 'tg.transpose(tg.stack("model.layers.*.self_attn.q_proj.weight", axis=0), (0, 2, 1))' \
        in code
    assert eval(code, {"tg": tg}) == s.mapping  # noqa: S307 - our own output


def test_cast_is_suggested_explicitly_for_other_float_widths():
    source = {"enc": {"weight": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    state = {"enc": {"weight": np.zeros((2, 3), np.float16)}}
    s = tg.suggest(state, source)
    assert s.mapping == {"enc": tg.cast("enc", np.float16)}
    assert "cast to float16" in s.explain()
    assert_law(state, source, {"enc": {"weight": source["enc"]["weight"].astype(np.float16)}}, s)
    assert "jnp.float16" in s.as_code()


def test_deterministic_and_pure():
    c = canonical(2)
    source, state = hf_layout(c), fresh(flax_layout(c, scanned=False))
    before = jax.tree.map(np.copy, (state, source))
    first, second = tg.suggest(state, source), tg.suggest(state, source)
    assert first == second and first.explain() == second.explain()
    assert first.as_code() == second.as_code()
    jax.tree.map(np.testing.assert_array_equal, (state, source), before)


def test_explain_shows_tokens_shapes_runs_and_certainty():
    c = canonical(3)
    s = tg.suggest(abstract(flax_layout(c, scanned=False)), abstract(hf_layout(c)))
    text = s.explain()
    lines = text.splitlines()
    at = lines.index('params.layers_*.attn.q.kernel <- '
                     'transpose("model.layers.*.self_attn.q_proj.weight", (1, 0))')
    assert lines[at + 1] == ("    3 leaves, equal, transposed; names: attn layers q; "
                             "indices 0..2; sure: high (names and shapes agree)")
    assert text.splitlines()[-1] == (
        "0 state leaves without a source, 0 source leaves unused, 0 ambiguous")


def test_48_layer_llama_metadata_is_quick():
    c = canonical(1)
    layer = c["layers"][0]
    c["layers"] = [layer] * 48  # metadata only: the arrays are never read
    state, source = abstract(flax_layout(c, scanned=True)), abstract(hf_layout(c))
    start = time.perf_counter()
    s = tg.suggest(state, source)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # a loose guard; the measured figure is in docs/howto/suggest.md
    assert len(s.mapping) == 3 + 4 + 3 + 2
    plan = tg.plan(state, source, s.mapping)  # usable as is, planned on shapes
    assert len(plan.entries) == leaf_count(state)


def test_identical_trees_need_one_rule_per_top_level_subtree():
    rng = np.random.default_rng(7)
    tree = {"params": {"a": {"w": rng.standard_normal(3)},
                       "b": [rng.standard_normal(2), rng.standard_normal(4)]},
            "rng": jax.random.key(0)}
    s = tg.suggest(fresh_like(tree), tree)
    assert s.mapping == {"params": "params", "rng": "rng"}
    assert_law(fresh_like(tree), tree, tree, s)


def fresh_like(tree: Any) -> Any:
    """`fresh` for trees holding PRNG keys: keys get another seed, arrays other values."""
    rng = np.random.default_rng(8)
    return jax.tree.map(lambda x: jax.random.key(9) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else rng.standard_normal(np.shape(x)), tree)


def test_an_int_leaf_is_never_fed_from_a_float_or_cast_unsafely():
    source = {"count": np.int32(3), "w": np.ones(2, np.float32)}
    state = {"count": np.float32(0), "w": np.zeros(2, np.int32)}
    s = tg.suggest(state, source)
    assert s.mapping == {"count": None, "w": None}
    assert s.unmatched_state == ("count", "w")


def test_real_linen_scanned_model_into_a_per_layer_one():
    nn = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _=None):
            return nn.Dense(D)(nn.relu(nn.Dense(F)(x))), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             length=3)(name="layers")
            return layers(x, None)[0]

    class PerLayer(nn.Module):
        def setup(self):
            self.layers = [Block() for _ in range(3)]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return x

    x = jnp.ones((1, D))
    scanned = Scanned().init(jax.random.key(0), x)
    per_layer = PerLayer().init(jax.random.key(1), x)
    s = tg.suggest(per_layer, scanned)
    assert s.mapping == {"params.layers_*": tg.unstack("params.layers", axis=0)}
    new = tg.graft(per_layer, scanned, s.mapping)
    # The grafted per-layer model computes what the scanned one does.
    np.testing.assert_allclose(PerLayer().apply(new, x), Scanned().apply(scanned, x),
                               rtol=1e-6)
