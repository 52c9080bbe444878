"""One process of the multi-process test (launched by tests/test_distributed.py).

Run as `python distributed_worker.py --process-id I --num-processes 2 --port P
--workdir DIR`, with `XLA_FLAGS=--xla_force_host_platform_device_count=2` and
`JAX_PLATFORMS=cpu` in the environment. Every process:

1. joins JAX's distributed runtime on 127.0.0.1 (gloo CPU collectives) and
   builds a 2x2 mesh over the 4 global devices (2 per process);
2. writes, together with the other process, a Kauldron-layout checkpoint
   (`<workdir>/pretrain/checkpoints/ckpt_<step>/default`, orbax
   CheckpointManager, StandardSave of a TrainState dataclass with an optax adam
   opt_state) whose arrays are global and sharded over the mesh;
3. grafts a subtree of params (`PartialKauldronLoader.transform`), then an
   opt_state subtree (`transform_after_optimizer`), into a differently
   structured global state, with other shardings, partly abstract, measuring
   `/proc/self/io` rchar around each read (and around a read of the same leaves
   into replicated targets, for reference);
4. grafts in memory: global arrays into other shardings, and a host numpy
   array into a global target;
5. makes the two processes read different steps (the race of step=-1 with a
   run that completes a step) and records the error each one raises;
6. checks the values of every addressable shard of every grafted leaf and
   prints one line `TREEGRAFT_RESULT {json}`.

Around every treegraft call, a spy records each cross-process gather of jax's
`multihost_utils` (with the bytes gathered); `np.asarray` on a global array
raises by itself. (jax's transfer guard cannot serve here: on the CPU backend
device memory is host memory and it sees no device-to-host copy.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from typing import Any

RESULT_PREFIX = "TREEGRAFT_RESULT "

# Shapes of the pretrain run's params (float32). D rows split evenly on 2 and 4.
V, D, C = 4096, 512, 16


_REMOTE = False  # True: bytes read are those tensorstore's gcs kvstore received


def _rchar() -> int:
    if _REMOTE:
        import tensorstore as ts

        found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/gcs/bytes_read")
        return sum(v["value"] for m in found for v in m["values"])
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def pattern(seed: int, shape: tuple[int, ...], index: tuple[slice, ...]) -> Any:
    """Deterministic, poorly compressible float32 values of the block at index."""
    import numpy as np

    if not shape:
        return np.asarray(np.sin(seed * 1.7) * 10.0, np.float32)
    ranges = [np.arange(*s.indices(n)) for s, n in zip(index, shape, strict=True)]
    grids = np.meshgrid(*ranges, indexing="ij")
    flat = np.ravel_multi_index(grids, shape).astype(np.float64)
    return (np.sin(flat * 0.7548776662 + seed * 1.3) * 10.0).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--storage-url", default=None,
                    help="save and read the checkpoints there (gs://...), not in --workdir")
    args = ap.parse_args()

    # Quiet: absl/tensorstore logging to errors only (they go to stderr anyway).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    result: dict[str, Any] = {"process": args.process_id}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(args, result)
        result["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        result["ok"] = True
    except BaseException as e:  # report, then fail the process
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    if not result["ok"]:
        # Exit now: a clean shutdown would wait at a barrier for the other process.
        sys.stderr.write(result["traceback"])
        sys.stderr.flush()
        os._exit(1)
    jax.distributed.shutdown()
    return 0


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from kauldron_run import TrainState  # beside this script, so on sys.path

    import treegraft as tg

    spy = GatherSpy()
    spy.install()
    pid = jax.process_index()
    assert jax.process_count() == args.num_processes
    assert jax.device_count() == 4 and jax.local_device_count() == 2, (
        jax.device_count(),
        jax.local_device_count(),
    )
    # Rows of the mesh are processes: 'data' spans processes, 'model' stays local.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
    assert [d.process_index for d in mesh.devices[pid]] == [pid, pid]

    def sh(*spec: Any) -> NamedSharding:
        return NamedSharding(mesh, P(*spec))

    def make(seed: int, shape: tuple[int, ...], sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(shape, sharding, lambda idx: pattern(seed, shape, idx))

    def zeros(shape: tuple[int, ...], sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: np.zeros(pattern(0, shape, idx).shape, np.float32)
        )

    # ---- 1. the pretrain run writes its checkpoint, every process its shards ----
    # Saved shardings: the big arrays are split on their columns across processes.
    old_specs = {
        "encoder": {
            "embed": ((V, D), sh("model", "data")),
            "block": {"kernel": ((D, D), sh("model", "data")), "bias": ((D,), sh("data"))},
        },
        "head": ((D, C), sh("data", None)),
    }
    is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], NamedSharding)  # noqa: E731
    seeds = iter(range(1, 1000))
    old_seed = jax.tree.map(lambda s: next(seeds), old_specs, is_leaf=is_spec)
    mu_seed = jax.tree.map(lambda s: s + 100, old_seed)
    nu_seed = jax.tree.map(lambda s: s + 200, old_seed)
    tx = optax.adam(1e-3)
    workdir = os.path.join(args.workdir, "pretrain")
    if args.storage_url:
        global _REMOTE
        import fsspec  # orbax writes gs:// through gcsfs

        fsspec.config.conf["gcs"] = {"token": "anon"}
        _REMOTE = True
        workdir = f"{args.storage_url}/pretrain"

    def save(step: int, offset: int) -> None:
        """Saves the pretrain state at step (values offset by `offset` seeds), together."""

        def arrays(seed_tree: Any) -> Any:
            return jax.tree.map(
                lambda s, seed: make(seed + offset, *s), old_specs, seed_tree, is_leaf=is_spec
            )

        params = arrays(old_seed)
        opt_state = (
            optax.ScaleByAdamState(
                count=jax.device_put(np.int32(7), sh()), mu=arrays(mu_seed), nu=arrays(nu_seed)
            ),
            optax.EmptyState(),
        )
        assert jax.tree.structure(opt_state) == jax.tree.structure(jax.eval_shape(tx.init, params))
        old_state = TrainState(step=step, params=params, collections={}, opt_state=opt_state)
        mgr = ocp.CheckpointManager(
            os.path.join(workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(step_prefix="ckpt", max_to_keep=3),
        )
        mgr.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(old_state)))
        mgr.wait_until_finished()
        mgr.close()
        multihost_utils.sync_global_devices(f"treegraft-test: step {step} written")
        from treegraft._storage.location import Location

        step_dir = Location.parse(workdir).join("checkpoints", f"ckpt_{step}", "default")
        assert step_dir.kind() == "dir", step_dir

    t0 = time.perf_counter()
    save(100, 0)
    result["save_s"] = round(time.perf_counter() - t0, 3)

    # ---- 2. the fine-tuning run: another structure, other shardings ----------
    # backbone <- encoder (abstract targets, rows split across processes);
    # decoder.layers_0 and layers_1 <- encoder.block (real targets, two shardings);
    # head has another shape and is not grafted.
    new_params = {
        "backbone": {
            "embed": jax.ShapeDtypeStruct((V, D), np.float32, sharding=sh("data", "model")),
            "block": {
                "kernel": jax.ShapeDtypeStruct((D, D), np.float32, sharding=sh("data", "model")),
                "bias": jax.ShapeDtypeStruct((D,), np.float32, sharding=sh("data")),
            },
        },
        "decoder": {
            "layers_0": {"kernel": zeros((D, D), sh("data", None)), "bias": zeros((D,), sh())},
            "layers_1": {
                "kernel": zeros((D, D), sh(None, "data")),
                "bias": zeros((D,), sh("data")),
            },
        },
        "head": zeros((D, 2 * C), sh("data", None)),
    }
    state = TrainState(step=0, params=new_params, collections={}, opt_state=None)
    mapping = {
        "params.backbone": "params.encoder",
        "params.decoder.layers_0": "params.encoder.block",
        "params.decoder.layers_1": "params.encoder.block",
        "opt_state[0].mu.backbone": "opt_state[0].mu.encoder",
        "opt_state[0].nu.backbone": "opt_state[0].nu.encoder",
    }
    expect_params = {  # target path -> seed of the source leaf
        ("backbone", "embed"): old_seed["encoder"]["embed"],
        ("backbone", "block", "kernel"): old_seed["encoder"]["block"]["kernel"],
        ("backbone", "block", "bias"): old_seed["encoder"]["block"]["bias"],
        ("decoder", "layers_0", "kernel"): old_seed["encoder"]["block"]["kernel"],
        ("decoder", "layers_0", "bias"): old_seed["encoder"]["block"]["bias"],
        ("decoder", "layers_1", "kernel"): old_seed["encoder"]["block"]["kernel"],
        ("decoder", "layers_1", "bias"): old_seed["encoder"]["block"]["bias"],
    }

    # The same bad mapping must fail the same way on every process.
    try:
        tg.plan(state, tg.KauldronCheckpoint(workdir), {"params.backbone": "params.encodr"})
    except tg.GraftError as e:
        result["bad_mapping_error"] = f"{type(e).__name__}: {e}"
    else:
        raise AssertionError("a mapping naming a missing path did not raise")

    loader = tg.PartialKauldronLoader(workdir=workdir, new_to_old=mapping)
    with spy:
        r0 = _rchar()
        t0 = time.perf_counter()
        state = loader.transform(state)
        t1 = time.perf_counter()
        r1 = _rchar()
    result["phase1"] = {"rchar": r1 - r0, "seconds": round(t1 - t0, 3)}
    # Own bytes: each source leaf is read once, for its first target's sharding.
    first_target = {
        ("encoder", "embed"): new_params["backbone"]["embed"],
        ("encoder", "block", "kernel"): new_params["backbone"]["block"]["kernel"],
        ("encoder", "block", "bias"): new_params["backbone"]["block"]["bias"],
    }
    result["phase1"].update(_bytes(first_target.values()))

    checked = _check_tree(state.params, expect_params, pattern, new_params)
    assert state.params["head"] is new_params["head"]
    assert state.step == 0 and state.collections == {} and state.opt_state is None

    # Reference: the same leaves into replicated targets, which every process
    # holds whole, so each reads the full arrays (as stored: zstd-compressed).
    replicated = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh()), new_params["backbone"]
    )
    with spy:
        r0 = _rchar()
        full = tg.graft(
            {"params": {"backbone": replicated}},
            tg.KauldronCheckpoint(workdir),
            {"params.backbone": "params.encoder"},
        )
        result["phase1"]["rchar_replicated"] = _rchar() - r0
    for leaf in jax.tree.leaves(full):
        assert leaf.is_fully_replicated
    del full

    # The optimizer state as a trainer makes it: real zeros sharded like params.
    new_abstract = jax.eval_shape(tx.init, state.params)
    param_sharding = jax.tree.map(lambda x: x.sharding, state.params)
    opt_state = (
        optax.ScaleByAdamState(
            count=jax.device_put(np.int32(0), sh()),
            mu=jax.tree.map(lambda s, x: zeros(x.shape, s), param_sharding, new_abstract[0].mu),
            nu=jax.tree.map(lambda s, x: zeros(x.shape, s), param_sharding, new_abstract[0].nu),
        ),
        optax.EmptyState(),
    )
    state = state.replace(opt_state=opt_state)
    with spy:
        r0 = _rchar()
        t0 = time.perf_counter()
        state = loader.transform_after_optimizer(state)
        t1 = time.perf_counter()
        r1 = _rchar()
    loader.close()
    adam = state.opt_state[0]
    result["phase2"] = {"rchar": r1 - r0, "seconds": round(t1 - t0, 3)}
    result["phase2"].update(
        _bytes(jax.tree.leaves([opt_state[0].mu["backbone"], opt_state[0].nu["backbone"]]))
    )
    for name, seeds_tree in (("mu", mu_seed), ("nu", nu_seed)):
        expect = {
            ("backbone", "embed"): seeds_tree["encoder"]["embed"],
            ("backbone", "block", "kernel"): seeds_tree["encoder"]["block"]["kernel"],
            ("backbone", "block", "bias"): seeds_tree["encoder"]["block"]["bias"],
        }
        checked += _check_tree(getattr(adam, name), expect, pattern, getattr(opt_state[0], name))
        assert getattr(adam, name)["head"] is getattr(opt_state[0], name)["head"]
    assert adam.count is opt_state[0].count
    assert isinstance(state.opt_state[1], optax.EmptyState)

    # ---- 3. in memory, between global arrays of different shardings ----------
    before = state.params["decoder"]["layers_1"]["kernel"]
    with spy:
        t0 = time.perf_counter()
        moved = tg.graft(
            state.params,
            {"enc": {"embed": state.params["backbone"]["embed"]}, "x": state.params["decoder"]},
            {"decoder.layers_1": "x.layers_0", "backbone.embed": "enc.embed"},
        )
        t1 = time.perf_counter()
    result["in_memory_seconds"] = round(t1 - t0, 3)
    got = moved["decoder"]["layers_1"]["kernel"]
    assert got.sharding == before.sharding, (got.sharding, before.sharding)
    assert got.sharding != state.params["decoder"]["layers_0"]["kernel"].sharding
    # Same sharding: a copy with buffers of its own (docs/design.md section 12), made on
    # each process's own devices.
    embed, original = moved["backbone"]["embed"], state.params["backbone"]["embed"]
    assert embed is not original and embed.sharding == original.sharding
    from helpers import assert_owns_buffers  # beside this script, so on sys.path

    assert_owns_buffers(embed, original)
    for a, b in zip(embed.addressable_shards, original.addressable_shards, strict=True):
        assert a.index == b.index
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    checked += _check_tree(
        moved,
        {("decoder", "layers_1", "kernel"): old_seed["encoder"]["block"]["kernel"]},
        pattern,
        state.params,
    )

    # Host values (the same numpy array on every process, e.g. weights loaded
    # from a file on each host) into global targets: each process places only
    # the shards it addresses; nothing is gathered or compared across hosts.
    host_kernel = pattern(77, (D, D), (slice(None), slice(None)))
    with spy:
        from_host = tg.graft(state.params, {"w": host_kernel}, {"decoder.layers_0.kernel": "w"})
    checked += _check_tree(
        from_host, {("decoder", "layers_0", "kernel"): 77}, pattern, state.params
    )

    # ---- 4. processes that would read different steps: the same error on all --
    # Stands for the race of step=-1 with a run that completes a step while the
    # processes list its workdir: here process 0 pins step 100 and process 1
    # takes the latest, 200. Both plans pass (same structure); the read refuses.
    save(200, 500)
    step = 100 if pid == 0 else -1
    with spy:
        try:
            tg.PartialKauldronLoader(
                workdir=workdir, new_to_old={"params.backbone": "params.encoder"}, step=step
            ).transform(state)
        except tg.GraftError as e:
            result["divergent_step_error"] = f"{type(e).__name__}: {e}"
        else:
            raise AssertionError("processes reading different steps did not raise")

    # ---- 5. a plan that fails on one process only: every process raises -----
    # Process 1 was given a mapping with a typo; process 0's plan is fine, but it
    # must not go on to a read that process 1 will never join.
    old = "params.encoder" if pid == 0 else "params.encodr"
    with spy:
        try:
            tg.PartialKauldronLoader(
                workdir=workdir, new_to_old={"params.backbone": old}, step=100
            ).transform(state)
        except tg.GraftError as e:
            result["divergent_plan_error"] = f"{type(e).__name__}: {e}"
        else:
            raise AssertionError("a plan failing on one process did not fail everywhere")

    # ---- 6. a mapping that does not even parse on one process: all raise ------
    # Parsing is part of the plan every process agrees on: process 0 must not
    # go on alone when process 1's mapping is rejected before any tree is seen.
    old = "params.encoder" if pid == 0 else "params.encoder["
    with spy:
        try:
            tg.graft(state, tg.KauldronCheckpoint(workdir, step=100), {"params.backbone": old})
        except tg.GraftError as e:
            result["unparsed_plan_error"] = f"{type(e).__name__}: {e}"
        else:
            raise AssertionError("a mapping rejected on one process did not fail everywhere")

    result["checked_shards"] = checked
    result["gathers"] = spy.calls
    multihost_utils.sync_global_devices("treegraft-test: done")


def _bytes(likes: Any) -> dict[str, int]:
    """This process's share of the leaves (unique addressable blocks) and the total."""
    import numpy as np

    own = full = 0
    for like in likes:
        itemsize = np.dtype(like.dtype).itemsize
        full += int(np.prod(like.shape)) * itemsize
        blocks = {
            tuple(s.indices(n)[:2] for s, n in zip(idx, like.shape, strict=True))
            for idx in like.sharding.addressable_devices_indices_map(like.shape).values()
        }
        for block in blocks:
            own += int(np.prod([b - a for a, b in block])) * itemsize
    return {"own_bytes": own, "full_bytes": full}


