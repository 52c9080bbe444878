"""Safetensors benchmark: treegraft's SafetensorsCheckpoint beside the safetensors package.

    python benchmarks/safetensors_case.py            # a ~1 GiB bf16 model, 5 repeats
    python benchmarks/safetensors_case.py --quick    # ~40 MiB, 1 repeat: a smoke test

Writes a Llama-style model in Hugging Face's sharded layout (shards plus
`model.safetensors.index.json`) to a temporary folder under /tmp (deleted at the
end, unless `--keep`), then runs each measured command in a fresh process:

  layer   one decoder layer (9 tensors): bytes read (`rchar`, read syscalls,
          page-cache hits included) against the bytes of those tensors, and wall
          time, for treegraft (`SafetensorsCheckpoint.read` into numpy, and
          `tg.graft` into a single-device jax state) and for the safetensors
          package (`safe_open(...).get_tensor` of the same tensors). Warm page
          cache; medians over the repeats. safe_open maps the file, so its reads
          are page faults, not read syscalls: its `rchar` is not comparable.
  sharded the whole model into a state of `jax.ShapeDtypeStruct`s sharded 8 ways
          over 8 CPU devices, rows (`P('x')`) or columns (`P(None, 'x')`): peak
          RSS growth against the bytes grafted (on CPU the devices' memory is the
          process's own, so 1.0x is the floor), beside safe_open + get_tensor +
          `jax.device_put` with the same shardings.

Prints a table and one JSON line per measurement.
"""

from __future__ import annotations

import argparse
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

MIB = 2**20
SIZES = {
    # bf16: layer = 4*h*h + 3*h*inner + 2*h values = ~96 MiB at h=2048, inner=5504.
    "full": {"hidden": 2048, "inner": 5504, "vocab": 16384, "layers": 9, "shards": 4},
    "quick": {"hidden": 256, "inner": 688, "vocab": 2048, "layers": 4, "shards": 2},
}
LAYER = 3  # the layer the `layer` case reads


def tensor_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama-style model, PyTorch layout ([out, in])."""
    h, inner = size["hidden"], size["inner"]
    shapes = {"model.embed_tokens.weight": (size["vocab"], h)}
    for i in range(size["layers"]):
        pre = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[pre + f"self_attn.{name}.weight"] = (h, h)
        shapes[pre + "mlp.gate_proj.weight"] = (inner, h)
        shapes[pre + "mlp.up_proj.weight"] = (inner, h)
        shapes[pre + "mlp.down_proj.weight"] = (h, inner)
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (size["vocab"], h)
    return shapes


def build(folder: str, size: dict) -> dict:
    """Writes the model with the safetensors package, as transformers lays it out."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = tensor_shapes(size)
    names = list(shapes)
    per_shard = -(-len(names) // size["shards"])
    weight_map = {}
    total = 0
    for k in range(size["shards"]):
        shard = f"model-{k + 1:05d}-of-{size['shards']:05d}.safetensors"
        part = {}
        for name in names[k * per_shard : (k + 1) * per_shard]:
            bits = rng.integers(
                0x3C00, 0x3F80, shapes[name], dtype=np.uint16
            )  # bf16 in ~[0.0078, 1)
            part[name] = bits.view(ml_dtypes.bfloat16)
            total += bits.nbytes
        save_file(part, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return {"bytes": total, "tensors": len(names)}


# -- measured commands (each in a fresh process) -----------------------------------------


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _layer_names(folder: str) -> list[str]:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    return [n for n in weight_map if n.startswith(f"model.layers.{LAYER}.")]


def worker(spec: dict) -> dict:
    import jax
    import numpy as np

    import treegraft as tg
    from treegraft._formats.safetensors.source import SafetensorsCheckpoint

    folder, variant = spec["folder"], spec["variant"]
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    if spec["case"] == "layer":
        names = _layer_names(folder)
        src = SafetensorsCheckpoint(folder)
        meta = {str(k): v for k, v in tg.flatten(src.metadata()).items()}
        infos = {n: meta[str(tg.parse_path(n))] for n in names}
        mapped = sum(i.nbytes for i in infos.values())
        if variant == "treegraft-numpy":
            requests = [
                tg.ReadRequest(tg.parse_path(n), np.empty(i.shape, i.dtype), i.dtype)
                for n, i in infos.items()
            ]

            def run():
                return src.read(requests)
        elif variant == "treegraft-graft":
            state = {
                "layer": jax.tree.map(
                    lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype),
                    src.metadata()["model"]["layers"][LAYER],
                )
            }

            def run():
                out = tg.graft(state, src, {"layer": f"model.layers.{LAYER}"})
                jax.block_until_ready(out)
                return out
        elif variant == "safe_open":
            from safetensors import safe_open

            def run():
                out = []
                by_file: dict[str, list[str]] = {}
                for n in names:
                    by_file.setdefault(weight_map[n], []).append(n)
                for file, group in by_file.items():
                    with safe_open(os.path.join(folder, file), framework="np") as f:
                        out.extend(f.get_tensor(n) for n in group)
                return out
        else:
            raise SystemExit(f"unknown variant {variant}")
        run()  # warm the page cache and any first-call costs
        before_io, start = _rchar(), time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        read = _rchar() - before_io
        del out
        return {"seconds": seconds, "rchar": read, "mapped": mapped}

    # sharded: the whole model into a state sharded 8 ways.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("x",))
    src = SafetensorsCheckpoint(folder)
    meta = src.metadata()

    def sharding_of(shape):
        if spec["split"] == "rows" or len(shape) == 1:
            return NamedSharding(mesh, P("x"))
        return NamedSharding(mesh, P(None, "x"))

    state = jax.tree.map(
        lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=sharding_of(i.shape)), meta
    )
    grafted = sum(i.nbytes for i in jax.tree.leaves(meta))
    gc.collect()
    rss_before = _rss()
    start = time.perf_counter()
    if variant == "treegraft":
        out = tg.graft(state, src, {"": ""})
        jax.block_until_ready(out)
    elif variant == "safe_open":
        from safetensors import safe_open

        flat = {str(k): v for k, v in tg.flatten(state).items()}
        out = {}
        by_file: dict[str, list[str]] = {}
        for n, file in weight_map.items():
            by_file.setdefault(file, []).append(n)
        for file, group in by_file.items():
            with safe_open(os.path.join(folder, file), framework="np") as f:
                for n in group:
                    like = flat[str(tg.parse_path(n))]
                    out[n] = jax.device_put(f.get_tensor(n), like.sharding)
        jax.block_until_ready(out)
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_growth": _peak() - rss_before,
        "grafted": grafted,
        "rss_before": rss_before,
    }


