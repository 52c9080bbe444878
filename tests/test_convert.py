"""tg.convert and tg.save (docs/design.md section 15): what is written is what graft would hold.

Oracles: plain orbax's restore (StandardCheckpointer, PyTreeCheckpointer,
CheckpointManager), treegraft's own readers, and `graft(like, source, mapping)`
on the same inputs, compared bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._read.source import BoxRequest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers ---------------------------------------------------------------------------------


def bits(tree):
    """{path text: (dtype, shape, bytes)} of every leaf: equal means bit-identical."""
    out = {}
    for path, leaf in tg.flatten(tree).items():
        with jax.transfer_guard("allow"):
            value = np.asarray(leaf)
        out[str(path)] = (value.dtype, value.shape, value.tobytes())
    return out


def assert_bits_equal(got, want):
    g, w = bits(got), bits(want)
    assert sorted(g) == sorted(w)
    for key in w:
        assert g[key][:2] == w[key][:2], (key, g[key][:2], w[key][:2])
        assert g[key][2] == w[key][2], key


def folder_hash(path):
    """A digest of every file's name, mode and bytes below path."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + dirs:
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            digest.update(str(os.stat(full).st_mode).encode())
            if name in files:
                with open(full, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def restore_std(path):
    return ocp.StandardCheckpointer().restore(path)


def restore_pytree(path):
    return ocp.PyTreeCheckpointer().restore(path)


def model(seed=0):
    """A small state: 3 layers of a block, a bfloat16 embedding, an int step, a list."""
    rng = np.random.default_rng(seed)
    layer = lambda: {  # noqa: E731
        "attn": {"kernel": rng.standard_normal((4, 6)).astype(np.float32),
                 "bias": rng.standard_normal(6).astype(np.float32)},
        "mlp": {"w": rng.standard_normal((6, 4)).astype(np.float32)},
    }
    return {
        "params": {f"layers_{i}": layer() for i in range(3)}
        | {"embed": rng.standard_normal((10, 4)).astype(ml_dtypes.bfloat16)},
        "step": np.array(7, np.int32),
        "history": [np.arange(3, dtype=np.int64), np.ones((2, 2), np.float16)],
    }


SCANNED = {
    "params.layers": tg.stack("params.layers_*"),
    "params.embed": "params.embed",
    "params.head": tg.transpose("params.layers_0.mlp.w", (1, 0)),
}


def save_orbax(tree, path):
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    return path


# -- round trips -----------------------------------------------------------------------------


def test_save_is_restored_by_plain_orbax_bit_identical(tmp_path):
    state = model()
    dest = tg.save(state, str(tmp_path / "state"))
    assert dest == str(tmp_path / "state")
    for restore in (restore_std, restore_pytree):
        got = restore(dest)
        assert isinstance(got["history"], list)  # containers kept: lists stay lists
        assert_bits_equal(got, state)
    # as plain orbax restores its own save of the same tree
    theirs = restore_std(save_orbax(state, str(tmp_path / "theirs")))
    assert jax.tree.structure(restore_std(dest)) == jax.tree.structure(theirs)
    assert_bits_equal(tg.graft(state, tg.OrbaxCheckpoint(dest), {"": ""}), state)


def test_convert_without_like_derives_the_layout_and_matches_graft(tmp_path):
    state = model()
    dest = tg.convert(state, str(tmp_path / "scanned"), SCANNED)
    got = restore_std(dest)
    assert got["params"]["layers"]["attn"]["kernel"].shape == (3, 4, 6)
    assert got["params"]["head"].shape == (4, 6)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), got)
    assert_bits_equal(got, tg.graft(like, state, SCANNED))
    assert_bits_equal(restore_pytree(dest), got)


