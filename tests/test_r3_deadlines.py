"""Stalled storage: every wait of the read path has a deadline (docs/design.md section 11).

A server that accepts a request and never answers it must not block a read
forever. Here a small TCP proxy on 127.0.0.1 stands in front of fake-gcs-server
or moto: it forwards every byte until a switch file appears, then swallows the
requests it matches and keeps their connections open, as a stalled server or
a dead proxy does. With a storage timeout of 2 s, each stalled call must raise
a `CheckpointError` naming the location within the timeout (plus a margin of
1.5 s, so that two timeouts in a row, a fallback waiting again, fail):
safetensors `metadata()` (one file; the shard probes of an index) and
`execute()`; orbax `plan` stalled on `manifest.ocdbt` or on a leaf's header,
and `execute()`; Kauldron `execute()`. A proxy that resets every connection
instead fails `execute()` as soon.

Each case runs in a child process: a read that hangs then fails the test when
the child is killed, instead of hanging the session; and the GCS endpoint is
read from the environment once per process, so only a child can be pointed at
the proxy.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import servers
from kauldron_run import init_params, train_state, write_item, write_run

import treegraft as tg
from treegraft._formats.orbax import ocdbt_index
from treegraft._formats.safetensors import header as st_header
from treegraft._storage.errors import stalled
from treegraft._storage.location import Location

_TIMEOUT = 2.0  # the storage timeout the children run with, in seconds
# A stall must be reported within the timeout, plus a margin for a loaded
# machine; two timeouts in a row (a fallback waiting again) exceed it.
_BOUND = _TIMEOUT + 1.5
_CHILD_CAP = 60.0  # a child still running after this is killed: the read hung
_TICK = 0.1  # how often the proxy's threads look at the stop flag


class StallingProxy:
    """A TCP proxy on 127.0.0.1 that stops answering once a switch file exists.

    After the switch file appears, a connection whose request bytes contain
    `match` (every request if empty) is frozen: nothing more is forwarded on it,
    either way, but it stays open, so the client waits for an answer that never
    comes. With `reset=True` such a connection is reset instead (as a proxy
    that drops connections does), and so is every later one. `close` stops
    every thread and closes every socket.
    """

    def __init__(self, upstream: str, switch: pathlib.Path, match: bytes = b"", *,
                 reset: bool = False):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        assert self._upstream[0] == "127.0.0.1", "the proxy forwards to loopback only"
        self._switch = switch
        self._match = match
        self._reset = reset
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.frozen = 0  # connections frozen so far
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(_TICK)
            with self._lock:
                self._sockets += [client, upstream]
            frozen = threading.Event()
            self._spawn(self._pump, client, upstream, frozen, True)
            self._spawn(self._pump, upstream, client, frozen, False)

    def _pump(self, src: socket.socket, dst: socket.socket, frozen: threading.Event,
              requests: bool) -> None:
        while not self._stop.is_set():
            try:
                data = src.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if requests and not frozen.is_set() and self._match in data and self._switch.exists():
                frozen.set()
                self.frozen += 1
                if self._reset:  # an RST, not an orderly close
                    src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    src.close()
                    dst.close()
                    return
            if frozen.is_set():
                continue  # swallowed: the request never reaches the server
            try:
                dst.sendall(data)
            except OSError:
                break
        if not frozen.is_set():
            for s in (src, dst):  # one side closed: so does the other
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        with self._lock:
            for s in self._sockets:
                s.close()


_CHILD = """
import json, pathlib, sys, time
import jax, jax.numpy as jnp
import treegraft as tg

args = json.loads(sys.argv[1])
switch = pathlib.Path(args["switch"])
fmt, op = args["case"].split("-")
like = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
mapping = {"w": "params.w" if fmt == "kauldron" else "w"}
out = {}
try:
    kinds = {"orbax": tg.OrbaxCheckpoint, "kauldron": tg.KauldronCheckpoint,
             "safetensors": tg.SafetensorsCheckpoint, "shards": tg.SafetensorsCheckpoint}
    src = kinds[fmt](args["url"])
    if op == "execute":
        p = tg.plan(like, src, mapping)
    elif op == "prefetch":
        src.metadata()  # the tree and the OCDBT index; the leaf headers are read by plan
    switch.touch()
    start = time.monotonic()
    if op == "metadata":
        src.metadata()
    elif op in ("plan", "prefetch"):
        tg.plan(like, src, mapping)
    else:
        tg.execute(p)
    out["ok"] = True
