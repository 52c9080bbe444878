"""Hugging Face checkpoints into tunix's Flax NNX models: one treegraft mapping per model.

docs/howto/recipes.md shows this module's pieces (literalinclude), and
tests/test_tunix_recipes.py checks each mapping against tunix's own loader,
leaf by leaf and logit by logit. Each recipe is a function of the tunix
`ModelConfig` (the head counts and sizes of the reshapes) that returns a plain
dict `{tunix path: Hugging Face name or operation}`: copy the one you need.

Hugging Face stores a Linear weight as `[out, in]`; tunix keeps attention
weights as einsum kernels with the heads split out (`q_proj.w` is `[D, N, H]`,
`o_proj.w` is `[N, H, D]`) and the MLP as `[in, out]` kernels.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
from flax import nnx

import treegraft as tg

__all__ = ["heads", "llama3", "qwen3", "qwen3_moe", "gemma3", "abstract_model", "load", "export"]


def heads(name: str, shape: tuple[int, ...]) -> tg.Operation:
    """A Linear weight `[out, in]` as a tunix einsum kernel: transposed, heads split out."""
    return tg.reshape(tg.transpose(name, (1, 0)), shape)


def llama3(cfg: Any) -> dict[str, Any]:
    """Hugging Face Llama 3 (`LlamaForCausalLM`) into `tunix.models.llama3.model.Llama3`."""
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hf = "model.layers.*."
    mapping = {
        "embedder.input_embedding": "model.embed_tokens.weight",
        "layers.*.attn.q_proj.w": heads(hf + "self_attn.q_proj.weight", (d, n, h)),
        "layers.*.attn.k_proj.w": heads(hf + "self_attn.k_proj.weight", (d, k, h)),
        "layers.*.attn.v_proj.w": heads(hf + "self_attn.v_proj.weight", (d, k, h)),
        "layers.*.attn.o_proj.w": heads(hf + "self_attn.o_proj.weight", (n, h, d)),
        "layers.*.mlp.*_proj.kernel": tg.transpose(hf + "mlp.*_proj.weight", (1, 0)),
        "layers.*.input_layernorm.w": hf + "input_layernorm.weight",
        "layers.*.post_attention_layernorm.w": hf + "post_attention_layernorm.weight",
        "final_norm.w": "model.norm.weight",
    }
    if not cfg.weight_tying:  # Llama 3.2 1B and 3B tie the head to the embedding
        mapping["lm_head.w"] = tg.transpose("lm_head.weight", (1, 0))
    return mapping


def qwen3(cfg: Any) -> dict[str, Any]:
    """Hugging Face Qwen 3 (`Qwen3ForCausalLM`) into `tunix.models.qwen3.model.Qwen3`."""
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hf = "model.layers.*."
    mapping = {
        "embedder.input_embedding": "model.embed_tokens.weight",
        "layers.*.attn.q_proj.w": heads(hf + "self_attn.q_proj.weight", (d, n, h)),
        "layers.*.attn.k_proj.w": heads(hf + "self_attn.k_proj.weight", (d, k, h)),
        "layers.*.attn.v_proj.w": heads(hf + "self_attn.v_proj.weight", (d, k, h)),
        "layers.*.attn.o_proj.w": heads(hf + "self_attn.o_proj.weight", (n, h, d)),
        "layers.*.attn.q_norm.w": hf + "self_attn.q_norm.weight",
        "layers.*.attn.k_norm.w": hf + "self_attn.k_norm.weight",
        "layers.*.mlp.*_proj.kernel": tg.transpose(hf + "mlp.*_proj.weight", (1, 0)),
        "layers.*.input_layernorm.w": hf + "input_layernorm.weight",
        "layers.*.post_attention_layernorm.w": hf + "post_attention_layernorm.weight",
        "final_norm.w": "model.norm.weight",
    }
    if not cfg.use_tied_embedding:
        mapping["lm_head.w"] = tg.transpose("lm_head.weight", (1, 0))
    return mapping


def qwen3_moe(cfg: Any) -> dict[str, Any]:
    """Hugging Face Qwen 3 MoE (`Qwen3MoeForCausalLM`) into tunix's `Qwen3` with experts."""
    mapping = qwen3(cfg)
    del mapping["layers.*.mlp.*_proj.kernel"]
    mapping |= {
        # One Linear per expert in the files, one [E, in, out] array per layer in
        # tunix: the stack takes the expert index (the last `*` that captures
        # integers), and `*_proj` carries over to the target's name.
        "layers.*.mlp.*_proj": tg.transpose(
            tg.stack("model.layers.*.mlp.experts.*.*_proj.weight", axis=0), (0, 2, 1)
        ),
        "layers.*.mlp.router.kernel": tg.transpose("model.layers.*.mlp.gate.weight", (1, 0)),
    }
    return mapping


