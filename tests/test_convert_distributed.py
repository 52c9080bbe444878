"""tg.save and tg.convert from two processes under jax.distributed (docs/design.md section 15).

Two processes on loopback (CPU backend, gloo, 2 devices each) save one state of
arrays sharded across all 4 devices, each writing the chunks of the shards it
holds, process 0 the metadata after both are done; then they convert that
checkpoint, the chunks dealt out between them. Plain orbax, in this process,
restores both equal; each process wrote about its half of the bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "CONVERT_RESULT "
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io to count bytes written"
)

WORKER = r"""
import json, os, sys
import numpy as np
process, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process, initialization_timeout=120)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import treegraft as tg

def written():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])

def values(shape, seed):
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 0.5 + seed)

mesh = Mesh(np.array(jax.devices()), ("x",))
def make(shape, spec, seed):
    full = values(shape, seed)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda i: full[i])

state = {"w": make((256, 512), P("x"), 1), "e": make((64, 256), P(None, "x"), 2),
         "b": make((512,), P(), 3)}
result = {"process": process}
try:
    before = written()
    result["saved"] = tg.save(state, os.path.join(workdir, "saved"), max_host_bytes=1 << 16)
    result["save_bytes"] = written() - before
    before = written()
    result["converted"] = tg.convert(tg.OrbaxCheckpoint(os.path.join(workdir, "saved")),
                                     os.path.join(workdir, "converted"),
                                     {"t": tg.transpose("w", (1, 0)), "b": "b"},
                                     max_host_bytes=1 << 16)
    result["convert_bytes"] = written() - before
    try:  # a transform of an in-memory array spread over processes: refused on both
        tg.convert(state, os.path.join(workdir, "refused"), {"t": tg.transpose("w", (1, 0))})
        result["refused"] = ""
    except tg.GraftError as e:
        result["refused"] = str(e)
    result["ok"] = True
except BaseException as e:
    import traceback
    result["ok"] = False
    result["error"] = traceback.format_exc()
print("CONVERT_RESULT " + json.dumps(result), flush=True)
if not result["ok"]:
    os._exit(1)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir: str) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    port = _free_port()
    logs = [open(os.path.join(workdir, f"worker{i}.log"), "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), workdir],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 20)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for i, log in enumerate(logs):
        log.seek(0)
        text = log.read()
        log.close()
        lines = [line for line in text.splitlines() if line.startswith(PREFIX)]
        assert procs[i].returncode == 0 and len(lines) == 1, f"process {i}:\n{text[-4000:]}"
        results.append(json.loads(lines[0][len(PREFIX):]))
    return results


def values(shape, seed):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 0.5 + seed


def test_two_processes_write_one_checkpoint_each_its_share(tmp_path):
    results = _run(str(tmp_path))
    for r in results:
        assert r["ok"], r.get("error")
    saved = str(tmp_path / "saved")
    assert all(r["saved"] == saved for r in results)
    got = ocp.StandardCheckpointer().restore(saved)
    np.testing.assert_array_equal(got["w"], values((256, 512), 1))
    np.testing.assert_array_equal(got["e"], values((64, 256), 2))
    np.testing.assert_array_equal(got["b"], values((512,), 3))
    converted = ocp.PyTreeCheckpointer().restore(str(tmp_path / "converted"))
    np.testing.assert_array_equal(converted["t"], values((256, 512), 1).T)
    np.testing.assert_array_equal(converted["b"], values((512,), 3))
    # Each process wrote about its half of the array bytes, never all of them.
    sharded = (256 * 512 + 64 * 256) * 4
    for r in results:
        assert 0.3 * sharded < r["save_bytes"] < 0.75 * sharded, results
        assert 0.3 * 256 * 512 * 4 < r["convert_bytes"] < 0.75 * 256 * 512 * 4, results
    assert [n for n in os.listdir(tmp_path) if ".treegraft-tmp-" in n] == []
    for r in results:
        assert "save the state first" in r["refused"], r["refused"]
    assert not os.path.exists(tmp_path / "refused")
