"""KauldronCheckpoint: step selection and errors on real Kauldron-layout workdirs."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import assert_same_values
from kauldron_run import (
    add_half_written_step,
    add_uncommitted_step,
    init_params,
    snapshot,
    train_state,
    write_run,
)

import treegraft as tg
from treegraft._formats.kauldron.source import is_workdir, list_steps

SHAPES = {"encoder": {"kernel": (4, 8), "bias": (8,)}, "decoder": {"kernel": (8, 4)}}
STEPS = (1, 2, 5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with steps 1, 2 and 5, each with its own params (read-only: copy to change)."""
    workdir = tmp_path_factory.mktemp("kd") / "run"
    states = {
        s: train_state(init_params(SHAPES, seed=s), step=s, opt=optax.adam(1e-3)) for s in STEPS
    }
    write_run(workdir, states)
    return str(workdir), states


@pytest.fixture
def own_run(run, tmp_path):
    """A private copy of the run, free to change."""
    workdir, states = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return str(copy), states


def target():
    return {"params": init_params(SHAPES, seed=100)}


def load_encoder(source):
    return tg.graft(target(), source, {"params.encoder": "params.encoder"})["params"]["encoder"]


def test_layout_is_kauldrons(run):
    workdir, _ = run
    ckpts = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["ckpt_1", "ckpt_2", "ckpt_5"]
    assert sorted(os.listdir(os.path.join(ckpts, "ckpt_5"))) == [
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "default",
        "ds_iter",
        "timer",
    ]


def test_latest_step_by_default(run, where):
    workdir, states = run
    workdir = where.publish(workdir, cache=True)
    src = tg.KauldronCheckpoint(workdir)
    assert src.step == -1
    assert src.resolved_step == 5
    assert src.step_dir == f"{workdir}/checkpoints/ckpt_5"
    assert_same_values(load_encoder(src), states[5].params["encoder"])


@pytest.mark.parametrize("step", [1, 2, 5])
def test_explicit_step(run, step, where):
    workdir, states = run
    workdir = where.publish(workdir, cache=True)
    src = tg.KauldronCheckpoint(workdir, step=step)
    assert src.resolved_step == step
    assert_same_values(load_encoder(src), states[step].params["encoder"])


def test_metadata_is_the_train_state_as_orbax_stores_it(run, where):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    meta = tg.KauldronCheckpoint(workdir).metadata()
    assert sorted(meta) == ["collections", "opt_state", "params", "step"]
    assert meta["collections"] == {}
    # (ScaleByAdamState, EmptyState) is stored as [dict of fields, None].
    assert isinstance(meta["opt_state"], list) and len(meta["opt_state"]) == 2
    assert sorted(meta["opt_state"][0]) == ["count", "mu", "nu"]
    assert meta["opt_state"][1] is None
    kernel = meta["params"]["encoder"]["kernel"]
    assert (kernel.shape, kernel.dtype) == ((4, 8), np.dtype("float32"))
    assert (meta["step"].shape, meta["step"].dtype) == ((), np.dtype("int32"))


def test_list_steps(run, where):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    assert list_steps(workdir) == [1, 2, 5]


def test_half_written_step_is_ignored(own_run, where):
    workdir, states = own_run
    tmp = add_half_written_step(workdir, 9, like_step=1)
    assert os.path.basename(tmp) == "ckpt_9.orbax-checkpoint-tmp"
    workdir = where.publish(workdir)
    assert list_steps(workdir) == [1, 2, 5]
    src = tg.KauldronCheckpoint(workdir)
    assert src.resolved_step == 5
    assert_same_values(load_encoder(src), states[5].params["encoder"])


def test_step_without_commit_marker_is_ignored(own_run, where):
    workdir, states = own_run
    add_uncommitted_step(workdir, 8, like_step=1)
    workdir = where.publish(workdir)
    # orbax's own manager would count it; a reader must not take a step in progress.
    assert list_steps(workdir) == [1, 2, 5]
    assert_same_values(load_encoder(tg.KauldronCheckpoint(workdir)), states[5].params["encoder"])
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"no complete step 8; available steps: 1, 2, 5"
    ):
        tg.KauldronCheckpoint(workdir, step=8).metadata()


