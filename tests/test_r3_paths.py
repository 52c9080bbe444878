"""Paths that are not what a checkpoint holds, and checkpoints changed after the plan.

Regression tests for the reliability issue, round 3 (items 3, 11, 12 and 18):

- a checkpoint rewritten between plan and execute with other dtypes (or
  shapes, or offsets) fails at execute with a `CheckpointError` naming the
  path and both sides, for orbax, Kauldron and safetensors sources, local and
  on S3, instead of being read and cast to the planned dtype;
- a FIFO where a safetensors file, `_METADATA` or `manifest.ocdbt` is expected
  is named as such instead of blocking forever (each such call runs in a
  thread with a deadline; a call that blocks is unblocked by a writer, so a
  regression fails instead of hanging);
- bucket names the storage rejects, a NUL byte, a folder name that is not
  UTF-8: `CheckpointError`s naming the location, never a raw ValueError or
  RuntimeError;
- a folder where a file is expected, a device, a loop of symbolic links: the
  message says what the path is.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
import time
from typing import Any

import jax
import numpy as np
import pytest
import servers
from kauldron_run import write_item, write_run

import treegraft as tg

SOURCES = {
    "orbax": tg.OrbaxCheckpoint,
    "kauldron": tg.KauldronCheckpoint,
    "safetensors": tg.SafetensorsCheckpoint,
}


def save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    return pytest.importorskip("safetensors.numpy").save_file(tensors, path)


def graft_w(source: Any, like: np.ndarray) -> Any:
    return tg.graft({"w": like}, source, {"w": "w"})


# -- item 3: a checkpoint rewritten between plan and execute -------------------------

# (what the plan saw, what the checkpoint holds at execute): values that a silent
# cast to the planned dtype would change (int64 2**40 + 1 -> int32 1; 1e300 -> inf).
REWRITES = {
    "int32-to-int64": (
        np.arange(4, dtype=np.int32), np.array([2**40 + 1, 1, 2, 3], np.int64),
        r"the plan saw int32\[4\], the checkpoint now holds int64\[4\]",
    ),
    "float32-to-float64": (
        np.arange(4, dtype=np.float32), np.array([1e300, 1, 2, 3], np.float64),
        r"the plan saw float32\[4\], the checkpoint now holds float64\[4\]",
    ),
    "shape": (
        np.arange(4, dtype=np.int32), np.arange(6, dtype=np.int32),
        r"the plan saw int32\[4\], the checkpoint now holds int32\[6\]",
    ),
}


def _rewrite_orbax(path: str, value: np.ndarray) -> None:
    shutil.rmtree(path)
    write_item(path, {"w": value})


@pytest.mark.parametrize("direct", [True, False], ids=["tensorstore", "orbax-restore"])
@pytest.mark.parametrize("case", list(REWRITES))
def test_orbax_rewritten_after_the_plan_fails_at_execute(tmp_path, case, direct):
    planned, now, message = REWRITES[case]
    path = write_item(tmp_path / "item", {"w": planned})
    src = tg.OrbaxCheckpoint(path)
    src._direct_reads = direct  # False: the fallback through orbax's restore
    p = tg.plan({"w": np.zeros_like(planned)}, src, {"w": "w"})
    _rewrite_orbax(path, now)
    with pytest.raises(tg.CheckpointError, match=rf"^'w' in {path} changed since the plan: "
                       rf"{message}; nothing was grafted: plan again"):
        tg.execute(p)


def test_orbax_rewritten_after_the_plan_fails_for_a_sharded_target(tmp_path):
    planned, now, message = REWRITES["float32-to-float64"]
    path = write_item(tmp_path / "item", {"w": planned})
    mesh = jax.make_mesh((2,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    like = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)}
    p = tg.plan(like, tg.OrbaxCheckpoint(path), {"w": "w"})
    _rewrite_orbax(path, now)
    with pytest.raises(tg.CheckpointError, match=message):
        tg.execute(p)


@pytest.mark.parametrize("case", ["int32-to-int64", "float32-to-float64"])
def test_kauldron_step_rewritten_after_the_plan_fails_at_execute(tmp_path, case):
    planned, now, message = REWRITES[case]
    workdir = tmp_path / "run"
    write_run(workdir, {1: {"w": planned}})
    p = tg.plan({"w": np.zeros_like(planned)}, tg.KauldronCheckpoint(workdir), {"w": "w"})
    shutil.rmtree(workdir)
    write_run(workdir, {1: {"w": now}})
    with pytest.raises(tg.CheckpointError, match=rf"ckpt_1/default changed since the plan: "
                       rf"{message}"):
        tg.execute(p)


def _rewrite_in_place(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Rewrites the file's bytes in place: same inode, same size, its mtime restored
    (as an in-place copy that keeps times does, or two writes in one clock tick)."""
    before = os.stat(path)
    save_safetensors(path + ".new", tensors)
    with open(path + ".new", "rb") as f:
        data = f.read()
    os.remove(path + ".new")
    assert len(data) == before.st_size  # the case a size check cannot see
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize(
    ("planned", "now", "message"),
    [
        # float32[4] and float64[2] take the same 16 bytes: the same file size.
        (np.arange(4, dtype=np.float32), np.array([1e300, 1], np.float64),
         r"tensor 'w' was float32\[4\] at bytes 64..80, it is now float64\[2\] at bytes 64..80"),
        (np.arange(4, dtype=np.int32), np.array([2**40 + 1, 1], np.int64),
         r"tensor 'w' was int32\[4\] at bytes 64..80, it is now int64\[2\] at bytes 64..80"),
    ],
    ids=["float", "int"],
)
def test_safetensors_rewritten_in_place_after_the_plan_fails_at_execute(
        tmp_path, planned, now, message):
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, {"w": planned})
    p = tg.plan({"w": np.zeros_like(planned)}, tg.SafetensorsCheckpoint(path), {"w": "w"})
    _rewrite_in_place(path, {"w": now})
    with pytest.raises(tg.CheckpointError, match=rf"^{path} changed since the plan: {message}; "
                       "nothing was grafted: open a new SafetensorsCheckpoint"):
        tg.execute(p)