def test_convert_with_like_writes_what_graft_holds(tmp_path):
    state = model()
    rng = np.random.default_rng(1)
    like = {
        "params": {
            "layers": {"attn": {"kernel": np.zeros((3, 4, 6), np.float32),
                                "bias": np.zeros((3, 6), np.float32)},
                       "mlp": {"w": np.zeros((3, 6, 4), np.float32)}},
            "embed": np.zeros((10, 4), np.float32),  # cast from bfloat16
            "head": np.zeros((4, 6), np.float32),
        },
        "opt": {"mu": rng.standard_normal(5).astype(np.float32)},  # untouched: written as is
    }
    dest = tg.convert(state, str(tmp_path / "out"), SCANNED, like=like, cast=True)
    want = tg.graft(like, state, SCANNED, cast=True)
    assert_bits_equal(restore_std(dest), want)
    assert_bits_equal(tg.graft(like, tg.OrbaxCheckpoint(dest), {"": ""}), want)


def test_python_scalars_tuples_and_empty_arrays_are_written(tmp_path):
    tree = {"step": 3, "lr": 0.5, "pair": (np.ones(1), np.zeros((0, 3))), "flag": np.bool_(True),
            "gappy": {0: np.ones(2), 2: np.zeros(2)}}
    got = restore_std(tg.save(tree, str(tmp_path / "out")))
    assert int(got["step"]) == 3 and float(got["lr"]) == 0.5 and bool(got["flag"])
    assert got["pair"][1].shape == (0, 3)
    assert sorted(got["gappy"]) == ["0", "2"]  # int keys that are no list stay a dict


def test_the_more_specific_rule_makes_a_leaf_two_rules_produce(tmp_path):
    source = {"x": {"b": np.ones(2, np.float32), "c": np.zeros(3, np.float32)},
              "y": np.full(5, 7, np.int32)}
    mapping = {"a": "x", "a.b": "y"}
    dest = tg.convert(source, str(tmp_path / "out"), mapping)
    got = restore_std(dest)
    assert_bits_equal(got, {"a": {"b": source["y"], "c": source["x"]["c"]}})
    like = {"a": {"b": np.zeros(5, np.int32), "c": np.ones(3, np.float32)}}
    assert_bits_equal(got, tg.graft(like, source, mapping))


def test_safetensors_is_chosen_by_the_dest_name(tmp_path):
    state = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    dest = str(tmp_path / "model.safetensors")
    try:
        import treegraft._formats.safetensors.write  # noqa: F401
    except ImportError:
        with pytest.raises(tg.GraftError, match="'safetensors' cannot be written by this "
                           "version"):
            tg.save(state, dest)
        assert os.listdir(tmp_path) == []
        return
    from safetensors import safe_open

    tg.save(state, dest)
    with safe_open(dest, "np") as f:
        np.testing.assert_array_equal(f.get_tensor("model.w"), state["model"]["w"])


def test_unstack_round_trip_through_two_converts(tmp_path):
    state = model()
    scanned = tg.convert(state, str(tmp_path / "scanned"), SCANNED)
    back = tg.convert(tg.OrbaxCheckpoint(scanned), str(tmp_path / "back"),
                      {"params.layers_*": tg.unstack("params.layers")})
    got = restore_std(back)
    assert sorted(got["params"]) == ["layers_0", "layers_1", "layers_2"]
    assert_bits_equal(got["params"], {k: v for k, v in state["params"].items() if k != "embed"})


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def sharded_state(mesh):
    rng = np.random.default_rng(3)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    return {
        f"layers_{i}": {
            "w": put(rng.standard_normal((8, 6)).astype(np.float32), P("data", "model")),
            "b": put(rng.standard_normal(6).astype(np.float32), P()),  # replicated
        }
        for i in range(2)
    } | {"emb": put(jnp.asarray(rng.standard_normal((16, 4)), jnp.bfloat16), P(None, "model"))}


def test_sharded_jax_arrays_are_written_shard_by_shard(tmp_path, mesh):
    state = sharded_state(mesh)
    mapping = {"layers": tg.stack("layers_*"), "emb_t": tg.transpose("emb", (1, 0))}
    dest = tg.convert(state, str(tmp_path / "out"), mapping)
    got = restore_std(dest)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), got)
    assert_bits_equal(got, tg.graft(like, state, mapping))
    assert_bits_equal(restore_std(tg.save(state, str(tmp_path / "saved"))), state)


