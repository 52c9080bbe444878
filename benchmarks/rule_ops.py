"""Case ops: rule operations (issue #14) against what users write today.

    python benchmarks/rule_ops.py            # 32 layers of 8 MiB (256 MiB per layout), 5 repeats
    python benchmarks/rule_ops.py --quick    # 32 layers of 128 KiB, 1 repeat (a smoke test)

One Kauldron run holds the same 32 layers twice: unscanned (`layers_0..31`, one
array each) and scanned (one `[32, ...]` array saved with one chunk per layer).
Every measured command runs in a fresh process with 8 CPU devices; the
variants alternate within each repeat. Reported: the median time of the graft
call, bytes read (rchar), and peak RSS growth during the call (VmHWM reset
first), against the bytes grafted.

Figures and aims:
  unstack  one layer of 32 from the per-layer chunks: bytes read <= 1.1x the
           layer; time <= 1.2x tensorstore reading that slice directly.
  unstack8 the same layer into a target sharded 8 ways on its rows (each shard
           cuts through the layer's one chunk; issue #25 row 3): bytes read
           <= 1.5x the layer; time against tensorstore reading the layer and
           jax.device_put into the sharding, for information.
  stack    32 layers into a target sharded 8 ways on the layer axis: peak RSS
           growth <= 1.25x bytes grafted; faster than orbax restoring the 32
           arrays + jnp.stack + jax.device_put (both peaks reported).
  keep     {'params': 'params', 'params.head': None} against the mapping that
           lists every other subtree: same bytes, planning time <= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LAYERS = 32
SHAPES = {"full": (1024, 2048), "quick": (128, 256)}
VARIANTS = {
    "unstack": ("unstack_treegraft", "unstack_tensorstore"),
    "unstack8": ("unstack8_treegraft", "unstack8_tensorstore"),
    "stack": ("stack_treegraft", "stack_orbax"),
    "keep": ("keep_rule", "keep_enumerated"),
}


# ----------------------------------------------------------------------------
# In the worker process.
# ----------------------------------------------------------------------------


def _io() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(name: str, data: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import treegraft as tg

    with open(os.path.join(data, "layout.json")) as f:
        layout = json.load(f)
    shape = tuple(layout["shape"])
    n = layout["layers"]
    layer_bytes = int(np.prod(shape)) * 4
    mesh = jax.make_mesh((8,), ("x",))
    by_layer = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    src = tg.KauldronCheckpoint(data)
    src.metadata()  # the step is chosen and the tree read before timing, for every variant
    out: dict = {}

    def timed(fn):
        _reset_peak()
        base_rss, base_io = _status("VmRSS"), _io()
        start = time.perf_counter()
        result = fn()
        jax.block_until_ready(result)
        out["time_s"] = time.perf_counter() - start
        out["read_bytes"] = _io() - base_io
        out["peak_growth_bytes"] = _status("VmHWM") - base_rss
        return result

    if name == "unstack_treegraft":
        like = {"params": {"layers_7": {"w": jax.ShapeDtypeStruct(shape, jnp.float32,
                                                                  sharding=one)}}}
        mapping = {"params.layers_*": tg.unstack("params.scanned.layers", axis=0)}
        got = timed(lambda: tg.graft(like, src, mapping))["params"]["layers_7"]["w"]
        out["grafted_bytes"] = layer_bytes
        out["check"] = float(np.asarray(got)[0, 0])
    elif name == "unstack_tensorstore":
        import tensorstore as ts

        item = os.path.join(src.step_dir, "default")
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/",
                                              "path": "params.scanned.layers.w"}}

        def read():
            array = ts.open(spec, open=True, read=True).result()
            return jax.device_put(array[7].read().result(), one)

        got = timed(read)
        out["grafted_bytes"] = layer_bytes
        out["check"] = float(np.asarray(got)[0, 0])
    elif name == "unstack8_treegraft":
        # The layer's chunk holds every row: each of the 8 target shards cuts
        # through it, and it must be decoded once, not once per shard.
        like = {"params": {"layers_7": {"w": jax.ShapeDtypeStruct(shape, jnp.float32,
                                                                  sharding=by_layer)}}}
        mapping = {"params.layers_*": tg.unstack("params.scanned.layers", axis=0)}
        got = timed(lambda: tg.graft(like, src, mapping))["params"]["layers_7"]["w"]
        out["grafted_bytes"] = layer_bytes
        out["check"] = float(np.asarray(got.addressable_shards[3].data)[0, 0])
    elif name == "unstack8_tensorstore":
        import tensorstore as ts

        item = os.path.join(src.step_dir, "default")
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/",
                                              "path": "params.scanned.layers.w"}}

        def read():
            array = ts.open(spec, open=True, read=True).result()
            return jax.device_put(array[7].read().result(), by_layer)

        got = timed(read)
        out["grafted_bytes"] = layer_bytes
        out["check"] = float(np.asarray(got.addressable_shards[3].data)[0, 0])
    elif name == "stack_treegraft":
        like = {"params": {"layers": {"w": jax.ShapeDtypeStruct((n, *shape), jnp.float32,
                                                                sharding=by_layer)}}}
        mapping = {"params.layers": tg.stack("params.unscanned.layers_*", axis=0)}
        got = timed(lambda: tg.graft(like, src, mapping))["params"]["layers"]["w"]
        out["grafted_bytes"] = n * layer_bytes
        out["check"] = float(np.asarray(got.addressable_shards[3].data)[0, 0, 0])
    elif name == "stack_orbax":
        import orbax.checkpoint as ocp
        from etils import epath

        item = os.path.join(src.step_dir, "default")

        def recipe():
            template = {"params": {"unscanned": {f"layers_{i}": {"w": np.zeros(shape, np.float32)}
                                                 for i in range(n)}}}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        template)
            handler = ocp.PyTreeCheckpointHandler()
            try:
                restored = handler.restore(
                    epath.Path(item),
                    args=ocp.args.PyTreeRestore(item=template, restore_args=restore_args,
                                                partial_restore=True),
                )
            finally:
                handler.close()
            layers = restored["params"]["unscanned"]
            stacked = jnp.stack([layers[f"layers_{i}"]["w"] for i in range(n)], axis=0)
            return jax.device_put(stacked, by_layer)

        got = timed(recipe)
        out["grafted_bytes"] = n * layer_bytes
        out["check"] = float(np.asarray(got.addressable_shards[3].data)[0, 0, 0])
    elif name in ("keep_rule", "keep_enumerated"):
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            src.metadata()["params"])
        like["head"] = {"w": jax.ShapeDtypeStruct((7, 7), jnp.float32, sharding=one)}
        state = {"params": like}
        if name == "keep_rule":
            mapping = {"params": "params", "params.head": None}
        else:
            mapping = {f"params.{k}": f"params.{k}" for k in like if k != "head"}
        # Enumerated rules leave the abstract head to no rule: without a keep rule only
        # strict=False lets it stay abstract (reported), as a user enumerating would need.
        opts = {} if name == "keep_rule" else {"strict": False}
        plans = []
        times = []
        for _ in range(20):  # planning takes milliseconds: the median of 20 calls
            start = time.perf_counter()
            plans.append(tg.plan(state, src, mapping, **opts))
            times.append(time.perf_counter() - start)
        out["time_s"] = statistics.median(times)
        out["plan_bytes"] = plans[-1].nbytes
        out["grafted_bytes"] = plans[-1].nbytes
    else:
        raise SystemExit(f"unknown variant {name}")
    return out


# ----------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------


def build(data: str, shape: tuple[int, int]) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((LAYERS, *shape), dtype=np.float32)
    params = {
        "unscanned": {f"layers_{i}": {"w": stacked[i]} for i in range(LAYERS)},
        "scanned": {"layers": {"w": stacked}},
    }
    state = {"step": 1, "params": params, "collections": {}}
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(), state)
    # One chunk per layer: the chunk holds exactly one [shape] slab.
    save_args["params"]["scanned"]["layers"]["w"] = ocp.SaveArgs(
        chunk_byte_size=int(np.prod(shape)) * 4, shard_axes=(0,)
    )
    options = ocp.CheckpointManagerOptions(step_prefix="ckpt")
    with ocp.CheckpointManager(os.path.join(data, "checkpoints"), options=options) as mgr:
        mgr.save(1, args=ocp.args.Composite(default=ocp.args.StandardSave(state,
                                                                          save_args=save_args)))
        mgr.wait_until_finished()
    with open(os.path.join(data, "layout.json"), "w") as f:
        json.dump({"shape": list(shape), "layers": LAYERS}, f)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run(name: str, data: str) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", data],
        env=_env(), capture_output=True, text=True, timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(data: str, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {v: [] for pair in VARIANTS.values() for v in pair}
    for k in range(repeats):
        for pair in VARIANTS.values():
            for name in pair if k % 2 == 0 else reversed(pair):
                runs[name].append(_run(name, data))
                print(f"  {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    med = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "check"}
        for name, rs in runs.items()
    }
    checks = {name: {r["check"] for r in rs if "check" in r} for name, rs in runs.items()}
    same = checks["unstack_treegraft"] == checks["unstack_tensorstore"] and (
        checks["stack_treegraft"] == checks["stack_orbax"]
    ) and checks["unstack8_treegraft"] == checks["unstack8_tensorstore"]
    u, ut = med["unstack_treegraft"], med["unstack_tensorstore"]
    u8, u8t = med["unstack8_treegraft"], med["unstack8_tensorstore"]
    s, so = med["stack_treegraft"], med["stack_orbax"]
    kr, ke = med["keep_rule"], med["keep_enumerated"]
    aims = [
        ("unstack: bytes read / layer <= 1.1", u["read_bytes"] / u["grafted_bytes"], 1.1),
        ("unstack: time / tensorstore's own slice read <= 1.2", u["time_s"] / ut["time_s"], 1.2),
        ("unstack into 8 shards: bytes read / layer <= 1.5",
         u8["read_bytes"] / u8["grafted_bytes"], 1.5),
        ("unstack into 8 shards: time / tensorstore's read + device_put (information)",
         u8["time_s"] / u8t["time_s"], None),
        ("stack: peak RSS growth / bytes grafted <= 1.25",
         s["peak_growth_bytes"] / s["grafted_bytes"], 1.25),
        ("stack: time / (orbax restore + jnp.stack + device_put) < 1.0",
         s["time_s"] / so["time_s"], 1.0),
        ("keep: plan bytes / enumerated plan bytes == 1.0",
         kr["plan_bytes"] / ke["plan_bytes"], 1.0),
        ("keep: planning time / enumerated <= 1.1", kr["time_s"] / ke["time_s"], 1.1),
    ]
    return {
        "medians": med,
        "runs": runs,
        "values_agree": same,
        "orbax_recipe_peak_growth_ratio": so["peak_growth_bytes"] / so["grafted_bytes"],
        "aims": [{"aim": a, "measured": round(v, 3), "met": None if bar is None else v <= bar}
                 for a, v, bar in aims],
    }


def report(result: dict) -> str:
    med = result["medians"]
    lines = ["variant               time       read       peak growth  grafted"]
    for name, m in med.items():
        lines.append(
            f"{name:<21} {m['time_s'] * 1e3:8.1f} ms "
            f"{m.get('read_bytes', 0) / 2**20:7.1f} MiB "
            f"{m.get('peak_growth_bytes', 0) / 2**20:8.1f} MiB"
            f" {m['grafted_bytes'] / 2**20:7.1f} MiB"
        )
    lines.append(f"values agree between the compared variants: {result['values_agree']}")
    lines.append(
        "orbax recipe peak RSS growth / bytes grafted: "
        f"{result['orbax_recipe_peak_growth_ratio']:.2f}"
    )
    for a in result["aims"]:
        status = "" if a["met"] is None else f" ({'met' if a['met'] else 'MISSED'})"
        lines.append(f"aim: {a['aim']}: {a['measured']}{status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--data", default=None, help="use (and keep) this data directory")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return 0
    mode = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 5)
    data = args.data or tempfile.mkdtemp(prefix="treegraft-ops-")
    try:
        if not os.path.exists(os.path.join(data, "layout.json")):
            build(data, SHAPES[mode])
        result = measure(data, repeats)
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    text = report(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "repeats": repeats, "load": os.getloadavg(),
                       "report": text, **result}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