def test_safetensors_offsets_moved_in_place_fail_at_execute(tmp_path):
    path = str(tmp_path / "m.safetensors")
    a, b = np.arange(4, dtype=np.float32), -np.arange(4, dtype=np.float32)
    save_safetensors(path, {"a": a, "b": b})
    p = tg.plan({"a": np.zeros(4, np.float32)}, tg.SafetensorsCheckpoint(path), {"a": "a"})
    # The same header length, the tensors' bytes swapped: 'a' now reads as b's bytes.
    with open(path, "rb") as f:
        raw = f.read()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    header["a"]["data_offsets"], header["b"]["data_offsets"] = (
        header["b"]["data_offsets"], header["a"]["data_offsets"])
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(tg.CheckpointError,
                       match=r"tensor 'a' was float32\[4\] at bytes \d+..\d+, it is now "
                       r"float32\[4\] at bytes \d+..\d+"):
        tg.execute(p)


def test_unchanged_checkpoints_still_read(tmp_path):
    """The checks at execute pass when nothing changed (and cost no second plan)."""
    st = str(tmp_path / "m.safetensors")
    save_safetensors(st, {"w": np.arange(4, dtype=np.float32)})
    orbax = write_item(tmp_path / "item", {"w": np.arange(4, dtype=np.float32)})
    for source in (tg.SafetensorsCheckpoint(st), tg.OrbaxCheckpoint(orbax)):
        got = graft_w(source, np.zeros(4, np.float32))
        np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(4, dtype=np.float32))


@pytest.fixture
def s3(s3_server):
    return servers.Storage("s3", "treegraft", s3_server)


def _republish(storage: servers.Storage, local: str, url: str) -> None:
    """Uploads the local folder's files over the objects under url (a rewrite in place)."""
    storage.upload_folder(local, url.split("://", 1)[1].split("/", 1)[1])


def test_orbax_on_s3_rewritten_after_the_plan_fails_at_execute(tmp_path, s3):
    planned, now, message = REWRITES["int32-to-int64"]
    local = write_item(tmp_path / "item", {"w": planned})
    url = s3.publish(local)
    p = tg.plan({"w": np.zeros_like(planned)}, tg.OrbaxCheckpoint(url), {"w": "w"})
    _rewrite_orbax(local, now)
    _republish(s3, local, url)
    with pytest.raises(tg.CheckpointError, match=rf"{url} changed since the plan: {message}"):
        tg.execute(p)


def test_safetensors_on_s3_rewritten_after_the_plan_fails_at_execute(tmp_path, s3):
    folder = tmp_path / "hf"
    folder.mkdir()
    path = str(folder / "m.safetensors")
    save_safetensors(path, {"w": np.arange(4, dtype=np.float32)})
    url = s3.publish(folder)
    p = tg.plan({"w": np.zeros(4, np.float32)},
                tg.SafetensorsCheckpoint(f"{url}/m.safetensors"), {"w": "w"})
    save_safetensors(path, {"w": np.array([1e300, 1], np.float64)})
    _republish(s3, str(folder), url)
    with pytest.raises(tg.CheckpointError, match=r"m.safetensors has changed since its header "
                       r"was read \(reading tensor 'w'\)"):
        tg.execute(p)


# -- item 11: a FIFO where a file is expected ----------------------------------------

