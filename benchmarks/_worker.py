"""Runs one measured command in a fresh process; prints one JSON line.

    python benchmarks/_worker.py '<json spec>'

Imports and the set-up of inputs (target state, in-memory trees) are not
measured. The measured region starts just before the command and ends when
every array it produced is ready (`block_until_ready`). Around it the worker
records wall time, `/proc/self/io` deltas (`rchar`: bytes returned by read
syscalls, page cache hits included; `read_bytes`: bytes fetched from the block
device) and `ru_maxrss` (peak resident memory of the process), with the
resident memory just before the command, so that the command's own peak can be
told from the interpreter's and jax's baseline.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import block, latest_item_dir, layer, leaf  # noqa: E402


def io_counters() -> dict[str, int]:
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:  # not Linux, or /proc not readable
        return {}


def rss_now() -> int:
    """Resident memory now, in bytes (VmRSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def block_all(tree) -> None:
    import jax

    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            x.block_until_ready()


# ---------------------------------------------------------------------------
# Kauldron checkpoint cases (1, 2, 5, 6): graft subtrees of params.layer_NN.
# ---------------------------------------------------------------------------


def _sharding(spec):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if spec.get("devices", 1) > 1:
        mesh = jax.make_mesh((spec["devices"],), ("x",))
        return NamedSharding(mesh, PartitionSpec("x"))
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract_state(names, shape, sharding):
    import jax
    import jax.numpy as jnp

    return {
        "step": 0,
        "params": {
            n: {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}
            for n in names
        },
        "collections": {},
    }


def _by_hand(state, restored_kernel, pairs, sharding):
    """The tree surgery a user writes: copy each restored subtree into a new state."""
    import jax

    params = dict(state["params"])
    for new, old in pairs:
        params[new] = {"kernel": jax.device_put(restored_kernel(old), sharding)}
    return {**state, "params": params}


def setup_kauldron(spec):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import treegraft as tg

    wd = spec["workdir"]
    shape = (spec["side"], spec["side"])
    sharding = _sharding(spec)
    state = _abstract_state(spec["target_layers"], shape, sharding)
    pairs = [tuple(p) for p in spec["pairs"]]
    olds = list(dict.fromkeys(old for _, old in pairs))
    variant = spec["variant"]
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    if variant == "treegraft":

        def run():
            loader = tg.PartialKauldronLoader(workdir=wd, new_to_old=spec["mapping"])
            return loader.transform(state)

    elif variant == "orbax_full":
        # (a) restore the whole checkpoint (onto one device: the user does not
        # pass the target's shardings to a full restore), then copy by hand.
        ckpt_names = [layer(i) for i in range(spec["ckpt_arrays"])]

        def run():
            item = latest_item_dir(wd)
            abstract = _abstract_state(ckpt_names, shape, single)
            abstract["step"] = 0
            args = ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            )
            restored = ocp.PyTreeCheckpointer().restore(item, args=args)
            return _by_hand(state, lambda o: restored["params"][o]["kernel"], pairs, sharding)

    elif variant in ("orbax_partial", "orbax_partial_each"):
        # (b) orbax's partial restore of exactly the needed arrays, straight into
        # the target sharding. "_each" restores once per target (a naive loop).
        def restore(names):
            item = {"params": {n: {"kernel": 0} for n in names}}
            restore_args = {
                "params": {
                    n: {
                        "kernel": ocp.ArrayRestoreArgs(
                            sharding=sharding, global_shape=shape, dtype=jnp.float32
                        )
                    }
                    for n in names
                }
            }
            return ocp.PyTreeCheckpointer().restore(
                latest_item_dir(wd),
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )

        if variant == "orbax_partial":

            def run():
                restored = restore(olds)
                return _by_hand(state, lambda o: restored["params"][o]["kernel"], pairs, sharding)

        else:

            def run():
                return _by_hand(
                    state, lambda o: restore([o])["params"][o]["kernel"], pairs, sharding
                )

    elif variant == "tensorstore":
        # The floor: tensorstore reading exactly the needed arrays, each target
        # shard its own slice, with no framework around it.
        import tensorstore as ts

        def run():
            item = latest_item_dir(wd)
            context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
            arrays = {
                o: ts.open(
                    {
                        "driver": "zarr",
                        "kvstore": {
                            "driver": "ocdbt",
                            "base": f"file://{item}/",
                            "path": f"params.{o}.kernel",
                        },
                    },
                    open=True,
                    read=True,
                    context=context,
                ).result()
                for o in olds
            }
            read = {
                o: jax.make_array_from_callback(
                    shape, sharding, lambda index, a=a: a[index].read().result()
                )
                for o, a in arrays.items()
            }
            return _by_hand(state, lambda o: read[o], pairs, sharding)

    else:
        raise ValueError(f"unknown variant {variant!r}")

    def check(out):
        for new, _ in pairs:
            x = out["params"][new]["kernel"]
            if not isinstance(x, jax.Array) or x.shape != shape or x.sharding != sharding:
                return f"params.{new}.kernel came back as {type(x).__name__} {x.shape}"
        return None

    return run, check


