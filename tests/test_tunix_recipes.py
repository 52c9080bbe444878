"""The recipes of docs/howto/recipes.md against tunix's own loaders (docs/design.md section 16).

For each model, a tiny random-weight checkpoint in the exact Hugging Face
layout (its tensor names, `[out, in]` Linear weights, two shards and
`model.safetensors.index.json`, a `config.json`) is loaded twice into the same
tunix NNX model: by tunix's `create_model_from_safe_tensors`, and by treegraft
with the recipe of tests/recipes.py. Every leaf must be bit-identical and
placed alike, and so must the logits on a fixed batch; on one device and on an
8-device (2 x 4) mesh. The way back too: the loaded model written out by the
recipe's inverse (`tg.invert`, `tg.convert`) is the original files' tensors,
and tunix's loader reads it as it reads them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flax = pytest.importorskip("flax")
pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

# Importing tunix's models turns flax's eager sharding of Variables off for the whole
# process (tunix.utils.env_utils.setup_sharding_environment). Keep that to these tests.
_EAGER_BEFORE = flax.config.flax_always_shard_variable
with warnings.catch_warnings():
    # tunix 0.1.7 imports jax.experimental.shard_map, deprecated since jax 0.8.
    warnings.simplefilter("ignore", DeprecationWarning)
    from tunix.models.gemma3 import model as gemma3_model  # noqa: E402
    from tunix.models.gemma3 import params_safetensors as gemma3_params  # noqa: E402
    from tunix.models.llama3 import model as llama3_model  # noqa: E402
    from tunix.models.llama3 import params as llama3_params  # noqa: E402
    from tunix.models.qwen3 import model as qwen3_model  # noqa: E402
    from tunix.models.qwen3 import params as qwen3_params  # noqa: E402

_EAGER_TUNIX = flax.config.flax_always_shard_variable
flax.config.update("flax_always_shard_variable", _EAGER_BEFORE)

import recipes  # noqa: E402

import treegraft as tg  # noqa: E402

# tunix 0.1.7 calls flax APIs that flax 0.12 deprecates (`sharding=` metadata,
# `State.to_pure_dict`): its warnings, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

@pytest.fixture(autouse=True)
def _as_after_importing_tunix():
    """flax's eager-sharding flag as a tunix user has it, restored afterwards."""
    flax.config.update("flax_always_shard_variable", _EAGER_TUNIX)
    try:
        yield
    finally:
        flax.config.update("flax_always_shard_variable", _EAGER_BEFORE)


# ----------------------------------------------------------------------------
# Hugging Face checkpoints.
# ----------------------------------------------------------------------------