def test_orbax_and_safetensors_sources(tmp_path):
    from safetensors.numpy import save_file

    state = model()
    orbax_dest = save_orbax(state, str(tmp_path / "orbax_src"))
    before = folder_hash(orbax_dest)
    out = tg.convert(tg.OrbaxCheckpoint(orbax_dest), str(tmp_path / "a"), SCANNED)
    assert_bits_equal(restore_std(out), tg.graft(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), restore_std(out)),
        state, SCANNED))
    assert folder_hash(orbax_dest) == before  # the source is byte-identical afterwards

    rng = np.random.default_rng(5)
    hf = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype(np.float32)
          for i in range(3)}
    hf["model.embed_tokens.weight"] = rng.standard_normal((10, 4)).astype(np.float32)
    path = str(tmp_path / "model.safetensors")
    save_file(hf, path)
    src_hash = file_hash(path)
    mapping = {
        "params.layers.mlp.up.kernel": tg.transpose(tg.stack("model.layers.*.mlp.up_proj.weight"),
                                                    (0, 2, 1)),
        "params.embed": "model.embed_tokens.weight",
    }
    dest = tg.convert(tg.SafetensorsCheckpoint(path), str(tmp_path / "scanned"), mapping)
    got = restore_std(dest)
    assert got["params"]["layers"]["mlp"]["up"]["kernel"].shape == (3, 4, 6)
    np.testing.assert_array_equal(got["params"]["layers"]["mlp"]["up"]["kernel"][1],
                                  hf["model.layers.1.mlp.up_proj.weight"].T)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), got)
    assert_bits_equal(got, tg.graft(like, tg.SafetensorsCheckpoint(path), mapping))
    assert file_hash(path) == src_hash


# -- steps: CheckpointManager and Kauldron ---------------------------------------------------


def test_step_writes_a_checkpoint_manager_step(tmp_path):
    state = model()
    root = str(tmp_path / "run")
    assert tg.save(state, root, step=3) == os.path.join(root, "3")
    tg.save(jax.tree.map(lambda x: x + 1, state), root, step=5)
    with ocp.CheckpointManager(root) as manager:
        assert manager.all_steps() == [3, 5]
        got = manager.restore(3)  # the single default item, as orbax saved it
    assert_bits_equal(got, state)


def test_kauldron_step_is_read_by_orbax_and_treegraft_loaders(tmp_path):
    state = model()
    workdir = str(tmp_path / "workdir")
    written = tg.convert(state, workdir, SCANNED, format="kauldron", step=12)
    assert written == os.path.join(workdir, "checkpoints", "ckpt_12")
    options = ocp.CheckpointManagerOptions(step_prefix="ckpt")
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options,
                               item_names=("default",)) as manager:
        assert manager.latest_step() == 12
        got = manager.restore(12, args=ocp.args.Composite(default=ocp.args.StandardRestore()))
    got = got["default"]
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), got)
    want = tg.graft(like, state, SCANNED)
    assert_bits_equal(got, want)
    assert_bits_equal(tg.graft(like, tg.KauldronCheckpoint(workdir), {"": ""}), want)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like)
    loader = tg.PartialKauldronLoader(workdir=workdir, new_to_old={"params": "params"})
    assert_bits_equal(loader.transform(zeros)["params"], want["params"])


# -- refusals --------------------------------------------------------------------------------


class CountingSource(tg.Source):
    """A real lazy source over numpy arrays that records every box it reads."""

    def __init__(self, tree):
        self.tree = tree
        self.boxes = []  # bytes of each box read

    def metadata(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.tree)

    def read(self, requests):
        out = []
        for r in requests:
            value = tg.extract(self.tree, r.path)
            self.boxes.append(value.nbytes)
            out.append(np.array(value))
        return out

    def read_boxes(self, requests: list[BoxRequest]):
        for r in requests:
            part = np.array(tg.extract(self.tree, r.path)[r.box])
            self.boxes.append(part.nbytes)
            yield part


