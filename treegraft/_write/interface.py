"""What a format's writer is given and must do (docs/design.md section 15).

The convert step plans the output (its leaves, shapes and dtypes), then hands a
format's `Writer` the leaves and a `BoxFetch`: any box of any output leaf, pulled
through the plan's operations from the source boxes it needs, as a fresh host
array. The writer decides which boxes to ask for and in what order (its chunks,
or contiguous slabs), writes each and drops it, so that array data in host
memory stays under `Budget.max_host_bytes` plus one chunk, whatever the size of
the model.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OutLeaf", "BoxFetch", "Budget", "Share", "Writer", "slabs"]


@dataclass(frozen=True)
class OutLeaf:
    """One leaf of the output.

    Attributes:
      path: the leaf's key parts in the output tree (str keys, int indices).
      shape: its shape.
      dtype: its numpy dtype (ml_dtypes for bfloat16 and friends).
    """

    path: tuple[Any, ...]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# (output leaf index, box) -> leaf[box] as a fresh host numpy array of the leaf's dtype.
BoxFetch = Callable[[int, tuple[slice, ...]], np.ndarray]


class Share:
    """This process's share of a write that several processes make together (jax.distributed).

    With one process (`count == 1`) it owns every box and `agree` returns at
    once. With several, every process runs the same writer on the same leaves:
    each writes the boxes it `owns` (on a chunk grid where each chunk lies in
    one process's share: `grid`), then all `agree` (a barrier that also
    tells every process if one failed), and process 0 alone writes the
    metadata that makes the output whole.

    Attributes:
      process: this process's index.
      count: how many processes write.
    """

    process: int = 0
    count: int = 1

    def owns(self, leaf: int, box: tuple[slice, ...]) -> bool:
        """Whether this process writes this box of this output leaf."""
        return True

    def grid(self, leaf: int) -> tuple[int, ...] | None:
        """A chunk shape that keeps each chunk in one process's share, or None for any."""
        return None

    def agree(self, what: str, ok: bool = True) -> None:
        """Waits for every process to get here; raises on all if one was not ok."""
        return None


@dataclass(frozen=True)
class Budget:
    """The limits a write keeps to.

    Attributes:
      max_host_bytes: array data held in host memory at once (plus one chunk).
      max_shard_bytes: the largest output file a format that splits files writes
        (safetensors' `model-0000i-of-0000n.safetensors`).
      share: this process's share when several processes write (the default:
        one process, writing everything).
    """

    max_host_bytes: int = 2**30
    max_shard_bytes: int = 5 * 10**9
    share: Share = Share()


class Writer(abc.ABC):
    """One output format: checks the leaves at plan time, then writes them."""

    format: str = ""

    @abc.abstractmethod
    def problems(self, leaves: Sequence[OutLeaf]) -> list[str]:
        """Why these leaves cannot be written in this format: one message per leaf, naming it.

        Called before anything is read (a key the format cannot name
        unambiguously, a dtype the format lacks). Empty when all can be written.
        """

    @abc.abstractmethod
    def write(self, tmp: Any, leaves: Sequence[OutLeaf], fetch: BoxFetch, budget: Budget) -> None:
        """Writes every leaf under `tmp` (a `treegraft._storage.location.Location`).

        `tmp` does not exist yet (or is an empty folder); the caller makes it
        appear as `dest` once this returns (a rename locally, the commit marker on
        object stores), and removes it if this raises.

        `tmp` is always a folder. For a dest that names one file (a dest ending
        in ".safetensors"), the writer writes that one file in `tmp` (any
        name) and the caller moves it to dest; more than one file there is
        refused (the output needs shards: dest must be a folder).
        """


def slabs(shape: Sequence[int], itemsize: int, max_bytes: int) -> Iterator[tuple[slice, ...]]:
    """Boxes covering an array in C order, each contiguous in memory and at most max_bytes.

    A box is a run of whole rows of the largest suffix that fits (at least one
    element), so the boxes written one after the other give the array's bytes in
    order (what a safetensors file holds).

    Example:
      >>> [tuple((s.start, s.stop) for s in b) for b in slabs((3, 4), 4, 32)]
      [((0, 2), (0, 4)), ((2, 3), (0, 4))]
    """
    shape = tuple(int(d) for d in shape)
    if not shape:
        yield ()
        return
    if math.prod(shape) == 0:
        yield tuple(slice(0, d) for d in shape)
        return
    budget = max(1, max_bytes // max(1, itemsize))  # elements per box
    # The first axis k whose suffix fits in the budget: boxes take whole runs along k.
    k = len(shape) - 1
    suffix = 1
    for axis in range(len(shape) - 1, -1, -1):
        if suffix * shape[axis] > budget:
            k = axis
            break
        suffix *= shape[axis]
        k = axis
    else:
        yield tuple(slice(0, d) for d in shape)
        return
    rows = max(1, budget // suffix)  # how many index steps of axis k per box
    for outer in np.ndindex(*shape[:k]):
        for start in range(0, shape[k], rows):
            stop = min(shape[k], start + rows)
            yield (tuple(slice(i, i + 1) for i in outer) + (slice(start, stop),)
                   + tuple(slice(0, d) for d in shape[k + 1:]))
