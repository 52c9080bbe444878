"""Reliability round 6: jax settings made for the calling thread, in treegraft's own threads.

Found while reviewing the copy threads of round 3 (`treegraft/_insert/copies.py`):
`jax.enable_x64` and `jax.transfer_guard` may be set for one thread only, and
a copy made in the worker thread ran under the process's settings instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import treegraft as tg
from treegraft._insert import copies

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("a", "b"))


def test_a_float64_leaf_copied_in_two_threads_stays_float64_under_a_threads_enable_x64(
        tmp_path, mesh, monkeypatch):
    """Before: the worker put float64 blocks as float32 (x64 off in its thread).

    The leaf mixed float32 and float64 shards: a raw ValueError, or, had every
    shard gone through the worker, a silent cast.
    """
    assert not jax.config.jax_enable_x64  # the process's setting: x64 off
    w = np.random.default_rng(0).standard_normal((2048, 1024))  # float64, 16 MiB
    assert w.nbytes >= copies.SHARED_FROM  # lent blocks go to the worker thread
    path = str(tmp_path / "m.safetensors")
    save_file({"w": w}, path)
    threads = []
    real_put = copies._put

    def put(block, device, x64):  # the real put, recording the thread it ran in
        threads.append(threading.current_thread() is threading.main_thread())
        return real_put(block, device, x64)

    monkeypatch.setattr(copies, "_put", put)
    grid = NamedSharding(mesh, P("a", "b"))
    with jax.enable_x64(True):
        like = {"k": jax.ShapeDtypeStruct((1024, 2048), np.float64, sharding=grid)}
        out = tg.graft(like, tg.SafetensorsCheckpoint(path), {"k": tg.transpose("w", (1, 0))})
        k = out["k"]
        assert k.dtype == np.float64
        assert {s.data.dtype for s in k.addressable_shards} == {np.dtype(np.float64)}
        assert np.array_equal(np.asarray(k), w.T)
    assert len(threads) == 8 and not all(threads)  # the worker made some of the copies


def test_the_worker_puts_under_the_x64_setting_it_is_given(mesh):
    block = np.arange(12, dtype=np.float64).reshape(3, 4).T  # a strided view, as lent
    got = []
    worker = threading.Thread(target=lambda: got.append(copies._put(block, jax.devices()[1], True)))
    with jax.enable_x64(True):
        worker.start()
        worker.join(timeout=60)
        assert got and got[0].dtype == np.float64
        assert np.array_equal(np.asarray(got[0]), block)


def test_every_transfer_treegraft_makes_runs_under_a_process_wide_transfer_guard(tmp_path):
    """Grafts from every source kind, with operations, onto devices and the host; saves; converts.

    Before, the safetensors reader, the copy thread, the first array treegraft
    makes and orbax's own restore raised jax's raw JaxRuntimeError (or a
    CheckpointError blaming the checkpoint) under
    `jax.config.update("jax_transfer_guard", "disallow_explicit")`, while the
    orbax reader allowed its transfers: the transfers are what graft was asked
    for, so every one is now allowed, in every thread.
    """
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "transfer_guard_worker.py"), str(tmp_path),
         "disallow_explicit"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK 14" in done.stdout, done.stdout


def test_a_guard_the_caller_sets_still_applies_to_the_callers_own_code(mesh):
    """treegraft allows its own transfers only: the caller's guard is left as it was."""
    x = np.ones(8, np.float32)
    with jax.transfer_guard("disallow_explicit"):
        out = tg.graft({"w": jax.ShapeDtypeStruct((8,), np.float32,
                                                 sharding=NamedSharding(mesh, P("b")))},
                       {"w": x}, {"w": "w"})
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.device_put(x, jax.devices()[0])
    assert np.array_equal(np.asarray(out["w"]), x)


# -- a device target of a 64-bit dtype while jax's 64-bit types are off ----------------------