_DEADLINE_S = 30.0  # far above the milliseconds the call takes; only a hang reaches it


def _bounded(call: Any, fifo: str) -> BaseException | None:
    """Runs call in a thread; the error it raised, or None.

    If the call is still running at the deadline (blocked opening the FIFO,
    waiting for a writer), the FIFO is opened for writing and closed until the
    call ends, so that a regression fails the test instead of hanging it.
    """
    out: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001  (reported to the test)
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(_DEADLINE_S)
    if not thread.is_alive():
        return out["error"]
    stop = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < stop:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for a blocked reader
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader right now
                raise
        time.sleep(0.02)
    pytest.fail(f"the call blocked on the FIFO {fifo} for more than {_DEADLINE_S:g} s")


def _fifo_orbax(tmp_path, name: str) -> tuple[str, str]:
    path = write_item(tmp_path / "item", {"w": np.arange(4, dtype=np.float32)})
    fifo = os.path.join(path, name)
    os.remove(fifo)
    os.mkfifo(fifo)
    return path, fifo


@pytest.mark.parametrize("name", ["_METADATA", "manifest.ocdbt"])
def test_fifo_in_an_orbax_checkpoint_is_named(tmp_path, name):
    path, fifo = _fifo_orbax(tmp_path, name)
    error = _bounded(lambda: graft_w(tg.OrbaxCheckpoint(path), np.zeros(4, np.float32)), fifo)
    assert isinstance(error, tg.CheckpointError), error
    assert f"'{fifo}' is a FIFO (named pipe), not a file" in str(error)


def test_fifo_in_a_kauldron_step_is_named(tmp_path):
    workdir = tmp_path / "run"
    write_run(workdir, {1: {"w": np.arange(4, dtype=np.float32)}})
    fifo = str(workdir / "checkpoints" / "ckpt_1" / "default" / "_METADATA")
    os.remove(fifo)
    os.mkfifo(fifo)
    error = _bounded(lambda: graft_w(tg.KauldronCheckpoint(workdir), np.zeros(4, np.float32)),
                     fifo)
    assert isinstance(error, tg.CheckpointError), error
    assert f"'{fifo}' is a FIFO (named pipe), not a file" in str(error)


