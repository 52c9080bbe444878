"""tg.convert when the write fails (docs/design.md sections 11 and 15): killed, full, refused.

For every format and destination kind: a convert killed (SIGKILL) mid-write
leaves nothing a reader accepts as complete, and rerunning it succeeds; a
disk that fills up, a folder that may not be written, a refusing or stalled
server are a typed `CheckpointError` naming dest, with the temporary data
removed. In every test the source is byte-identical afterwards and was never
written to (its hash and mtime).

Oracles: plain orbax (`CheckpointManager`, `StandardCheckpointer`),
`safetensors.safe_open`, and treegraft's readers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import servers
from test_convert import (
    ROOT,
    FailingSource,
    _run_unprivileged,
    file_hash,
    folder_hash,
)
from test_convert_remote import (  # noqa: F401  (fixtures)
    read_only_server,
    refusing_server,
    silent_server,
    url,
)

import treegraft as tg

# The source: 16 tensors of 256 KiB of random float32, written once per session.
N_TENSORS, SHAPE = 16, (64, 1024)
SOURCE_BYTES = N_TENSORS * int(np.prod(SHAPE)) * 4
SLOW = 0.02  # seconds the child's progress callback sleeps per box: the kill lands mid-write


# -- the source, and proof it was never touched ------------------------------------------------


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.w": rng.standard_normal(SHAPE, dtype=np.float32)
            for i in range(N_TENSORS)}


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Two safetensors files of different random tensors: {name: (path, tensors)}."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("sources")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        tensors = _tensors(seed)
        path = str(folder / f"{name}.safetensors")
        save_file(tensors, path)
        os.chmod(path, 0o444)  # read-only as well: a write would fail, not pass unnoticed
        out[name] = (path, tensors)
    return out


class Untouched:
    """Records a file's bytes and stat; `check` asserts they are as they were."""

    def __init__(self, path: str):
        self.path = path
        self.before = self._state()

    def _state(self):
        st = os.stat(self.path)
        return file_hash(self.path), st.st_size, st.st_mtime_ns, st.st_mode

    def check(self) -> None:
        assert self._state() == self.before, f"the source {self.path} changed"


@pytest.fixture
def src(sources):
    path, tensors = sources["a"]
    guard = Untouched(path)
    yield path, tensors
    guard.check()


@pytest.fixture
def src_b(sources):
    path, tensors = sources["b"]
    guard = Untouched(path)
    yield path, tensors
    guard.check()


# -- reading back -------------------------------------------------------------------------------


def flat_names(tree) -> dict[str, np.ndarray]:
    """{keys joined with '.': host array} of a restored tree (the safetensors names)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        with jax.transfer_guard("allow"):
            out[".".join(keys)] = np.asarray(leaf)
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def read_safetensors_folder(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors folder (index and shards, or one file), by safe_open."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = os.listdir(folder)
        assert files == ["model.safetensors"], files
    out = {}
    for name in files:
        with safe_open(os.path.join(folder, name), "np") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def via_treegraft(source: tg.Source, want: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    like = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), source.metadata())
    return flat_names(tg.graft(like, source, {"": ""}))


# -- the destination kinds -----------------------------------------------------------------------


class Case:
    """One format and destination kind: where it writes, how it is read and refused."""

    def __init__(self, name: str, dest: str, options: dict, final: str):
        self.name, self.dest, self.options, self.final = name, dest, options, final

    def read(self) -> dict[str, np.ndarray]:
        """The complete output, read by the format's own oracle (and treegraft)."""
        if self.name in ("orbax-step", "kauldron"):
            item = os.path.join(self.final, "default")
            got = flat_names(ocp.StandardCheckpointer().restore(item))
            assert_same(via_treegraft(self.reader(), got), got)
            return got
        if self.name == "safetensors-file":
            from safetensors import safe_open

            with safe_open(self.final, "np") as f:
                got = {key: f.get_tensor(key) for key in f.keys()}
        else:
            got = read_safetensors_folder(self.final)
        assert_same(via_treegraft(tg.SafetensorsCheckpoint(self.final), got), got)
        return got

    def reader(self) -> tg.Source:
        if self.name == "kauldron":
            return tg.KauldronCheckpoint(self.dest, step=2)
        return tg.OrbaxCheckpoint(os.path.join(self.final, "default"))

    def steps(self) -> list[int]:
        if self.name == "kauldron":
            options = ocp.CheckpointManagerOptions(step_prefix="ckpt")
            with ocp.CheckpointManager(os.path.join(self.dest, "checkpoints"),
                                       options=options) as manager:
                return list(manager.all_steps())
        with ocp.CheckpointManager(self.dest) as manager:
            return list(manager.all_steps())

    def assert_nothing_accepted(self) -> None:
        """Nothing at dest that a reader takes for the output, complete."""
        assert not os.path.lexists(self.final), os.listdir(os.path.dirname(self.final))
        if self.name in ("orbax-step", "kauldron"):
            assert self.steps() == [1]  # the earlier step only
            with pytest.raises(tg.GraftError):
                self.reader().metadata()
            return
        with pytest.raises(tg.CheckpointError):
            tg.SafetensorsCheckpoint(self.final).metadata()
        if self.name == "safetensors-file":
            from safetensors import safe_open

            with pytest.raises(Exception):  # noqa: B017  (safetensors raises its own types)
                safe_open(self.final, "np")

    def temporaries(self) -> list[str]:
        parent, name = os.path.split(self.final)
        if not os.path.isdir(parent):
            return []
        return [os.path.join(parent, n) for n in os.listdir(parent)
                if n.startswith(f".{name}.treegraft-tmp-")]

    def fingerprint(self) -> str:
        return file_hash(self.final) if os.path.isfile(self.final) else folder_hash(self.final)


