"""Pausing Python's cycle collector while a plan builds its tables."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses automatic cycle collection for the duration of the block.

    Planning over 100,000 leaves allocates a few million small objects (paths,
    index tables, parsed metadata), none of them in a cycle. Each automatic
    collection on the way walks every object alive, the caller's too: 0.3 to
    0.5 s of a 1.5 s plan. Objects that survive are looked at once by the next
    collection after the block, as usual. The previous setting is restored,
    also on error, and a collector already disabled stays disabled.

    Example:
      >>> import gc
      >>> with collector_paused():
      ...     gc.isenabled()
      False
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
