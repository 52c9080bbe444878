"""The storage layer decides once what a storage failure means (docs/design.md section 11).

Every wait goes through `Location.wait`, and every failure it sees through
`errors.translate`: a local path gets a local remedy (never credentials or a
bucket), a remote one the remedy for its cause, a stall says it stalled even
where a format wraps it with a leaf's name. `reads.read_value` is the one
checked read of a file's bytes; `OrbaxStore` is built whole by its
constructor. Failing futures are made with `tensorstore.Promise`, so no
server is needed.
"""

from __future__ import annotations

import pytest

import treegraft as tg
from treegraft._formats.orbax import arrays
from treegraft._formats.orbax.headers import OrbaxStore
from treegraft._storage.errors import reason, stalled, translate
from treegraft._storage.location import Location
from treegraft._storage.reads import read_value

_SHORT = 0.3  # seconds: the timeout of the stalled waits here
_KEEP: list = []  # promises of futures that never complete, kept alive


def _failed(message: str):
    """A tensorstore future that fails as tensorstore does: a ValueError with a status."""
    import tensorstore as ts

    promise, future = ts.Promise.new()
    promise.set_exception(ValueError(message))
    return future


def _never():
    import tensorstore as ts

    promise, future = ts.Promise.new()
    _KEEP.append(promise)
    return future


def _wait_error(location: Location, future) -> tg.CheckpointError:
    with pytest.raises(tg.CheckpointError) as info:
        location.wait(future, "reading")
    return info.value


def test_a_local_permission_error_names_permissions_not_credentials(tmp_path):
    loc = Location.parse(str(tmp_path))
    error = _wait_error(loc, _failed(
        f'PERMISSION_DENIED: Error opening file "{tmp_path}/w": Permission denied'))
    message = str(error)
    assert message.startswith(f"reading {tmp_path} failed: permission denied; fix its "
                              "permissions"), message
    assert "credentials" not in message and "AWS" not in message
    assert "PERMISSION_DENIED" in message  # the storage's own words are kept


def test_a_local_not_found_is_not_a_missing_bucket(tmp_path):
    loc = Location.parse(str(tmp_path))
    error = _wait_error(loc, _failed("NOT_FOUND: Error opening \"zarr\" driver: no metadata"))
    assert not isinstance(error, tg.CheckpointNotFoundError)
    assert str(error) == (
        f'reading {tmp_path} failed: NOT_FOUND: Error opening "zarr" driver: no metadata')


@pytest.mark.parametrize(
    ("where", "status", "expected", "kind"),
    [
        ("s3://bkt/run", "PERMISSION_DENIED", "the credentials were refused: check them "
         "(AWS_ACCESS_KEY_ID", tg.CheckpointError),
        ("gs://bkt/run", "UNAUTHENTICATED", "the credentials were refused: check them "
         "(GOOGLE_APPLICATION_CREDENTIALS", tg.CheckpointError),
        ("gs://bkt/run", "NOT_FOUND", "the bucket 'bkt' does not exist",
         tg.CheckpointNotFoundError),
        ("s3://bkt/run", "UNAVAILABLE", "the storage could not be reached: check the network",
         tg.CheckpointError),
    ],
)
def test_a_remote_failure_gets_the_remedy_for_its_cause(where, status, expected, kind):
    loc = Location.parse(where)
    error = _wait_error(loc, _failed(f"{status}: refused [http_response={{body}}]"))
    assert type(error) is kind
    assert str(error).startswith(f"reading {where} failed: {expected}"), error
    assert str(error).endswith(f"({status}: refused)")  # the raw HTTP body is dropped


def test_translate_names_the_location_shown_and_the_timeout_of_the_one_waited_on():
    folder = Location.parse("gs://bkt/run", timeout=_SHORT)
    error = translate(TimeoutError(), folder, "listing", shown=Location.parse("gs://bkt"))
    assert str(error).startswith("listing gs://bkt took more than 0.3 s: check the network")


def test_a_stalled_header_read_says_it_stalled(tmp_path):
    # A wrapper naming the leaf quoted the root cause's first line: a stall's
    # TimeoutError has none, so the message said "TimeoutError" and no more.
    store = OrbaxStore(Location.parse(str(tmp_path), timeout=_SHORT))
    with pytest.raises(tg.CheckpointError) as info:
        store.finish_header("params.w", _never())
    message = str(info.value)
    assert message.startswith(
        f"cannot read the metadata of {tmp_path} (leaf 'params.w'): reading an array header "
        f"of {tmp_path} took more than 0.3 s"), message
    assert stalled(info.value)


def test_a_failed_array_read_quotes_the_status_without_the_exception_type(tmp_path):
    loc = Location.parse(str(tmp_path))
    error = _wait_error(loc, _failed("DATA_LOSS: chunk is corrupt"))
    assert str(arrays._LeafError("w", error)) == "array 'w': DATA_LOSS: chunk is corrupt"


def test_reason_is_the_storage_s_words_and_a_stall_s_whole_message(tmp_path):
    assert reason(ValueError("NOT_FOUND: gone\nspec: {...}")) == "NOT_FOUND: gone"
    assert reason(OSError("disk on fire")) == "OSError: disk on fire"
    assert reason(ValueError("not a status")) == "ValueError: not a status"
    loc = Location.parse(str(tmp_path), timeout=_SHORT)
    stall = _wait_error(loc, _never())
    assert reason(stall) == str(stall) and "took more than" in reason(stall)


def test_orbax_store_is_built_whole_by_its_constructor(tmp_path):
    impls = {"rng": "threefry2x32"}
    store = OrbaxStore(Location.parse(str(tmp_path)), zarr3=True, key_impls=impls,
                       fill_missing=False)
    key = store.leaf("rng", False)
    scalar = store.leaf("rng", True)  # a scalar is never a key array
    plain = store.leaf("w", False)
    assert (key.key_impl, scalar.key_impl, plain.key_impl) == ("threefry2x32", None, None)
    assert store.leaves == [key, scalar, plain]
    assert store.spec("w")["driver"] == "zarr3" and store.fill_missing is False
    impls["other"] = "rbg"
    assert "other" not in store.key_impls  # the store keeps its own copy
    default = OrbaxStore(Location.parse(str(tmp_path)))
    assert (default.zarr3, default.key_impls, default.fill_missing, default.index) == (
        False, {}, True, None)


def test_read_value_checks_presence_and_generation(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"12345678")
    loc = Location.parse(str(tmp_path))
    kv = loc.open_kvstore()
    gens: dict[str, bytes] = {}
    assert read_value(kv.read("f.bin"), "f.bin", loc, "its bytes", generations=gens) == (
        b"12345678")
    (tmp_path / "f.bin").write_bytes(b"123456789abc")  # rewritten: another generation
    with pytest.raises(tg.CheckpointError, match=r"f\.bin has changed since it was first read "
                       r"\(reading its bytes\): read it again$"):
        read_value(kv.read("f.bin"), "f.bin", loc, "its bytes", generations=gens)
    with pytest.raises(tg.CheckpointError, match=r"gone\.bin does not exist \(reading it\)"):
        read_value(kv.read("gone.bin"), "gone.bin", loc, "it")
    with pytest.raises(tg.CheckpointError, match=r"f\.bin is truncated or damaged: reading "
                       r"the tail needs 100 bytes but the file has 12"):
        read_value(kv.read("f.bin", byte_range=slice(99, 100)), "f.bin", loc, "the tail",
                   bytes_wanted=100)