def gemma3(cfg: Any) -> dict[str, Any]:
    """Hugging Face Gemma 3 text (`Gemma3ForCausalLM`) into `tunix.models.gemma3.model.Gemma3`.

    tunix keeps query and key/value heads first (`[N, D, H]`), and stacks k and v
    into one `kv_einsum` leaf (or q, k and v into `qkv_einsum` without GQA).
    Its norms compute `1 + scale` themselves, so the weights are copied as they are.
    """
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hf = "model.layers.*."

    def heads_first(name: str, heads: int) -> tg.Operation:  # [heads * H, D] -> [heads, D, H]
        return tg.transpose(tg.reshape(hf + f"self_attn.{name}.weight", (heads, h, d)), (0, 2, 1))

    mapping: dict[str, Any] = {
        "embedder.input_embedding": "model.embed_tokens.weight",
        "layers.*.attn.attn_vec_einsum.w": heads(hf + "self_attn.o_proj.weight", (n, h, d)),
        "layers.*.attn._query_norm.scale": hf + "self_attn.q_norm.weight",
        "layers.*.attn._key_norm.scale": hf + "self_attn.k_norm.weight",
        "layers.*.mlp.*_proj.kernel": tg.transpose(hf + "mlp.*_proj.weight", (1, 0)),
        "layers.*.pre_attention_norm.scale": hf + "input_layernorm.weight",
        "layers.*.post_attention_norm.scale": hf + "post_attention_layernorm.weight",
        "layers.*.pre_ffw_norm.scale": hf + "pre_feedforward_layernorm.weight",
        "layers.*.post_ffw_norm.scale": hf + "post_feedforward_layernorm.weight",
        "final_norm.scale": "model.norm.weight",
    }
    if n == k:  # no GQA: q, k and v in one leaf
        mapping["layers.*.attn.qkv_einsum.w"] = tg.stack(
            [heads_first("q_proj", n), heads_first("k_proj", k), heads_first("v_proj", k)], axis=0
        )
    else:
        mapping["layers.*.attn.q_einsum.w"] = heads_first("q_proj", n)
        mapping["layers.*.attn.kv_einsum.w"] = tg.stack(
            [heads_first("k_proj", k), heads_first("v_proj", k)], axis=0
        )
    return mapping


def abstract_model(model_class: Any, cfg: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The tunix model built abstractly, its parameters carrying the model's own shardings.

    `nnx.eval_shape` under `jax.set_mesh` alone gives every parameter a
    replicated sharding (flax 0.12): `nnx.use_eager_sharding(True)` makes each
    `nnx.Param` take the sharding its `sharding=` annotation names.
    """
    if mesh is None:
        return nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(params=0)))
    with nnx.use_eager_sharding(True), jax.set_mesh(mesh):
        return nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(params=0)))


def load(model_class: Any, cfg: Any, folder: str, mapping: dict[str, Any],
         mesh: jax.sharding.Mesh | None = None) -> Any:
    """A tunix model whose weights are read from a Hugging Face folder by treegraft."""
    graphdef, abstract = nnx.split(abstract_model(model_class, cfg, mesh))
    source = tg.SafetensorsCheckpoint(folder)
    if mesh is None:
        return nnx.merge(graphdef, tg.graft(abstract, source, mapping))
    with jax.set_mesh(mesh):  # the abstract shardings name the mesh by its axes only
        return nnx.merge(graphdef, tg.graft(abstract, source, mapping))


def export(model: Any, folder: str, mapping: dict[str, Any], dest: str, **options: Any) -> str:
    """A tunix model's weights as Hugging Face files again, written by the recipe's inverse.

    `like` is the folder the model was loaded from: only its headers are read,
    for the shapes before the reshapes and the `*` each stack took. `options`
    go to `tg.convert` (`max_shard_bytes`, `max_host_bytes`, ...).
    """
    back = tg.invert(mapping, like=tg.SafetensorsCheckpoint(folder))
    written = tg.convert(nnx.state(model), dest, back, format="safetensors", **options)
    shutil.copy(os.path.join(folder, "config.json"), os.path.join(written, "config.json"))
    return written
