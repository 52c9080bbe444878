"""Case inprocess: one 4 MiB array of a 256 MiB checkpoint, read in a warm process.

    python benchmarks/read_inprocess.py             # 64 arrays of 4 MiB, 31 rounds
    python benchmarks/read_inprocess.py --quick     # 64 arrays of 64 KiB, 5 rounds (smoke test)
    python benchmarks/read_inprocess.py --profile   # and where treegraft's time goes

Issue #25 row 4.

One process, everything imported and warmed up first; each round runs every
variant once, the order reversed every other round; medians are reported:

  treegraft        tg.graft of the one array from a new tg.OrbaxCheckpoint (what a
                   user writes: metadata, plan and read)
  treegraft_warm   the same graft on one checkpoint object kept between rounds
                   (its metadata read once)
  tensorstore      tensorstore opening the array and reading it, then jax.device_put
                   (the floor: no metadata, no plan)
  orbax            orbax's exact partial restore of the array into the same sharding

Aims: treegraft <= 1.2x tensorstore's time; orbax >= 2x treegraft's time.
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
sys.path.insert(0, HERE)

from _common import STEP, item_dir, layer  # noqa: E402

SIZES = {"full": {"n": 64, "side": 1024, "rounds": 31},
         "quick": {"n": 64, "side": 128, "rounds": 5}}
VARIANTS = ("treegraft", "treegraft_warm", "tensorstore", "orbax")


def build(data: str, n: int, side: int) -> None:
    spec = {"build": {"mid": {"kind": "arrays", "workdir": data, "n": n, "side": side}}}
    subprocess.run([sys.executable, os.path.join(HERE, "_build.py"), json.dumps(spec)],
                   check=True, capture_output=True, env=_env())


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def measure(data: str, n: int, side: int, rounds: int, profile: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    import tensorstore as ts

    import treegraft as tg

    item = item_dir(data, STEP)
    name = layer(n * 37 // 64)
    shape = (side, side)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = {"params": {name: {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=dev)}}}
    mapping = {f"params.{name}.kernel": f"params.{name}.kernel"}
    kept = tg.OrbaxCheckpoint(item)

    def treegraft():
        return tg.graft(like, tg.OrbaxCheckpoint(item), mapping)["params"][name]["kernel"]

    def treegraft_warm():
        return tg.graft(like, kept, mapping)["params"][name]["kernel"]

    def tensorstore():
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/",
                                              "path": f"params.{name}.kernel"}}
        array = ts.open(spec, open=True, read=True).result()
        return jax.device_put(array.read().result(), dev)

    def orbax():
        args = ocp.args.PyTreeRestore(
            item={"params": {name: {"kernel": 0}}},
            restore_args={"params": {name: {"kernel": ocp.ArrayRestoreArgs(
                sharding=dev, global_shape=shape, dtype=jnp.float32)}}},
            partial_restore=True,
        )
        return ocp.PyTreeCheckpointer().restore(item, args=args)["params"][name]["kernel"]

    fns = {"treegraft": treegraft, "treegraft_warm": treegraft_warm,
           "tensorstore": tensorstore, "orbax": orbax}
    checks = {}
    for v, fn in fns.items():  # warm-up: imports, jax's first transfer, orbax's handlers
        checks[v] = jax.device_get(jax.block_until_ready(fn())).tobytes()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for k in range(rounds):
        for v in VARIANTS if k % 2 == 0 else VARIANTS[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fns[v]())
            times[v].append(time.perf_counter() - start)
    med = {v: statistics.median(t) for v, t in times.items()}
    out = {
        "array": f"params.{name}.kernel",
        "array_bytes": side * side * 4,
        "checkpoint_bytes": n * side * side * 4,
        "medians_s": med,
        "times_s": times,
        "values_agree": len(set(checks.values())) == 1,
        "aims": [
            {"aim": "treegraft time / tensorstore's <= 1.2",
             "measured": round(med["treegraft"] / med["tensorstore"], 3),
             "met": med["treegraft"] / med["tensorstore"] <= 1.2},
            {"aim": "orbax partial restore time / treegraft's >= 2",
             "measured": round(med["orbax"] / med["treegraft"], 3),
             "met": med["orbax"] / med["treegraft"] >= 2},
            {"aim": "(also) warm treegraft time / tensorstore's",
             "measured": round(med["treegraft_warm"] / med["tensorstore"], 3), "met": None},
        ],
    }
    if profile:
        out["profile"] = _profile(treegraft, rounds)
    return out


def _profile(fn, rounds: int) -> str:
    """cProfile of treegraft's variant: the functions with most cumulative time."""
    import cProfile
    import io
    import pstats

    import jax

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rounds):
        jax.block_until_ready(fn())
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    return text.getvalue()


def report(result: dict) -> str:
    lines = [f"one {result['array_bytes'] / 2**20:.2f} MiB array ({result['array']}) of a "
             f"{result['checkpoint_bytes'] / 2**20:.0f} MiB checkpoint, in process (medians)"]
    for v, t in result["medians_s"].items():
        lines.append(f"  {v:<15} {t * 1e3:8.2f} ms")
    lines.append(f"values agree: {result['values_agree']}")
    for a in result["aims"]:
        met = "" if a["met"] is None else (" (met)" if a["met"] else " (MISSED)")
        lines.append(f"aim: {a['aim']}: {a['measured']}{met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 31, quick 5)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--data", default=None, help="use (and keep) this data directory")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    rounds = args.repeats or size["rounds"]
    data = args.data or tempfile.mkdtemp(prefix="treegraft-inprocess-")
    try:
        if not os.path.isdir(os.path.join(data, "checkpoints")):
            build(data, size["n"], size["side"])
        result = measure(data, size["n"], size["side"], rounds, args.profile)
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    text = report(result)
    print(text)
    if args.profile:
        print(result["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "rounds": rounds, "load": os.getloadavg(), "report": text,
                       **result}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