def test_explicit_half_written_step_is_not_found(own_run, where):
    workdir, _ = own_run
    add_half_written_step(workdir, 9, like_step=1)
    workdir = where.publish(workdir)
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"no complete step 9; available steps: 1, 2, 5"
    ):
        tg.KauldronCheckpoint(workdir, step=9).metadata()


def test_missing_step_lists_available_steps(run, where):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    src = tg.KauldronCheckpoint(workdir, step=3)
    with pytest.raises(tg.CheckpointNotFoundError) as info:
        src.metadata()
    msg = str(info.value)
    assert msg == f"workdir {workdir!r} has no complete step 3; available steps: 1, 2, 5"
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, tg.CheckpointError) and isinstance(info.value, tg.GraftError)


def test_missing_step_through_graft(run):
    workdir, _ = run
    with pytest.raises(
        FileNotFoundError, match=r"has no complete step 4; available steps: 1, 2, 5"
    ):
        load_encoder(tg.KauldronCheckpoint(workdir, step=4))


def test_many_steps_are_abbreviated(tmp_path, where):
    ckpts = tmp_path / "checkpoints"
    source_state = train_state(init_params({"w": (2,)}, seed=0))
    write_run(tmp_path, {0: source_state}, timer=False, ds_iter=False)
    for s in range(1, 20):
        shutil.copytree(ckpts / "ckpt_0", ckpts / f"ckpt_{s}")
    with pytest.raises(
        tg.CheckpointNotFoundError,
        match=r"available steps: 0, 1, 2, 3, 4, \.\.\., 15, 16, 17, 18, 19$",
    ):
        tg.KauldronCheckpoint(where.publish(tmp_path), step=100).metadata()


def test_missing_workdir(tmp_path, where):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    missing = where.publish(tmp_path) + "/nope"
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"workdir '.*/nope' does not exist"
    ) as info:
        tg.KauldronCheckpoint(missing).metadata()
    assert isinstance(info.value, FileNotFoundError)
    assert not os.path.exists(missing) and not os.path.exists(missing.split("://")[0] + ":")


def test_workdir_is_a_file(tmp_path, where):
    f = tmp_path / "file.txt"
    f.write_text("hello")
    with pytest.raises(
        tg.CheckpointError, match=r"workdir '.*/file.txt' is a file, not a Kauldron workdir"
    ):
        tg.KauldronCheckpoint(where.publish(tmp_path) + "/file.txt").metadata()


def test_workdir_without_checkpoints_folder(tmp_path, where):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        tg.CheckpointNotFoundError,
        match=r"has no checkpoints/ folder: it is not a Kauldron workdir, "
        r"or its run saved no checkpoint yet",
    ):
        tg.KauldronCheckpoint(where.publish(tmp_path)).metadata()
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_empty_checkpoints_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(
        tg.CheckpointNotFoundError,
        match=r"has no complete checkpoint in checkpoints/ "
        r"\(steps still being written are ignored\)",
    ):
        tg.KauldronCheckpoint(tmp_path).metadata()


def test_only_half_written_steps(own_run, where):
    workdir, _ = own_run
    ckpts = os.path.join(workdir, "checkpoints")
    add_half_written_step(workdir, 9, like_step=5)
    for s in STEPS:
        shutil.rmtree(os.path.join(ckpts, f"ckpt_{s}"))
    workdir = where.publish(workdir)
    with pytest.raises(
        tg.CheckpointNotFoundError, match=r"has no complete checkpoint in checkpoints/"
    ):
        tg.KauldronCheckpoint(workdir).metadata()


