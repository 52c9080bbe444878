"""Multi-host agreement: every process fails together, or reads the same data.

Under `jax.distributed`, each process plans and reads its own shards of the
same global arrays, so a process that fails alone would leave the others
waiting in a collective. Two small all-gathers prevent that: one byte per
process after planning (did it fail?), and 128 bytes per process before a
read (which step, item and leaves). No array byte moves; a single process
skips both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import jax
import numpy as np

from treegraft._errors import CheckpointError, GraftError
from treegraft._parse.paths import Path, render_parts

_T = TypeVar("_T")


class _Request(Protocol):
    """What the read agreement needs of a read request (a `treegraft.ReadRequest`)."""

    @property
    def path(self) -> Path: ...

    @property
    def like(self) -> Any: ...

    @property
    def dtype(self) -> Any: ...

__all__ = ["plan_on_every_process", "check_processes_agree", "spans_processes"]


def plan_on_every_process(state: Any, make_plan: Callable[[], _T]) -> _T:
    """Runs make_plan; under several processes sharing global targets, all fail together.

    A plan depends only on inputs every process shares, so verdicts agree; but
    if one process cannot see the checkpoint, or was given another mapping, it
    would raise alone and leave the others waiting in the read's collectives.
    One byte per process is exchanged to make every process raise instead.
    """
    if jax.process_count() == 1 or not spans_processes(state):
        return make_plan()
    error: Exception | None = None
    try:
        p = make_plan()
    except Exception as e:  # re-raised below, after the others have heard of it
        error = e
    from jax.experimental import multihost_utils

    with jax.transfer_guard("allow"):  # one byte per process, not array data
        flags = np.asarray(
            multihost_utils.process_allgather(np.array([error is not None], np.uint8))
        ).ravel()
    if error is not None:
        raise error
    failed = [i for i, flag in enumerate(flags) if flag]
    if failed:
        raise GraftError(
            f"the graft failed on process(es) {failed} (see their errors); this process "
            f"(#{jax.process_index()}) planned it fine, but none reads: the processes must "
            "share the state's structure, the mapping and the checkpoint"
        )
    return p


_NAME_BYTES = 96  # of the step and item folder names, shown when processes disagree


def check_processes_agree(directory: str, requests: Sequence[_Request]) -> None:
    """Raises the same error on every process if the processes would read different data.

    Active only with several processes and a target sharded across them: each
    process then reads only its own shards of the same global arrays, so all of
    them take part in this read, and they must read the same leaves of the same
    step. They may not, silently: with step=-1 a step can complete while the
    processes list the workdir, and each one then fills its shards from another
    step. One all-gather of 128 bytes per process compares the step and item
    folder names and a digest of the requested leaves; no array byte moves.
    """
    if jax.process_count() == 1 or not any(spans_processes(r.like) for r in requests):
        return
    from jax.experimental import multihost_utils

    parent, _, item = directory.rstrip("/").rpartition("/")
    name = f"{parent.rpartition('/')[2]}/{item}".encode()[-_NAME_BYTES:]
    digest = hashlib.sha256(name)
    for req in requests:
        shape = getattr(req.like, "shape", None)
        digest.update(repr((render_parts(req.path.parts), shape, str(req.dtype))).encode())
    payload = np.frombuffer(digest.digest() + name.ljust(_NAME_BYTES, b"\0"), np.uint8)
    with jax.transfer_guard("allow"):  # 128 bytes per process, not array data
        table = np.asarray(multihost_utils.process_allgather(payload))
    if (table == table[0]).all():
        return
    rows = [bytes(row) for row in table]
    names = [row[32:].rstrip(b"\0").decode(errors="replace") for row in rows]
    listed = ", ".join(
        f"process {i} reads {n!r} (leaves #{row[:4].hex()})"
        for i, (n, row) in enumerate(zip(names, rows, strict=True))
    )
    if len(set(names)) > 1:
        why = (
            "they opened different checkpoints; with step=-1 (the latest) a step that "
            "completed while they listed the workdir does this: pass the same explicit "
            "step on every process"
        )
    else:
        why = "they request different leaves: the state or the mapping differs between processes"
    raise CheckpointError(
        f"the {len(rows)} processes would fill their shards of the same global arrays "
        f"from different data, so none reads: {why}. {listed}"
    )


def spans_processes(tree: Any) -> bool:
    """Whether any leaf of tree is sharded across several processes."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding) and not sharding.is_fully_addressable:
            return True
    return False