def make_case(name: str, tmp_path) -> Case:
    if name == "orbax-step":
        dest = str(tmp_path / "run")
        tg.save({"w": np.ones(3, np.float32)}, dest, step=1)
        # A small budget: the orbax writer commits every few chunks, so data lands mid-way.
        return Case(name, dest, {"step": 2, "max_host_bytes": 1 << 20}, os.path.join(dest, "2"))
    if name == "kauldron":
        dest = str(tmp_path / "workdir")
        tg.save({"w": np.ones(3, np.float32)}, dest, format="kauldron", step=1)
        return Case(name, dest, {"format": "kauldron", "step": 2, "max_host_bytes": 1 << 20},
                    os.path.join(dest, "checkpoints", "ckpt_2"))
    if name == "safetensors-folder":
        dest = str(tmp_path / "hf")
        return Case(name, dest, {"format": "safetensors", "max_shard_bytes": SOURCE_BYTES // 4},
                    dest)
    dest = str(tmp_path / "model.safetensors")
    return Case(name, dest, {}, dest)


KINDS = ["orbax-step", "kauldron", "safetensors-folder", "safetensors-file"]


# -- a convert in a child process, killed mid-write -----------------------------------------------

CHILD = """
import json, sys, time
import treegraft as tg
args = json.loads(sys.argv[1])
def progress(done, total, path=args.pop("progress"), slow=args.pop("slow")):
    with open(path, "w") as f:
        f.write(f"{done} {total}")
    time.sleep(slow)
source, dest = tg.SafetensorsCheckpoint(args.pop("src")), args.pop("dest")
tg.convert(source, dest, {"": ""}, progress=progress, **args)
print("DONE")
"""


def progress_of(path: str) -> tuple[int, int]:
    try:
        with open(path) as f:
            done, total = f.read().split()
        return int(done), int(total)
    except (OSError, ValueError):  # not written yet, or read while being rewritten
        return 0, 0  # not "mid-write": the child may not have begun


def kill_mid_write(tmp_path, src: str, dest: str, options: dict,
                   ready: Callable[[tuple[int, int]], bool], slow: float = SLOW) -> None:
    """Runs convert(src, dest) in a child and SIGKILLs it once ready(progress) holds.

    Fails the test if the child ends on its own, or ready does not hold within
    the deadline.
    """
    progress = str(tmp_path / f"progress-{time.monotonic_ns()}")
    args = dict(options, src=src, dest=dest, progress=progress, slow=slow)
    env = dict(os.environ, PYTHONPATH=ROOT)
    with subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 120
        killed = False
        while time.monotonic() < deadline and proc.poll() is None:
            now = progress_of(progress)
            if 0 < now[0] < now[1] and ready(now):  # begun, not done: mid-write
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
        if not killed:
            proc.kill()
        out, err = proc.communicate(timeout=60)
    assert killed, f"the child was not killed mid-write: {out!r} {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert b"DONE" not in out


def temp_bytes(case: Case) -> int:
    total = 0
    for path in case.temporaries():
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(root, name))
                except OSError:
                    pass
    return total