@pytest.mark.parametrize("layout", ["file", "single-in-folder", "sharded"])
def test_fifo_as_a_safetensors_file_is_named(tmp_path, layout):
    folder = tmp_path / "hf"
    folder.mkdir()
    fifo = str(folder / "model.safetensors")
    if layout == "sharded":
        save_safetensors(str(folder / "a.safetensors"), {"v": np.zeros(2, np.float32)})
        index = {"weight_map": {"v": "a.safetensors", "w": "model.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.mkfifo(fifo)
    given = fifo if layout == "file" else str(folder)
    error = _bounded(lambda: graft_w(tg.SafetensorsCheckpoint(given), np.zeros(4, np.float32)),
                     fifo)
    assert isinstance(error, tg.CheckpointError), error
    assert f"'{fifo}' is a FIFO (named pipe), not a " in str(error)


def test_fifo_as_the_safetensors_index_is_named(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    fifo = str(folder / "model.safetensors.index.json")
    os.mkfifo(fifo)
    error = _bounded(lambda: tg.SafetensorsCheckpoint(str(folder)).metadata(), fifo)
    assert isinstance(error, tg.CheckpointError), error
    assert f"the index '{fifo}' is a FIFO (named pipe), not a file" in str(error)


def test_file_replaced_by_a_fifo_after_the_plan_is_named(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, {"w": np.arange(4, dtype=np.float32)})
    p = tg.plan({"w": np.zeros(4, np.float32)}, tg.SafetensorsCheckpoint(path), {"w": "w"})
    os.remove(path)
    os.mkfifo(path)
    error = _bounded(lambda: tg.execute(p), path)
    assert isinstance(error, tg.CheckpointError), error
    assert f"'{path}' is a FIFO (named pipe), not a file" in str(error)


# -- item 12: locations the storage rejects ------------------------------------------

def _non_utf8_folder(tmp_path, kind: str) -> str:
    """A checkpoint of this kind in a folder whose name is not UTF-8 (as os.fsdecode gives it)."""
    made = tmp_path / "made"
    if kind == "orbax":
        write_item(made, {"w": np.arange(4, dtype=np.float32)})
    elif kind == "kauldron":
        write_run(made, {1: {"w": np.arange(4, dtype=np.float32)}})
    else:
        made.mkdir()
        save_safetensors(str(made / "m.safetensors"), {"w": np.arange(4, dtype=np.float32)})
    target = os.fsencode(str(tmp_path)) + b"/ckpt-\xff\xfe"
    os.rename(os.fsencode(str(made)), target)
    return os.fsdecode(target)


LOCATIONS = {
    "short-gcs-bucket": ("gs://a/b", r"'gs://a/b': 'a' is not a valid gs:// bucket name "
                         r"\(.*Invalid GCS bucket name.*\); bucket names have 3-63 characters"),
    "s3-bucket-with-space": ("s3://bad bucket/x", r"'s3://bad bucket/x': 'bad bucket' is not a "
                             r"valid s3:// bucket name"),
    "nul-byte": ("/tmp/a\x00b", r"'/tmp/a\\x00b' holds a NUL byte"),
}


@pytest.mark.parametrize("kind", list(SOURCES))
@pytest.mark.parametrize("where", list(LOCATIONS))
def test_locations_the_storage_rejects_are_checkpoint_errors(kind, where):
    path, message = LOCATIONS[where]
    with pytest.raises(tg.CheckpointError, match=message):
        graft_w(SOURCES[kind](path), np.zeros(4, np.float32))


@pytest.mark.parametrize("kind", list(SOURCES))
def test_a_folder_name_that_is_not_utf8_is_a_checkpoint_error(tmp_path, kind):
    path = _non_utf8_folder(tmp_path, kind)
    with pytest.raises(tg.CheckpointError,
                       match=r"ckpt-\\udcff\\udcfe.* is not valid UTF-8 \(bytes b'\\xff\\xfe' "
                       r"at character \d+\): tensorstore, which reads checkpoints, takes UTF-8 "
                       r"paths only; rename the folder"):
        graft_w(SOURCES[kind](path), np.zeros(4, np.float32))


# -- item 18: say what the path is ---------------------------------------------------

def test_folder_named_like_a_safetensors_file_in_a_folder(tmp_path):
    folder = tmp_path / "hf"
    (folder / "m.safetensors").mkdir(parents=True)
    with pytest.raises(tg.CheckpointError,
                       match=rf"safetensors file '{folder}/m.safetensors' is a folder, not a file"):
        tg.SafetensorsCheckpoint(str(folder)).metadata()


def test_folder_named_like_a_safetensors_file_given(tmp_path):
    path = tmp_path / "m.safetensors"
    path.mkdir()
    with pytest.raises(tg.CheckpointError,
                       match=rf"'{path}' \(a folder, though named like a file\) has no "):
        tg.SafetensorsCheckpoint(str(path))


def test_folder_named_metadata_in_an_orbax_checkpoint(tmp_path):
    path, fifo = _fifo_orbax(tmp_path, "_METADATA")
    os.remove(fifo)
    os.mkdir(fifo)
    with pytest.raises(tg.CheckpointError,
                       match=rf"orbax's metadata file '{fifo}' is a folder, not a file"):
        tg.OrbaxCheckpoint(path).metadata()


@pytest.mark.parametrize("kind", list(SOURCES))
def test_a_device_is_named(kind):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    with pytest.raises(tg.CheckpointError, match=r"'/dev/zero' is a character device, not a "
                       r"file or folder: treegraft reads checkpoints from regular files and "
                       r"folders only"):
        graft_w(SOURCES[kind]("/dev/zero"), np.zeros(4, np.float32))


@pytest.mark.parametrize("kind", list(SOURCES))
def test_a_symlink_loop_is_named(tmp_path, kind):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(tg.CheckpointError, match=rf"'{tmp_path}/a' is a loop of symbolic links, "
                       r"not a file or folder: fix or remove the link"):
        graft_w(SOURCES[kind](str(tmp_path / "a")), np.zeros(4, np.float32))


def test_a_symlink_loop_as_a_shard_is_named(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    os.symlink(folder / "x", folder / "m.safetensors")
    os.symlink(folder / "m.safetensors", folder / "x")
    with pytest.raises(tg.CheckpointError, match=r"m.safetensors' is a loop of symbolic links"):
        tg.SafetensorsCheckpoint(str(folder)).metadata()


def test_what_a_local_path_is(tmp_path):
    from treegraft._storage.local import local_kind

    (tmp_path / "f").write_text("x")
    os.mkfifo(tmp_path / "p")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    os.symlink(tmp_path / "l2", tmp_path / "l1")
    os.symlink(tmp_path / "l1", tmp_path / "l2")
    kinds = {name: local_kind(str(tmp_path / name))
             for name in ("f", "p", "dangling", "l1", "nothing")}
    kinds["dir"] = local_kind(str(tmp_path))
    assert kinds == {"f": "file", "p": "fifo", "dangling": "broken symlink",
                     "l1": "symlink loop", "nothing": "missing", "dir": "dir"}
    if os.path.exists("/dev/null"):
        assert local_kind("/dev/null") == "char device"