def test_a_float64_device_target_with_64_bit_types_off_is_refused_before_any_read(
        tmp_path, mesh, monkeypatch):
    """Before: float64 values read into such a target came back float32 (a silent cast).

    jax makes a float64 `ShapeDtypeStruct` with x64 off, but puts float64 host
    values on a device as float32. From an orbax checkpoint the graft failed
    after its reads with the wrong remedy ("pass cast=True").
    """
    assert not jax.config.jax_enable_x64
    w = np.random.default_rng(1).standard_normal((8, 4))  # float64
    path = str(tmp_path / "m.safetensors")
    save_file({"w": w, "i": np.arange(8, dtype=np.int64)}, path)
    grid = NamedSharding(mesh, P("b"))
    like = {"layers": [{"w": jax.ShapeDtypeStruct((8, 4), np.float64, sharding=grid)}
                       for _ in range(3)],
            "i": jax.ShapeDtypeStruct((8,), np.int64),
            "f": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=grid)}
    mapping = {**{f"layers[{k}].w": "w" for k in range(3)}, "i": "i", "f": tg.cast("w", np.float32)}
    reads = []
    real_read = tg.SafetensorsCheckpoint.read
    monkeypatch.setattr(tg.SafetensorsCheckpoint, "read",
                        lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k))
    for source in ({"w": w, "i": np.arange(8, dtype=np.int64)}, tg.SafetensorsCheckpoint(path)):
        p = tg.plan(like, source, mapping)  # the plan is fine: convert writes 64-bit values
        with pytest.raises(tg.MismatchError) as err:
            tg.execute(p)
        text = str(err.value)
        assert "device targets of 64-bit dtypes while jax's 64-bit types are off: 4" in text
        assert ("'layers[0..2].w' in the state is float64[8, 4], which jax puts on a device "
                "as float32 while its 64-bit types are off") in text
        assert "'i' in the state is int64[8], which jax puts on a device as int32" in text
        assert "'f'" not in text  # float32 fits
        assert "jax.enable_x64(True)" in text and "pass cast=True" not in text.split("to fix")[0]
        assert {pr.kind for pr in err.value.problems} == {"x64"}
    assert reads == []  # refused before a byte was read
    with jax.enable_x64(True):  # the remedy works
        out = tg.graft(like, tg.SafetensorsCheckpoint(path), mapping)
        assert out["layers"][2]["w"].dtype == np.float64
        assert np.array_equal(np.asarray(out["layers"][2]["w"]), w)
        assert out["i"].dtype == np.int64


def test_host_targets_and_convert_keep_64_bit_values_with_64_bit_types_off(tmp_path):
    """Only device targets are refused: numpy targets and convert's host writes stay exact."""
    w = np.random.default_rng(2).standard_normal((8, 4))
    out = tg.graft({"w": np.zeros((8, 4))}, {"w": w}, {"w": "w"})
    assert out["w"].dtype == np.float64 and np.array_equal(out["w"], w)
    dest = str(tmp_path / "out.safetensors")
    tg.convert({"w": w}, dest, {"w": "w"}, like={"w": jax.ShapeDtypeStruct((8, 4), np.float64)})
    from safetensors import safe_open
    with safe_open(dest, "numpy") as f:
        got = f.get_tensor("w")
    assert got.dtype == np.float64 and np.array_equal(got, w)


def test_propagate_sharding_refuses_what_jax_would_narrow(mesh):
    w = np.ones((8, 4))
    like = {"w": jax.ShapeDtypeStruct((8, 4), np.float64, sharding=NamedSharding(mesh, P("b")))}
    with pytest.raises(tg.MismatchError, match=r"'w' in like is float64\[8, 4\], which jax puts"):
        tg.propagate_sharding({"w": w}, like)
    with jax.enable_x64(True):
        assert tg.propagate_sharding({"w": w}, like)["w"].dtype == np.float64


# -- one checkpoint object read by several threads at once -----------------------------------


def test_one_safetensors_checkpoint_grafted_by_four_threads_at_once_gives_each_its_values(
        tmp_path, mesh):
    """Before: the reader's reused row memory was shared between threads' reads.

    Four threads each grafting their own tensors, transposed, from one
    `SafetensorsCheckpoint`: 5 of 600 grafts held another read's bytes
    (none without the reused memory, none with an object per thread). The
    switch interval is made short so that threads interleave often.
    """
    rng = np.random.default_rng(3)
    tensors = {f"t{k}": rng.standard_normal((64, 32)).astype(np.float32) for k in range(16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    source = tg.SafetensorsCheckpoint(str(tmp_path / "m.safetensors"))
    grid = NamedSharding(mesh, P("a", "b"))
    wrong, errors = [], []

    def work(names):
        like = {n: jax.ShapeDtypeStruct((32, 64), np.float32, sharding=grid) for n in names}
        mapping = {n: tg.transpose(n, (1, 0)) for n in names}
        try:
            for r in range(150):
                out = tg.graft(like, source, mapping)
                wrong.extend((n, r) for n in names
                             if not np.array_equal(np.asarray(out[n]), tensors[n].T))
        except Exception as e:  # noqa: BLE001 (reported below, with the thread's tensors)
            errors.append((names, repr(e)))

    names = sorted(tensors)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and wrong == []
