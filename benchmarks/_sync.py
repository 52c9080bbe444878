"""Case `sync` (issue #25, row 2): weight sync between two differently sharded states.

An RL trainer's parameters (8-way fsdp over 8 devices) are copied into a
sampler's (2x4 mesh, tensor parallel), whose names differ by one glob rule.
treegraft's `tg.graft` against the floor: `jax.device_put` of exactly the
same source leaves into the target shardings, in one call. Run by
`_sync_worker.py` (the worker with this case added) through
`run.py --cases sync`, on 8 CPU devices.

Two configurations (`leaves`, `shape`): 192 kernels of 1 MiB (512x512
float32) with their biases (float32[512]); 10,000 leaves of float32[4].
"""

from __future__ import annotations

from typing import Any


def _meshes() -> tuple[Any, Any]:
    import jax

    devices = jax.devices()
    if len(devices) < 8:
        raise RuntimeError(f"the sync case needs 8 devices, found {len(devices)}")
    fsdp = jax.make_mesh((8,), ("fsdp",), devices=devices[:8])
    tp = jax.make_mesh((2, 4), ("data", "model"), devices=devices[:8])
    return fsdp, tp


def trees(spec: dict) -> tuple[Any, Any, dict, Any]:
    """(trainer state, sampler state, mapping, the target shardings in source-leaf order)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    fsdp, tp = _meshes()
    n, side = spec["leaves"], spec["side"]
    if side:
        # A kernel and its bias per layer: fsdp splits rows, tensor parallel columns.
        src_sh = {
            "kernel": NamedSharding(fsdp, P("fsdp", None)),
            "bias": NamedSharding(fsdp, P("fsdp")),
        }
        tgt_sh = {
            "kernel": NamedSharding(tp, P(None, "model")),
            "bias": NamedSharding(tp, P("model")),
        }
        shapes = {"kernel": (side, side), "bias": (side,)}
        names = ("kernel", "bias")
    else:
        # Scales and norms too small to split: replicated on both sides, each
        # side on its own mesh (the same 8 devices).
        src_sh = {"w": NamedSharding(fsdp, P())}
        tgt_sh = {"w": NamedSharding(tp, P())}
        shapes = {"w": (4,)}
        names = ("w",)

    def layer(shardings, value):
        return {
            k: jax.device_put(np.full(shapes[k], value, np.float32), shardings[k]) for k in names
        }

    source = {"model": {f"layers_{i}": layer(src_sh, i + 1.0) for i in range(n)}}
    target = {"decoder": {f"block_{i}": layer(tgt_sh, 0.0) for i in range(n)}}
    mapping = {"decoder.block_*": "model.layers_*"}
    # The floor puts the same source leaves into the target shardings, in
    # the order the source flattens (the user would zip them by name).
    leaves = jax.tree_util.tree_leaves(source)
    shardings = [tgt_sh[k] for i in sorted(range(n), key=str) for k in sorted(names)]
    return source, target, mapping, (leaves, shardings)


def setup_sync(spec: dict) -> tuple[Any, Any]:
    import jax
    import numpy as np

    import treegraft as tg

    source, target, mapping, (leaves, shardings) = trees(spec)
    n = spec["leaves"]
    variant = spec["variant"]
    if variant == "treegraft":

        def run():
            return tg.graft(target, source, mapping)

        def check(out):
            last = out["decoder"][f"block_{n - 1}"]
            for k, x in last.items():
                want = target["decoder"][f"block_{n - 1}"][k].sharding
                if x.sharding != want or float(np.asarray(x).reshape(-1)[0]) != float(n):
                    return f"block_{n - 1}.{k} came back wrong ({x.sharding})"
            return None

    elif variant == "device_put":

        def run():
            return jax.device_put(leaves, shardings)

        def check(out):
            bad = [x for x, sh in zip(out, shardings, strict=True) if x.sharding != sh]
            return f"{len(bad)} leaves not on their sharding" if bad else None

    else:
        raise ValueError(f"unknown variant {variant!r}")
    return run, check
