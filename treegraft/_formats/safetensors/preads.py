"""A local file's byte range read into a buffer, a large one by two threads at once.

Reading from the page cache is a copy the kernel makes into the buffer (and,
into memory never used before, the faults that zero its pages): a range of
several MiB read by this thread and one reader thread, half each, takes half
the time when a core is free, which it is while the insert step's copy
worker waits for the next block (tunix case: the reads were a quarter of the
main thread's time; docs/benchmarks.md). The boxes cut out of a range read
whole are copied the same way (`copy_in_two`). A read is local and a copy is
host memory to host memory: the wait for the reader's half is bounded by
that read or copy, and no storage is waited on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from treegraft._errors import CheckpointError

__all__ = ["SPLIT_FROM", "copy_in_two", "read_range"]

# A range smaller than this is read by this thread alone: handing half of it
# over costs some tens of microseconds, reading 1 MiB about a hundred.
SPLIT_FROM = 2 * 2**20
# The reader's half starts a whole number of these into the range.
_PAGE = 2**16

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the process it serves, the pool)
_pool_lock = threading.Lock()


def _reader() -> ThreadPoolExecutor:
    """The reader thread's pool, made anew in a forked child (the parent's thread is not there)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="treegraft-read"))
        return _pool[1]


def read_range(fd: int, view: memoryview, begin: int, what: str, where: str, size: int) -> None:
    """Fills view with the bytes of the open file fd from offset begin.

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
    half = (len(view) // 2) // _PAGE * _PAGE
    if len(view) < SPLIT_FROM or half == 0:
        _read(fd, view, begin, *said)
        return
    _in_two(
        lambda: _read(fd, view[:half], begin, *said),
        lambda: _read(fd, view[half:], begin + half, *said),
    )


def copy_in_two(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Copies each source into its destination (`dst[...] = src`), large ones by two threads.

    Pairs of at least `SPLIT_FROM` bytes in all are shared out, a large pair
    cut in two along its first axis, so that each thread copies about half
    the bytes; smaller ones are copied here.

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
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for dst, src in pairs:
        n = dst.shape[0] // 2 if dst.ndim else 0
        if dst.nbytes >= SPLIT_FROM and n:
            parts += [(dst[:n], src[:n]), (dst[n:], src[n:])]
        else:
            parts.append((dst, src))
    ours: list[tuple[np.ndarray, np.ndarray]] = []
    theirs: list[tuple[np.ndarray, np.ndarray]] = []
    for part in sorted(parts, key=lambda p: -p[0].nbytes):  # the larger first, to the lighter
        lighter = ours if sum(d.nbytes for d, _ in ours) <= sum(
            d.nbytes for d, _ in theirs) else theirs
        lighter.append(part)
    _in_two(lambda: _copy(ours), lambda: _copy(theirs))


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


def _in_two(ours: Callable[[], None], theirs: Callable[[], None]) -> None:
    """Runs theirs on the reader thread and ours here; raises the first failure.

    Theirs is waited for even when ours failed: nothing may still write into
    the caller's buffers once this returns or raises.
    """
    try:
        other: Future[None] = _reader().submit(theirs)
    except RuntimeError:  # the interpreter is shutting down: no new thread
        ours()
        theirs()
        return
    try:
        ours()
    finally:
        failed = other.exception()
    if failed is not None:
        raise failed


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
