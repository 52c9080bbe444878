"""Writes a benchmark checkpoint in Kauldron's layout; run in its own process.

    python benchmarks/_build.py '{"build": {"big": {"kind": "arrays", "workdir": ...,
                                                     "n": 64, "side": 2048},
                                             "many": {"kind": "many", "workdir": ...,
                                                      "blocks": 1000, "per": 100, "leaf": 256}}}'

Kauldron's layout, written with plain orbax as Kauldron does:
`<workdir>/checkpoints/ckpt_<step>/default`, saved by a CheckpointManager with
`step_prefix='ckpt'` and the standard handler. Array values are random bits
(incompressible), so bytes on disk equal array bytes and "bytes read / bytes
mapped" is not flattered by compression. Prints one JSON line: what was built
and how long saving took.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import STEP, block, layer, leaf  # noqa: E402


def _random_f32(rng, shape):
    import numpy as np

    size = int(np.prod(shape))
    return rng.integers(0, 2**32, size, dtype=np.uint32).view(np.float32).reshape(shape)


def _save(workdir: str, state) -> float:
    import orbax.checkpoint as ocp

    t0 = time.perf_counter()
    mgr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(step_prefix="ckpt", enable_async_checkpointing=False),
    )
    mgr.save(STEP, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))
    mgr.wait_until_finished()
    mgr.close()
    return time.perf_counter() - t0


def build_arrays(spec: dict) -> dict:
    """n float32 jax arrays of side x side under params (Kauldron's TrainState keys)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(spec.get("seed", 0))
    shape = (spec["side"], spec["side"])
    t0 = time.perf_counter()
    params = {
        layer(i): {"kernel": jax.device_put(_random_f32(rng, shape))} for i in range(spec["n"])
    }
    make = time.perf_counter() - t0
    state = {"step": STEP, "params": params, "collections": {}}
    save = _save(spec["workdir"], state)
    return {
        "leaves": spec["n"],
        "array_bytes": spec["n"] * shape[0] * shape[1] * 4,
        "make_s": make,
        "save_s": save,
    }


def build_many(spec: dict) -> dict:
    """blocks x per small numpy leaves under params: a checkpoint with many leaves."""
    import numpy as np

    rng = np.random.default_rng(spec.get("seed", 0))
    n = spec["leaf"]
    t0 = time.perf_counter()
    params = {
        block(b): {leaf(j): _random_f32(rng, (n,)) for j in range(spec["per"])}
        for b in range(spec["blocks"])
    }
    make = time.perf_counter() - t0
    state = {"step": STEP, "params": params, "collections": {}}
    save = _save(spec["workdir"], state)
    leaves = spec["blocks"] * spec["per"]
    return {"leaves": leaves, "array_bytes": leaves * n * 4, "make_s": make, "save_s": save}


def main() -> None:
    results = {}
    for key, spec in json.loads(sys.argv[1])["build"].items():
        out = {"arrays": build_arrays, "many": build_many}[spec["kind"]](spec)
        out["disk_bytes"] = sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(spec["workdir"])
            for f in files
        )
        results[key] = out
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
