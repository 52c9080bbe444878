"""The read layer under damage: unreadable folders, odd step names, corrupt metadata.

Regression tests for issue 12 (items 3, 5 and 10, their checkpoint-reading
parts). Tests run as root, for whom permission bits deny nothing; so each
permission case runs its read in a child process that drops to the `nobody`
user after its imports, and really is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import optax
import pytest
from kauldron_run import init_params, snapshot, train_state, write_item, write_run

import treegraft as tg
from treegraft._formats.kauldron.source import list_steps

SHAPES = {"encoder": {"kernel": (4, 8), "bias": (8,)}}
NOBODY = 65534


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A Kauldron run with steps 1, 2 and 5 (read-only: copy it to change it)."""
    workdir = tmp_path_factory.mktemp("rel") / "run"
    states = {s: train_state(init_params(SHAPES, seed=s), step=s, opt=optax.adam(1e-3))
              for s in (1, 2, 5)}
    write_run(workdir, states)
    return str(workdir), states


@pytest.fixture
def open_run(run):
    """A copy of the run in a folder every user may enter (pytest's tmp is root-only)."""
    parent = tempfile.mkdtemp(prefix="treegraft-perm-")
    os.chmod(parent, 0o755)
    copy = os.path.join(parent, "run")
    shutil.copytree(run[0], copy)
    for dirpath, _, files in os.walk(copy):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    yield copy, run[1]
    for dirpath, _, _ in os.walk(parent):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(parent)


def _can_drop_privileges() -> bool:
    if not hasattr(os, "setuid"):
        return False
    if os.geteuid() != 0:
        return True  # not root: permission bits already apply
    probe = f"import os; os.setgid({NOBODY}); os.setuid({NOBODY})"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


needs_denial = pytest.mark.skipif(
    not _can_drop_privileges(),
    reason="running as root without the right to drop to 'nobody': permission bits deny nothing",
)


def as_nobody(body: str, **values: object) -> dict:
    """Runs body (which sets `result`) as user nobody; returns what it raised or returned."""
    script = textwrap.dedent(
        """
        import json, os, sys
        import numpy as np, orbax.checkpoint, tensorstore
        import treegraft as tg
        from treegraft._formats.kauldron.source import list_steps
        values = json.loads(sys.argv[1])
        if os.geteuid() == 0:
            os.setgid(%d)
            os.setuid(%d)
        try:
        %s
            out = {"ok": result}
        except BaseException as e:
            out = {"type": type(e).__name__, "graft_error": isinstance(e, tg.GraftError),
                   "checkpoint_error": isinstance(e, tg.CheckpointError),
                   "not_found": isinstance(e, tg.CheckpointNotFoundError), "message": str(e)}
        print(json.dumps(out))
        """
    ) % (NOBODY, NOBODY, textwrap.indent(textwrap.dedent(body), "    "))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(values)],
        capture_output=True, text=True, env=env, check=False, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


ENCODER = """
src = tg.KauldronCheckpoint(values["workdir"], step=values.get("step", -1))
state = {"params": {"encoder": {"kernel": np.zeros((4, 8), np.float32),
                                "bias": np.zeros(8, np.float32)}}}
new = tg.graft(state, src, {"params.encoder": "params.encoder"})
result = {"step": src.resolved_step,
          "kernel": new["params"]["encoder"]["kernel"].tolist()}
"""


def assert_typed(out: dict, pattern: str) -> None:
    import re

    assert out.get("checkpoint_error"), out
    assert re.search(pattern, out["message"]), out["message"]


@needs_denial
def test_unreadable_latest_step_is_an_error_never_an_older_step(open_run):
    workdir, states = open_run
    ckpt_5 = os.path.join(workdir, "checkpoints", "ckpt_5")
    os.chmod(ckpt_5, 0)
    out = as_nobody(ENCODER, workdir=workdir)
    assert_typed(
        out,
        rf"step folder '{ckpt_5}' exists but cannot be read \(Permission denied\), so "
        r"whether it is complete is unknown; treegraft does not fall back to an older step: "
        r"fix the folder's permissions, or pass an explicit step",
    )
    # An explicit step that can be read still loads, with its own values.
    out = as_nobody(ENCODER, workdir=workdir, step=2)
    assert out["ok"]["step"] == 2
    np.testing.assert_array_equal(
        np.asarray(out["ok"]["kernel"], np.float32),
        np.asarray(states[2].params["encoder"]["kernel"]),
    )
    out = as_nobody('result = list_steps(values["workdir"])', workdir=workdir)
    assert_typed(out, rf"step folder '{ckpt_5}' exists but cannot be read")


