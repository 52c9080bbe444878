"""A lazy source over a Kauldron workdir: `<workdir>/checkpoints/ckpt_<step>/default`."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from treegraft._errors import CheckpointError, CheckpointNotFoundError
from treegraft._formats.orbax.source import OrbaxCheckpoint
from treegraft._parse.paths import Path
from treegraft._read.source import BoxRequest, ReadRequest, Source
from treegraft._storage.errors import stalled
from treegraft._storage.location import Location, children_of

__all__ = ["KauldronCheckpoint", "list_steps", "is_workdir"]

# ASCII digits only: `\d` would also take `ckpt_١٠` (Arabic-Indic digits) as step 10.
_STEP = re.compile(r"ckpt_([0-9]+)")
# Orbax writes one of these into a step folder when the step is complete.
_COMMIT_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")
# After a failed read, how long to watch for the step's deletion by its run.
_REMOVAL_GRACE_S = 0.5


def list_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """The complete steps of a Kauldron workdir, ascending.

    Step folders still being written (orbax's `.orbax-checkpoint-tmp` suffix)
    or without a commit marker are left out.

    Raises:
      CheckpointNotFoundError: the workdir or its `checkpoints/` folder is missing.
      CheckpointError: the workdir is a file, or a folder in it cannot be read.
    """
    return sorted(_step_folders(workdir, None))


def is_workdir(path: str | os.PathLike[str] | Location) -> bool:
    """Whether path (local, file://, gs:// or s3://) holds a `checkpoints/` folder.

    Raises:
      CheckpointError: path cannot be looked at (permission denied, storage
        unreachable).
    """
    return Location.parse(path).join("checkpoints").kind("the checkpoints folder") == "dir"


def _step_folders(workdir: str | os.PathLike[str] | Location, wanted: int | None = -1
                  ) -> dict[int, str]:
    """{step: folder name} of the complete steps (`ckpt_7`, or a padded `ckpt_00007`).

    A step folder that cannot be read is an error when it matters for wanted:
    the step itself, any step above the latest complete one for -1 (it might
    be the latest), any at all for None.
    """
    wd = Location.parse(workdir, what="workdir")
    ckpts = wd.join("checkpoints")
    keys: set[str] | None = None
    listed: list[str] = []
    if not wd.is_local:
        # One listing of every key below checkpoints/ shows the steps and their
        # markers; the workdir is looked at only when it finds nothing.
        listed = ckpts.keys(shown=wd)
        keys = set(listed)
    if not listed:
        kind = wd.kind("workdir")
        if kind is None:
            raise CheckpointNotFoundError(f"workdir {str(wd)!r} does not exist")
        if kind != "dir":
            raise CheckpointError(f"workdir {str(wd)!r} is a file, not a Kauldron workdir")
        if ckpts.kind("the checkpoints folder") != "dir":
            raise CheckpointNotFoundError(
                f"workdir {str(wd)!r} has no checkpoints/ folder: it is not a Kauldron workdir, "
                "or its run saved no checkpoint yet"
            )
    entries = (
        ckpts.children("the checkpoints folder") if keys is None else children_of(listed)
    )
    steps: dict[int, str] = {}
    unreadable: dict[int, tuple[str, CheckpointError]] = {}
    for name, entry in entries.items():
        m = _STEP.fullmatch(name)
        if m is None or entry != "dir":
            continue
        folder = ckpts.join(name)
        step = int(m.group(1))
        try:
            if keys is not None:
                committed = any(f"{name}/{marker}" in keys for marker in _COMMIT_MARKERS)
            else:
                committed = any(
                    folder.join(marker).kind("step folder") is not None
                    for marker in _COMMIT_MARKERS
                )
        except CheckpointError as e:
            unreadable[step] = (str(folder), e)
            continue
        if committed:
            # Kauldron's own name (no padding) wins over a padded duplicate.
            if step not in steps or name == f"ckpt_{step}":
                steps[step] = name
    latest = max(steps, default=-1)
    for step, (folder_name, error) in sorted(unreadable.items()):
        if wanted is None or step == wanted or (wanted == -1 and step > latest):
            cause = error.__cause__
            reason = getattr(cause, "strerror", None) or type(cause).__name__
            raise CheckpointError(
                f"step folder {folder_name!r} exists but cannot be read ({reason}), so "
                "whether it is complete is unknown; treegraft does not fall back to an older "
                "step: fix the folder's permissions, or pass an explicit step"
            ) from error
    return steps


class KauldronCheckpoint(Source):
    """A lazy source over the checkpoint of a Kauldron run.

    Args:
      workdir: the run's work directory (holding `checkpoints/ckpt_<step>/`): a
        local path, or a `file://`, `gs://` or `s3://` URL.
      step: the step to read; -1 (the default) means the latest complete one.
      timeout: seconds each remote storage operation may take (default 30, or
        `TREEGRAFT_STORAGE_TIMEOUT`).

    The step is chosen on first use and kept, so that metadata and reads come
    from the same step even while the run writes new ones. If the run deletes
    that step before it is read (orbax's `max_to_keep`), reading raises a
    `CheckpointNotFoundError` that says so. Nothing is ever created or written
    in the workdir.

    Example:
      >>> import treegraft as tg
      >>> src = tg.KauldronCheckpoint('/runs/pretrain', step=-1)  # doctest: +SKIP
      >>> src.step_dir                                            # doctest: +SKIP
      '/runs/pretrain/checkpoints/ckpt_5000'
    """

    def __init__(
        self, workdir: str | os.PathLike[str], step: int = -1, *, timeout: float | None = None
    ):
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise CheckpointError(f"step must be an int >= 0, or -1 for the latest; got {step!r}")
        if not isinstance(workdir, str | os.PathLike | Location):
            raise CheckpointError(
                f"workdir must be a path (str or os.PathLike), got {type(workdir).__name__}: "
                f"{workdir!r}"
            )
        self.location = Location.parse(workdir, timeout=timeout, what="workdir")
        self.workdir = str(self.location)
        self.step = step
        self._inner: OrbaxCheckpoint | None = None
        self._resolved: int | None = None
        self._folder: str | None = None

    def __repr__(self) -> str:
        return f"KauldronCheckpoint({self.workdir!r}, step={self.step})"

    @property
    def resolved_step(self) -> int:
        """The step actually read (the latest complete one for step=-1)."""
        self._open()
        assert self._resolved is not None
        return self._resolved

    @property
    def step_dir(self) -> str:
        """The step folder read, `<workdir>/checkpoints/ckpt_<step>`."""
        self._open()
        assert self._folder is not None
        return str(self.location.join("checkpoints", self._folder))

    def describe(self) -> str:
        if self._resolved is None:
            return f"the checkpoint of {self.workdir}"
        return f"the checkpoint {self.step_dir}"

    def _open(self) -> OrbaxCheckpoint:
        if self._inner is None:
            folders = _step_folders(self.location, self.step)
            steps = sorted(folders)
            if not steps:
                raise CheckpointNotFoundError(
                    f"workdir {self.workdir!r} has no complete checkpoint in checkpoints/ "
                    "(steps still being written are ignored)"
                )
            if self.step == -1:
                step = steps[-1]
            elif self.step in steps:
                step = self.step
            else:
                raise CheckpointNotFoundError(
                    f"workdir {self.workdir!r} has no complete step {self.step}; "
                    f"available steps: {_list(steps)}"
                )
            step_dir = self.location.join("checkpoints", folders[step])
            item = step_dir.join("default")
            if item.kind("the train state item") != "dir":
                try:
                    items = step_dir.listdir("step folder")
                    if not items:  # an object store has no empty folders
                        raise FileNotFoundError(str(step_dir))
                except FileNotFoundError:  # deleted by its run since it was listed
                    raise CheckpointNotFoundError(
                        f"step {step} of {self.workdir!r} was removed while it was being "
                        "opened (a run that keeps only its latest steps deletes older ones); "
                        "load again to read the latest complete step"
                    ) from None
                raise CheckpointError(
                    f"step {step} of {self.workdir!r} has no 'default' item (the train state); "
                    f"it holds: {', '.join(items) or 'nothing'}"
                )
            self._inner = OrbaxCheckpoint(item)
            self._resolved = step
            self._folder = folders[step]
        return self._inner

    def metadata(self) -> Any:
        with self._removal_checked(grace=0.0) as inner:
            return inner.metadata()

    def prefetch(self, leaves: Sequence[Any]) -> None:
        with self._removal_checked(grace=_REMOVAL_GRACE_S) as inner:
            inner.prefetch(leaves)

    def read(self, requests: Sequence[ReadRequest]) -> list[Any]:
        with self._removal_checked(grace=_REMOVAL_GRACE_S) as inner:
            return inner.read(requests)

    def read_boxes(self, requests: Sequence[BoxRequest]) -> Iterable[np.ndarray]:
        """`leaf[box]` for each request, reading only the chunks that hold the box."""
        with self._removal_checked(grace=_REMOVAL_GRACE_S) as inner:
            parts = inner.read_boxes(requests)
        return self._removal_checked_parts(parts)

    def _removal_checked_parts(self, parts: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """parts, read lazily by the step's checkpoint, with a removed step named as such."""
        with self._removal_checked(grace=_REMOVAL_GRACE_S):
            yield from parts

    def box_nbytes(self, path: Path, box: Sequence[slice]) -> int:
        """Bytes a read of `leaf[box]` really reads, given the array's chunking."""
        with self._removal_checked(grace=_REMOVAL_GRACE_S) as inner:
            return inner.box_nbytes(path, box)

    @contextlib.contextmanager
    def _removal_checked(self, *, grace: float) -> Iterator[OrbaxCheckpoint]:
        """The step's checkpoint, for one call whose errors name a removed step as such.

        A `CheckpointError` raised once the step is gone becomes the
        removed-step error; errors of opening the step pass through as they are.
        """
        inner = self._open()
        try:
            yield inner
        except CheckpointError as e:
            # A stall is not a removal, and looking would wait on the stalled storage again.
            if self._inner is inner and not stalled(e):  # not closed meanwhile: same step
                self._raise_if_removed(e, grace=grace)
            raise

    def _raise_if_removed(self, error: CheckpointError, *, grace: float) -> None:
        # A run that keeps only its latest steps (orbax's max_to_keep) deletes
        # older ones: the chosen step can vanish between listing and reading,
        # or while it is read. Say so, rather than what the read tripped on.
        # A deletion still under way may not show yet: watch for it briefly
        # (only on this error path).
        deadline = time.monotonic() + grace
        while self._intact():
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)
        raise CheckpointNotFoundError(
            f"step {self._resolved} of {self.workdir!r} was removed after it was chosen "
            "(a run that keeps only its latest steps deletes older ones); nothing was "
            "grafted: load again to read the latest complete step, or pass a step the "
            "run keeps"
        ) from error

    def _intact(self) -> bool:
        """Whether the chosen step still has its folder and a commit marker."""
        assert self._folder is not None
        step_dir = self.location.join("checkpoints", self._folder)
        try:
            return step_dir.kind("step folder") == "dir" and any(
                step_dir.join(m).kind("step folder") is not None for m in _COMMIT_MARKERS
            )
        except CheckpointError:  # cannot tell: report the read's own error
            return True

    def close(self) -> None:
        """Closes the step's checkpoint and forgets the chosen step."""
        if self._inner is not None:
            self._inner.close()
        self._inner = None
        self._resolved = None
        self._folder = None


def _list(steps: list[int]) -> str:
    if len(steps) <= 12:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:5])) + ", ..., " + ", ".join(map(str, steps[-5:]))
