"""A local file's byte range read into a buffer, a large one by two threads at once.

Reading from the page cache is a copy the kernel makes into the buffer (and,
into memory never used before, the faults that zero its pages): a range of
several MiB read by this thread and one reader thread, piece by piece, takes
half the time when a core is free, which it is while the insert step's copy
worker waits for the next block (tunix case: the reads were a quarter of the
main thread's time; docs/benchmarks.md). The boxes cut out of a range read
whole are copied the same way (`copy_in_two`). A read is local and a copy is
host memory to host memory: the wait for the reader's half is bounded by
that read or copy, and no storage is waited on.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from treegraft._errors import CheckpointError
from treegraft._threads import one_thread

__all__ = ["SPLIT_FROM", "copy_in_two", "read_range"]

# A range smaller than this is read by this thread alone: handing half of it
# over costs some tens of microseconds, reading 1 MiB about a hundred.
SPLIT_FROM = 2 * 2**20
# The pieces a large range is read or copied in: small enough that neither
# thread waits long for the other's last one, large enough that taking one
# (a lock, a syscall) costs little beside it.
_PIECE = 2**20



def _reader() -> ThreadPoolExecutor:
    """The reader thread's pool (made anew in a forked child: `_threads.one_thread`)."""
    return one_thread("treegraft-read")


def read_range(fd: int, view: memoryview, begin: int, what: str, where: str, size: int) -> None:
    """Fills view with the bytes of the open file fd from offset begin.

    A range of `SPLIT_FROM` bytes or more is read in pieces of `_PIECE`
    bytes, which this thread and the reader take in turn, each the next one
    not started (`_shared`).

    Args:
      view: a writable byte memoryview (the destination, filled whole).
      what: how messages name what is read ("tensor 'w'").
      where: how messages name the file.
      size: the file's size when it was checked, for the message of a short file.

    Raises:
      CheckpointError: the read fails, or the file ends before the range does
        (truncated); nothing is left reading into view when it raises.
    """
    said = (what, where, size, begin + len(view))
    if len(view) < SPLIT_FROM:
        _read(fd, view, begin, *said)
        return
    _shared([
        functools.partial(_read, fd, view[o : o + _PIECE], begin + o, *said)
        for o in range(0, len(view), _PIECE)
    ])


def copy_in_two(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Copies each source into its destination (`dst[...] = src`), large ones by two threads.

    Pairs of at least `SPLIT_FROM` bytes in all are copied in pieces of about
    `_PIECE` bytes (a pair cut along its first axis), which this thread and
    the reader take in turn (`_shared`); smaller ones are copied here.

    Example:
      >>> import numpy as np
      >>> src = np.arange(12).reshape(3, 4)[:, :2]
      >>> dst = np.empty((3, 2), src.dtype)
      >>> copy_in_two([(dst, src)])
      >>> dst.tolist()
      [[0, 1], [4, 5], [8, 9]]
    """
    if sum(d.nbytes for d, _ in pairs) < SPLIT_FROM:
        _copy(pairs)
        return
    tasks = []
    for dst, src in pairs:
        rows = dst.shape[0] if dst.ndim else 1
        step = max(1, rows * _PIECE // max(dst.nbytes, 1)) if dst.ndim else 1
        for r in range(0, rows, step):
            part = (dst[r : r + step], src[r : r + step]) if dst.ndim else (dst, src)
            tasks.append(functools.partial(_copy, [part]))
    _shared(tasks)


def _copy(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in pairs:
        # As unsigned integers of the same size: numpy lets go of the GIL for
        # those, maybe not for a dtype of another library (bfloat16).
        kind = _UINTS.get(dst.dtype.itemsize)
        if kind is not None and src.dtype.itemsize == dst.dtype.itemsize:
            np.copyto(dst.view(kind), src.view(kind))
        else:
            dst[...] = src


_UINTS = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def _shared(tasks: Sequence[Callable[[], None]]) -> None:
    """Runs tasks on this thread and the reader, each thread taking the next one not started.

    A thread held up (the reader not yet scheduled, a slow page fault) then
    costs the other at most the one piece it is in: this thread does the rest.
    The first failure stops both from starting another piece, and is raised
    once the reader's piece in flight is done: nothing may still write into
    the caller's buffers once this returns or raises.
    """
    pending = iter(tasks)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                task = None if failures else next(pending, None)
            if task is None:
                return
            try:
                task()
            except BaseException as e:  # noqa: BLE001 (raised by the caller below)
                with lock:
                    failures.append(e)

    try:
        other: Future[None] | None = _reader().submit(work)
    except RuntimeError:  # the interpreter is shutting down: no new thread
        other = None
    try:
        work()
    finally:
        if other is not None:
            other.exception()  # the reader's piece in flight, if any
    if failures:
        raise failures[0]


def _read(
    fd: int, view: memoryview, begin: int, what: str, where: str, size: int, end: int
) -> None:
    """One thread's read of view's bytes, in as many `os.preadv` calls as it takes.

    A short file is named with the end of the whole range (end), not of this part.
    """
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], begin + done)
        except OSError as e:
            raise CheckpointError(
                f"cannot read {what} from {where}: {type(e).__name__}: {e}"
            ) from e
        if n == 0:
            raise CheckpointError(
                f"{where} is truncated or damaged: reading {what} needs "
                f"{end} bytes but the file has {size}"
            )
        done += n
