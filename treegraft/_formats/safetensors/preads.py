"""A local file's byte range read into a buffer, a large one by two threads at once.

Reading from the page cache is a copy the kernel makes into the buffer (and,
into memory never used before, the faults that zero its pages): a range of
several MiB read by this thread and one reader thread, half each, takes half
the time when a core is free, which it is while the insert step's copy
worker waits for the next block (tunix case: the reads were a quarter of the
main thread's time; docs/benchmarks.md). A read is local: the wait for the
reader's half is bounded by that read, and no storage is waited on.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from treegraft._errors import CheckpointError

__all__ = ["SPLIT_FROM", "read_range"]

# A range smaller than this is read by this thread alone: handing half of it
# over costs some tens of microseconds, reading 1 MiB about a hundred.
SPLIT_FROM = 2 * 2**20
# The reader's half starts on a page boundary of the buffer and of the file.
_PAGE = 2**16

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _reader() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="treegraft-read")
        return _pool


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
    other: Future[None] = _reader().submit(_read, fd, view[half:], begin + half, *said)
    try:
        _read(fd, view[:half], begin, *said)
    finally:
        # Waited for even when this half failed: nothing may still write into
        # the buffer once this call returns or raises.
        first = other.exception()
    if first is not None:
        raise first


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