# ---------------------------------------------------------------------------
# Case 3: in-memory graft of many small leaves.
# ---------------------------------------------------------------------------


def setup_memory(spec):
    import jax
    import numpy as np

    import treegraft as tg

    blocks, per, n = spec["blocks"], spec["per"], spec["leaf"]
    dev = jax.devices()[0]

    def tree(top, value):
        host = [np.full((n,), value, np.float32) for _ in range(blocks * per)]
        arrays = iter(jax.device_put(host, dev))
        return {top: {block(b): {leaf(j): next(arrays) for j in range(per)} for b in range(blocks)}}

    state = tree("params", 0.0)
    variant = spec["variant"]
    if variant == "treegraft":
        source = tree("encoder", 1.0)
        mapping = {"params.block_*": "encoder.block_*"}

        def run():
            return tg.graft(state, source, mapping)

        def check(out):
            x = out["params"][block(blocks - 1)][leaf(per - 1)]
            return None if float(x[0]) == 1.0 else "graft did not take the source's value"

    elif variant == "floor":

        def run():
            keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
            return jax.tree_util.tree_unflatten(treedef, [v for _, v in keyed])

        def check(out):
            return None

    else:
        raise ValueError(f"unknown variant {variant!r}")
    return run, check


# ---------------------------------------------------------------------------
# Case 4: planning against a checkpoint with many leaves.
# ---------------------------------------------------------------------------


def setup_plan(spec):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from etils import epath

    import treegraft as tg

    wd = spec["workdir"]
    blocks, per, n = spec["blocks"], spec["per"], spec["leaf"]
    sds = jax.ShapeDtypeStruct((n,), jnp.float32)
    state = {
        "step": 0,
        "params": {block(b): {leaf(j): sds for j in range(per)} for b in range(blocks)},
        "collections": {},
    }
    mapping = {"params": "params"}
    variant = spec["variant"]
    extra: dict = {}
    if variant == "treegraft":
        source: list = []

        def run():
            source.append(tg.KauldronCheckpoint(wd))
            return tg.plan(state, source[-1], mapping)

        def check(p):
            paired = len(p.entries)
            if paired != blocks * per:
                return f"plan paired {paired} leaves, expected {blocks * per}"
            # Planning again with metadata already loaded: treegraft's own share.
            t0 = time.perf_counter()
            tg.plan(state, source[-1], mapping)
            extra["plan_metadata_cached_s"] = time.perf_counter() - t0
            return None

    elif variant == "orbax_metadata":

        def run():
            return ocp.PyTreeCheckpointHandler().metadata(epath.Path(latest_item_dir(wd))).tree

        def check(tree):
            got = len(jax.tree_util.tree_leaves(tree))
            return None if got == blocks * per + 1 else f"metadata has {got} leaves"

    else:
        raise ValueError(f"unknown variant {variant!r}")
    run.extra = extra  # type: ignore[attr-defined]
    return run, check


SETUPS = {"kauldron": setup_kauldron, "memory": setup_memory, "plan": setup_plan}


def main() -> None:
    spec = json.loads(sys.argv[1])
    import jax  # noqa: F401  (imported before measuring, as in a training script)
    import orbax.checkpoint  # noqa: F401

    import treegraft  # noqa: F401

    run, check = SETUPS[spec["kind"]](spec)
    inner = max(1, int(spec.get("inner", 1)))
    times = []
    gc.collect()
    rss0 = rss_now()
    io0 = io_counters()
    out = None
    for k in range(inner):
        if k:
            out = None
            gc.collect()
        t0 = time.perf_counter()
        out = run()
        block_all(out)
        times.append(time.perf_counter() - t0)
        if k == 0:
            io1 = io_counters()
            peak = peak_rss()
    problem = check(out)
    result = {
        "time_s": times[0],
        "times_s": times,
        "rchar": io1.get("rchar", 0) - io0.get("rchar", 0) if io0 else None,
        "read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0) if io0 else None,
        "rss_before": rss0,
        "peak_rss": peak,
        "problem": problem,
    }
    result.update(getattr(run, "extra", {}))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