def test_unrelated_entries_in_checkpoints_are_ignored(own_run, where):
    workdir, _ = own_run
    ckpts = os.path.join(workdir, "checkpoints")
    os.mkdir(os.path.join(ckpts, "ckpt_abc"))
    os.mkdir(os.path.join(ckpts, "backup_7"))
    with open(os.path.join(ckpts, "backup_7", "commit_success.txt"), "w") as f:
        f.write("x")
    with open(os.path.join(ckpts, "ckpt_11"), "w") as f:  # a file, not a step folder
        f.write("x")
    workdir = where.publish(workdir)
    assert list_steps(workdir) == [1, 2, 5]
    assert tg.KauldronCheckpoint(workdir).resolved_step == 5


def test_zero_padded_step_folders(own_run, where):
    # orbax's step_format_fixed_length writes ckpt_00007; Kauldron does not, but the
    # folder must then be read as it is named, not as ckpt_7.
    workdir, states = own_run
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckpts, "ckpt_1"), os.path.join(ckpts, "ckpt_00007"))
    workdir = where.publish(workdir)
    src = tg.KauldronCheckpoint(workdir)
    assert src.resolved_step == 7
    assert src.step_dir == f"{workdir}/checkpoints/ckpt_00007"
    assert_same_values(load_encoder(src), states[1].params["encoder"])


def test_step_without_default_item(tmp_path, where):
    # A step holding only the timer, as written by an orbax manager.
    mgr = ocp.CheckpointManager(
        str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(step_prefix="ckpt")
    )
    mgr.save(3, args=ocp.args.Composite(timer=ocp.args.JsonSave({"elapsed_s": 1.0})))
    mgr.wait_until_finished()
    mgr.close()
    tmp_path = where.publish(tmp_path)
    assert list_steps(tmp_path) == [3]
    with pytest.raises(
        tg.CheckpointError,
        match=r"step 3 of '.*' has no 'default' item \(the train state\); "
        r"it holds: _CHECKPOINT_METADATA, commit_success.txt, timer$",
    ):
        tg.KauldronCheckpoint(tmp_path).metadata()


@pytest.mark.parametrize("step", [-2, 1.0, "3", True, None])
def test_invalid_step_argument(step):
    with pytest.raises(
        tg.CheckpointError, match=r"step must be an int >= 0, or -1 for the latest; got"
    ):
        tg.KauldronCheckpoint("/anything", step=step)


def test_step_is_kept_once_chosen(own_run):
    workdir, states = own_run
    ckpts = os.path.join(workdir, "checkpoints")
    src = tg.KauldronCheckpoint(workdir)
    src.metadata()
    # The run saves a new step meanwhile: metadata and reads must still agree.
    shutil.copytree(os.path.join(ckpts, "ckpt_1"), os.path.join(ckpts, "ckpt_6"))
    assert src.resolved_step == 5
    assert_same_values(load_encoder(src), states[5].params["encoder"])
    src.close()
    assert src.resolved_step == 6
    assert_same_values(load_encoder(src), states[1].params["encoder"])


def test_describe_and_repr(run, where):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    src = tg.KauldronCheckpoint(workdir, step=2)
    assert repr(src) == f"KauldronCheckpoint({workdir!r}, step=2)"
    assert src.describe() == f"the checkpoint of {workdir}"
    src.metadata()
    assert src.describe() == f"the checkpoint {workdir}/checkpoints/ckpt_2"


def test_errors_name_the_step_folder(run, where):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    state = {"params": {"encoder": {"kernel": jnp.zeros((4, 9)), "bias": jnp.zeros(8)}}}
    with pytest.raises(tg.MismatchError) as info:
        tg.graft(state, tg.KauldronCheckpoint(workdir), {"params.encoder": "params.encoder"})
    msg = str(info.value)
    assert "'params.encoder.kernel' in the state is float32[4, 9]" in msg
    assert "'params.encoder.kernel' in the source is float32[4, 8]" in msg


