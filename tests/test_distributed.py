"""treegraft under JAX's distributed runtime: 2 processes on loopback, 4 devices.

Launches tests/distributed_worker.py twice (process 0 and 1) with the CPU
backend, gloo collectives and 2 local devices each. The processes write a
Kauldron-layout checkpoint together, then graft params and opt_state subtrees
into a differently structured, differently sharded global state; each one checks
its own shards and reports what it read. See the worker's docstring.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
RESULT_PREFIX = "TREEGRAFT_RESULT "
NUM_PROCESSES = 2
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io to count bytes read"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Replace (not extend) the 8 fake devices conftest.py asks for: 2 per process.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    root = os.path.dirname(os.path.dirname(WORKER))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def _run_workers(workdir: str, storage_url: str | None = None) -> list[tuple[int, str, str]]:
    """Runs the workers; returns (exit code, stdout, stderr) per process."""
    port = _free_port()
    env = _worker_env()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i in range(NUM_PROCESSES):
            out = open(os.path.join(workdir, f"worker{i}.out"), "w+b")
            err = open(os.path.join(workdir, f"worker{i}.err"), "w+b")
            logs.append((out, err))
            cmd = [
                sys.executable,
                WORKER,
                f"--process-id={i}",
                f"--num-processes={NUM_PROCESSES}",
                f"--port={port}",
                f"--workdir={workdir}",
            ] + ([f"--storage-url={storage_url}"] if storage_url else [])
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]  # poll every process, no short-circuit
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                # One failed: the others may wait for it forever; give them a moment.
                deadline = min(deadline, time.monotonic() + 20)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        results = []
        for proc, (out, err) in zip(procs, logs, strict=False):
            out.seek(0)
            err.seek(0)
            results.append((proc.returncode, out.read().decode(), err.read().decode()))
            out.close()
            err.close()
        for out, err in logs[len(procs) :]:
            out.close()
            err.close()
    return results


def _result(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, out
    return json.loads(lines[0][len(RESULT_PREFIX) :])


@pytest.mark.parametrize("storage", ["local", "gcs"])
def test_graft_across_two_processes(tmp_path, storage, request):
    """Both processes save together, then each reads only its own shards.

    On GCS (the emulator) the bytes each process reads are those tensorstore's
    gcs kvstore received, against rchar from the page cache locally.
    """
    url = None
    if storage == "gcs":
        request.getfixturevalue("gcs_server")  # sets the loopback environment the workers get
        url = f"gs://treegraft/distributed-{os.getpid()}-{time.monotonic_ns()}"
    start = time.monotonic()
    outputs = _run_workers(str(tmp_path), url)
    assert time.monotonic() - start < TIMEOUT_S, f"the workers did not finish in {TIMEOUT_S} s"
    results = []
    for i, (code, out, err) in enumerate(outputs):
        detail = f"process {i} exit {code}\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}"
        assert code == 0, detail
        res = _result(out)
        assert res["ok"], detail
        assert res["process"] == i
        results.append(res)

    for res in results:
        assert res["warnings"] == []
        # 7 grafted params leaves + 6 opt_state leaves + 2 in memory, 2 shards each.
        assert res["checked_shards"] == 2 * (7 + 6 + 2)
        # No array data crossed processes: the only gathers are the plan
        # verdict's 1 byte, one per graft into global arrays, and the read
        # agreement's 128 bytes, one per checkpoint read.
        assert all(name == "process_allgather" for name, _ in res["gathers"])
        sizes = [n for _, n in res["gathers"]]
        assert sizes.count(1) == 8 and sizes.count(128) == 4, res["gathers"]
        for phase in ("phase1", "phase2"):
            got = res[phase]
            # Each process addresses half of the bytes, and reads about that (as
            # stored: zstd-compressed), far less than the full arrays.
            assert got["own_bytes"] == got["full_bytes"] // 2, got
            assert 0.4 * got["full_bytes"] < got["rchar"] < 0.55 * got["full_bytes"], got
        # The same leaves into replicated targets read the full arrays: twice as much.
        ratio = res["phase1"]["rchar"] / res["phase1"]["rchar_replicated"]
        assert 0.45 < ratio < 0.55, res["phase1"]

    # The plan's verdict is the same on every process.
    errors = {res["bad_mapping_error"] for res in results}
    assert len(errors) == 1, errors
    message = errors.pop()
    assert message.startswith("PathNotFoundError:") and "'params.encodr'" in message
    # Processes about to read different steps all refuse, with the same message.
    errors = {res["divergent_step_error"] for res in results}
    assert len(errors) == 1, errors
    message = errors.pop()
    assert message.startswith("CheckpointError:")
    assert "'ckpt_100/default'" in message and "'ckpt_200/default'" in message
    # A plan failing on one process only (process 1 has a typo): process 1 says
    # why, process 0 says that process 1 failed; neither hangs in the read.
    errors = [res["divergent_plan_error"] for res in results]
    assert errors[1].startswith("PathNotFoundError:") and "'params.encodr'" in errors[1]
    assert errors[0].startswith("GraftError: the graft failed on process(es) [1]"), errors[0]
    # A mapping rejected while parsing, on one process only: the same agreement.
    errors = [res["unparsed_plan_error"] for res in results]
    assert errors[1].startswith("MappingError: invalid mapping"), errors[1]
    assert errors[0].startswith("GraftError: the graft failed on process(es) [1]"), errors[0]
