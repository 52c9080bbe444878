"""The storage layer: locations, remote reads on loopback servers, and failures in bounded time.

Remote tests use real servers on 127.0.0.1 (fake-gcs-server, moto, and small
stub servers that refuse or never answer), inside the loopback-only network
namespace the conftest enters; they skip, with the reason, where it cannot.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import servers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kauldron_run import init_params, train_state, write_item, write_run

import treegraft as tg
from treegraft._storage.location import Location, default_timeout

# -- parsing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "key", "shown"),
    [
        ("/runs/a", "file", "", "/runs/a", "/runs/a"),
        ("/runs/a/", "file", "", "/runs/a", "/runs/a"),
        ("file:///runs/a", "file", "", "/runs/a", "file:///runs/a"),
        ("file://localhost/runs/a%20b", "file", "", "/runs/a b", "file://localhost/runs/a%20b"),
        ("gs://bkt/run/checkpoints", "gs", "bkt", "run/checkpoints", "gs://bkt/run/checkpoints"),
        ("gs://bkt/run//x/", "gs", "bkt", "run/x", "gs://bkt/run/x"),
        ("GS://bkt/run", "gs", "bkt", "run", "gs://bkt/run"),
        ("s3://bkt", "s3", "bkt", "", "s3://bkt"),
        ("s3://bkt/a/b", "s3", "bkt", "a/b", "s3://bkt/a/b"),
    ],
)
def test_parse(text, scheme, bucket, key, shown):
    loc = Location.parse(text)
    assert (loc.scheme, loc.bucket, loc.key, str(loc)) == (scheme, bucket, key, shown)


def test_local_paths_expand_home_and_become_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert Location.parse("~/runs/a").key == str(tmp_path / "runs" / "a")
    assert Location.parse("runs/a").key == str(tmp_path / "runs" / "a")
    assert Location.parse(pathlib.Path("~") / "x").key == str(tmp_path / "x")
    assert tg.KauldronCheckpoint("~/w").workdir == str(tmp_path / "w")
    assert tg.OrbaxCheckpoint("~/w/ckpt_1").path == str(tmp_path / "w" / "ckpt_1")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://host/x", r"unknown storage scheme 'http'://"),
        ("gs:///run", r"names no bucket: write gs://BUCKET/path"),
        ("s3://", r"names no bucket: write s3://BUCKET/path"),
        ("file://otherhost/x", r"a file:// URL names a local path .*not host 'otherhost'"),
        (3, r"must be a str or os.PathLike, got int: 3"),
        (b"/x", r"must be a str or os.PathLike, got bytes"),
    ],
)
def test_bad_locations_are_checkpoint_errors(value, message):
    with pytest.raises(tg.CheckpointError, match=message):
        Location.parse(value)


def test_join_and_describe_keep_what_the_user_wrote():
    loc = Location.parse("gs://bkt/run/")
    assert str(loc.join("checkpoints", "ckpt_5/default")) == "gs://bkt/run/checkpoints/ckpt_5/default"
    assert loc.join("checkpoints").key == "run/checkpoints"
    assert str(Location.parse("file:///w").join("a")) == "file:///w/a"
    assert Location.parse("file:///w").join("a").key == "/w/a"
    assert tg.KauldronCheckpoint("s3://bkt/run").describe() == "the checkpoint of s3://bkt/run"


def test_kvstore_specs(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert Location.parse("/w").kvstore() == {"driver": "file", "path": "/w/"}
    assert Location.parse("gs://bkt/r").kvstore() == {
        "driver": "gcs", "bucket": "bkt", "path": "r/"}
    assert Location.parse("s3://bkt").kvstore() == {"driver": "s3", "bucket": "bkt", "path": ""}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert Location.parse("s3://bkt/r").kvstore() == {
        "driver": "s3", "bucket": "bkt", "path": "r/", "endpoint": "http://127.0.0.1:1",
        "aws_region": "eu-west-3"}
    # The service-specific variables win, as in the AWS SDKs.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    spec = Location.parse("s3://bkt/r").kvstore()
    assert (spec["endpoint"], spec["aws_region"]) == ("http://127.0.0.1:2", "us-west-2")


def test_timeouts(monkeypatch):
    monkeypatch.delenv("TREEGRAFT_STORAGE_TIMEOUT", raising=False)
    assert default_timeout() == 30.0
    monkeypatch.setenv("TREEGRAFT_STORAGE_TIMEOUT", "2.5")
    assert Location.parse("gs://bkt/r").timeout == 2.5
    assert Location.parse("gs://bkt/r", timeout=4).timeout == 4.0
    assert tg.KauldronCheckpoint("gs://bkt/r", timeout=7).location.timeout == 7.0
    monkeypatch.setenv("TREEGRAFT_STORAGE_TIMEOUT", "soon")
    with pytest.raises(tg.CheckpointError, match=r"TREEGRAFT_STORAGE_TIMEOUT='soon' is not a"):
        Location.parse("gs://bkt/r")
    with pytest.raises(tg.CheckpointError, match=r"timeout must be a positive number"):
        Location.parse("gs://bkt/r", timeout=0)


# -- real servers --------------------------------------------------------------

SHAPES = {"encoder": {"kernel": (64, 32), "bias": (32,)}, "decoder": {"kernel": (32, 64)}}


def _sharded_target(mesh):
    return {
        "params": {
            "encoder": {
                "kernel": jax.ShapeDtypeStruct((64, 32), jnp.float32,
                                               sharding=NamedSharding(mesh, P("x"))),
                "bias": jnp.zeros(32),
            }
        }
    }


def test_orbax_writes_to_gcs_and_treegraft_reads_it_back(gcs_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative folder named gs: would appear here
    url = f"gs://treegraft/orbax-written-{os.getpid()}"
    states = {s: train_state(init_params(SHAPES, seed=s), step=s, opt=optax.adam(1e-3))
              for s in (1, 4)}
    write_run(url, states)
    mesh = jax.make_mesh((8,), ("x",))
    new = tg.graft(_sharded_target(mesh), tg.KauldronCheckpoint(url),
                   {"params.encoder": "params.encoder"})
    kernel = new["params"]["encoder"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P("x"))
    want = states[4].params["encoder"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(want))
    loader = tg.PartialKauldronLoader(workdir=url, new_to_old={"params.encoder": "params.encoder"})
    with loader:
        state = loader.transform({"params": {"encoder": {"kernel": jnp.zeros((64, 32)),
                                                         "bias": jnp.zeros(32)}}})
    np.testing.assert_array_equal(np.asarray(state["params"]["encoder"]["bias"]),
                                  np.asarray(states[4].params["encoder"]["bias"]))
    assert os.listdir(tmp_path) == []


def test_partial_read_from_s3_reads_only_the_mapped_bytes(s3_server, tmp_path):
    import tensorstore as ts

    rng = np.random.default_rng(0)
    tree = {f"w{i}": rng.standard_normal((256, 256), dtype=np.float32) for i in range(8)}
    write_item(tmp_path / "item", tree)
    url = servers.Storage("s3", "treegraft").publish(tmp_path / "item")
    src = tg.OrbaxCheckpoint(url)
    src.metadata()

    def served() -> int:
        found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/s3/bytes_read")
        return sum(v["value"] for m in found for v in m["values"])

    before = served()
    new = tg.graft({"w3": np.zeros((256, 256), np.float32)}, src, {"w3": "w3"})
    got = served() - before
    np.testing.assert_array_equal(new["w3"], tree["w3"])
    # Random floats barely compress: the bytes served are those of w3, plus the index.
    assert got <= 1.05 * tree["w3"].nbytes + 16 * 1024, got


def test_missing_buckets_are_not_found_errors(gcs_server, s3_server):
    with pytest.raises(tg.CheckpointNotFoundError, match=r"^listing s3://no-such-bucket/run "
                       r"failed: the bucket 'no-such-bucket' does not exist \(or is not visible "
                       r"with these credentials\)\. \(NOT_FOUND: NoSuchBucket: The specified "
                       r"bucket does not exist\)$"):
        tg.KauldronCheckpoint("s3://no-such-bucket/run").metadata()
    # GCS lists a missing bucket as empty: the workdir is then missing, by name.
    with pytest.raises(tg.CheckpointNotFoundError,
                       match=r"workdir 'gs://no-such-bucket/run' does not exist"):
        tg.KauldronCheckpoint("gs://no-such-bucket/run").metadata()
    with pytest.raises(tg.CheckpointNotFoundError,
                       match=r"checkpoint 'gs://no-such-bucket/ckpt' does not exist"):
        tg.OrbaxCheckpoint("gs://no-such-bucket/ckpt").metadata()


class _Refuse(http.server.BaseHTTPRequestHandler):
    """Answers every request 403, as S3 (XML) and GCS (JSON) do for refused credentials."""

    def do_GET(self):
        if self.path.startswith(("/storage/", "/download/")):  # the GCS JSON API
            body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                               "storage.objects.list access", "errors": []}}).encode()
            kind = "application/json"
        else:
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b"<Message>Access Denied</Message></Error>")
            kind = "application/xml"
        self.send_response(403)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server(s3_server):
    with servers.http_endpoint(_Refuse) as url:
        yield url


@pytest.fixture
def silent_server(s3_server):
    """Accepts connections and never answers."""
    with servers.silent_endpoint() as url:
        yield url


def test_refused_credentials_are_a_checkpoint_error(refusing_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", refusing_server)
    with pytest.raises(tg.CheckpointError, match=r"s3://treegraft/run failed: the credentials "
                       r"were refused: check them \(AWS_ACCESS_KEY_ID"):
        tg.KauldronCheckpoint("s3://treegraft/run").metadata()


def test_unreachable_endpoint_fails_in_bounded_time(s3_server, monkeypatch):
    dead = f"http://127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    start = time.monotonic()
    with pytest.raises(tg.CheckpointError, match=rf"s3://treegraft/run .*{dead}"):
        tg.KauldronCheckpoint("s3://treegraft/run", timeout=20).metadata()
    assert time.monotonic() - start < 20


def test_a_server_that_never_answers_times_out(silent_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_server)
    start = time.monotonic()
    with pytest.raises(tg.CheckpointError, match=r"listing|took more than 1 s: check the network"
                       ) as info:
        tg.OrbaxCheckpoint("s3://treegraft/ckpt", timeout=1).metadata()
    assert "s3://treegraft/ckpt" in str(info.value)
    assert time.monotonic() - start < 5


_GCS_CHILD = """
import json, sys, time
import treegraft as tg
start = time.monotonic()
try:
    tg.KauldronCheckpoint("gs://treegraft/run", timeout=float(sys.argv[1])).metadata()
    out = {"ok": True}
