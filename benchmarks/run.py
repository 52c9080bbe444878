"""treegraft benchmarks: treegraft side by side with what users would do instead.

    python benchmarks/run.py            # full sizes (1 GiB checkpoints), 5 repeats
    python benchmarks/run.py --quick    # small sizes, 1 repeat: a smoke test, not a measurement

Builds its own data in a temporary directory (deleted at the end), runs every
measured command in a fresh subprocess (`_worker.py`), alternates the compared
commands within each repeat, and prints a table of medians with ratios against
treegraft, the aims from issue #6 and whether each is met. Writes everything,
including every single run and a description of the machine, to a JSON file
(`--json`, default `benchmarks/results.json`).

Cases:
  1 partial   graft 1/64 of a 1 GiB Kauldron checkpoint with PartialKauldronLoader;
              vs (a) orbax full restore + copy by hand, (b) orbax partial restore
              of exactly that array. Warm page cache, and cold (evicted with
              posix_fadvise before each run).
  2 fanout    one source subtree into 4 targets: bytes read.
  3 memory    in-memory graft of 50,000 small leaves with one glob rule, vs
              one tree_flatten_with_path + tree_unflatten of the state.
  4 plan      plan against a checkpoint with 100,000 leaves, vs orbax's own
              metadata read; array bytes read.
  5 sharded   1 GiB into a target sharded over 8 CPU devices: peak RSS / bytes.
  6 scaling   case 1 at 1/64, 1/8 and 1/1 of the checkpoint, and 1/64 of 1 GiB
              vs the same bytes from a checkpoint 8x smaller.
  7 sync      weight sync in memory (issue #25): tg.graft from an 8-way fsdp state
              into a 2x4 tensor-parallel one renamed by one glob rule, vs
              jax.device_put of the same leaves into the target shardings (the
              floor); 192 kernels of 1 MiB with their biases, and 10,000 leaves
              of float32[4]. Warm calls are the aim (a sync repeats); 8 devices.

Cases with a script of their own (EXTRA): planscale, ops, storage, and
error_path (`error_path.py`: a plan with a mistake beside the same plan
without it: a mistyped stack pattern over an 18,867-tensor MoE source, mistyped
keys among 30,000, unmatched ignore patterns, a typo against 100,000 keys).
Extra case convert (`convert_case.py`): 1, 2 and 4 GiB of safetensors to orbax under a
64 MiB budget, and a sharded 1 GiB state to safetensors, beside the naive recipes and cp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata as importlib_metadata
from importlib import util as importlib_util

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import FANOUT, MIB, SIZES, layer  # noqa: E402

CASES = ("partial", "fanout", "memory", "plan", "sharded", "scaling", "sync")
# Case 7's configurations per mode: (leaves, side): side x side kernels with
# their biases, or float32[4] leaves when side is 0.
SYNC_SIZES = {"full": [(192, 512), (10000, 0)], "quick": [(16, 64), (300, 0)]}
# Cases with a script of their own: run in a subprocess, their report and JSON
# kept beside the others' (`results["extra"]`).
EXTRA = {
    "planscale": "planscale.py",
    "ops": "rule_ops.py",
    "storage": "storage_cases.py",
    "error_path": "error_path.py",
    "convert": "convert_case.py",
    "inprocess": "read_inprocess.py",
}
# Hugging Face Llama 3 into tunix's NNX model beside tunix's own loader (tunix_case.py):
# only where google-tunix (in the test extra) is installed.
if importlib_util.find_spec("tunix") is not None:
    EXTRA["tunix"] = "tunix_case.py"

TREEGRAFT = "treegraft"
LABELS = {
    "treegraft": "treegraft",
    "orbax_full": "(a) orbax full restore + copy by hand",
    "orbax_partial": "(b) orbax partial restore of exactly the arrays",
    "orbax_partial_each": "(c) orbax partial restore once per target",
    "floor": "jax tree_flatten_with_path + tree_unflatten (floor)",
    "tensorstore": "tensorstore reading exactly the arrays, shard by shard (floor)",
    "orbax_metadata": "orbax PyTreeCheckpointHandler.metadata (floor)",
    "device_put": "jax.device_put of the same leaves into the target shardings (floor)",
}


# ---------------------------------------------------------------------------
# Running things in fresh processes.
# ---------------------------------------------------------------------------


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_script(script: str, spec: dict, *, devices: int = 1, timeout: float) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), json.dumps(spec)]
    proc = subprocess.run(
        cmd, env=_env(devices), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
    raise RuntimeError(
        f"{script} {spec.get('variant', spec.get('kind'))} failed (exit {proc.returncode}):\n{tail}"
    )


def evict_page_cache(root: str) -> bool:
    """Asks the kernel to drop root's files from the page cache (clean pages only).

    Returns False where posix_fadvise is not available. Not a guarantee: the
    kernel may keep pages, and nothing else on the machine is evicted.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


