"""Keeping Python's full collections out of a plan that builds big tables."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["young_collections_only"]

_NEVER = 2**31 - 1
_lock = threading.Lock()
_active = 0
_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def young_collections_only() -> Iterator[None]:
    """Runs the block with collections of the youngest generation only.

    Planning over 100,000 leaves allocates a few million small objects (paths,
    index tables, parsed metadata), none of them in a cycle. Each automatic
    collection of an older generation walks every object alive, the caller's
    too: 0.3 to 0.5 s of a 1.5 s plan. Young collections go on as usual, so
    cyclic garbage made meanwhile is still freed, and objects that survive
    are examined later like any others. Disabling the collector altogether
    was measured worse: its one collection of every survivor at the end, cold
    in the cache, cost 0.15 s against 0.06 s for the young collections.

    Nested and concurrent blocks are fine: the first to enter saves the
    thresholds, the last to leave restores them, also on error.

    Example:
      >>> import gc
      >>> before = gc.get_threshold()
      >>> with young_collections_only():
      ...     gc.get_threshold()[1:] == before[1:]
      False
      >>> gc.get_threshold() == before
      True
    """
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(_saved[0], _NEVER, _NEVER)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                gc.set_threshold(*_saved)