def _run(spec: dict) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the model folder")
    parser.add_argument("--model", help="reuse a model folder kept by an earlier --keep run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (1 if args.quick else 5)
    folder = args.model or tempfile.mkdtemp(prefix="treegraft-safetensors-", dir="/tmp")
    try:
        start = time.perf_counter()
        if args.model:
            with open(os.path.join(folder, "model.safetensors.index.json")) as f:
                index = json.load(f)
            built = {"bytes": index["metadata"]["total_size"], "tensors": len(index["weight_map"])}
        else:
            built = build(folder, size)
        print(
            f"model: {built['tensors']} tensors, {built['bytes'] / MIB:.0f} MiB bf16 in "
            f"{size['shards']} shards at {folder} (written in {time.perf_counter() - start:.1f} s)"
        )
        results: dict[str, list[dict]] = {}
        for _ in range(repeats):  # variants alternate within each repeat
            for variant in ("treegraft-numpy", "treegraft-graft", "safe_open"):
                r = _run({"case": "layer", "variant": variant, "folder": folder})
                results.setdefault(f"layer/{variant}", []).append(r)
            for split in ("rows", "cols"):
                for variant in ("treegraft", "safe_open"):
                    spec = {"case": "sharded", "variant": variant, "folder": folder, "split": split}
                    results.setdefault(f"sharded-{split}/{variant}", []).append(_run(spec))
        print(f"\none layer (model.layers.{LAYER}.*), warm page cache, median of {repeats}:")
        print(
            f"  {'variant':<18} {'time':>9} {'rchar MiB':>10} {'mapped MiB':>11} "
            f"{'read/mapped':>12}"
        )
        base = statistics.median(r["seconds"] for r in results["layer/safe_open"])
        for variant in ("treegraft-numpy", "treegraft-graft", "safe_open"):
            rs = results[f"layer/{variant}"]
            t = statistics.median(r["seconds"] for r in rs)
            read = statistics.median(r["rchar"] for r in rs)
            mapped = rs[0]["mapped"]
            ratio = f"{read / mapped:.3f}x" if variant != "safe_open" else "(mmap)"
            print(
                f"  {variant:<18} {t * 1e3:7.1f}ms {read / MIB:10.1f} {mapped / MIB:11.1f} "
                f"{ratio:>12}   time {t / base:.2f}x safe_open"
            )
        print(f"\nwhole model into a state sharded 8 ways, median of {repeats}:")
        print(
            f"  {'split/variant':<22} {'time':>8} {'peak RSS growth':>16} {'grafted':>9} "
            f"{'ratio':>7}"
        )
        for split in ("rows", "cols"):
            for variant in ("treegraft", "safe_open"):
                rs = results[f"sharded-{split}/{variant}"]
                t = statistics.median(r["seconds"] for r in rs)
                growth = statistics.median(r["peak_growth"] for r in rs)
                grafted = rs[0]["grafted"]
                print(
                    f"  {split + '/' + variant:<22} {t:7.2f}s {growth / MIB:13.0f} MiB "
                    f"{grafted / MIB:6.0f} MiB {growth / grafted:6.2f}x"
                )
        print()
        for key, rs in results.items():
            print(json.dumps({"measure": key, "runs": rs}))
    finally:
        if args.keep or args.model:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
