"""Every kind of graft, convert and save, under a transfer guard set for the whole process.

Run by tests/test_r6_reliability.py in a fresh process: argv[1] a folder,
argv[2] the guard ("disallow_explicit" refuses every transfer jax sees).
"""

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import treegraft as tg  # noqa: E402


def orbax_save(path, tree, **options):
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options))
    ckptr.save(path, args=ocp.args.PyTreeSave(tree))
    ckptr.close()
    return path


def main(root: str, guard: str) -> None:
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    grid = jax.sharding.NamedSharding(mesh, P("a", "b"))
    rows = jax.sharding.NamedSharding(mesh, P("b", None))
    vec = jax.sharding.NamedSharding(mesh, P("b"))
    w = np.random.default_rng(0).standard_normal((2048, 1024), dtype=np.float32)  # 8 MiB
    b = np.arange(64, dtype=np.float32)
    st = os.path.join(root, "model.safetensors")
    save_file({"w": w, "b": b}, st)
    placed = {"w": jax.device_put(w, rows), "b": jax.device_put(b, vec)}
    ocdbt = orbax_save(os.path.join(root, "ocdbt"), placed)
    plain = orbax_save(os.path.join(root, "plain"), placed, use_ocdbt=False)
    state = {"w": jax.device_put(w, rows), "b": jax.device_put(b, vec)}  # made before the guard

    halves = jax.sharding.NamedSharding(mesh, P("a"))
    like = {"k": jax.ShapeDtypeStruct((1024, 2048), np.float32, sharding=grid),
            "b": jax.ShapeDtypeStruct((64,), np.float32, sharding=halves)}
    on_host = {"k": np.zeros((1024, 2048), np.float32), "b": np.zeros(64, np.float32)}
    mapping = {"k": tg.transpose("w", (1, 0)), "b": "b"}
    ops = {"k": tg.scale(tg.transpose("w", (1, 0)), 0.5), "b": tg.pad(tg.slice("b", 0, 32), 64)}

    jax.config.update("jax_transfer_guard", guard)
    results = {}
    sources = [("safetensors", tg.SafetensorsCheckpoint(st)), ("ocdbt", tg.OrbaxCheckpoint(ocdbt)),
               ("plain", tg.OrbaxCheckpoint(plain)), ("memory", state)]
    for name, source in sources:
        results[name] = tg.graft(like, source, mapping)
        results[name + "-host"] = tg.graft(on_host, source, mapping)
        results[name + "-ops"] = tg.graft(like, source, ops)
    both = tg.Sources({"st": tg.SafetensorsCheckpoint(st), "mem": state})
    results["several"] = tg.graft(like, both, {"k": tg.transpose("st.w", (1, 0)), "b": "mem.b"})
    results["propagate"] = tg.propagate_sharding({"k": np.ascontiguousarray(w.T), "b": b}, like)
    tg.save(state, os.path.join(root, "saved"))
    tg.convert(tg.OrbaxCheckpoint(ocdbt), os.path.join(root, "out.safetensors"), mapping, like=like)
    tg.convert(tg.SafetensorsCheckpoint(st), os.path.join(root, "out-orbax"), mapping, like=like)

    jax.config.update("jax_transfer_guard", "allow")
    for name, out in results.items():
        k, bias = np.asarray(out["k"]), np.asarray(out["b"])
        want_k = w.T * 0.5 if name.endswith("-ops") else w.T
        want_b = np.concatenate([b[:32], np.zeros(32, np.float32)]) if name.endswith("-ops") else b
        assert k.dtype == np.float32 and np.array_equal(k, want_k), name
        assert np.array_equal(bias, want_b), name
        if name.endswith("-host"):
            assert type(out["k"]) is np.ndarray, name
        else:
            assert out["k"].sharding == grid, name
    with safe_open(os.path.join(root, "out.safetensors"), "numpy") as f:
        assert np.array_equal(f.get_tensor("k"), w.T)
    back = ocp.PyTreeCheckpointer().restore(os.path.join(root, "saved"))
    assert np.array_equal(np.asarray(back["w"]), w)
    back = ocp.PyTreeCheckpointer().restore(os.path.join(root, "out-orbax"))
    assert np.array_equal(np.asarray(back["k"]), w.T)
    print("OK", len(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