@pytest.mark.parametrize("kind", KINDS)
def test_a_convert_killed_mid_write_leaves_nothing_accepted_and_rerunning_succeeds(
        kind, tmp_path, src, src_b):
    path, tensors = src
    case = make_case(kind, tmp_path)
    # Mid-write: more than a quarter of the data in the temporary folder (for the
    # shards: the first shard complete and the second begun).
    kill_mid_write(tmp_path, path, case.dest, case.options,
                   lambda _: temp_bytes(case) > SOURCE_BYTES // 4 + 4096)
    case.assert_nothing_accepted()
    assert case.temporaries()  # what the dead run left: no reader looks there
    # Rerunning the same convert succeeds, and removes what the dead run left.
    tg.convert(tg.SafetensorsCheckpoint(path), case.dest, {"": ""}, **case.options)
    assert_same(case.read(), tensors)
    assert case.temporaries() == []

    # Killed while overwriting it: the old output stays, whole and readable.
    before = case.fingerprint()
    kill_mid_write(tmp_path, src_b[0], case.dest, dict(case.options, overwrite=True),
                   lambda _: temp_bytes(case) > SOURCE_BYTES // 4 + 4096)
    assert case.fingerprint() == before
    assert_same(case.read(), tensors)
    if kind in ("orbax-step", "kauldron"):
        assert case.steps() == [1, 2]


RENAMES = "rename,renameat,renameat2"


def _strace_refused() -> str | None:
    if not shutil.which("strace"):
        return "strace is missing"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={RENAMES}",
                            "true"], capture_output=True, text=True)
    return probe.stderr.strip() or None if probe.returncode else None


@pytest.mark.parametrize("kind", ["safetensors-file", "safetensors-folder"])
def test_a_kill_between_the_renames_of_an_overwrite_keeps_a_whole_dest(
        kind, tmp_path, src, src_b):
    # strace kills the child on entering its second rename: with an overwrite by two
    # renames (old away, new in) that is the moment dest does not exist. The local
    # safetensors writer itself renames nothing, so the count is the commit's.
    if (why := _strace_refused()) is not None:
        pytest.skip(f"cannot run the child under strace: {why}")
    case = make_case(kind, tmp_path)
    tg.convert(tg.SafetensorsCheckpoint(src[0]), case.dest, {"": ""}, **case.options)
    before = case.fingerprint()
    args = dict(case.options, src=src_b[0], dest=case.dest, overwrite=True,
                progress=str(tmp_path / "progress"), slow=0.0)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={RENAMES}",
         "-e", f"inject={RENAMES}:signal=SIGKILL:when=2",
         sys.executable, "-c", CHILD, json.dumps(args)],
        env=env, capture_output=True, text=True, timeout=120)
    # Whole, old or new: never absent, never a mix.
    assert os.path.lexists(case.final), (done.returncode, done.stderr[-2000:])
    if case.fingerprint() == before:
        assert_same(case.read(), src[1])
    else:
        assert "DONE" in done.stdout, done.stderr[-2000:]
        assert_same(case.read(), src_b[1])
    tg.convert(tg.SafetensorsCheckpoint(src_b[0]), case.dest, {"": ""}, overwrite=True,
               **case.options)
    assert_same(case.read(), src_b[1])
    assert case.temporaries() == []
    assert [n for n in os.listdir(os.path.dirname(case.final))
            if ".treegraft-old-" in n] == []


class FailsLate(FailingSource):
    """A real lazy source whose 6th box read fails, as a checkpoint removed mid-read would."""

    reads = 5


def test_a_failed_orbax_write_removes_its_temporary_folder_after_the_writes_in_flight(
        tmp_path):
    # The orbax writer keeps writes in flight; a failure must wait for them before the
    # temporary folder is removed, or they write files into it again (a race: repeated).
    rng = np.random.default_rng(0)
    tree = {f"l{i}": rng.standard_normal((64, 256)).astype(np.float32) for i in range(8)}
    copy = {k: v.copy() for k, v in tree.items()}
    for k in range(10):
        with pytest.raises(tg.CheckpointError, match="^reading the source failed"):
            tg.save(FailsLate(tree), str(tmp_path / "out"), max_host_bytes=1 << 22)
        assert os.listdir(tmp_path) == [], k
    assert_same(tree, copy)  # the source, as it was