class GatherSpy:
    """Records every cross-process gather (jax's multihost_utils) while active.

    On the CPU backend jax's transfer guard does not see device-to-host copies
    (host memory is the device memory), so this is how the test sees data
    moving between hosts: `jax.device_put` of a host value into a global
    sharding, for one, gathers the value from every process to compare it.
    """

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, int]] = []

    def install(self) -> None:
        from jax.experimental import multihost_utils

        for name in ("process_allgather", "assert_equal", "broadcast_one_to_all"):
            orig = getattr(multihost_utils, name)
            setattr(multihost_utils, name, self._wrap(name, orig))

    def _wrap(self, name: str, orig: Any) -> Any:
        import jax
        import numpy as np

        def wrapped(in_tree: Any, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                nbytes = sum(
                    int(getattr(x, "nbytes", None) or np.asarray(x).nbytes)
                    for x in jax.tree.leaves(in_tree)
                )
                self.calls.append((name, nbytes))
            return orig(in_tree, *args, **kwargs)

        return wrapped

    def __enter__(self) -> GatherSpy:
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


def _check_tree(tree: Any, expect: dict[tuple, int], pattern: Any, like_tree: Any) -> int:
    """Checks each addressable shard of the expected leaves; returns shards checked."""
    import jax
    import numpy as np

    n = 0
    for path, seed in expect.items():
        leaf = tree
        like = like_tree
        for k in path:
            leaf, like = leaf[k], like[k]
        assert isinstance(leaf, jax.Array), (path, type(leaf))
        assert leaf.shape == like.shape and leaf.dtype == like.dtype, (path, leaf, like)
        assert leaf.sharding == like.sharding, (path, leaf.sharding, like.sharding)
        assert not leaf.is_fully_addressable, path
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(
                np.asarray(shard.data), pattern(seed, leaf.shape, shard.index), err_msg=str(path)
            )
            n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())
