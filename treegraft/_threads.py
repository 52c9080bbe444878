"""treegraft's own helper threads: one lazily made thread per name, per process.

A pool made in a parent process is useless in a forked child: its thread is
not there, and a task submitted to it would wait forever. Each name's pool
is therefore kept with the process id it was made in, and made anew in a
child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["one_thread"]

_pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}  # name: (its process, the pool)
_lock = threading.Lock()


def one_thread(name: str, initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """The one-thread pool called name in this process, made on first use.

    Args:
      name: the thread's name prefix ("treegraft-copy").
      initializer: run once in the thread as it starts.

    Example:
      >>> one_thread("treegraft-doc").submit(lambda: 6 * 7).result()
      42
    """
    with _lock:
        kept = _pools.get(name)
        if kept is None or kept[0] != os.getpid():
            kept = _pools[name] = (os.getpid(), ThreadPoolExecutor(
                1, thread_name_prefix=name, initializer=initializer))
        return kept[1]
