"""Case tunix: Hugging Face Llama 3 into tunix's Flax NNX model, treegraft beside tunix's loader.

    python benchmarks/tunix_case.py              # 0.54 GiB bf16, 5 repeats
    python benchmarks/tunix_case.py --quick      # a few MiB, 1 repeat (a smoke test)
    python benchmarks/tunix_case.py --profile    # treegraft's side under cProfile, once

Issue round 3, row 1. A Llama-3-style checkpoint (hidden 1024, 8 layers,
vocab 32000, FFN 8192, bf16: 0.54 GiB) in Hugging Face's layout (two shards
and the index) is loaded into `tunix.models.llama3.model.Llama3` on an 8-device
(2 x 4, `fsdp` x `tp`) CPU mesh, each run in a fresh process, the variants
alternating within each repeat:

  tunix       `llama3.params.create_model_from_safe_tensors(folder, cfg, mesh)`
              (its optimized mode: the files mapped, each tensor sliced on the
              host and `jax.device_put` into its sharding)
  treegraft   the recipe of docs/howto/recipes.md (tests/recipes.py): the model
              built abstractly with its shardings, `tg.graft` from
              `tg.SafetensorsCheckpoint`, `nnx.merge`
  treegraft-1 the same on one device (no mesh), for the cost of the mesh

Measured around the load call, to the last array ready: wall time, and the
peak RSS growth (`ru_maxrss` minus the resident memory just before). Aims:
time <= 0.8x tunix's, peak RSS growth <= 0.7x tunix's. Warm page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 2**20
SIZES = {
    "full": {"hidden": 1024, "layers": 8, "vocab": 32000, "ffn": 8192, "heads": 16,
             "kv_heads": 8, "head_dim": 64},
    "quick": {"hidden": 128, "layers": 2, "vocab": 1024, "ffn": 512, "heads": 8,
              "kv_heads": 4, "head_dim": 16},
}
VARIANTS = ("tunix", "treegraft", "treegraft-1")
STEPS: dict[str, float] = {}  # treegraft's load, step by step (seconds)
AIMS = {"time": 0.8, "peak_rss": 0.7}


def hf_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    """Names and `[out, in]` shapes of a Llama 3 checkpoint, as transformers writes it."""
    d, f = size["hidden"], size["ffn"]
    q, kv = size["heads"] * size["head_dim"], size["kv_heads"] * size["head_dim"]
    shapes = {"model.embed_tokens.weight": (size["vocab"], d)}
    for i in range(size["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        }
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (size["vocab"], d)
    return shapes


def build(folder: str, size: dict) -> int:
    """Writes the checkpoint (two shards, the index, config.json); returns its tensor bytes."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = hf_shapes(size)
    names = list(shapes)
    half = len(names) // 2
    weight_map, total = {}, 0
    for k, part in enumerate([names[:half], names[half:]]):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {}
        for n in part:
            bits = rng.integers(0x3C00, 0x3F80, shapes[n], dtype=np.uint16)  # bf16 in [0.008, 1)
            tensors[n] = bits.view(ml_dtypes.bfloat16)
            total += bits.nbytes
        save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": size["hidden"], "num_hidden_layers": size["layers"],
                   "vocab_size": size["vocab"], "intermediate_size": size["ffn"],
                   "num_attention_heads": size["heads"],
                   "num_key_value_heads": size["kv_heads"], "torch_dtype": "bfloat16"}, f)
    return total


# -- one measured load, in a fresh process --------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loaders(spec: dict):
    """(the config, a function that loads the model) for the spec's variant."""
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama3_model
    from tunix.models.llama3 import params as llama3_params

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import recipes

    import treegraft as tg

    size = spec["size"]
    cfg = llama3_model.ModelConfig(
        num_layers=size["layers"], vocab_size=size["vocab"], embed_dim=size["hidden"],
        hidden_dim=size["ffn"], num_heads=size["heads"], head_dim=size["head_dim"],
        num_kv_heads=size["kv_heads"], rope_theta=500_000, norm_eps=1e-5,
    )
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=auto)
    folder = spec["folder"]

    if spec["variant"] == "tunix":
        def load():
            return llama3_params.create_model_from_safe_tensors(
                folder, cfg, mesh=mesh, mode="optimized")
        return load

    on_mesh = spec["variant"] == "treegraft"
    mapping = recipes.llama3(cfg)

    def load():
        # recipes.load, step by step, each step timed (STEPS).
        t0 = time.perf_counter()
        graphdef, abstract = nnx.split(
            recipes.abstract_model(llama3_model.Llama3, cfg, mesh if on_mesh else None))
        # tunix declares float32 params; the files are bf16, and tunix's loader keeps
        # the files' dtype: so does this state.
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=s.sharding), abstract)
        t1 = time.perf_counter()
        with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
            plan = tg.plan(abstract, tg.SafetensorsCheckpoint(folder), mapping)
            t2 = time.perf_counter()
            state = tg.execute(plan)
            jax.block_until_ready(jax.tree.leaves(state))
            t3 = time.perf_counter()
            model = nnx.merge(graphdef, state)
        STEPS.update(abstract=t1 - t0, plan=t2 - t1, execute=t3 - t2,
                     merge=time.perf_counter() - t3)
        return model
    return load