@needs_denial
def test_unreadable_older_step_does_not_hide_the_latest(open_run):
    workdir, states = open_run
    os.chmod(os.path.join(workdir, "checkpoints", "ckpt_1"), 0)
    out = as_nobody(ENCODER, workdir=workdir)
    assert out["ok"]["step"] == 5
    out = as_nobody(ENCODER, workdir=workdir, step=1)
    assert_typed(out, r"step folder '.*/ckpt_1' exists but cannot be read")


@needs_denial
def test_unlistable_checkpoints_folder_is_a_checkpoint_error(open_run):
    workdir, _ = open_run
    ckpts = os.path.join(workdir, "checkpoints")
    os.chmod(ckpts, 0)
    out = as_nobody(ENCODER, workdir=workdir)
    assert out["type"] != "PermissionError"
    assert_typed(
        out,
        rf"cannot list the checkpoints folder '{ckpts}': Permission denied; fix its "
        r"permissions",
    )


@needs_denial
def test_workdir_mode_000_is_not_a_workdir_without_checkpoints(open_run):
    workdir, _ = open_run
    os.chmod(workdir, 0)
    out = as_nobody(ENCODER, workdir=workdir)
    assert not out["not_found"], out
    assert "has no checkpoints/ folder" not in out["message"]
    assert_typed(out, r"cannot read the checkpoints folder '.*/run/checkpoints': Permission denied")


@needs_denial
def test_unreadable_default_item_is_a_checkpoint_error(open_run):
    workdir, _ = open_run
    os.chmod(os.path.join(workdir, "checkpoints", "ckpt_5", "default"), 0)
    out = as_nobody(ENCODER, workdir=workdir)
    assert out["type"] != "PermissionError"
    assert_typed(out, r"cannot read .*'.*/ckpt_5/default/_METADATA': Permission denied")
    body = 'tg.OrbaxCheckpoint(values["item"]).metadata(); result = None'
    out = as_nobody(body, item=os.path.join(workdir, "checkpoints", "ckpt_5", "default"))
    assert_typed(out, r"cannot read .*'.*/ckpt_5/default/_METADATA': Permission denied")


@pytest.mark.parametrize(
    "digits", ["١٠", "１０", "१०"], ids=["arabic-indic", "fullwidth", "devanagari"]
)
def test_non_ascii_digits_are_not_a_step(run, tmp_path, digits):
    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckpts, "ckpt_1"), os.path.join(ckpts, f"ckpt_{digits}"))
    assert list_steps(workdir) == [1, 2, 5]
    assert tg.KauldronCheckpoint(workdir).resolved_step == 5
    with pytest.raises(tg.CheckpointNotFoundError, match=r"no complete step 10; available"):
        tg.KauldronCheckpoint(workdir, step=10).metadata()


@pytest.fixture
def item(tmp_path):
    path = write_item(tmp_path / "item", {"a": {"x": np.ones(3, np.float32)}, "b": np.ones(2)})
    return str(path)


def _edit_metadata(item: str, edit) -> None:
    path = os.path.join(item, "_METADATA")
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        f.write(edit(meta))


def _int_key(meta: dict) -> str:
    first = next(iter(meta["tree_metadata"].values()))
    first["key_metadata"][0]["key"] = 0  # {"a": ...} becomes {0: ...} beside {"b": ...}
    return json.dumps(meta)


def _int_key_deep(meta: dict) -> str:
    first = next(iter(meta["tree_metadata"].values()))
    first["key_metadata"][1]["key"] = 7
    return json.dumps(meta)


def _deep(meta: dict) -> str:
    return '{"tree_metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _deep_root(meta: dict) -> str:
    return "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_int_key, r"the dict key 0 is not a string"),
        (_int_key_deep, r"the dict key 7 is not a string"),
        (_deep, r"its JSON is nested too deeply to be orbax's"),
        (_deep_root, r"its JSON is nested too deeply to be orbax's"),
    ],
    ids=["int-key", "int-key-nested", "deep-json", "deep-json-root"],
)
def test_corrupt_metadata_is_a_checkpoint_error(item, edit, reason):
    _edit_metadata(item, edit)
    before = snapshot(item)
    pattern = rf"cannot read the metadata of {item} \(is _METADATA corrupt\?\): {reason}"
    with pytest.raises(tg.CheckpointError, match=pattern):
        tg.OrbaxCheckpoint(item).metadata()
    with pytest.raises(tg.CheckpointError, match=pattern):
        tg.graft({"b": np.zeros(2)}, tg.OrbaxCheckpoint(item), {"b": "b"})
    assert snapshot(item) == before
