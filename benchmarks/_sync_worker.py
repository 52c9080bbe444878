"""`_worker.py` with the weight-sync case (`_sync.py`) added: one measured command, one JSON line.

    python benchmarks/_sync_worker.py '<json spec>'

Or both variants alternating in one process, CPU time beside wall time (on a
shared machine the separate processes of `run.py` see different loads; CPU
time of the same process, taken turn about, does not):

    python benchmarks/_sync_worker.py --alternate LEAVES SIDE [ROUNDS]

`PYTHONPATH` chooses which treegraft is measured (a worktree of an older
commit, to compare).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _worker  # noqa: E402
from _sync import setup_sync  # noqa: E402

_worker.SETUPS["sync"] = setup_sync


def alternate(leaves: int, side: int, rounds: int) -> dict:
    """Medians of treegraft and device_put taken turn about, warm, in this process."""
    import gc
    import statistics
    import time

    runs = {v: setup_sync({"leaves": leaves, "side": side, "variant": v})[0]
            for v in ("treegraft", "device_put")}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in runs}
    for k in range(rounds + 2):
        for variant, run in runs.items():
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            _worker.block_all(run())
            if k >= 2:  # two warm-up rounds: the plan kept, the copies compiled
                times[variant].append((time.perf_counter() - wall, time.process_time() - cpu))
    out: dict = {"leaves": leaves, "side": side, "rounds": rounds}
    for variant, got in times.items():
        out[f"{variant}_wall_s"] = statistics.median(w for w, _ in got)
        out[f"{variant}_cpu_s"] = statistics.median(c for _, c in got)
    for what in ("wall", "cpu"):
        out[f"ratio_{what}"] = out[f"treegraft_{what}_s"] / out[f"device_put_{what}_s"]
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--alternate":
        import json

        flags = os.environ.get("XLA_FLAGS", "")
        if "device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
        args = [int(a) for a in sys.argv[2:]]
        print(json.dumps(alternate(args[0], args[1], args[2] if len(args) > 2 else 15)))
    else:
        _worker.main()