def worker(spec: dict) -> dict:
    import jax
    from flax import nnx

    load = _loaders(spec)
    gc.collect()
    rss_before = _rss()
    start = time.perf_counter()
    model = load()
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "peak_growth": _peak() - rss_before, "rss_before": rss_before,
           "bytes": sum(x.nbytes for x in leaves),
           "devices": max(len(x.sharding.device_set) for x in leaves),
           "replicated": sum(x.sharding.is_fully_replicated for x in leaves),
           "leaves": len(leaves), "steps": dict(STEPS)}
    return out


def profile(spec: dict) -> str:
    """treegraft's load under cProfile, in this process: the 25 costliest functions."""
    import cProfile
    import io
    import pstats

    load = _loaders(spec)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    model = load()
    import jax
    from flax import nnx

    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    prof.disable()
    text = io.StringIO()
    text.write(f"{spec['variant']}: {time.perf_counter() - start:.2f} s under cProfile\n")
    order = os.environ.get("TG_SORT", "cumulative")  # or tottime
    pstats.Stats(prof, stream=text).sort_stats(order).print_stats(25)
    return text.getvalue()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(spec: dict, *, profile_it: bool = False) -> dict:
    flag = "--profile-worker" if profile_it else "--worker"
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), flag, json.dumps(spec)],
        capture_output=True, text=True, env=_env(), timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {spec['variant']} failed:\n{done.stderr[-3000:]}")
    if profile_it:
        return {"profile": done.stdout}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(size: dict, nbytes: int, repeats: int, runs: dict[str, list[dict]]) -> tuple[str, dict]:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_growth")}
           for v, rs in runs.items()}
    lines = [
        f"Hugging Face Llama 3 ({size['hidden']} hidden, {size['layers']} layers, vocab "
        f"{size['vocab']}, FFN {size['ffn']}; {nbytes / MIB:.0f} MiB bf16) into tunix's Llama3, "
        f"fresh processes, alternating, median of {repeats}:",
        f"  {'variant':<12} {'time':>8} {'peak RSS growth':>16} {'devices':>8} "
        f"{'replicated leaves':>18}",
    ]
    for v, rs in runs.items():
        lines.append(
            f"  {v:<12} {med[v]['seconds']:7.2f}s {med[v]['peak_growth'] / MIB:12.0f} MiB "
            f"{rs[0]['devices']:>8} {rs[0]['replicated']:>11} of {rs[0]['leaves']}")
    for v, rs in runs.items():
        if rs[0]["steps"]:
            steps = {k: statistics.median(r["steps"][k] for r in rs) for k in rs[0]["steps"]}
            lines.append(f"  {v} step by step: " + ", ".join(
                f"{k} {t:.2f}s" for k, t in steps.items()))
    base = med["tunix"]
    ratios = {"time": med["treegraft"]["seconds"] / base["seconds"],
              "peak_rss": med["treegraft"]["peak_growth"] / max(base["peak_growth"], 1)}
    lines.append("  aims (treegraft on the mesh / tunix):")
    for key, aim in AIMS.items():
        mark = "met" if ratios[key] <= aim else "MISSED"
        lines.append(f"    {key:<9} {ratios[key]:.2f}x  (aim <= {aim}x: {mark})")
    return "\n".join(lines), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="write the results here (benchmarks/run.py's EXTRA)")
    parser.add_argument("--profile", action="store_true",
                        help="profile treegraft's load once (mesh and one device), no timings")
    parser.add_argument("--model", help="a folder written by an earlier --keep run")
    parser.add_argument("--keep", action="store_true", help="keep the model folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.profile_worker:
        print(profile(json.loads(args.profile_worker)))
        return
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (1 if args.quick else 5)
    folder = args.model or tempfile.mkdtemp(prefix="treegraft-tunix-", dir="/tmp")
    try:
        if args.model:
            with open(os.path.join(folder, "model.safetensors.index.json")) as f:
                nbytes = json.load(f)["metadata"]["total_size"]
        else:
            nbytes = build(folder, size)
        if args.profile:
            for variant in ("treegraft", "treegraft-1"):
                spec = {"variant": variant, "folder": folder, "size": size}
                print(_run(spec, profile_it=True)["profile"])
            return
        # --quick (the smoke test of benchmarks/run.py) leaves out the one-device run.
        variants = VARIANTS[:2] if args.quick else VARIANTS
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for k in range(repeats):  # alternate, and swap who goes first every other repeat
            order = variants if k % 2 == 0 else tuple(reversed(variants))
            for variant in order:
                runs[variant].append(_run({"variant": variant, "folder": folder, "size": size}))
        text, ratios = report(size, nbytes, repeats, runs)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"report": text, "ratios": ratios, "aims": AIMS, "runs": runs,
                           "bytes": nbytes, "size": size, "quick": args.quick}, f, indent=1)
    finally:
        if args.keep or args.model:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