def test_plan_from_workdir(run, where):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    p = tg.plan(target(), tg.KauldronCheckpoint(workdir, step=2), {"params": "params"})
    assert [str(e.target) for e in p.entries] == [
        "params.decoder.kernel",
        "params.encoder.bias",
        "params.encoder.kernel",
    ]
    assert p.nbytes == (32 + 8 + 32) * 4
    assert f"from the checkpoint {workdir}/checkpoints/ckpt_2" in str(p)


def test_nothing_written_in_the_workdir(own_run, where):
    workdir, states = own_run
    add_half_written_step(workdir, 9, like_step=1)
    add_uncommitted_step(workdir, 8, like_step=1)
    workdir = where.publish(workdir)
    before = where.snapshot(workdir)
    bucket_before = where.bucket_keys() if where.kind != "local" else None
    cwd_before = sorted(os.listdir("."))
    # Successful loads: metadata, plan, graft, at the latest and an explicit step.
    for step in (-1, 2):
        src = tg.KauldronCheckpoint(workdir, step=step)
        load_encoder(src)
        tg.plan(target(), src, {"params": "params"})
        src.close()
    # Failed loads: missing step, mismatch, missing key.
    with pytest.raises(tg.CheckpointNotFoundError, match="no complete step 3"):
        load_encoder(tg.KauldronCheckpoint(workdir, step=3))
    with pytest.raises(tg.MismatchError, match="shape differs"):
        tg.graft(
            {"p": {"kernel": jnp.zeros((4, 4))}},
            tg.KauldronCheckpoint(workdir),
            {"p.kernel": "params.encoder.kernel"},
        )
    with pytest.raises(tg.PathNotFoundError, match="params.encoderr"):
        tg.graft(target(), tg.KauldronCheckpoint(workdir), {"params.encoder": "params.encoderr"})
    assert where.snapshot(workdir) == before
    if bucket_before is not None:  # nothing created anywhere in the bucket
        assert where.bucket_keys() == bucket_before
    assert sorted(os.listdir(".")) == cwd_before  # no local folder named gs: or s3:


def test_nothing_created_for_missing_checkpoints_folder(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(tg.CheckpointNotFoundError, match="has no checkpoints/ folder"):
        load_encoder(tg.KauldronCheckpoint(tmp_path))
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "checkpoints").exists()


def test_is_workdir(run, where, tmp_path):
    workdir, _ = run
    workdir = where.publish(workdir, cache=True)
    assert is_workdir(workdir)
    assert not is_workdir(f"{workdir}/checkpoints/ckpt_5")
    assert not is_workdir(f"{workdir}/nothing-here")


def test_a_step_removed_before_prefetch_is_reported_by_prefetch(own_run, tmp_path):
    """The removed-step error comes from the source's own prefetch step, not a hook."""
    from test_read_metadata import reencode

    workdir, _ = own_run
    item = os.path.join(workdir, "checkpoints", "ckpt_5", "default")
    # Small index nodes: the headers are not all in memory once metadata() returns.
    deep = reencode(item, tmp_path / "deep", max_decoded_node_bytes=256)
    shutil.rmtree(item)
    shutil.move(deep, item)
    src = tg.KauldronCheckpoint(workdir)
    encoder = src.metadata()["params"]["encoder"]
    shutil.rmtree(os.path.join(workdir, "checkpoints", "ckpt_5"))
    with pytest.raises(tg.CheckpointNotFoundError,
                       match=r"step 5 of '.*run' was removed after it was chosen") as info:
        src.prefetch([encoder["kernel"], encoder["bias"]])
    assert isinstance(info.value.__cause__, tg.CheckpointError)


def test_close_closes_the_step_and_opens_nothing(own_run):
    workdir, states = own_run
    with tg.KauldronCheckpoint(workdir) as src:
        inner = src._open()
        inner.metadata()
    assert src._inner is None and inner._metadata is None  # released
    src.close()  # twice is fine
    never = tg.KauldronCheckpoint(os.path.join(workdir, "no-such-workdir"))
    never.close()  # nothing to open just to close: no error for a missing workdir
    assert_same_values(load_encoder(src), states[5].params["encoder"])  # reopens on use