def write_hf_folder(folder: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    """`tensors` as save_pretrained lays them out: two shards, the index, config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate([names[:half], names[half:]]):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def hf_tensors(kind: str, cfg: Any, dtype: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the names and `[out, in]` shapes transformers writes."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(dtype)

    d, f, h = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim
    n, k = cfg.num_heads, cfg.num_kv_heads
    vocab = cfg.num_embed if kind == "gemma3" else cfg.vocab_size
    out = {"model.embed_tokens.weight": w(vocab, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": w(n * h, d),
            p + "self_attn.k_proj.weight": w(k * h, d),
            p + "self_attn.v_proj.weight": w(k * h, d),
            p + "self_attn.o_proj.weight": w(d, n * h),
            p + "input_layernorm.weight": w(d),
            p + "post_attention_layernorm.weight": w(d),
        }
        if kind in ("qwen3", "qwen3_moe", "gemma3"):
            out |= {p + "self_attn.q_norm.weight": w(h), p + "self_attn.k_norm.weight": w(h)}
        if kind == "gemma3":
            out |= {p + "pre_feedforward_layernorm.weight": w(d),
                    p + "post_feedforward_layernorm.weight": w(d)}
        if kind == "qwen3_moe":
            out[p + "mlp.gate.weight"] = w(cfg.num_experts, d)
            for e in range(cfg.num_experts):
                q = f"{p}mlp.experts.{e}."
                out |= {q + "gate_proj.weight": w(f, d), q + "up_proj.weight": w(f, d),
                        q + "down_proj.weight": w(d, f)}
        else:
            out |= {p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                    p + "mlp.down_proj.weight": w(d, f)}
    out["model.norm.weight"] = w(d)
    tied = kind == "gemma3" or getattr(cfg, "weight_tying", False) or getattr(
        cfg, "use_tied_embedding", False)
    if not tied:
        out["lm_head.weight"] = w(vocab, d)
    return out


# ----------------------------------------------------------------------------
# The models, tiny: every size divides the 2 x 4 mesh's axes.
# ----------------------------------------------------------------------------

_DIMS = dict(embed_dim=32, hidden_dim=64, num_heads=8, head_dim=8, num_kv_heads=4)


@dataclass(frozen=True)
class Case:
    kind: str
    model_class: Any
    cfg: Any
    tunix_load: Any
    recipe: Any
    dtype: Any
    hf_config: dict


def _llama(tied: bool) -> Case:
    cfg = llama3_model.ModelConfig(num_layers=2, vocab_size=128, rope_theta=10_000,
                                   norm_eps=1e-5, weight_tying=tied, **_DIMS)
    return Case("llama3", llama3_model.Llama3, cfg, llama3_params.create_model_from_safe_tensors,
                recipes.llama3, np.float32,
                {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                 "tie_word_embeddings": tied})


def _qwen(moe: bool) -> Case:
    extra = dict(num_experts=4, num_experts_per_tok=2) if moe else {}
    cfg = qwen3_model.ModelConfig(num_layers=2, vocab_size=128, rope_theta=10_000,
                                  norm_eps=1e-6, **_DIMS, **extra)
    arch = "Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"
    return Case("qwen3_moe" if moe else "qwen3", qwen3_model.Qwen3, cfg,
                qwen3_params.create_model_from_safe_tensors,
                recipes.qwen3_moe if moe else recipes.qwen3, np.float32,
                {"architectures": [arch], "model_type": "qwen3_moe" if moe else "qwen3"})


def _gemma() -> Case:
    cfg = gemma3_model.ModelConfig(num_layers=2, num_embed=128, sliding_window_size=4, **_DIMS)
    return Case("gemma3", gemma3_model.Gemma3, cfg, gemma3_params.create_model_from_safe_tensors,
                recipes.gemma3, ml_dtypes.bfloat16,
                {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"})


_NO_STACK_OF_LIST = not hasattr(tg, "take")
CASES = {
    "llama3": lambda: _llama(tied=False),
    "llama3_tied": lambda: _llama(tied=True),
    "qwen3": lambda: _qwen(moe=False),
    "qwen3_moe": lambda: _qwen(moe=True),
    "gemma3": _gemma,
}
PARAMS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name == "gemma3" and _NO_STACK_OF_LIST,
            reason="Gemma 3's kv_einsum needs tg.stack of a list of values (docs/design.md "
            "section 16), not built yet",
        ),
    )
    for name in CASES
]


def _mesh(on_mesh: bool, explicit: bool = False) -> jax.sharding.Mesh | None:
    """The 2 x 4 mesh tunix's sharding names; Auto axes unless `explicit`.

    tunix's model code shards its activations with sharding constraints, which
    needs Auto axes to run; `jax.make_mesh` makes Explicit ones by default.
    """
    if not on_mesh:
        return None
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(kind, kind))


def _logits(case: Case, model: Any) -> np.ndarray:
    tokens = jnp.asarray([[1, 5, 9, 3, 7, 2, 11, 4], [8, 6, 0, 13, 2, 9, 1, 5]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, jnp.bool_))
    mask = jnp.broadcast_to(causal, (tokens.shape[0], *causal.shape))
    logits, _ = model(tokens, positions, None, mask)
    return np.asarray(jax.device_get(logits))


def _flat(model: Any) -> dict[str, Any]:
    return {str(p): v for p, v in tg.flatten(nnx.to_pure_dict(nnx.state(model))).items()}


# ----------------------------------------------------------------------------
# The tests.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh_2x4"])
@pytest.mark.parametrize("name", PARAMS)
def test_recipe_matches_tunix_loader(tmp_path: Path, name: str, on_mesh: bool) -> None:
    case = CASES[name]()
    mesh = _mesh(on_mesh)
    folder = write_hf_folder(tmp_path / name, hf_tensors(case.kind, case.cfg, case.dtype),
                             case.hf_config)

    theirs = case.tunix_load(str(folder), case.cfg, mesh=mesh, mode="optimized")
    ours = recipes.load(case.model_class, case.cfg, str(folder), case.recipe(case.cfg), mesh)

    a, b = _flat(theirs), _flat(ours)
    assert sorted(a) == sorted(b)
    for path in a:
        x, y = a[path], b[path]
        assert (x.shape, x.dtype) == (y.shape, y.dtype), path
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
        if mesh is not None:
            assert y.sharding.is_equivalent_to(x.sharding, x.ndim), (path, x.sharding, y.sharding)
            assert not y.sharding.is_fully_replicated or x.sharding.is_fully_replicated, path

    if mesh is None:
        ours_logits, theirs_logits = _logits(case, ours), _logits(case, theirs)
    else:
        with jax.set_mesh(mesh):
            ours_logits, theirs_logits = _logits(case, ours), _logits(case, theirs)
    assert ours_logits.tobytes() == theirs_logits.tobytes()
    assert np.isfinite(ours_logits).all() and np.abs(ours_logits).max() > 0


def test_recipe_reads_each_tensor_of_the_folder(tmp_path: Path) -> None:
    """Nothing in the files is left unread: the recipe maps every Hugging Face tensor."""
    case = _qwen(moe=True)
    folder = write_hf_folder(tmp_path / "q", hf_tensors(case.kind, case.cfg, case.dtype),
                             case.hf_config)
    _, abstract = nnx.split(recipes.abstract_model(case.model_class, case.cfg))
    plan = tg.plan(abstract, tg.SafetensorsCheckpoint(str(folder)), recipes.qwen3_moe(case.cfg))
    assert not plan.unused
    assert not plan.abstract


def test_eval_shape_under_a_mesh_alone_gives_replicated_params() -> None:
    """The trap: with tunix imported, `nnx.eval_shape` under `jax.set_mesh` replicates.

    (On jax.make_mesh's default Explicit axes; the recipe's way does not depend on it.)
    """
    case = _llama(tied=False)
    mesh = _mesh(True, explicit=True)
    with jax.set_mesh(mesh):
        naive = nnx.eval_shape(lambda: case.model_class(case.cfg, rngs=nnx.Rngs(params=0)))
    leaves = jax.tree.leaves(nnx.state(naive))
    assert leaves and all(leaf.sharding.is_fully_replicated for leaf in leaves)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto_axes", "explicit_axes"])
def test_abstract_model_carries_the_partitioned_shardings(explicit: bool) -> None:
    """`recipes.abstract_model` (nnx.use_eager_sharding) gives tunix's own partition specs."""
    case = _llama(tied=False)
    mesh = _mesh(True, explicit=explicit)
    _, abstract = nnx.split(recipes.abstract_model(case.model_class, case.cfg, mesh))
    wanted = nnx.get_named_sharding(abstract, mesh)
    got = {str(p): v.sharding for p, v in tg.flatten(abstract).items()}
    want = {str(p): v for p, v in tg.flatten(wanted).items()}
    assert sorted(got) == sorted(want)
    for path, sharding in got.items():
        assert sharding.spec == want[path].spec, path
    q = got["layers[0].attn.q_proj.w"]
    assert q.spec == jax.sharding.PartitionSpec("fsdp", "tp", None)
    assert sum(not s.is_fully_replicated for s in got.values()) == len(got)


def test_plan_summary_shows_a_replicated_target(tmp_path: Path) -> None:
    """A fully replicated target on 8 devices says so in the plan's first lines."""
    case = _llama(tied=False)
    mesh = _mesh(True, explicit=True)
    folder = write_hf_folder(tmp_path / "l", hf_tensors(case.kind, case.cfg, case.dtype),
                             case.hf_config)
    source = tg.SafetensorsCheckpoint(str(folder))
    mapping = recipes.llama3(case.cfg)
    with jax.set_mesh(mesh):
        naive = nnx.eval_shape(lambda: case.model_class(case.cfg, rngs=nnx.Rngs(params=0)))
        _, right = nnx.split(recipes.abstract_model(case.model_class, case.cfg, mesh))
        replicated = str(tg.plan(nnx.state(naive), source, mapping))
        sharded = str(tg.plan(right, source, mapping))
    n = len(jax.tree.leaves(right))
    assert f"target: {n} leaves on 8 devices: 0 sharded, {n} replicated (" in replicated
    assert f"target: {n} leaves on 8 devices: {n} sharded, 0 replicated" in sharded


def test_cli_plan_shows_a_replicated_target(tmp_path: Path, monkeypatch, capsys) -> None:
    """`treegraft plan --target module:function` prints the same placement line."""
    from treegraft._app.cli import main

    case = _llama(tied=False)
    folder = write_hf_folder(tmp_path / "hf", hf_tensors(case.kind, case.cfg, case.dtype),
                             case.hf_config)
    (tmp_path / "tunix_target.py").write_text(
        "import jax\n"
        "from flax import nnx\n"
        "import test_tunix_recipes as t\n\n"
        "def abstract_model():\n"
        "    case = t._llama(tied=False)\n"
        "    with jax.set_mesh(t._mesh(True, explicit=True)):\n"
        "        return nnx.eval_shape(lambda: case.model_class(case.cfg, rngs=nnx.Rngs(0)))\n"
    )
    (tmp_path / "rules.py").write_text(
        "import recipes, test_tunix_recipes as t\n"
        "MAPPING = recipes.llama3(t._llama(tied=False).cfg)\n"
    )
    monkeypatch.chdir(tmp_path)
    code = main(["plan", str(folder), "--target", "tunix_target:abstract_model",
                 "--mapping", "rules.py:MAPPING"])
    out = capsys.readouterr().out
    assert code == 0, out
    n = case.cfg.num_layers * 9 + 3  # 9 leaves a layer; the embedding, final norm and head
    assert f"target: {n} leaves on 8 devices: 0 sharded, {n} replicated (" in out



# ----------------------------------------------------------------------------
# The way back: the loaded state exported to Hugging Face files.
# ----------------------------------------------------------------------------


def _two_shards(tensors: dict[str, np.ndarray]) -> int:
    """A `max_shard_bytes` under which these tensors fill exactly two files, packed in turn."""
    total = sum(t.nbytes for t in tensors.values())
    return (total + max(t.nbytes for t in tensors.values())) // 2 + 1


def _tensors(folder: Path) -> dict[str, tuple[Any, tuple[int, ...], bytes]]:
    """Every tensor of a Hugging Face folder by name, read by safe_open: dtype, shape, bytes."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "numpy") as f:
            assert f.metadata() == {"format": "pt"}, shard
            for name in f.keys():
                assert index["weight_map"][name] == shard, name
                x = f.get_tensor(name)
                out[name] = (x.dtype, x.shape, x.tobytes())
    assert sorted(out) == sorted(index["weight_map"])
    return out


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh_2x4"])
@pytest.mark.parametrize("name", PARAMS)
def test_export_with_inverted_recipe_is_the_original_files(
    tmp_path: Path, name: str, on_mesh: bool
) -> None:
    """Loaded by the recipe, written back by its inverse: the files tunix loaded, bit for bit.

    The export's tensors (names, dtypes, shapes, bytes) are the original's, up to
    their order in the files; tunix's own loader reads it into the same leaves and
    logits as the original; a tied head writes no `lm_head.weight`.
    """
    case = CASES[name]()
    mesh = _mesh(on_mesh)
    tensors = hf_tensors(case.kind, case.cfg, case.dtype)
    folder = write_hf_folder(tmp_path / name, tensors, case.hf_config)
    recipe = case.recipe(case.cfg)
    loaded = recipes.load(case.model_class, case.cfg, str(folder), recipe, mesh)

    written = Path(recipes.export(loaded, str(folder), recipe, str(tmp_path / "export"),
                                  max_shard_bytes=_two_shards(tensors)))

    assert written == tmp_path / "export"
    assert sorted(p.name for p in written.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    assert (written / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    original, exported = _tensors(folder), _tensors(written)
    assert sorted(exported) == sorted(original) == sorted(tensors)
    assert ("lm_head.weight" in exported) == ("lm_head.weight" in tensors)
    for tensor, (dtype, shape, data) in original.items():
        assert exported[tensor] == (dtype, shape, data), tensor
    index = json.loads((written / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())

    theirs = case.tunix_load(str(folder), case.cfg, mesh=mesh, mode="optimized")
    again = case.tunix_load(str(written), case.cfg, mesh=mesh, mode="optimized")
    a, b = _flat(theirs), _flat(again)
    assert sorted(a) == sorted(b)
    for path in a:
        x, y = a[path], b[path]
        assert (x.shape, x.dtype) == (y.shape, y.dtype), path
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
    if mesh is None:
        logits, logits_again = _logits(case, theirs), _logits(case, again)
    else:
        with jax.set_mesh(mesh):
            logits, logits_again = _logits(case, theirs), _logits(case, again)
    assert logits.tobytes() == logits_again.tobytes()
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0


def test_inverting_a_recipe_without_like_names_every_rule_that_needs_it() -> None:
    """The reshapes need the shapes before them, the MoE stack which `*` it took: all listed."""
    case = _qwen(moe=True)
    recipe = recipes.qwen3_moe(case.cfg)
    with pytest.raises(tg.MappingError, match="pass like=") as info:
        tg.invert(recipe)
    refused = sorted(p.rule.split(" <- ")[0].strip("'") for p in info.value.problems)
    assert refused == sorted(["layers.*.attn.q_proj.w", "layers.*.attn.k_proj.w",
                              "layers.*.attn.v_proj.w", "layers.*.attn.o_proj.w",
                              "layers.*.mlp.*_proj"])
