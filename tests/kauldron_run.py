"""Write real checkpoints exactly as a Kauldron run lays them out (no Kauldron needed).

A Kauldron trainer saves through an orbax `CheckpointManager` on
`<workdir>/checkpoints` with `step_prefix='ckpt'`: one folder `ckpt_<step>` per
step (no zero padding), item `default` holding the `TrainState` saved with
orbax's standard handler, and items `timer` and `ds_iter` (JSON) beside it.
Orbax stores tuples as lists, namedtuples (optax's `ScaleByAdamState`) as dicts
of their fields, and `optax.EmptyState()` as None.

Also here: the two kinds of incomplete step folder a reader must skip, and a
snapshot of a directory tree to prove that reading wrote nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

# The tree comparison moved to helpers; test files still import it from here.
from helpers import assert_same_values as assert_equal_trees

__all__ = [
    "TrainState",
    "init_params",
    "train_state",
    "write_run",
    "write_item",
    "add_half_written_step",
    "add_uncommitted_step",
    "snapshot",
    "data_files",
    "assert_equal_trees",
]

TMP_SUFFIX = ".orbax-checkpoint-tmp"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
    """Kauldron's `kd.train.TrainState`: the same fields, a pytree, with `replace`."""

    step: Any
    params: Any
    collections: Any = None
    opt_state: Any = None

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)


def init_params(shapes: Mapping[str, Any], seed: int, dtype: Any = jnp.float32) -> dict:
    """A nested dict of random arrays; shapes is a nested dict of shape tuples."""
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    arrays = [jax.random.normal(k, shape, dtype) for k, shape in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, arrays)


def train_state(
    params: Any,
    *,
    step: int = 0,
    collections: Any = None,
    opt: optax.GradientTransformation | None = None,
) -> TrainState:
    """A TrainState as a trainer holds it after `step` steps (adam state if opt)."""
    opt_state = None if opt is None else opt.init(params)
    if opt_state is not None and step:
        # Make the optimizer state differ from a fresh init, as after training.
        grads = jax.tree.map(jnp.ones_like, params)
        for _ in range(step):
            _, opt_state = opt.update(grads, opt_state, params)
    return TrainState(
        step=jnp.asarray(step),
        params=params,
        collections={} if collections is None else collections,
        opt_state=opt_state,
    )


def write_run(
    workdir: str | os.PathLike[str],
    states: Mapping[int, Any],
    *,
    timer: bool = True,
    ds_iter: bool = True,
) -> dict[int, Any]:
    """Saves each state at its step as a Kauldron run does; returns states.

    The manager is the one Kauldron's `Checkpointer` builds: prefix `ckpt`,
    asynchronous saves, item `default` with the standard handler.
    """
    directory = os.path.join(os.fspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(step_prefix="ckpt", max_to_keep=None)
    mgr = ocp.CheckpointManager(directory, options=options)
    try:
        for step, state in sorted(states.items()):
            items: dict[str, Any] = {"default": ocp.args.StandardSave(state)}
            if timer:
                items["timer"] = ocp.args.JsonSave({"elapsed_s": 1.5 * step})
            if ds_iter:
                items["ds_iter"] = ocp.args.JsonSave({"position": step * 32})
            mgr.save(step, args=ocp.args.Composite(**items))
            mgr.wait_until_finished()
    finally:
        mgr.close()
    return dict(states)


def write_item(path: str | os.PathLike[str], tree: Any) -> str:
    """Saves tree as a bare orbax item directory (what `OrbaxCheckpoint` reads)."""
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.abspath(os.fspath(path)), tree)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    return os.fspath(path)


def _copy_step(workdir: str | os.PathLike[str], like_step: int, name: str) -> str:
    ckpts = os.path.join(os.fspath(workdir), "checkpoints")
    dst = os.path.join(ckpts, name)
    shutil.copytree(os.path.join(ckpts, f"ckpt_{like_step}"), dst)
    return dst


def add_half_written_step(workdir: str | os.PathLike[str], step: int, *, like_step: int) -> str:
    """Adds `ckpt_<step>.orbax-checkpoint-tmp`, as left by a save still running.

    Its content is a full copy of step like_step with the item folders renamed
    `<item>.orbax-checkpoint-tmp` and no `commit_success.txt`, as orbax has it
    mid-save; the step's `_CHECKPOINT_METADATA`, written first, is kept.
    """
    dst = _copy_step(workdir, like_step, f"ckpt_{step}{TMP_SUFFIX}")
    for name in os.listdir(dst):
        full = os.path.join(dst, name)
        if os.path.isdir(full):
            os.rename(full, full + TMP_SUFFIX)
    _remove_commit_files(dst, keep_step_metadata=True)
    return dst


def add_uncommitted_step(workdir: str | os.PathLike[str], step: int, *, like_step: int) -> str:
    """Adds `ckpt_<step>` with a copy of step like_step but no commit marker at all."""
    dst = _copy_step(workdir, like_step, f"ckpt_{step}")
    _remove_commit_files(dst)
    return dst


def _remove_commit_files(root: str, *, keep_step_metadata: bool = False) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == "commit_success.txt" or (
                name == "_CHECKPOINT_METADATA" and not (keep_step_metadata and dirpath == root)
            ):
                os.remove(os.path.join(dirpath, name))


def data_files(item_dir: str | os.PathLike[str]) -> list[str]:
    """The OCDBT files holding the array bytes of an orbax item directory."""
    d = os.path.join(os.fspath(item_dir), "ocdbt.process_0", "d")
    return sorted(os.path.join(d, name) for name in os.listdir(d))


def snapshot(root: str | os.PathLike[str]) -> dict[str, tuple[int, str | None, int]]:
    """Every entry under root: {relative path: (size, sha256, mtime_ns)}.

    Directories are included (size -1, no hash) so that a file created and
    removed again still shows up in the directory's mtime.
    """
    root = os.fspath(root)
    out: dict[str, tuple[int, str | None, int]] = {}
    st = os.stat(root)
    out["."] = (-1, None, st.st_mtime_ns)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = (-1, None, os.stat(full).st_mtime_ns)
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(full)
            out[os.path.relpath(full, root)] = (st.st_size, digest, st.st_mtime_ns)
    return out

