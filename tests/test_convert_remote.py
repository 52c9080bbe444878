"""tg.convert to gs:// and s3:// (docs/design.md sections 11 and 15), on loopback emulators.

fake-gcs-server and moto run on 127.0.0.1 (tests/servers.py); the session is
in a loopback-only network namespace where the machine allows it.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import servers
import tensorstore

import treegraft as tg

_N = itertools.count()


def state():
    rng = np.random.default_rng(0)
    return {
        "layers_0": {"w": rng.standard_normal((32, 16)).astype(np.float32)},
        "layers_1": {"w": rng.standard_normal((32, 16)).astype(np.float32)},
        "step": np.array(3, np.int32),
    }


MAPPING = {"layers": tg.stack("layers_*"), "step": "step"}


def url(scheme: str) -> str:
    return f"{scheme}://treegraft/convert-{os.getpid()}-{next(_N)}"


@pytest.fixture(params=["gcs", "s3"])
def remote(request):
    request.getfixturevalue(f"{request.param}_server")
    return "gs" if request.param == "gcs" else "s3"


def test_convert_writes_a_remote_checkpoint_treegraft_reads(remote, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local folder named gs: or s3: would appear here
    dest = url(remote)
    assert tg.convert(state(), dest, MAPPING, max_host_bytes=1024) == dest
    like = {"layers": {"w": np.zeros((2, 32, 16), np.float32)}, "step": np.zeros((), np.int32)}
    got = tg.graft(like, tg.OrbaxCheckpoint(dest), {"": ""})
    np.testing.assert_array_equal(got["layers"]["w"],
                                  np.stack([state()["layers_0"]["w"], state()["layers_1"]["w"]]))
    assert int(got["step"]) == 3
    # an existing remote dest is refused, then replaced with overwrite=True
    with pytest.raises(tg.CheckpointError, match="already exists"):
        tg.save({"v": np.ones(2)}, dest)
    tg.save({"v": np.ones(2)}, dest, overwrite=True)
    meta = tg.OrbaxCheckpoint(dest).metadata()
    assert list(meta) == ["v"]
    assert os.listdir(tmp_path) == []


def test_a_kauldron_step_on_remote_storage(remote, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = url(remote)
    tg.convert(state(), workdir, MAPPING, format="kauldron", step=4)
    like = {"layers": {"w": np.zeros((2, 32, 16), np.float32)}, "step": np.zeros((), np.int32)}
    got = tg.graft(like, tg.KauldronCheckpoint(workdir), {"": ""})
    np.testing.assert_array_equal(got["layers"]["w"][1], state()["layers_1"]["w"])


def test_a_folder_without_metadata_is_not_a_checkpoint(remote):
    """What a convert killed mid-write leaves remotely: arrays, no _METADATA (written last)."""
    from treegraft._storage.location import Location

    dest = url(remote)
    tg.save(state(), dest)
    location = Location.parse(dest)
    kv = location.open_kvstore()
    location.wait(kv.delete_range(tensorstore.KvStore.KeyRange(b"_METADATA", b"_METADATA\x00")),
                  "deleting")
    with pytest.raises(tg.GraftError):
        tg.OrbaxCheckpoint(dest).metadata()


def test_a_missing_bucket_is_a_checkpoint_error(remote):
    with pytest.raises(tg.CheckpointError, match="no-such-bucket"):
        tg.save(state(), f"{remote}://no-such-bucket/out")


class _Refuse(http.server.BaseHTTPRequestHandler):
    """Answers every request 403, as S3 does for refused credentials."""

    def _refuse(self):
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server(s3_server):
    with servers.http_endpoint(_Refuse) as url:
        yield url


def test_a_refusing_server_is_a_checkpoint_error_within_the_timeout(refusing_server,
                                                                    monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", refusing_server)
    monkeypatch.setenv("TREEGRAFT_STORAGE_TIMEOUT", "10")
    start = time.monotonic()
    with pytest.raises(tg.CheckpointError, match=r"s3://treegraft/refused.*credentials"):
        tg.save(state(), "s3://treegraft/refused")
    assert time.monotonic() - start < 10


@pytest.fixture
def silent_server(s3_server):
    """Accepts connections and never answers."""
    with servers.silent_endpoint() as url:
        yield url


def test_a_server_that_never_answers_is_an_error_within_the_timeout(silent_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_server)
    monkeypatch.setenv("TREEGRAFT_STORAGE_TIMEOUT", "3")
    start = time.monotonic()
    with pytest.raises(tg.CheckpointError, match=r"s3://treegraft/stalled.*took more than 3 s"):
        tg.save(state(), "s3://treegraft/stalled")
    assert time.monotonic() - start < 10


class _ReadOnly(http.server.BaseHTTPRequestHandler):
    """An S3 bucket these credentials may list and read but not write: every write is 403."""

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if "list-type=2" in self.path:
            self._send(200, b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                            b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>treegraft'
                            b"</Name><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
                            b"<IsTruncated>false</IsTruncated></ListBucketResult>")
        else:
            self._send(404, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey'
                            b"</Code><Message>The specified key does not exist.</Message>"
                            b"</Error>")

    do_HEAD = do_GET

    def _refuse(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._send(403, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied'
                        b"</Code><Message>Access Denied</Message></Error>")

    do_PUT = do_POST = do_DELETE = _refuse

    def log_message(self, *args):
        pass


@pytest.fixture
def read_only_server(s3_server):
    with servers.http_endpoint(_ReadOnly) as url:
        yield url


def test_a_refused_write_is_a_checkpoint_error_naming_dest(read_only_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", read_only_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", read_only_server)
    monkeypatch.setenv("TREEGRAFT_STORAGE_TIMEOUT", "10")
    start = time.monotonic()
    with pytest.raises(tg.CheckpointError, match=r"^writing s3://treegraft/read-only failed: "
                       r".*(PERMISSION_DENIED|Access Denied).*permission denied") as info:
        tg.save(state(), "s3://treegraft/read-only")
    assert "treegraft-tmp" not in str(info.value)
    assert time.monotonic() - start < 10


_GCS_CHILD = """
import json, sys, time
import numpy as np
import treegraft as tg
start = time.monotonic()
try:
    tg.save({"w": np.ones((64, 64), np.float32)}, "gs://treegraft/refused")
    out = {"ok": True}
except tg.CheckpointError as e:
    out = {"type": type(e).__name__, "message": str(e)}
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def test_a_refusing_gcs_server_is_a_checkpoint_error_within_the_timeout(refusing_server):
    # The GCS endpoint is read from the environment once: a child process gets its own.
    env = dict(os.environ, TENSORSTORE_GCS_HTTP_URL=refusing_server,
               STORAGE_EMULATOR_HOST=refusing_server, TREEGRAFT_STORAGE_TIMEOUT="10",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _GCS_CHILD], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.get("type") == "CheckpointError", out
    assert "gs://treegraft/refused" in out["message"] and "credentials" in out["message"], out
    assert out["seconds"] < 10
