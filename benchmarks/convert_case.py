"""Case convert: the write side (issue #23 item 10) against what users write today.

    python benchmarks/convert_case.py            # 1, 2 and 4 GiB of 16 MiB tensors, 3 repeats
    python benchmarks/convert_case.py --quick    # 4 MiB of 256 KiB tensors, 1 repeat

Data: one safetensors file per size, float32 tensors of random bits, written
with the format's own layout one tensor at a time (never the whole model in
memory), under `--data` (default /tmp/bench-data/convert, reused when present;
--quick builds in a temporary folder, deleted at the end). Every output is
deleted after its run.

Every measured command runs in a fresh process; the compared commands
alternate within each repeat (their order reversed every other repeat). Peak
RSS growth is VmHWM (reset through /proc/self/clear_refs just before the
command) minus VmRSS at that moment, after imports and set-up.

  convert  the safetensors file to an orbax item:
           treegraft  `tg.convert(tg.SafetensorsCheckpoint(f), dest, {"": ""},
                      format="orbax", max_host_bytes=64 MiB)`;
           naive      `safetensors.numpy.load_file(f)`, then
                      `ocp.StandardCheckpointer().save(dest, arrays)` + wait (its
                      save alone is timed too: orbax's own save of the same arrays
                      already in memory);
           cp         `cp f dest` (the floor: the same bytes, no format), and
                      `sync dest` after it, timed apart (treegraft and orbax write
                      through tensorstore, which syncs its files; cp does not).
                      GNU cp copies in the kernel (copy_file_range): no byte
                      crosses into user space;
           readwrite  the floor of any user-space converter: the file read in
                      16 MiB blocks into a buffer and written out, then fsynced.
           Aims: treegraft's peak RSS growth under 256 MiB at every size and flat
           across sizes (largest minus smallest under the 64 MiB budget);
           throughput at least 0.7x cp's.
  export   a 1 GiB state of `jax.Array`s sharded over 8 CPU devices to
           safetensors: `tg.save(state, dest, format="safetensors",
           max_host_bytes=64 MiB)` against `safetensors.numpy.save_file` of the
           gathered arrays (`np.asarray` of each; the fsync of its file timed
           apart, as treegraft syncs what it writes). Aim: peak RSS growth under
           256 MiB (the budget plus a few chunks); the time is reported beside
           save_file's.

Prints a report; `--json` writes it with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB, GIB = 2**20, 2**30
DEFAULT_DATA = "/tmp/bench-data/convert"
SIZES = {
    "full": {"sizes": [1 * GIB, 2 * GIB, 4 * GIB], "tensor": 16 * MIB, "budget": 64 * MIB,
             "export": 1 * GIB, "aim_growth": 256 * MIB, "repeats": 3},
    # One size: a smoke test of every command (about 15 s), no measurement.
    "quick": {"sizes": [4 * MIB], "tensor": 256 * 2**10, "budget": 1 * MIB,
              "export": 4 * MIB, "aim_growth": 4 * MIB, "repeats": 1},
}
CONVERT = ("treegraft", "naive", "cp", "readwrite")
EXPORT = ("treegraft", "save_file")
AIM_CP = 0.7  # treegraft's throughput / cp's, at least
# Memory the naive recipe takes per byte of model, with a margin (measured: 3.0x at 1 GiB).
NAIVE_PEAK = 3.5


# ----------------------------------------------------------------------------
# Data: a safetensors file written tensor by tensor.
# ----------------------------------------------------------------------------


def tensor_shape(tensor_bytes: int) -> tuple[int, int]:
    """A float32 matrix of tensor_bytes: 16 MiB is [2048, 2048]."""
    n = tensor_bytes // 4
    rows = 1 << ((n.bit_length() - 1) // 2)
    return rows, n // rows


def random_bits(rng, nbytes: int):
    """nbytes of random bits as a byte array (every float32 pattern, NaNs included)."""
    import numpy as np

    return rng.bit_generator.random_raw(nbytes // 8).view(np.uint8)


def build_file(path: str, size: int, tensor_bytes: int, seed: int) -> None:
    """Writes size bytes of float32 tensors as a safetensors file, one tensor in memory at once."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = tensor_shape(tensor_bytes)
    header: dict = {"__metadata__": {"format": "pt"}}
    for i in range(size // tensor_bytes):
        header[f"tensor_{i:04d}"] = {"dtype": "F32", "shape": list(shape),
                                     "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _ in range(size // tensor_bytes):
            f.write(random_bits(rng, tensor_bytes))
    os.replace(partial, path)  # a file that exists is complete: reused by later runs


def source_file(data: str, size: int) -> str:
    return os.path.join(data, f"model-{size // MIB}MiB.safetensors")


def ensure_data(data: str, sizes: list[int], tensor_bytes: int) -> list[str]:
    """Builds the files that are missing; returns what was built."""
    os.makedirs(data, exist_ok=True)
    built = []
    for k, size in enumerate(sizes):
        path = source_file(data, size)
        if not os.path.exists(path):
            build_file(path, size, tensor_bytes, seed=k)
            built.append(path)
    return built


# ----------------------------------------------------------------------------
# In the worker process.
# ----------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Measure:
    """Wall time and peak RSS growth of the region it wraps, after a gc."""

    def __enter__(self) -> Measure:
        import ctypes
        import gc

        gc.collect()
        # Freed set-up buffers go back to the system, so that reusing them cannot hide growth.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        _reset_peak()
        self.rss_before = _status("VmRSS")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.time_s = time.perf_counter() - self.start
        self.peak_growth = _status("VmHWM") - self.rss_before


def _last_tensor_equal(src: str, read_back) -> bool:
    """The source's last tensor against what the output holds under its name (outside timing)."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(src, framework="np") as f:
        name = sorted(f.keys())[-1]
        want = f.get_tensor(name)
    got = read_back(name, want)
    return bool(np.array_equal(want.view(np.uint32), np.asarray(got).view(np.uint32)))


def _read_write(src: str, dest: str, block: int) -> None:
    """The same bytes through a user-space buffer, block by block, synced: no format, no copy."""
    with open(src, "rb", buffering=0) as f, open(dest, "wb", buffering=0) as g:
        while data := f.read(block):
            g.write(data)
        os.fsync(g.fileno())


def convert_worker(spec: dict) -> dict:
    src, dest, variant = spec["source"], spec["dest"], spec["variant"]
    if variant == "readwrite":  # no library: nothing to import
        with Measure() as m:
            _read_write(src, dest, spec["tensor"])
        return {"time_s": m.time_s, "peak_growth": m.peak_growth, "rss_before": m.rss_before,
                "bytes": os.path.getsize(src), "ok": os.path.getsize(dest) == os.path.getsize(src)}
    import jax  # noqa: F401  (imported before measuring, as in a user's script)
    import numpy as np
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    import treegraft as tg

    out: dict = {}
    if variant == "treegraft":
        source = tg.SafetensorsCheckpoint(src)
        with Measure() as m:
            tg.convert(source, dest, {"": ""}, format="orbax", max_host_bytes=spec["budget"])
    elif variant == "naive":
        with Measure() as m:
            arrays = load_file(src)
            out["load_s"] = time.perf_counter() - m.start
            saved = time.perf_counter()
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(dest, arrays)
            checkpointer.wait_until_finished()
            out["save_s"] = time.perf_counter() - saved
        checkpointer.close()
        del arrays
    else:
        raise SystemExit(f"unknown variant {variant}")

    def read_back(name, want):
        like = {name: jax.ShapeDtypeStruct(want.shape, want.dtype)}
        got = tg.graft(like, tg.OrbaxCheckpoint(dest), {name: name})[name]
        return np.asarray(got)

    out.update(time_s=m.time_s, peak_growth=m.peak_growth, rss_before=m.rss_before,
               bytes=os.path.getsize(src), ok=_last_tensor_equal(src, read_back))
    return out


def export_worker(spec: dict) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from safetensors import safe_open
    from safetensors.numpy import save_file

    import treegraft as tg

    if jax.device_count() != 8:
        raise SystemExit(f"export needs 8 devices, got {jax.device_count()}")
    sharding = NamedSharding(jax.make_mesh((8,), ("x",)), PartitionSpec("x"))
    shape = tensor_shape(spec["tensor"])
    rng = np.random.default_rng(7)
    state = {}
    for i in range(spec["size"] // spec["tensor"]):
        host = random_bits(rng, spec["tensor"]).view(np.float32).reshape(shape)
        state[f"layer_{i:03d}"] = {"w": jax.device_put(host, sharding)}
        del host
    jax.block_until_ready(state)
    dest, variant = spec["dest"], spec["variant"]
    out: dict = {}
    if variant == "treegraft":
        with Measure() as m:
            tg.save(state, dest, format="safetensors", max_host_bytes=spec["budget"])
        file = os.path.join(dest, "model.safetensors")
    elif variant == "save_file":
        os.makedirs(dest)
        file = os.path.join(dest, "model.safetensors")
        with Measure() as m:
            save_file({f"{k}.w": np.asarray(v["w"]) for k, v in state.items()}, file,
                      metadata={"format": "pt"})
        start = time.perf_counter()
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        out["fsync_s"] = time.perf_counter() - start
    else:
        raise SystemExit(f"unknown variant {variant}")
    last = sorted(state)[-1]
    with safe_open(file, framework="np") as f:
        got = f.get_tensor(f"{last}.w")
    want = np.asarray(state[last]["w"])
    out.update(time_s=m.time_s, peak_growth=m.peak_growth, rss_before=m.rss_before,
               bytes=spec["size"],
               ok=bool(np.array_equal(got.view(np.uint32), want.view(np.uint32))))
    return out


# ----------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _worker_run(spec: dict, devices: int) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        env=_env(devices), capture_output=True, text=True, timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['case']} {spec['variant']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cp_run(src: str, dest: str) -> dict:
    start = time.perf_counter()
    subprocess.run(["cp", src, dest], check=True)
    copied = time.perf_counter()
    subprocess.run(["sync", dest], check=True)
    synced = time.perf_counter()
    return {"time_s": copied - start, "sync_s": synced - copied, "bytes": os.path.getsize(src),
            "ok": os.path.getsize(dest) == os.path.getsize(src)}


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(case: str, variant: str, size: int, sizes: dict, data: str) -> dict:
    """One measured command in a fresh process; its output deleted afterwards."""
    dest = os.path.join(data, f"out-{os.getpid()}-{case}-{variant}")
    _remove(dest)
    try:
        if case == "convert" and variant == "cp":
            return _cp_run(source_file(data, size), dest)
        if case == "convert" and variant == "naive" and _available() < NAIVE_PEAK * size:
            # The machine is shared: the naive recipe's peak would push others out.
            return {"skipped": f"{_fmt(_available())} available, the naive recipe needs about "
                               f"{_fmt(NAIVE_PEAK * size)}"}
        spec = {"case": case, "variant": variant, "dest": dest, "budget": sizes["budget"],
                "tensor": sizes["tensor"], "size": size, "source": source_file(data, size)}
        return _worker_run(spec, 8 if case == "export" else 1)
    finally:
        _remove(dest)


def measure(data: str, sizes: dict, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {}
    for k in range(repeats):
        steps = [("convert", v, s) for s in sizes["sizes"] for v in CONVERT]
        steps += [("export", v, sizes["export"]) for v in EXPORT]
        for case, variant, size in (steps if k % 2 == 0 else list(reversed(steps))):
            key = f"{case}/{size // MIB}MiB/{variant}"
            r = run_one(case, variant, size, sizes, data)
            r["load"] = os.getloadavg()[0]
            runs.setdefault(key, []).append(r)
            print(f"  {key}: {r}", file=sys.stderr, flush=True)
    return runs


def _med(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(values) if values else None


def evaluate(runs: dict, sizes: dict) -> dict:
    """Medians per variant and the aims, each with its measured figure."""
    med = {key: {f: _med(rs, f) for f in ("time_s", "peak_growth", "load_s", "save_s", "sync_s",
                                          "fsync_s", "bytes")}
           for key, rs in runs.items()}
    ok = all(r.get("ok") for rs in runs.values() for r in rs if "skipped" not in r)
    aims = []

    def aim(text, measured, met, note=""):
        aims.append({"aim": text, "measured": measured, "met": met, "note": note})

    budget, bar = sizes["budget"], sizes["aim_growth"]
    growths = []
    for size in sizes["sizes"]:
        tg = med[f"convert/{size // MIB}MiB/treegraft"]
        naive = med[f"convert/{size // MIB}MiB/naive"]
        cp = med[f"convert/{size // MIB}MiB/cp"]
        label = _fmt(size)
        growths.append(tg["peak_growth"])
        skipped = next((r["skipped"] for r in runs[f"convert/{size // MIB}MiB/naive"]
                        if "skipped" in r), None)
        naive_growth = (f"{_fmt(naive['peak_growth'])} = {naive['peak_growth'] / size:.2f}x "
                        "the model" if naive["peak_growth"] is not None else f"skipped: {skipped}")
        aim(f"convert {label}: treegraft peak RSS growth < {_fmt(bar)}",
            _fmt(tg["peak_growth"]), tg["peak_growth"] < bar,
            f"naive load_file + orbax save: {naive_growth}")
        thr = cp["time_s"] / tg["time_s"]
        aim(f"convert {label}: throughput >= {AIM_CP}x cp's", f"{thr:.2f}x", thr >= AIM_CP,
            f"treegraft {size / tg['time_s'] / MIB:.0f} MiB/s, cp {size / cp['time_s'] / MIB:.0f}"
            f" MiB/s ({size / (cp['time_s'] + cp['sync_s']) / MIB:.0f} MiB/s with sync)")
        rw = med[f"convert/{size // MIB}MiB/readwrite"]
        aim(f"convert {label}: throughput / user-space read+write's (information)",
            f"{rw['time_s'] / tg['time_s']:.2f}x", None,
            f"read+write+fsync {size / rw['time_s'] / MIB:.0f} MiB/s = "
            f"{cp['time_s'] / rw['time_s']:.2f}x cp's")
        if naive["save_s"] is not None:
            aim(f"convert {label}: time / orbax's own save of the arrays in memory "
                "(information)", f"{tg['time_s'] / naive['save_s']:.2f}x", None,
                f"treegraft {tg['time_s']:.2f} s, orbax save {naive['save_s']:.2f} s, naive "
                f"total {naive['time_s']:.2f} s")
    spread = max(growths) - min(growths)
    aim(f"convert: peak RSS growth flat across sizes (largest - smallest < {_fmt(budget)})",
        _fmt(spread), spread < budget,
        " / ".join(f"{_fmt(s)}: {_fmt(g)}" for s, g in zip(sizes["sizes"], growths, strict=True)))
    ex = sizes["export"]
    tg = med[f"export/{ex // MIB}MiB/treegraft"]
    sf = med[f"export/{ex // MIB}MiB/save_file"]
    aim(f"export {_fmt(ex)} over 8 devices: treegraft peak RSS growth < {_fmt(bar)}",
        _fmt(tg["peak_growth"]), tg["peak_growth"] < bar,
        f"save_file of the gathered arrays: {_fmt(sf['peak_growth'])}")
    aim(f"export {_fmt(ex)}: time / safetensors.numpy.save_file (information)",
        f"{tg['time_s'] / sf['time_s']:.2f}x", None,
        f"treegraft {tg['time_s']:.2f} s (fsynced), save_file {sf['time_s']:.2f} s "
        f"+ fsync {sf['fsync_s']:.2f} s = {(tg['time_s'] / (sf['time_s'] + sf['fsync_s'])):.2f}x")
    return {"medians": med, "values_agree": ok, "aims": aims}


def _fmt(n: float | None) -> str:
    if n is None:
        return "-"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def report(result: dict) -> str:
    lines = [f"{'command':<34} {'time':>9} {'MiB/s':>7} {'peak RSS growth':>16}"]
    for key, m in result["medians"].items():
        if m["time_s"] is None:
            lines.append(f"{key:<34} skipped: {result['runs'][key][0]['skipped']}")
            continue
        rate = m["bytes"] / m["time_s"] / MIB if m["time_s"] else 0
        extra = ""
        if m.get("save_s") is not None:
            extra = f"  (load {m['load_s']:.2f} s, orbax save {m['save_s']:.2f} s)"
        if m.get("sync_s") is not None:
            extra = f"  (+ sync {m['sync_s']:.2f} s)"
        if m.get("fsync_s") is not None:
            extra = f"  (+ fsync {m['fsync_s']:.2f} s)"
        growth = _fmt(m["peak_growth"]) if m.get("peak_growth") is not None else "-"
        lines.append(f"{key:<34} {m['time_s']:8.2f}s {rate:7.0f} {growth:>16}{extra}")
    agree = result["values_agree"]
    lines.append(f"outputs equal to the source (last tensor, bit for bit): {agree}")
    for a in result["aims"]:
        met = {True: "met", False: "MISSED", None: "info"}[a["met"]]
        lines.append(f"aim [{met}] {a['aim']}: {a['measured']}  ({a['note']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--data", default=None,
                        help=f"data folder, reused when present (default {DEFAULT_DATA}; "
                             "--quick: a temporary folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        work = convert_worker if spec["case"] == "convert" else export_worker
        print(json.dumps(work(spec)))
        return 0
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    repeats = args.repeats or sizes["repeats"]
    temporary = args.data is None and args.quick
    data = tempfile.mkdtemp(prefix="treegraft-convert-") if temporary else (
        args.data or DEFAULT_DATA)
    try:
        start = time.perf_counter()
        built = ensure_data(data, sizes["sizes"], sizes["tensor"])
        print(f"data at {data}: built {len(built)} file(s) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
        load_before = os.getloadavg()
        runs = measure(data, sizes, repeats)
        result = evaluate(runs, sizes)
        if args.quick:  # a smoke test: too small to measure anything, so nothing is judged
            result["aims"] = [{**a, "met": None} for a in result["aims"]]
    finally:
        if temporary:
            shutil.rmtree(data, ignore_errors=True)
    result.update(mode=mode, repeats=repeats, load_before=load_before,
                  load_after=os.getloadavg(), runs=runs)
    text = report(result)
    text += (f"\nload average before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
             f"{'/'.join(f'{x:.2f}' for x in result['load_after'])}; {repeats} repeat(s), {mode}")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "report": text}, f, indent=1, default=str)
    return 0 if result["values_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