def test_an_existing_dest_is_refused_before_anything_is_read(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    source = CountingSource({"w": np.ones(4, np.float32)})
    with pytest.raises(tg.CheckpointError, match="already exists.*overwrite=True") as info:
        tg.convert(source, str(dest), {"": ""})
    assert str(dest) in str(info.value)
    assert source.boxes == []
    assert (dest / "keep.txt").read_text() == "mine"
    with pytest.raises(tg.CheckpointError, match="already exists"):
        tg.save({"w": np.ones(2)}, str(tmp_path), step=None)  # the folder itself


class FailingSource(CountingSource):
    """A source whose box read after the first `reads` fails, as a checkpoint removed
    mid-read would."""

    reads = 1

    def read_boxes(self, requests):
        for part in super().read_boxes(requests):
            if len(self.boxes) > self.reads:
                raise tg.CheckpointError("reading the source failed: the test's source is gone")
            yield part


def test_a_failing_source_read_is_its_own_error_and_removes_the_temporary_data(tmp_path):
    source = FailingSource({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    with pytest.raises(tg.CheckpointError, match="^reading the source failed"):
        tg.save(source, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    # failing mid-write, an overwrite leaves the old checkpoint as it was
    old = tg.save({"v": np.arange(3)}, str(tmp_path / "out"))
    before = folder_hash(old)
    with pytest.raises(tg.CheckpointError, match="^reading the source failed"):
        tg.save(FailingSource(source.tree), old, overwrite=True)
    assert folder_hash(old) == before and os.listdir(tmp_path) == ["out"]


def test_overwrite_replaces_only_once_complete(tmp_path):
    dest = str(tmp_path / "out")
    tg.save({"w": np.ones(3, np.float32)}, dest)
    tg.save({"v": np.zeros(2, np.int32)}, dest, overwrite=True)
    assert_bits_equal(restore_std(dest), {"v": np.zeros(2, np.int32)})
    # a failing overwrite (a dtype orbax cannot write is refused at plan time) keeps the old one
    with pytest.raises(tg.GraftError):
        tg.save({"s": np.array(["text"])}, dest, overwrite=True)
    assert_bits_equal(restore_std(dest), {"v": np.zeros(2, np.int32)})
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda d: tg.convert({"a": np.ones(2)}, d, {"b": None}), tg.MappingError, "keep rule"),
        (lambda d: tg.convert({"a": np.ones(2)}, d, {"b": "zzz"}), tg.MappingError,
         "produces no leaf"),
        (lambda d: tg.save({"a": np.ones(2)}, d, format="zip"), tg.MappingError, "format must"),
        (lambda d: tg.save({"a": np.ones(2)}, d, format="kauldron"), tg.MappingError, "step=N"),
        (lambda d: tg.save({"a": np.ones(2)}, d, max_host_bytes=0), tg.MappingError,
         "max_host_bytes"),
        (lambda d: tg.save({"a.b": np.ones(2), "a": {"b": np.ones(2)}}, d), tg.GraftError,
         "both name"),
        (lambda d: tg.convert({"a": np.ones((2, 3))}, d, {"b.*": tg.unstack("a", axis=2)}),
         tg.GraftError, "axis"),
        (lambda d: tg.save({"a": np.ones(2)}, d, like={"a": np.ones(2)}), tg.MappingError,
         "save writes"),
        (lambda d: tg.save({}, d), tg.GraftError, "no leaf"),
        (lambda d: tg.save(np.ones(2), d), tg.GraftError, "wrap it in a dict"),
        (lambda d: tg.save({"k": jax.random.key(0)}, d), tg.GraftError, "key_data"),
        (lambda d: tg.save({"s": np.array(["text"])}, d), tg.GraftError, "cannot store dtype"),
        (lambda d: tg.convert({"x": np.ones(3)}, d, {"x": "x"}, strict=False,
                              like={"x": np.zeros(3), "y": jax.ShapeDtypeStruct((2,), np.float32)}),
         tg.GraftError, "no rule fills it"),
    ],
)
def test_refusals_are_typed_and_write_nothing(tmp_path, call, error, message):
    dest = str(tmp_path / "out")
    with pytest.raises(error, match=message):
        call(dest)
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_is_never_written_over_its_own_source(tmp_path):
    src = save_orbax({"w": np.ones(3)}, str(tmp_path / "src"))
    before = folder_hash(src)
    with pytest.raises(tg.CheckpointError, match="overlap"):
        tg.save(tg.OrbaxCheckpoint(src), src, overwrite=True)
    with pytest.raises(tg.CheckpointError, match="overlap"):
        tg.save(tg.OrbaxCheckpoint(src), os.path.join(src, "inside"))
    assert folder_hash(src) == before
    workdir = str(tmp_path / "workdir")
    tg.save({"w": np.ones(3)}, workdir, format="kauldron", step=1)
    step_1 = folder_hash(os.path.join(workdir, "checkpoints", "ckpt_1"))
    with pytest.raises(tg.CheckpointError, match="overlap"):
        tg.save(tg.KauldronCheckpoint(workdir), workdir, format="kauldron", step=1,
                overwrite=True)
    # a new step beside the one read is fine
    tg.save(tg.KauldronCheckpoint(workdir, step=1), workdir, format="kauldron", step=2)
    assert folder_hash(os.path.join(workdir, "checkpoints", "ckpt_1")) == step_1
    assert_bits_equal(tg.graft({"w": np.zeros(3)}, tg.KauldronCheckpoint(workdir), {"": ""}),
                      {"w": np.ones(3)})


# -- the budget ------------------------------------------------------------------------------


def test_boxes_stay_within_the_budget(tmp_path):
    rng = np.random.default_rng(0)
    tree = {f"l{i}": {"w": rng.standard_normal((64, 32)).astype(np.float32)} for i in range(4)}
    source = CountingSource(tree)
    budget = 2048  # bytes: each leaf is 8 KiB, each stacked leaf 32 KiB
    dest = tg.convert(source, str(tmp_path / "out"), {"stacked": tg.stack("l*")},
                      max_host_bytes=budget)
    assert source.boxes and max(source.boxes) <= budget // 2
    assert sum(source.boxes) == 4 * 64 * 32 * 4  # each source byte read once
    got = restore_std(dest)
    np.testing.assert_array_equal(got["stacked"]["w"], np.stack([tree[f"l{i}"]["w"]
                                                                  for i in range(4)]))


def test_progress_reports_every_byte(tmp_path):
    seen = []
    state = model()
    tg.save(state, str(tmp_path / "out"), progress=lambda done, total: seen.append((done, total)))
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    assert seen[0] == (0, total) and seen[-1] == (total, total)


# -- write failures --------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                    reason="root ignores permissions and setpriv is missing")
def test_permission_denied_is_a_checkpoint_error_naming_dest(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    src = save_orbax(model(), str(tmp_path / "src"))
    before = folder_hash(src)
    script = textwrap.dedent(f"""
        import treegraft as tg
        try:
            tg.save(tg.OrbaxCheckpoint({src!r}), {str(parent / "out")!r})
        except tg.CheckpointError as e:
            print("ERROR", e)
    """)
    os.chmod(parent, 0o555)
    os.chmod(tmp_path, 0o755)
    try:
        out = _run_unprivileged(script)
    finally:
        os.chmod(parent, 0o755)
    assert "ERROR" in out and str(parent / "out") in out and "permission" in out.lower(), out
    assert os.listdir(parent) == []
    assert folder_hash(src) == before


def _run_unprivileged(script):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if done.stderr.startswith("setpriv:"):  # e.g. root of a user namespace without that uid
        pytest.skip(f"cannot drop privileges here: {done.stderr.strip()}")
    return done.stdout + done.stderr


def test_disk_full_is_a_checkpoint_error_and_removes_the_temporary_data(tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("unshare is missing: no mount namespace for a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"this machine allows no mount namespace: {probe.stderr.decode().strip()}")
    small = tmp_path / "small"
    small.mkdir()
    script = textwrap.dedent(f"""
        import os, subprocess, numpy as np, treegraft as tg
        state = {{"w": np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)}}
        try:
            tg.save(state, {str(small / "out")!r})
            print("WROTE")
        except tg.CheckpointError as e:
            print("ERROR", e)
        print("LEFT", sorted(os.listdir({str(small)!r})))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = ["unshare", "-rm", "sh", "-c",
           f"mount -t tmpfs -o size=1m tmpfs {small} && exec {sys.executable} -c \"$0\"", script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert "ERROR" in out and str(small / "out") in out, out
    assert "storage is full" in out, out
    assert "LEFT []" in out, out


KILL_SCRIPT = """
import sys, numpy as np, treegraft as tg
src, dest = sys.argv[1], sys.argv[2]
tg.save(tg.OrbaxCheckpoint(src), dest, max_host_bytes=1 << 16)
print("DONE")
"""


def test_a_killed_convert_leaves_nothing_accepted_and_rerunning_succeeds(tmp_path):
    rng = np.random.default_rng(0)
    state = {f"l{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(24)}
    src = save_orbax(state, str(tmp_path / "src"))
    before = folder_hash(src)
    dest = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT)
    killed = False
    with subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, src, dest], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [n for n in os.listdir(tmp_path) if ".treegraft-tmp-" in n]
            if temps and sum(len(f) for _, _, f in os.walk(tmp_path / temps[0])) >= 3:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    if not killed:
        pytest.skip("the convert finished before it could be killed mid-write")
    assert not os.path.exists(dest)
    with pytest.raises(tg.GraftError):
        tg.OrbaxCheckpoint(dest).metadata()
    with pytest.raises(Exception):  # noqa: B017  (orbax raises its own types)
        restore_std(dest)
    stale = [n for n in os.listdir(tmp_path) if ".treegraft-tmp-" in n]
    assert stale  # what the dead run left: ignored by readers, removed by the next run
    tg.save(tg.OrbaxCheckpoint(src), dest)
    assert_bits_equal(restore_std(dest), state)
    assert [n for n in os.listdir(tmp_path) if ".treegraft-tmp-" in n] == []
    assert folder_hash(src) == before


def test_a_stale_temporary_step_folder_does_not_confuse_orbax(tmp_path):
    root = tmp_path / "run"
    tg.save({"w": np.ones(2)}, str(root), step=1)
    other = root / ".2.treegraft-tmp-otherhost-1-abcd"  # another host's run, maybe alive
    other.mkdir()
    with ocp.CheckpointManager(str(root)) as manager:
        assert manager.all_steps() == [1]
    tg.save({"w": np.zeros(2)}, str(root), step=2)
    assert other.is_dir()  # left alone: only this host's dead runs are cleaned
    with ocp.CheckpointManager(str(root)) as manager:
        assert manager.all_steps() == [1, 2]


def test_the_source_tree_is_not_modified(tmp_path):
    state = model()
    copy = jax.tree.map(np.array, state)
    tg.convert(state, str(tmp_path / "out"), SCANNED)
    assert_bits_equal(state, copy)


def test_a_source_without_box_reads_is_read_whole_once(tmp_path):
    # A lazy source without read_boxes is read whole, one leaf at a time.
    class Whole(CountingSource):
        read_boxes = tg.Source.read_boxes

    source = Whole({"a": np.arange(6.0).reshape(2, 3), "b": np.ones(4)})
    dest = tg.convert(source, str(tmp_path / "out"), {"t": tg.transpose("a", (1, 0)), "b": "b"})
    got = restore_std(dest)
    np.testing.assert_array_equal(got["t"], np.arange(6.0).reshape(2, 3).T)
    assert sorted(source.boxes) == [32, 48]  # each leaf read whole, once


def test_convert_from_several_sources_opens_only_what_it_reads(tmp_path):
    # docs/design.md section 17: a dict holding sources is one source for convert too.
    ckpt = tg.save({"w": np.arange(4, dtype=np.float32)}, str(tmp_path / "a"))
    sources = {
        "x": tg.OrbaxCheckpoint(ckpt),
        "y": {"b": np.arange(3, dtype=np.int32)},
        "unused": tg.OrbaxCheckpoint(str(tmp_path / "does-not-exist")),
    }
    before = folder_hash(ckpt)
    out = tg.convert(sources, str(tmp_path / "c"), {"p.w": "x.w", "p.b": "y.b"})
    want = {"p": {"w": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int32)}}
    assert_bits_equal(restore_std(out), want)
    assert folder_hash(ckpt) == before
    with pytest.raises(tg.MappingError, match="produces no leaf"):
        tg.convert(sources, str(tmp_path / "d"), {"p.w": "x.ww"})
    assert not os.path.exists(tmp_path / "d")
