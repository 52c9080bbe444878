"""Storage benchmarks: treegraft's tensorstore reader against tensorstore and orbax.

    python benchmarks/storage_cases.py [--quick] [--repeats N] [--json out.json]
    python benchmarks/run.py --cases storage [--quick]      # the same, from run.py

Runs in one process with 8 CPU devices; compared commands alternate within
each repeat; medians are reported with ratios. Cases:

  S1 one 4 MiB array of a 256 MiB Kauldron checkpoint, warm page cache: treegraft
     (graft with a fresh KauldronCheckpoint, plan included), tensorstore's own
     open + read + device_put of that array (the floor), orbax's exact partial
     restore, and treegraft with its orbax fallback.
  S2 an array of 1 GiB (quick: 64 MiB) into a target sharded over 8 devices,
     each variant in a fresh process: time, bytes read from files (rchar) and
     peak RSS growth per byte grafted; treegraft's reader against tensorstore's
     full read + device_put (the floor) and against treegraft's orbax fallback.
  S3 one layer [i] of a stacked array saved with one chunk per layer, and of one
     saved as a single chunk: bytes read per byte of the layer (read_boxes).
  S4 a partial read from the GCS emulator (fake-gcs-server on 127.0.0.1): bytes
     served by the storage (tensorstore's kvstore metrics) per byte mapped, and
     time against orbax's partial restore of the same array through gcsfs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

MIB = 1 << 20


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _write_layers(path: str, n: int, side: int, *, step: int = 1) -> None:
    """A Kauldron run whose params are n float32[side, side] arrays."""
    from kauldron_run import train_state, write_run

    rng = np.random.default_rng(0)
    params = {f"l{i}": jnp.asarray(rng.standard_normal((side, side), dtype=np.float32))
              for i in range(n)}
    write_run(path, {step: train_state(params, step=step)}, timer=False, ds_iter=False)


_REPEATS: int | None = None  # --repeats: overrides each case's own count


def _timed(variants: dict, repeats: int) -> dict[str, float]:
    repeats = _REPEATS or repeats
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up: imports, page cache
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _orbax_partial(item: str, name: str, like) -> None:
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        from etils import epath

        path = epath.Path(item)
        handler.restore(path, args=ocp.args.PyTreeRestore(
            item={"params": {name: 0}},
            restore_args={"params": {name: ocp.ArrayRestoreArgs(
                sharding=like.sharding, global_shape=like.shape, dtype=like.dtype)}},
            partial_restore=True,
        ))
    finally:
        handler.close()


def _ts_read(item: str, name: str, like, base: dict | None = None) -> None:
    import tensorstore as ts

    base = base or {"driver": "file", "path": item + "/"}
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base,
                                                  "path": f"params.{name}"}}).result()
    jax.device_put(arr.read().result(), like.sharding).block_until_ready()


def case_s1(root: str, quick: bool) -> dict:
    import treegraft as tg

    n, side, repeats = (16, 256, 3) if quick else (64, 1024, 15)
    wd = os.path.join(root, "s1")
    _write_layers(wd, n, side)
    name = f"l{n * 37 // 64}"
    item = os.path.join(wd, "checkpoints", "ckpt_1", "default")
    like = jax.ShapeDtypeStruct((side, side), jnp.float32,
                                sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    target = {"params": {name: like}}

    def treegraft(direct=True):
        src = tg.KauldronCheckpoint(wd)
        src.metadata()
        if not direct:
            src._inner._direct_reads = False
        out = tg.graft(target, src, {f"params.{name}": f"params.{name}"})
        out["params"][name].block_until_ready()

    medians = _timed({
        "treegraft": treegraft,
        "tensorstore": lambda: _ts_read(item, name, like),
        "orbax_partial": lambda: _orbax_partial(item, name, like),
        "treegraft_orbax_fallback": lambda: treegraft(direct=False),
    }, repeats)
    return {
        "title": f"S1 one {side * side * 4 / MIB:g} MiB array of a "
                 f"{n * side * side * 4 / MIB:.0f} MiB checkpoint, in-process, warm",
        "median_s": medians,
        "ratio_vs_tensorstore": medians["treegraft"] / medians["tensorstore"],
        "orbax_over_treegraft": medians["orbax_partial"] / medians["treegraft"],
        "repeats": repeats,
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _s2_one(path: str, side: int, variant: str) -> dict:
    """One S2 variant, in this (fresh) process: seconds, bytes read, peak RSS growth."""
    import tensorstore as ts
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import treegraft as tg

    mesh = jax.make_mesh((8,), ("x",))
    like = jax.ShapeDtypeStruct((side, side), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    src = tg.OrbaxCheckpoint(path)
    src.metadata()
    src._direct_reads = variant == "treegraft"
    jax.device_put(np.zeros(8), like.sharding).block_until_ready()  # backend up
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    rss, before, start = _rss(), rchar(), time.perf_counter()
    if variant == "tensorstore":
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt",
                "base": {"driver": "file", "path": path + "/"}, "path": "w"}}
        host = ts.open(spec).result().read().result()
        out = jax.device_put(host, like.sharding)
    else:
        out = tg.graft({"w": like}, src, {"w": "w"})["w"]
    out.block_until_ready()
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"seconds": seconds, "bytes_read": rchar() - before, "rss_growth": peak - rss}


def case_s2(root: str, quick: bool) -> dict:
    import subprocess

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from kauldron_run import write_item

    side = 4096 if quick else 16384  # float32: 64 MiB or 1 GiB
    rng = np.random.default_rng(1)
    host = rng.standard_normal((side, side), dtype=np.float32)
    grafted = side * side * 4
    out: dict = {"title": f"S2 {grafted / MIB:.0f} MiB into a target sharded over 8 devices "
                          "(each variant in a fresh process)", "bytes_grafted": grafted}
    layouts = {
        # Saved from one device: one chunk, which every target shard slices.
        "one_chunk": jax.device_put(host, jax.devices()[0]),
        # Saved by an 8-device run sharded like the target: a chunk per shard.
        "chunk_per_shard": jax.device_put(host, NamedSharding(jax.make_mesh((8,), ("x",)),
                                                              P("x"))),
    }
    del host
    for layout, array in layouts.items():
        wd = os.path.join(root, f"s2-{layout}")
        write_item(wd, {"w": array})
        rows = out[layout] = {}
        for variant in ("treegraft", "tensorstore", "treegraft_orbax_fallback"):
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--s2-one",
                 json.dumps([wd, side, variant])],
                capture_output=True, text=True, check=True,
            )
            got = json.loads(proc.stdout.strip().splitlines()[-1].split("RESULT ", 1)[1])
            rows[variant] = {
                "seconds": got["seconds"],
                "bytes_read_per_byte_grafted": got["bytes_read"] / grafted,
                "peak_rss_growth_per_byte_grafted": got["rss_growth"] / grafted,
            }
        rows["treegraft_over_tensorstore_time"] = (
            rows["treegraft"]["seconds"] / rows["tensorstore"]["seconds"])
        shutil.rmtree(wd, ignore_errors=True)
    layouts.clear()
    return out


def case_s3(root: str, quick: bool) -> dict:
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import treegraft as tg
    from treegraft._parse.paths import parse_path
    from treegraft._read.source import BoxRequest

    layers, side = 8, (256 if quick else 1024)
    stacked = np.random.default_rng(2).standard_normal((layers, side, side), dtype=np.float32)
    path = os.path.join(root, "s3")
    mesh = jax.make_mesh((8,), ("x",))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        ckptr.save(path, args=ocp.args.PyTreeSave({
            "per_layer": jax.device_put(jnp.asarray(stacked), NamedSharding(mesh, P("x"))),
            "one_chunk": jax.device_put(jnp.asarray(stacked), jax.devices()[0]),
        }))
    finally:
        ckptr.close()
    layer_bytes = side * side * 4
    box = (slice(5, 6), slice(None), slice(None))
    out = {"title": f"S3 one layer [5] of a stacked float32[{layers}, {side}, {side}]",
           "layer_bytes": layer_bytes}
    for name in ("per_layer", "one_chunk"):
        src = tg.OrbaxCheckpoint(path)
        planned = src.box_nbytes(parse_path(name), box)  # opens the array: header, index
        before = rchar()
        (value,) = src.read_boxes([BoxRequest(parse_path(name), box)])
        read = rchar() - before
        assert np.array_equal(value, stacked[box])
        out[name] = {"planned_per_layer": planned / layer_bytes,
                     "read_per_layer": read / layer_bytes}
    return out


def case_s4(root: str, quick: bool) -> dict:
    import servers
    import tensorstore as ts

    import treegraft as tg

    try:
        server = servers.gcs_server(os.path.join(root, "gcs"))
    except Exception as e:  # no bundled binary on this platform
        return {"title": "S4 partial read from the GCS emulator", "skipped": str(e)}
    os.environ.update(servers.loopback_env(gcs=server.url))
    try:
        import fsspec

        fsspec.config.conf["gcs"] = {"token": "anon", "endpoint_url": server.url}
        servers.gcs_client().create_bucket("bench")
        n, side, repeats = (8, 256, 3) if quick else (16, 1024, 7)
        local = os.path.join(root, "s4")
        _write_layers(local, n, side)
        url = servers.Storage("gcs", "bench").publish(local)
        name = f"l{n // 2}"
        like = jax.ShapeDtypeStruct((side, side), jnp.float32,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        item = f"{url}/checkpoints/ckpt_1/default"

        def served() -> int:
            found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/gcs/bytes_read")
            return sum(v["value"] for m in found for v in m["values"])

        def treegraft():
            src = tg.KauldronCheckpoint(url)
            out = tg.graft({"params": {name: like}}, src, {f"params.{name}": f"params.{name}"})
            out["params"][name].block_until_ready()

        before = served()
        treegraft()
        mapped = side * side * 4
        bytes_per_mapped = (served() - before) / mapped
        medians = _timed({"treegraft": treegraft,
                          "orbax_partial": lambda: _orbax_partial(item, name, like)},
                         repeats)
        return {"title": f"S4 one {mapped / MIB:.2f} MiB array of a {n * mapped / MIB:.0f} MiB "
                         "checkpoint on the GCS emulator",
                "served_per_byte_mapped": bytes_per_mapped, "median_s": medians,
                "orbax_over_treegraft": medians["orbax_partial"] / medians["treegraft"]}
    finally:
        server.stop()


CASES = {"S1": case_s1, "S2": case_s2, "S3": case_s3, "S4": case_s4}


def run(root: str, quick: bool, only: list[str] | None = None) -> dict:
    """Runs the storage cases with their data under root; returns their results."""
    out = {}
    for key, fn in CASES.items():
        if only and key not in only:
            continue
        folder = os.path.join(root, f"storage-{key}")
        os.makedirs(folder, exist_ok=True)
        try:
            out[key] = fn(folder, quick)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps({key: out[key]}, indent=1), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=None, help="JSON options (from run.py)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default="", help="comma-separated subset of S1,S2,S3,S4")
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of S1 and S4")
    parser.add_argument("--s2-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.s2_one:
        print("RESULT " + json.dumps(_s2_one(*json.loads(args.s2_one))))
        return 0
    spec = json.loads(args.spec) if args.spec else {}
    quick = args.quick or spec.get("quick", False)
    global _REPEATS
    _REPEATS = args.repeats
    root = tempfile.mkdtemp(prefix="treegraft-storage-bench-", dir=spec.get("root"))
    try:
        results = run(root, quick, [c for c in args.cases.split(",") if c] or None)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