# -- disk full and permission denied --------------------------------------------------------------


DISK_FULL = """
import json, os, sys, treegraft as tg
src, small = sys.argv[1], sys.argv[2]
cases = {
    "safetensors-file": (os.path.join(small, "model.safetensors"), {}),
    "safetensors-folder": (os.path.join(small, "hf"),
                           {"format": "safetensors", "max_shard_bytes": 1 << 19}),
    "kauldron": (os.path.join(small, "workdir"), {"format": "kauldron", "step": 3}),
}
out = {}
for name, (dest, options) in cases.items():
    try:
        tg.convert(tg.SafetensorsCheckpoint(src), dest, {"": ""}, **options)
        out[name] = {"wrote": True}
    except Exception as e:
        out[name] = {"type": type(e).__name__, "typed": isinstance(e, tg.CheckpointError),
                     "message": str(e)}
    out[name]["left"] = sorted(os.listdir(small))
print("RESULT " + json.dumps(out))
"""


def test_disk_full_is_a_checkpoint_error_naming_dest_and_leaves_nothing(tmp_path, src):
    if not shutil.which("unshare"):
        pytest.skip("unshare is missing: no mount namespace for a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"this machine allows no mount namespace: {probe.stderr.decode().strip()}")
    small = tmp_path / "small"
    small.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    # 1 MiB of room for 4 MiB of tensors.
    cmd = ["unshare", "-rm", "sh", "-c",
           f'mount -t tmpfs -o size=1m tmpfs {small} && exec {sys.executable} -c "$0" "$1" "$2"',
           DISK_FULL, src[0], str(small)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout + done.stderr[-3000:]
    results = json.loads(lines[0][len("RESULT "):])
    for name, dest in (("safetensors-file", small / "model.safetensors"),
                       ("safetensors-folder", small / "hf"), ("kauldron", small / "workdir")):
        got = results[name]
        assert got.get("typed"), (name, got)
        assert got["type"] == "CheckpointError", (name, got)
        assert str(dest) in got["message"] and "full" in got["message"], (name, got)
        assert "treegraft-tmp" not in got["message"], (name, got)
        assert got["left"] == [], (name, got)  # no temporary data, dest absent


PERMISSION = """
import json, os, sys, treegraft as tg
src, parent = sys.argv[1], sys.argv[2]
tg.SafetensorsCheckpoint(src).metadata()  # the source itself is readable
out = {}
for name, dest, options in (("file", os.path.join(parent, "model.safetensors"), {}),
                            ("folder", os.path.join(parent, "hf"),
                             {"format": "safetensors", "max_shard_bytes": 1 << 20})):
    try:
        tg.convert(tg.SafetensorsCheckpoint(src), dest, {"": ""}, **options)
        out[name] = {"wrote": True}
    except Exception as e:
        out[name] = {"type": type(e).__name__, "typed": isinstance(e, tg.CheckpointError),
                     "message": str(e), "dest": dest}
    out[name]["left"] = sorted(os.listdir(parent))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                    reason="root ignores permissions and setpriv is missing")
def test_permission_denied_on_the_parent_is_a_checkpoint_error_naming_dest(src):
    # Outside pytest's private tmp folder: the unprivileged child must reach it.
    top = tempfile.mkdtemp(prefix="treegraft-perm-")
    try:
        os.chmod(top, 0o755)
        source = os.path.join(top, "source.safetensors")
        shutil.copyfile(src[0], source)
        os.chmod(source, 0o444)
        guard = Untouched(source)
        parent = os.path.join(top, "ro")
        os.mkdir(parent, 0o555)
        os.chmod(parent, 0o555)
        script = PERMISSION.replace("sys.argv[1], sys.argv[2]", f"{source!r}, {parent!r}")
        out = _run_unprivileged(script)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out
        results = json.loads(lines[0][len("RESULT "):])
        for name in ("file", "folder"):
            got = results[name]
            assert got.get("typed") and got["type"] == "CheckpointError", (name, got)
            assert got["dest"] in got["message"], (name, got)
            assert "permission" in got["message"].lower(), (name, got)
            assert got["left"] == [], (name, got)
        guard.check()
    finally:
        if os.path.isdir(os.path.join(top, "ro")):
            os.chmod(os.path.join(top, "ro"), 0o755)
        shutil.rmtree(top, ignore_errors=True)


def test_a_folder_holding_only_the_first_of_several_shards_is_not_a_checkpoint(tmp_path):
    """What a sharded write to an object store killed after its first shard leaves, locally."""
    from safetensors.numpy import save_file

    tensors = {"w": np.arange(6, dtype=np.float32)}
    lone = tmp_path / "lone"
    lone.mkdir()
    save_file(tensors, str(lone / "model-00001-of-00003.safetensors"))
    with pytest.raises(tg.CheckpointError, match=r"shard 1 of 3, and no "
                       r"model.safetensors.index.json: it is incomplete"):
        tg.SafetensorsCheckpoint(str(lone)).metadata()
    # the one file alone, when asked for, and a lone shard 1 of 1, are read
    assert_same(via_treegraft(tg.SafetensorsCheckpoint(
        str(lone / "model-00001-of-00003.safetensors")), tensors), tensors)
    whole = tmp_path / "whole"
    whole.mkdir()
    save_file(tensors, str(whole / "model-00001-of-00001.safetensors"))
    assert_same(via_treegraft(tg.SafetensorsCheckpoint(str(whole)), tensors), tensors)


# -- remote destinations: fake-gcs-server and moto on loopback ------------------------------------


@pytest.fixture(params=["gcs", "s3"])
def remote(request):
    request.getfixturevalue(f"{request.param}_server")
    return "gs" if request.param == "gcs" else "s3"


def storage_of(scheme: str) -> servers.Storage:
    return servers.Storage("gcs" if scheme == "gs" else "s3", "treegraft")


def names_under(dest: str) -> list[str]:
    """The object names under a gs:// or s3:// folder, relative to it."""
    scheme = dest.split("://", 1)[0]
    prefix = dest.split("://", 1)[1].split("/", 1)[1] + "/"
    return sorted(key[len(prefix):] for key in storage_of(scheme).snapshot(dest))


def download(dest: str, folder: str) -> None:
    """Copies every object under dest into folder, with the storage's own client."""
    scheme = dest.split("://", 1)[0]
    prefix = dest.split("://", 1)[1].split("/", 1)[1] + "/"
    os.makedirs(folder)
    for name in names_under(dest):
        target = os.path.join(folder, name)
        if scheme == "gs":
            servers.gcs_client().bucket("treegraft").blob(prefix + name).download_to_filename(
                target)
        else:
            servers.s3_client().download_file("treegraft", prefix + name, target)


@pytest.mark.parametrize("files", [1, 4])
def test_safetensors_to_a_remote_folder_is_read_back_by_treegraft_and_safe_open(
        remote, files, tmp_path, monkeypatch, src):
    monkeypatch.chdir(tmp_path)  # a local folder named gs: or s3: would appear here
    path, tensors = src
    dest = url(remote)
    # On object storage a file is built in memory: max_host_bytes // 3 bytes of data at most.
    options = ({"max_host_bytes": 4 * SOURCE_BYTES} if files == 1 else
               {"max_host_bytes": SOURCE_BYTES, "max_shard_bytes": SOURCE_BYTES // 4})
    written = tg.convert(tg.SafetensorsCheckpoint(path), dest, {"": ""}, format="safetensors",
                         **options)
    assert written == dest
    want = (["model.safetensors"] if files == 1 else
            [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
            + ["model.safetensors.index.json"])
    assert names_under(dest) == sorted(want)
    assert_same(via_treegraft(tg.SafetensorsCheckpoint(dest), tensors), tensors)
    download(dest, str(tmp_path / "down"))
    assert_same(read_safetensors_folder(str(tmp_path / "down")), tensors)
    assert os.listdir(tmp_path) == ["down"]


def _within(seconds: float, run: Callable[[], object]) -> None:
    start = time.monotonic()
    run()
    # Not a speed check: a hang would wait forever, or far beyond the storage timeout.
    assert time.monotonic() - start < seconds


@pytest.mark.parametrize("server", ["refusing_server", "read_only_server", "silent_server"])
def test_a_refusing_or_stalled_s3_server_is_a_checkpoint_error_naming_dest(
        server, request, monkeypatch, src):
    endpoint = request.getfixturevalue(server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("TREEGRAFT_STORAGE_TIMEOUT", "3")
    dest = f"s3://treegraft/{server}"

    def convert():
        with pytest.raises(tg.CheckpointError, match=dest) as info:
            tg.convert(tg.SafetensorsCheckpoint(src[0]), dest, {"": ""}, format="safetensors",
                       max_host_bytes=SOURCE_BYTES, max_shard_bytes=SOURCE_BYTES // 4)
        assert "treegraft-tmp" not in str(info.value)
        if server == "silent_server":
            assert "took more than 3 s" in str(info.value)

    _within(30, convert)


GCS_CHILD = """
import json, sys, time
import treegraft as tg
src, dest = sys.argv[1], sys.argv[2]
try:
    tg.convert(tg.SafetensorsCheckpoint(src), dest, {"": ""}, format="safetensors",
               max_shard_bytes=1 << 20, max_host_bytes=4 << 20)
    out = {"ok": True}
except Exception as e:
    out = {"type": type(e).__name__, "typed": isinstance(e, tg.CheckpointError),
           "message": str(e)}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("server", ["refusing_server", "silent_server"])
def test_a_refusing_or_stalled_gcs_server_is_a_checkpoint_error_naming_dest(
        server, request, src):
    endpoint = request.getfixturevalue(server)
    # The GCS endpoint is read from the environment once: a child process gets its own.
    env = dict(os.environ, TENSORSTORE_GCS_HTTP_URL=endpoint, STORAGE_EMULATOR_HOST=endpoint,
               TREEGRAFT_STORAGE_TIMEOUT="2", PYTHONPATH=ROOT)
    dest = f"gs://treegraft/{server}"
    proc = subprocess.run([sys.executable, "-c", GCS_CHILD, src[0], dest], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT "):])
    assert got.get("typed") and got["type"] == "CheckpointError", got
    assert dest in got["message"], got
    if server == "silent_server":
        assert "took more than 2 s" in got["message"], got


REMOTE_KINDS = {
    # kind: (options, when to kill: (progress, objects written) -> bool)
    "orbax": ({"max_host_bytes": 1 << 18},
              lambda progress, names: bool(names)),
    "safetensors-shards": ({"format": "safetensors", "max_host_bytes": SOURCE_BYTES,
                            "max_shard_bytes": SOURCE_BYTES // 4},
                           lambda progress, names: len(names) == 1),  # the first shard only
    # One file: built in memory and sent in one request; killed while it is built.
    "safetensors-one": ({"format": "safetensors", "max_host_bytes": 4 * SOURCE_BYTES},
                        lambda progress, names: 2 * progress[0] >= progress[1] > 0),
}


@pytest.mark.parametrize("kind", sorted(REMOTE_KINDS))
def test_a_remote_convert_killed_mid_write_leaves_nothing_accepted(
        remote, kind, tmp_path, monkeypatch, src):
    monkeypatch.chdir(tmp_path)
    path, tensors = src
    dest = url(remote)
    options, ready = REMOTE_KINDS[kind]
    kill_mid_write(tmp_path, path, dest, options,
                   lambda progress: ready(progress, names_under(dest)), slow=0.05)
    names = names_under(dest)
    if kind == "orbax":
        assert names  # killed mid-write: arrays, but not the metadata written last
        assert not {"_METADATA", "commit_success.txt", "_CHECKPOINT_METADATA"} & set(names)
        with pytest.raises(tg.GraftError):
            tg.OrbaxCheckpoint(dest).metadata()
    elif kind == "safetensors-shards":
        assert names == ["model-00001-of-00004.safetensors"]  # no index: not complete
        with pytest.raises(tg.CheckpointError):
            tg.SafetensorsCheckpoint(dest).metadata()
    else:
        assert names == []
        with pytest.raises(tg.CheckpointNotFoundError):
            tg.SafetensorsCheckpoint(dest).metadata()
    if names:  # what the dead run left is not taken for nothing, nor written over unasked
        with pytest.raises(tg.CheckpointError,
                           match="already exists.*overwrite=True.*removed first"):
            tg.convert(tg.SafetensorsCheckpoint(path), dest, {"": ""}, **options)
    # What the dead run left is replaced by a rerun with overwrite=True.
    tg.convert(tg.SafetensorsCheckpoint(path), dest, {"": ""}, overwrite=True, **options)
    reader = tg.OrbaxCheckpoint(dest) if kind == "orbax" else tg.SafetensorsCheckpoint(dest)
    assert_same(via_treegraft(reader, tensors), tensors)
    assert [n for n in os.listdir(tmp_path) if not n.startswith("progress-")] == []