except Exception as e:
    out.update(type=type(e).__name__, message=str(e),
               checkpoint_error=isinstance(e, tg.CheckpointError))
out["seconds"] = time.monotonic() - start
print(json.dumps(out), flush=True)
"""


def run_child(case: str, url: str, switch: pathlib.Path, env: dict[str, str]) -> dict:
    """Runs one case in a child process; its report, or a failure if it hung."""
    args = json.dumps({"case": case, "url": url, "switch": str(switch)})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_CHILD), args],
            capture_output=True, text=True, env=env, timeout=_CHILD_CAP, check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{case} on {url}: the child did not finish in {_CHILD_CAP:g} s "
                    f"(a wait without a deadline); it printed: {out[-500:]!r}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def both_servers(gcs_server, s3_server):
    return {"gcs": gcs_server, "s3": s3_server}


def _safetensors_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    folder = tmp_path / "hf"
    folder.mkdir()
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    safetensors_numpy.save_file({"w": w}, str(folder / "weights.safetensors"))
    return folder


def _safetensors_shards(tmp_path: pathlib.Path) -> pathlib.Path:
    """Two shards and the index that names them, as Hugging Face writes them."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    folder = tmp_path / "hf"
    folder.mkdir()
    names = {"w": "model-00001.safetensors", "v": "model-00002.safetensors"}
    for name, file in names.items():
        safetensors_numpy.save_file({name: np.ones((64, 32), np.float32)}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    return folder


def _orbax_item(tmp_path: pathlib.Path) -> pathlib.Path:
    # Enough leaves that a plan of one reads its header by key, not from a walk of the index.
    tree = {f"x{i}": np.full(2, i, np.float32) for i in range(40)}
    tree["w"] = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    return pathlib.Path(write_item(tmp_path / "item", tree))


def _kauldron_run(tmp_path: pathlib.Path) -> pathlib.Path:
    write_run(tmp_path / "run", {1: train_state(init_params({"w": (64, 32)}, seed=0))})
    return tmp_path / "run"


_MAKERS = {"safetensors": _safetensors_folder, "shards": _safetensors_shards,
           "orbax": _orbax_item, "kauldron": _kauldron_run}


# case -> (what the proxy stalls on once the switch exists, the file messages name)
_CASES = {
    "safetensors-metadata": (b"", "/weights.safetensors"),
    "safetensors-execute": (b"", "/weights.safetensors"),
    # The index is read; the probes of the shards it names stall.
    "shards-metadata": (b"model-0000", "/model-00001.safetensors"),
    "orbax-plan": (b"manifest.ocdbt", ""),
    "orbax-prefetch": (b"", ""),
    "orbax-execute": (b"", ""),
    "kauldron-execute": (b"", "/checkpoints/ckpt_1/default"),
}


def _run_behind_proxy(servers_by_kind, tmp_path, kind, case, *, reset=False):
    """Publishes the case's checkpoint, runs the case through a proxy; the child's report."""
    match, _ = _CASES[case]
    local = _MAKERS[case.split("-")[0]](tmp_path)
    url = servers.Storage(kind, "treegraft").publish(local)
    switch = tmp_path / "stall-now"
    proxy = StallingProxy(servers_by_kind[kind].url, switch, match, reset=reset)
    try:
        env = dict(os.environ, TREEGRAFT_STORAGE_TIMEOUT=str(_TIMEOUT))
        if kind == "gcs":
            env.update(TENSORSTORE_GCS_HTTP_URL=proxy.url, STORAGE_EMULATOR_HOST=proxy.url)
        else:
            env.update(AWS_ENDPOINT_URL=proxy.url, AWS_ENDPOINT_URL_S3=proxy.url)
        out = run_child(case, url, switch, env)
    finally:
        proxy.close()
    assert proxy.frozen > 0, "the proxy never stalled a request: the test tests nothing"
    out["url"] = url
    return out


@pytest.mark.parametrize("kind", ["gcs", "s3"])
@pytest.mark.parametrize("case", list(_CASES))
def test_a_stalled_read_is_a_checkpoint_error_within_the_timeout(both_servers, tmp_path, kind,
                                                                 case):
    out = _run_behind_proxy(both_servers, tmp_path, kind, case)
    url, file = out["url"], _CASES[case][1]
    assert out.get("checkpoint_error"), out
    assert f"{url}{file} " in out["message"], out
    assert f"took more than {_TIMEOUT:g} s" in out["message"], out
    assert "TREEGRAFT_STORAGE_TIMEOUT" in out["message"], out
    assert out["seconds"] < _BOUND, out


@pytest.mark.parametrize("kind", ["gcs", "s3"])
def test_a_proxy_that_resets_every_connection_fails_execute_in_bounded_time(both_servers,
                                                                           tmp_path, kind):
    out = _run_behind_proxy(both_servers, tmp_path, kind, "safetensors-execute", reset=True)
    assert out.get("checkpoint_error"), out
    assert f"{out['url']}/weights.safetensors " in out["message"], out
    assert out["seconds"] < _BOUND, out


# -- the same, without servers: futures that never complete --------------------------------
# These run everywhere (the emulator tests above skip outside a loopback-only
# network namespace). Each call runs in a daemon thread joined with a bound, so
# that a wait without a deadline fails the test instead of hanging it.

_SHORT = 0.3  # seconds: the timeout of the locations below


def _raised_within(bound: float, call) -> BaseException:
    """The exception call raised, which it must do within bound seconds."""
    box: dict[str, object] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            box["error"] = e
        box["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"still waiting after {bound} s: a wait without a deadline"
    assert "error" in box, f"returned {box.get('value')!r} instead of raising"
    assert box["seconds"] < bound
    return box["error"]  # type: ignore[return-value]


def _never():
    """A tensorstore future that never completes (its promise is kept alive with it)."""
    import tensorstore as ts

    promise, future = ts.Promise.new()
    _KEEP.append(promise)
    return future


_KEEP: list = []


class _StalledKv:
    """A kvstore whose every read never completes; counts the reads issued."""

    def __init__(self):
        self.reads = 0

    def read(self, key, *, byte_range=None):
        self.reads += 1
        return _never()


def test_wait_bounds_a_future_that_never_completes():
    loc = Location.parse("s3://bkt/hf", timeout=_SHORT)
    future = _never()
    error = _raised_within(_SHORT + 1.0, lambda: loc.wait(future, "reading"))
    assert isinstance(error, tg.CheckpointError)
    assert re.match(r"reading s3://bkt/hf took more than 0\.3 s: check the network, the "
                    r"endpoint .* \(AWS_ENDPOINT_URL\) and AWS_REGION; pass timeout= or set "
                    r"TREEGRAFT_STORAGE_TIMEOUT to wait longer$", str(error)), error
    assert stalled(error) and future.cancelled()
    wrapped = tg.CheckpointError("cannot read leaf 'w'")
    wrapped.__cause__ = error
    assert stalled(wrapped)  # a wrapper naming the leaf is still a stall
    assert not stalled(tg.CheckpointError("damaged")) and not stalled(TimeoutError())


def test_a_stalled_safetensors_read_names_the_file():
    loc = Location.parse("gs://bkt/hf", timeout=_SHORT)
    error = _raised_within(
        _SHORT + 1.0, lambda: st_header.read_result(_never(), "w.safetensors", loc,
                                                    "its header length"))
    assert isinstance(error, tg.CheckpointError)
    assert str(error).startswith(
        "reading its header length from gs://bkt/hf/w.safetensors took more than 0.3 s: "
        "check the network and the endpoint"), error


def test_stalled_probes_of_the_shards_cost_one_timeout_not_one_each():
    loc = Location.parse("gs://bkt/hf", timeout=_SHORT)
    kv = _StalledKv()
    names = [f"model-0000{i}.safetensors" for i in range(1, 6)]
    error = _raised_within(2 * _SHORT, lambda: st_header._missing(kv, names, loc))
    assert isinstance(error, tg.CheckpointError)
    assert "looking for gs://bkt/hf/model-00001.safetensors took more than 0.3 s" in str(error)
    assert kv.reads == len(names)  # probed together


def test_a_stalled_manifest_is_not_taken_for_a_store_without_one(monkeypatch, tmp_path):
    # A walk that cannot start falls back to reading keys one by one: not when
    # the storage stalled, since those reads would wait on it again.
    import tensorstore as ts

    monkeypatch.setattr(ts.ocdbt, "dump", lambda *args, **kwargs: _never())
    loc = Location.parse(str(tmp_path), timeout=_SHORT)
    error = _raised_within(_SHORT + 1.0, lambda: ocdbt_index.start_walk(loc, ts.Context()))
    assert isinstance(error, tg.CheckpointError)
    assert str(error).startswith(f"reading the OCDBT manifest of {tmp_path} took more than 0.3 s")
