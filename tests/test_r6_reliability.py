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
