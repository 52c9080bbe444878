"""Several processes writing one output (jax.distributed): who writes which chunk.

docs/design.md section 15: under `jax.distributed`, every process plans the
same output and runs the same writer; each writes the chunks it owns and
process 0 writes the metadata once all chunks are written. A leaf copied from
an in-memory `jax.Array` sharded across processes is written by the process
that holds each shard (its chunk grid divides the shards, so that no chunk
needs another process's data); every other leaf (a checkpoint's, a numpy
array every process holds) is dealt out chunk by chunk. The agreements are
one small all-gather each: they are barriers, and they tell every process if
one of them failed, so that all raise together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import CheckpointError, GraftError
from treegraft._parse.paths import render_parts
from treegraft._plan import PlanRecord
from treegraft._tree.index import is_abstract
from treegraft._write.interface import OutLeaf, Share

__all__ = ["ProcessShare", "Disagreed", "agree_token"]

Box = tuple[slice, ...]


class Disagreed(CheckpointError):
    """Another process failed a step of the write: this one stops too."""


def _allgather(values: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    with jax.transfer_guard("allow"):  # a few bytes per process, not array data
        return np.asarray(multihost_utils.process_allgather(values))


def agree_token(token: bytes) -> bytes:
    """Process 0's token, on every process (the temporary folder's shared name)."""
    table = _allgather(np.frombuffer(token.ljust(16, b"\0")[:16], np.uint8))
    return bytes(table.reshape(jax.process_count(), -1)[0]).rstrip(b"\0")


class ProcessShare(Share):
    """This process's share of the output: shards it holds, and every n-th other chunk.

    Args:
      rec: the plan's record.
      leaves: the output's leaves.
      max_chunk: the largest chunk, in bytes.
    """

    def __init__(self, rec: PlanRecord, leaves: Sequence[OutLeaf], max_chunk: int):
        self.process = jax.process_index()
        self.count = jax.process_count()
        self._owners: dict[int, Any] = {}
        self._grids: dict[int, tuple[int, ...]] = {}
        pair_of = {pair.target: pair for pair in rec.pairs}
        for i, leaf in enumerate(leaves):
            pair = pair_of.get(i)
            value = rec.source.leaves[pair.source] if pair is not None else rec.target.leaves[i]
            if pair is not None and not rec.is_copy(pair):
                if any(_spans(rec.source.leaves[si]) for si in (pair.sources or (pair.source,))):
                    raise GraftError(
                        f"the output leaf {render_parts(leaf.path)!r}: its rule transforms "
                        "an in-memory array sharded across processes, whose boxes no one "
                        "process holds: save the state first (tg.save), then convert the "
                        "checkpoint"
                    )
                continue
            if not _spans(value):
                continue
            sharding = value.sharding
            shape = tuple(value.shape)
            self._owners[i] = {
                tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True)):
                    device.process_index
                for device, index in sharding.devices_indices_map(shape).items()
            }
            self._grids[i] = _divide(tuple(sharding.shard_shape(shape)),
                                     leaf.dtype.itemsize, max_chunk)
        self._dealt = 0

    def grid(self, leaf: int) -> tuple[int, ...] | None:
        return self._grids.get(leaf)

    def owns(self, leaf: int, box: Box) -> bool:
        owners = self._owners.get(leaf)
        if owners is None:
            self._dealt += 1
            return (self._dealt - 1) % self.count == self.process
        holders = [
            process for bounds, process in owners.items()
            if all(lo <= b.start and b.stop <= hi for b, (lo, hi) in zip(box, bounds, strict=True))
        ]
        return min(holders, default=0) == self.process

    def agree(self, what: str, ok: bool = True) -> None:
        flags = _allgather(np.array([0 if ok else 1], np.uint8)).ravel()
        failed = [i for i, flag in enumerate(flags) if flag]
        if failed and ok:
            raise Disagreed(
                f"{what} failed on process(es) {failed} (see their errors); this process "
                f"(#{self.process}) stops too, and nothing is written"
            )


def _spans(value: Any) -> bool:
    return (isinstance(value, jax.Array) and not is_abstract(value)
            and not value.is_fully_addressable)


def _divide(shard: tuple[int, ...], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """A chunk shape that divides the shard shape and holds at most max_bytes (or one row)."""
    grid = list(shard)
    for axis in range(len(grid)):
        if math.prod(grid) * itemsize <= max_bytes:
            break
        rest = math.prod(grid[axis + 1:]) * itemsize
        fits = max(1, max_bytes // max(rest, 1))
        grid[axis] = max(d for d in _divisors(grid[axis]) if d <= fits)
    return tuple(grid)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] or [1]