except tg.CheckpointError as e:
    out = {"type": type(e).__name__, "message": str(e)}
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def _gcs_child(url: str, timeout: float) -> dict:
    # The GCS endpoint is read from the environment: a child process gets its own.
    env = dict(os.environ, TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_GCS_CHILD), str(timeout)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gcs_endpoint_that_never_answers_times_out(silent_server):
    out = _gcs_child(silent_server, 2)
    assert out["type"] == "CheckpointError"
    assert "gs://treegraft/run took more than 2 s" in out["message"], out
    assert "TENSORSTORE_GCS_HTTP_URL" in out["message"]
    assert out["seconds"] < 8


def test_gcs_unreachable_endpoint_is_a_checkpoint_error(gcs_server):
    dead = f"http://127.0.0.1:{servers.free_port()}"
    out = _gcs_child(dead, 20)
    assert out["type"] == "CheckpointError", out
    assert "gs://treegraft/run" in out["message"] and dead in out["message"], out
    assert out["seconds"] < 20


def test_reading_writes_nothing_remotely_or_locally(gcs_server, s3_server, tmp_path, monkeypatch):
    write_run(tmp_path / "run", {2: train_state(init_params(SHAPES, seed=2))})
    monkeypatch.chdir(tmp_path)
    for kind in ("gcs", "s3"):
        storage = servers.Storage(kind, "treegraft")
        url = storage.publish(tmp_path / "run")
        before = storage.bucket_keys()
        src = tg.KauldronCheckpoint(url)
        tg.graft({"params": jax.tree.map(jnp.zeros_like, init_params(SHAPES, seed=0))}, src,
                 {"params": "params"})
        with pytest.raises(tg.CheckpointNotFoundError):
            tg.KauldronCheckpoint(url, step=3).metadata()
        with pytest.raises(tg.CheckpointNotFoundError):
            tg.OrbaxCheckpoint(url + "/nothing").metadata()
        assert storage.bucket_keys() == before
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_gcs_refused_credentials_are_a_checkpoint_error(refusing_server):
    out = _gcs_child(refusing_server, 20)
    assert out["type"] == "CheckpointError", out
    assert re.match(
        r"(listing|reading) gs://treegraft/run failed: the credentials were refused: check "
        r"them \(GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`\)",
        out["message"],
    ), out
    assert out["seconds"] < 20