# ---------------------------------------------------------------------------
# Cases: what to run. Each case is a list of configs; each config compares
# variants (treegraft first) on the same data.
# ---------------------------------------------------------------------------


def _kauldron_spec(workdir, size, *, ckpt_arrays, target_layers, pairs, mapping, devices=1):
    return {
        "kind": "kauldron",
        "workdir": workdir,
        "side": size["side"],
        "ckpt_arrays": ckpt_arrays,
        "target_layers": target_layers,
        "pairs": pairs,
        "mapping": mapping,
        "devices": devices,
    }


def middle(n: int) -> str:
    """A layer in the middle of an n-array checkpoint (not the first one written)."""
    return layer(n * 37 // 64)


def build_cases(data: dict, size: dict, selected: list[str], *, quick: bool) -> list[dict]:
    n = size["n_arrays"]
    array_bytes = size["side"] ** 2 * 4
    all_layers = [layer(i) for i in range(n)]
    one = middle(n)
    big, small = data["big"], data["small"]

    def select(k, workdir=big, ckpt=n, devices=1):
        names = [layer(i) for i in range(k)] if k < ckpt else [layer(i) for i in range(ckpt)]
        if k == 1:
            names = [middle(ckpt)]
        if k == ckpt:
            mapping = {"params": "params"}
        else:
            # The other layers stay abstract on purpose: a keep rule says so (an abstract
            # leaf no rule fills is an error, docs/design.md section 5).
            mapping = {"params": None, **{f"params.{m}": f"params.{m}" for m in names}}
        base = _kauldron_spec(
            workdir,
            size,
            ckpt_arrays=ckpt,
            target_layers=[layer(i) for i in range(ckpt)] if ckpt < n else all_layers,
            pairs=[[m, m] for m in names],
            mapping=mapping,
            devices=devices,
        )
        return base, k * array_bytes

    cases = []
    if "partial" in selected:
        spec, mapped = select(1)
        variants = ["treegraft", "orbax_full", "orbax_partial", "tensorstore"]
        cases.append(
            {
                "id": "1_partial",
                "title": f"1. Partial load: 1/{n} of a {_fmt_bytes(n * array_bytes)} Kauldron "
                "checkpoint with PartialKauldronLoader",
                "configs": [
                    {
                        "name": "warm cache",
                        "spec": spec,
                        "variants": variants,
                        "mapped_bytes": mapped,
                    },
                    {
                        "name": "cold cache",
                        "spec": spec,
                        "variants": variants,
                        "mapped_bytes": mapped,
                        "evict": big,
                    },
                ],
            }
        )
    if "fanout" in selected:
        targets = [f"dec_{i}" for i in range(FANOUT)]
        spec = _kauldron_spec(
            big,
            size,
            ckpt_arrays=n,
            target_layers=targets,
            pairs=[[t, one] for t in targets],
            mapping={f"params.{t}": f"params.{one}" for t in targets},
        )
        cases.append(
            {
                "id": "2_fanout",
                "title": f"2. Fan-out: one {_fmt_bytes(array_bytes)} source subtree into "
                f"{FANOUT} targets",
                "configs": [
                    {
                        "name": f"1 -> {FANOUT}",
                        "spec": spec,
                        "variants": ["treegraft", "orbax_partial", "orbax_partial_each"],
                        "mapped_bytes": array_bytes,
                    }
                ],
            }
        )
    if "memory" in selected:
        spec = {
            "kind": "memory",
            "blocks": size["mem_blocks"],
            "per": size["mem_per"],
            "leaf": size["mem_leaf"],
            "inner": size["inner"],
        }
        leaves = size["mem_blocks"] * size["mem_per"]
        cases.append(
            {
                "id": "3_memory",
                "title": f"3. In-memory graft: {leaves:,} leaves, one glob rule",
                "configs": [
                    {
                        "name": f"{leaves:,} leaves",
                        "spec": spec,
                        "variants": ["treegraft", "floor"],
                        "leaves": leaves,
                    }
                ],
            }
        )
    if "plan" in selected:
        spec = {
            "kind": "plan",
            "workdir": data["many"],
            "blocks": size["many_blocks"],
            "per": size["many_per"],
            "leaf": size["many_leaf"],
        }
        leaves = size["many_blocks"] * size["many_per"]
        cases.append(
            {
                "id": "4_plan",
                "title": f"4. Planning against a checkpoint with {leaves:,} leaves",
                "configs": [
                    {
                        "name": f"{leaves:,} leaves",
                        "spec": spec,
                        "variants": ["treegraft", "orbax_metadata"],
                        "leaves": leaves,
                        "array_bytes": leaves * size["many_leaf"] * 4,
                    }
                ],
            }
        )
    if "sharded" in selected:
        spec, mapped = select(n, devices=8)
        cases.append(
            {
                "id": "5_sharded",
                "title": f"5. Sharded restore: {_fmt_bytes(mapped)} into a target sharded over "
                "8 CPU devices",
                "configs": [
                    {
                        "name": "8 devices",
                        "spec": spec,
                        "devices": 8,
                        "variants": ["treegraft", "orbax_partial", "orbax_full"],
                        "mapped_bytes": mapped,
                    }
                ],
            }
        )
    if "scaling" in selected:
        configs = []
        for k in (1, n) if quick else (1, n // 8, n):
            spec, mapped = select(k)
            configs.append(
                {
                    "name": f"1/{n // k} of {_fmt_bytes(n * array_bytes)}",
                    "spec": spec,
                    "variants": ["treegraft", "orbax_partial", "tensorstore"],
                    "mapped_bytes": mapped,
                    "fraction": k / n,
                    "ckpt_bytes": n * array_bytes,
                }
            )
        m = size["small_arrays"]
        spec, mapped = select(1, workdir=small, ckpt=m)
        configs.append(
            {
                "name": f"1/{m} of {_fmt_bytes(m * array_bytes)}",
                "spec": spec,
                "variants": ["treegraft", "orbax_partial"],
                "mapped_bytes": mapped,
                "fraction": 1 / m,
                "ckpt_bytes": m * array_bytes,
            }
        )
        cases.append(
            {
                "id": "6_scaling",
                "title": "6. Scaling: time against bytes mapped and checkpoint size",
                "configs": configs,
            }
        )
    if "sync" in selected:
        configs = []
        for leaves, side in SYNC_SIZES["quick" if quick else "full"]:
            name = (
                f"{leaves:,} kernels {side}x{side} + biases" if side else f"{leaves:,} x float32[4]"
            )
            configs.append(
                {
                    "name": name,
                    "spec": {"kind": "sync", "leaves": leaves, "side": side,
                             "inner": size["inner"]},
                    "script": "_sync_worker.py",
                    "devices": 8,
                    "variants": ["treegraft", "device_put"],
                }
            )
        cases.append(
            {
                "id": "7_sync",
                "title": "7. Weight sync in memory: 8-way fsdp -> 2x4 tensor parallel, one glob "
                "rule",
                "configs": configs,
            }
        )
    return cases


# ---------------------------------------------------------------------------
# Summaries and aims.
# ---------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(config: dict) -> dict[str, dict]:
    """Per variant: medians over runs (time: first call; memory case: warm calls too)."""
    out = {}
    for variant, runs in config["runs"].items():
        ok = [r for r in runs if "error" not in r]
        row = {
            "runs": len(ok),
            "errors": [r["error"] for r in runs if "error" in r],
            "time_s": _median([r["time_s"] for r in ok]),
            "rchar": _median([r["rchar"] for r in ok]),
            "read_bytes": _median([r["read_bytes"] for r in ok]),
            "peak_rss": _median([r["peak_rss"] for r in ok]),
            # ru_maxrss is the peak since the process started: when the set-up
            # peaked higher than the command, the command's growth shows as 0.
            "peak_rss_delta": _median([max(0, r["peak_rss"] - r["rss_before"]) for r in ok]),
            "rss_before": _median([r["rss_before"] for r in ok]),
            "problems": sorted({r["problem"] for r in ok if r.get("problem")}),
        }
        warm = [t for r in ok for t in r["times_s"][1:]]
        if warm:
            row["warm_time_s"] = _median(warm)
        cached = [r["plan_metadata_cached_s"] for r in ok if "plan_metadata_cached_s" in r]
        if cached:
            row["plan_metadata_cached_s"] = _median(cached)
        out[variant] = row
    return out


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def evaluate(case: dict) -> list[dict]:
    """The aims of issue #6 for one case, each with the measured figure."""
    cid = case["id"]
    aims = []

    def aim(text, measured, met, row=None, config=None, note=""):
        aims.append(
            {
                "aim": text,
                "measured": measured,
                "met": bool(met) if met is not None else None,
                "row": row,
                "config": config,
                "note": note,
            }
        )

    if cid == "1_partial":
        for cfg in case["configs"]:
            s = cfg["summary"]
            tg, full, part = s.get("treegraft"), s.get("orbax_full"), s.get("orbax_partial")
            if not (tg and full and part) or tg["time_s"] is None:
                continue
            r_full = _ratio(full["time_s"], tg["time_s"])
            r_part = _ratio(tg["time_s"], part["time_s"])
            r_bytes = _ratio(tg["rchar"], cfg["mapped_bytes"])
            name = cfg["name"]
            aim(
                f">= 20x faster than (a) [{name}]",
                f"{r_full:.1f}x",
                r_full >= 20,
                "orbax_full",
                name,
            )
            aim(
                f"<= 1.15x the time of (b) [{name}]",
                f"{r_part:.2f}x",
                r_part <= 1.15,
                "orbax_partial",
                name,
            )
            aim(
                f"bytes read (rchar) <= 1.05x bytes mapped [{name}]",
                f"{r_bytes:.3f}x",
                r_bytes <= 1.05,
                "treegraft",
                name,
                f"read_bytes (disk) {_fmt_bytes(tg['read_bytes'])}, "
                f"mapped {_fmt_bytes(cfg['mapped_bytes'])}",
            )
    elif cid == "2_fanout":
        cfg = case["configs"][0]
        tg = cfg["summary"].get("treegraft")
        if tg and tg["rchar"] is not None:
            r = _ratio(tg["rchar"], cfg["mapped_bytes"])
            aim(
                f"bytes read ~1x the subtree, not {FANOUT}x (<= 1.1x)",
                f"{r:.3f}x",
                r <= 1.1,
                "treegraft",
                cfg["name"],
            )
    elif cid == "3_memory":
        cfg = case["configs"][0]
        s = cfg["summary"]
        tg, floor = s.get("treegraft"), s.get("floor")
        if tg and floor and tg["time_s"] is not None:
            warm = _ratio(tg.get("warm_time_s"), floor.get("warm_time_s"))
            first = _ratio(tg["time_s"], floor["time_s"])
            if warm is not None:
                aim(
                    "<= 3x one flatten_with_path + unflatten (warm calls)",
                    f"{warm:.2f}x",
                    warm <= 3,
                    "floor",
                    cfg["name"],
                )
            aim(
                "<= 3x one flatten_with_path + unflatten (first call in process)",
                f"{first:.2f}x",
                first <= 3,
                "floor",
                cfg["name"],
            )
    elif cid == "4_plan":
        cfg = case["configs"][0]
        s = cfg["summary"]
        tg, meta = s.get("treegraft"), s.get("orbax_metadata")
        if tg and tg["time_s"] is not None:
            aim(
                "plan time < 1 s",
                f"{tg['time_s']:.2f} s",
                tg["time_s"] < 1,
                "treegraft",
                cfg["name"],
                f"of which treegraft's own planning (metadata cached): "
                f"{tg.get('plan_metadata_cached_s', float('nan')):.2f} s",
            )
            if meta and meta["rchar"] is not None and tg["rchar"] is not None:
                extra = max(0, tg["rchar"] - meta["rchar"])
                aim(
                    "array bytes read = 0",
                    f"{_fmt_bytes(extra)} (rchar beyond orbax's metadata read)",
                    extra < 1024,
                    "treegraft",
                    cfg["name"],
                    f"rchar {_fmt_bytes(tg['rchar'])} vs {_fmt_bytes(cfg['array_bytes'])} of "
                    "array data in the checkpoint",
                )
    elif cid == "7_sync":
        for cfg in case["configs"]:
            s = cfg["summary"]
            tg, floor = s.get("treegraft"), s.get("device_put")
            if not (tg and floor) or tg["time_s"] is None:
                continue
            warm = _ratio(tg.get("warm_time_s"), floor.get("warm_time_s"))
            first = _ratio(tg["time_s"], floor["time_s"])
            if warm is not None:
                aim(
                    f"<= 1.25x jax.device_put of the same leaves (warm calls) [{cfg['name']}]",
                    f"{warm:.2f}x",
                    warm <= 1.25,
                    "device_put",
                    cfg["name"],
                    f"first call in process {first:.2f}x",
                )
    elif cid == "5_sharded":
        cfg = case["configs"][0]
        tg = cfg["summary"].get("treegraft")
        if tg and tg["peak_rss_delta"] is not None:
            r = _ratio(tg["peak_rss_delta"], cfg["mapped_bytes"])
            total = _ratio(tg["peak_rss"], cfg["mapped_bytes"])
            aim(
                "peak RSS / bytes grafted <= 1.1 (RSS growth during the graft; issue #25 "
                "row 6, was 1.25)",
                f"{r:.2f}",
                r <= 1.1,
                "treegraft",
                cfg["name"],
                f"whole-process peak RSS / bytes = {total:.2f} (includes "
                f"{_fmt_bytes(tg['rss_before'])} of interpreter, jax and orbax)",
            )
    elif cid == "6_scaling":
        full = [
            c
            for c in case["configs"]
            if c.get("ckpt_bytes") == max(x.get("ckpt_bytes", 0) for x in case["configs"])
        ]
        small = [c for c in case["configs"] if c not in full]
        t = {c["name"]: c["summary"].get("treegraft", {}).get("time_s") for c in case["configs"]}
        if len(full) >= 2 and small and None not in t.values():
            lo, hi = full[0], full[-1]
            r_time = _ratio(t[hi["name"]], t[lo["name"]])
            r_bytes = hi["mapped_bytes"] / lo["mapped_bytes"]
            aim(
                "time grows with bytes mapped (information)",
                f"{r_time:.1f}x time for {r_bytes:.0f}x bytes ({lo['name']} -> {hi['name']})",
                None,
                "treegraft",
                hi["name"],
            )
            s = small[0]
            r_size = _ratio(t[lo["name"]], t[s["name"]])
            aim(
                "same bytes mapped from an 8x larger checkpoint: time unchanged (<= 1.25x)",
                f"{r_size:.2f}x ({s['name']} -> {lo['name']})",
                r_size <= 1.25,
                "treegraft",
                lo["name"],
            )
            for c in case["configs"]:
                tg = c["summary"].get("treegraft")
                part = c["summary"].get("orbax_partial")
                if tg and part:
                    r = _ratio(tg["time_s"], part["time_s"])
                    aim(
                        f"<= 1.15x orbax partial restore [{c['name']}]",
                        f"{r:.2f}x",
                        r <= 1.15,
                        "orbax_partial",
                        c["name"],
                    )
    return aims


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt_time(t) -> str:
    if t is None:
        return "-"
    return f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"


def _status(a: dict, mode: str) -> str:
    if a["met"] is None:
        return "info"
    if mode == "quick":
        return "n/a"  # quick sizes are a smoke test: aims are not judged
    return "yes" if a["met"] else "NO"


def _spread(runs: list[dict], *, warm: bool) -> str:
    """The smallest and largest time over the runs (the warm calls for the memory case)."""
    times = [
        t
        for r in runs
        if "error" not in r
        for t in (r["times_s"][1:] if warm else r["times_s"][:1])
    ]
    if not times:
        return "-"
    return f"{_fmt_time(min(times))} - {_fmt_time(max(times))}"


def table_rows(results: dict) -> list[list[str]]:
    rows = [
        [
            "case",
            "config",
            "command",
            "median time",
            "min - max",
            "vs treegraft",
            "rchar",
            "read_bytes",
            "peak RSS (growth)",
            "aim",
            "met?",
        ]
    ]
    for case in results["cases"]:
        for cfg in case["configs"]:
            s = cfg["summary"]
            tg = s.get(TREEGRAFT, {})
            for variant in cfg["variants"]:
                r = s.get(variant)
                if r is None:
                    continue
                time_key = "warm_time_s" if "warm_time_s" in r else "time_s"
                t = r.get(time_key)
                ratio = _ratio(t, tg.get(time_key))
                label = LABELS[variant]
                if time_key == "warm_time_s":
                    label += f" [warm; first call {_fmt_time(r['time_s'])}]"
                if r["errors"]:
                    label += f" [{len(r['errors'])} failed]"
                aims = [
                    a for a in case["aims"] if a["row"] == variant and a["config"] == cfg["name"]
                ]
                aim_text = "; ".join(a["aim"].split(" [")[0] for a in aims)
                met = "; ".join(
                    f"{_status(a, results['mode'])}: {a['measured'].split(' (')[0]}" for a in aims
                )
                rows.append(
                    [
                        case["id"].split("_")[0],
                        cfg["name"],
                        label,
                        _fmt_time(t),
                        _spread(cfg["runs"][variant], warm=time_key == "warm_time_s"),
                        f"{ratio:.2f}x" if ratio is not None else "-",
                        _fmt_bytes(r["rchar"]),
                        _fmt_bytes(r["read_bytes"]),
                        f"{_fmt_bytes(r['peak_rss'])} (+{_fmt_bytes(r['peak_rss_delta'])})",
                        aim_text,
                        met,
                    ]
                )
    return rows


def render_table(rows: list[list[str]], markdown: bool = False) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pool(paths: list[str]) -> dict:
    """Merges the runs of several result files (same mode) into the first one's report.

    Runs are matched by case, config and command; medians and aims are
    recomputed over all of them. The machine and load fields stay the first
    file's; `pooled_from` lists each file with its start time and load.
    """
    loaded = []
    for path in paths:
        with open(path) as f:
            loaded.append(json.load(f))
    results = loaded[0]
    if len(loaded) == 1:
        return results
    modes = {r["mode"] for r in loaded}
    if len(modes) > 1:
        raise SystemExit(f"cannot pool results of different modes: {sorted(modes)}")
    for other in loaded[1:]:
        by_id = {(c["id"], cfg["name"]): cfg for c in other["cases"] for cfg in c["configs"]}
        for case in results["cases"]:
            for cfg in case["configs"]:
                theirs = by_id.get((case["id"], cfg["name"]))
                if theirs is None:
                    continue
                for variant, runs in theirs["runs"].items():
                    cfg["runs"].setdefault(variant, []).extend(runs)
    for case in results["cases"]:
        for cfg in case["configs"]:
            cfg["summary"] = summarize(cfg)
        case["aims"] = evaluate(case)
    results["pooled_from"] = [
        {
            "file": p,
            "started": r.get("started"),
            "load_before": r.get("load_before"),
            "load_after": r.get("load_after"),
            "wall_s": r.get("wall_s"),
        }
        for p, r in zip(paths, loaded, strict=True)
    ]
    results["sizes"] = dict(results["sizes"], repeats=sum(r["sizes"]["repeats"] for r in loaded))
    results["command"] = "python benchmarks/run.py --report " + " ".join(paths)
    results["wall_s"] = sum(r.get("wall_s", 0) for r in loaded)
    results["load_after"] = loaded[-1]["load_after"]
    return results


def print_report(results: dict) -> None:
    """Prints the table, the aims and the machine to stdout."""
    for name, extra in results.get("extra", {}).items():
        print(f"case {name}:")
        if "failed" in extra:
            print(f"FAILED (exit {extra['failed']}): {extra.get('stderr', '')}")
        else:
            print(extra.get("report") or json.dumps(extra, indent=1, default=str))
    mode = results["mode"]
    print(render_table(table_rows(results)))
    print()
    print("Aims:")
    for case in results["cases"]:
        for a in case["aims"]:
            met = {"yes": "met", "NO": "MISSED"}.get(_status(a, mode), _status(a, mode))
            note = f"  ({a['note']})" if a["note"] else ""
            print(
                f"  [{met:>6}] case {case['id'].split('_')[0]}: {a['aim']}: {a['measured']}{note}"
            )
    m = results["machine"]
    print(
        f"\nmachine: {m['nproc']} CPUs ({m.get('cpu_model')}), "
        f"{_fmt_bytes(m.get('memory_total'))} RAM; python {m['python']}, jax {m['jax']}, "
        f"orbax-checkpoint {m['orbax-checkpoint']}, tensorstore {m['tensorstore']}"
    )
    print(
        f"load average before {_fmt_load(results['load_before'])}, after "
        f"{_fmt_load(results['load_after'])}; wall {results['wall_s']:.0f} s; mode {mode}, "
        f"{results['sizes']['repeats']} repeat(s); command: {results['command']}"
    )
    if mode == "quick":
        print(
            "(--quick: small sizes, a smoke test; the timings are not measurements and the "
            "aims are not judged)"
        )


def _fmt_load(load) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def write_markdown(results: dict, path: str) -> None:
    """The results table and the aims as markdown (for docs/benchmarks.md)."""
    mode = results["mode"]
    rows = [r[:9] for r in table_rows(results)]
    aims = [["case", "aim", "measured", "met?"]]
    for case in results["cases"]:
        for a in case["aims"]:
            measured = a["measured"] + (f" ({a['note']})" if a["note"] else "")
            aims.append([case["id"].split("_")[0], a["aim"], measured, _status(a, mode)])
    with open(path, "w") as f:
        f.write(
            render_table(rows, markdown=True) + "\n\n" + render_table(aims, markdown=True) + "\n"
        )


def machine_info(tmp: str) -> dict:
    info: dict = {
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
    except OSError:
        info["cpu_model"] = platform.processor() or None
    try:
        with open("/proc/meminfo") as f:
            mem = dict(line.split(":", 1) for line in f)
        info["memory_total"] = int(mem["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError):
        info["memory_total"] = None
    for pkg in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy", "optree", "treegraft"):
        try:
            info[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        st = os.statvfs(tmp)
        info["tmp_free"] = st.f_bavail * st.f_frsize
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
        best = max(
            (m for m in mounts if os.path.abspath(tmp).startswith(m[1])),
            key=lambda m: len(m[1]),
            default=None,
        )
        info["tmp_filesystem"] = f"{best[2]} on {best[1]}" if best else None
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def build_data(root: str, size: dict, selected: list[str], timeout: float) -> dict:
    """Writes the checkpoints the selected cases need (one subprocess for all)."""
    data = {
        "big": os.path.join(root, "big"),
        "small": os.path.join(root, "small"),
        "many": os.path.join(root, "many"),
    }
    needs = {
        "big": {"partial", "fanout", "sharded", "scaling"},
        "small": {"scaling"},
        "many": {"plan"},
    }
    specs = {
        "big": {
            "kind": "arrays",
            "workdir": data["big"],
            "n": size["n_arrays"],
            "side": size["side"],
        },
        "small": {
            "kind": "arrays",
            "workdir": data["small"],
            "n": size["small_arrays"],
            "side": size["side"],
            "seed": 1,
        },
        "many": {
            "kind": "many",
            "workdir": data["many"],
            "blocks": size["many_blocks"],
            "per": size["many_per"],
            "leaf": size["many_leaf"],
        },
    }
    built: dict = {}
    todo = {}
    for key, spec in specs.items():
        if not needs[key] & set(selected):
            continue
        if os.path.isdir(os.path.join(spec["workdir"], "checkpoints")):
            built[key] = {"reused": True}
        else:
            todo[key] = spec
    if todo:
        _log(
            "building "
            + ", ".join(
                f"{k} {json.dumps({a: b for a, b in v.items() if a != 'workdir'})}"
                for k, v in todo.items()
            )
        )
        t0 = time.perf_counter()
        out = _run_script("_build.py", {"build": todo}, timeout=timeout)
        for key, info in out.items():
            built[key] = info
            _log(
                f"  {key}: {info['leaves']:,} leaves, {_fmt_bytes(info['disk_bytes'])} on "
                f"disk, saved in {info['save_s']:.1f} s"
            )
        _log(f"  built in {time.perf_counter() - t0:.1f} s")
    return {"paths": data, "built": built}


def warm_page_cache(root: str) -> None:
    """Reads every file under root once, so that a "warm cache" run finds them cached."""
    buf = bytearray(8 * MIB)
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def run_case(case: dict, repeats: int, *, jobs: int, timeout: float) -> int:
    """Runs every (repeat, config, variant) of a case; returns how many failed.

    Within each repeat the compared commands alternate (their order reverses
    every other repeat). With jobs > 1 (only for --quick) several run at once,
    which makes the timings meaningless but the smoke test faster.
    """
    tasks = []
    for rep in range(repeats):
        for cfg in case["configs"]:
            order = cfg["variants"] if rep % 2 == 0 else cfg["variants"][::-1]
            tasks += [(rep, cfg, variant) for variant in order]

    def one(task):
        rep, cfg, variant = task
        spec = dict(cfg["spec"], variant=variant)
        if cfg.get("evict"):
            spec["evicted"] = evict_page_cache(cfg["evict"])
        elif cfg["spec"].get("workdir"):
            warm_page_cache(cfg["spec"]["workdir"])
        where = f"  [{rep + 1}/{repeats}] {cfg['name']}: {variant}"
        try:
            r = _run_script(
                cfg.get("script", "_worker.py"), spec, devices=cfg.get("devices", 1),
                timeout=timeout,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            _log(f"{where} FAILED: {e}")
            return {"error": str(e)}
        _log(
            f"{where} {_fmt_time(r['time_s'])} rchar {_fmt_bytes(r['rchar'])} read_bytes "
            f"{_fmt_bytes(r['read_bytes'])} peak {_fmt_bytes(r['peak_rss'])}"
            + (f" PROBLEM: {r['problem']}" if r.get("problem") else "")
        )
        return r

    for cfg in case["configs"]:
        cfg["runs"] = {v: [] for v in cfg["variants"]}
    if jobs > 1:
        with ThreadPoolExecutor(jobs) as pool:
            outs = list(pool.map(one, tasks))
    else:
        outs = [one(t) for t in tasks]
    failures = 0
    for (_, cfg, variant), r in zip(tasks, outs, strict=True):
        cfg["runs"][variant].append(r)
        failures += "error" in r or bool(r.get("problem"))
    return failures


def run_extra(name: str, *, quick: bool, repeats: int | None, root: str) -> dict:
    """Runs a case that has a script of its own; returns its JSON (with its report)."""
    out = os.path.join(root, f"{name}.json")
    cmd = [sys.executable, os.path.join(HERE, EXTRA[name]), "--json", out]
    cmd += ["--quick"] if quick else []
    cmd += ["--repeats", str(repeats)] if repeats else []
    _log(f"\ncase {name}: {' '.join(cmd[1:])}")
    done = subprocess.run(cmd, env=_env(8), capture_output=True, text=True)
    if done.returncode != 0:
        return {"failed": done.returncode, "stderr": done.stderr[-4000:]}
    with open(out) as f:
        return json.load(f)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark treegraft against what users would do instead."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and 1 repeat: a smoke test, not a measurement",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per command (default: 5, or 1 with --quick)"
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES + tuple(EXTRA)),
        help=f"comma-separated subset of {','.join(CASES + tuple(EXTRA))}",
    )
    parser.add_argument(
        "--json",
        default=os.path.join(HERE, "results.json"),
        help="where to write the results (default: benchmarks/results.json)",
    )
    parser.add_argument(
        "--markdown", default=None, help="also write the table as markdown to this file"
    )
    parser.add_argument(
        "--tmpdir", default=None, help="parent of the data directory (default: the system temp dir)"
    )
    parser.add_argument(
        "--data", default=None, help="use (and keep) this data directory, building what is missing"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="commands run at once (default 1; 2 with --quick, whose timings "
        "mean nothing anyway); use 1 for measurements",
    )
    parser.add_argument(
        "--report",
        default=None,
        nargs="+",
        metavar="JSON",
        help="only print (and with --markdown, write) the report of earlier runs' JSON files; "
        "several files are pooled: their runs are merged and the medians and aims recomputed",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed per subprocess"
    )
    args = parser.parse_args(argv)

    if args.report:
        results = pool(args.report)
        print_report(results)
        if args.markdown:
            write_markdown(results, args.markdown)
        return 0

    mode = "quick" if args.quick else "full"
    size = dict(SIZES[mode])
    if args.repeats is not None:
        size["repeats"] = args.repeats
    jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    selected = [c.strip() for c in args.cases.split(",") if c.strip()]
    extra = [c for c in selected if c in EXTRA]
    selected = [c for c in selected if c not in EXTRA]
    unknown = set(selected) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {','.join(CASES)}")

    command = "python benchmarks/run.py" + (
        " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    root = args.data or tempfile.mkdtemp(prefix="treegraft-bench-", dir=args.tmpdir)
    os.makedirs(root, exist_ok=True)
    started = time.time()
    results: dict = {
        "command": command,
        "mode": mode,
        "sizes": size,
        "jobs": jobs,
        "machine": machine_info(root),
        "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
    }
    failures = 0
    try:
        data = build_data(root, size, selected, args.timeout)
        results["data"] = data["built"]
        cases = build_cases(data["paths"], size, selected, quick=args.quick)
        for case in cases:
            _log(f"\n{case['title']}")
            case["load_before"] = os.getloadavg()
            failures += run_case(case, size["repeats"], jobs=jobs, timeout=args.timeout)
            for cfg in case["configs"]:
                cfg["summary"] = summarize(cfg)
            case["aims"] = evaluate(case)
            case["load_after"] = os.getloadavg()
        results["cases"] = cases
        results["extra"] = {
            name: run_extra(name, quick=args.quick, repeats=args.repeats, root=root)
            for name in extra
        }
    finally:
        if args.data is None:
            shutil.rmtree(root, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.time() - started

    print_report(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"results written to {args.json}")
    if args.markdown:
        write_markdown(results, args.markdown)
    if failures:
        print(f"{failures} run(s) failed or gave a wrong result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
