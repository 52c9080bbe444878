"""Lent blocks put on their devices by two threads: this one and one worker.

A transformed leaf read through lent views (`transform.Blocks.lend`) costs
one copy per device, jax's, made while this thread holds no lock: the
device put of a strided view copies it into a buffer of the device's own
(docs/design.md section 12). Those copies are handed to one worker thread
as the blocks are made, so that reading the next rows here overlaps them;
once every block is made, this thread takes back the copies the worker has
not started and makes them itself. A copy is host memory to host memory:
the wait for the worker's last one is bounded by that copy, and no storage
is waited on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from treegraft._insert.placement import (
    Box,
    assemble,
    copy_block,
    devices_by_box,
    put_block,
)
from treegraft._threads import one_thread

__all__ = ["SHARED_FROM", "lent", "place_shared"]

# A leaf smaller than this is put by this thread alone: handing a copy over
# costs some tens of microseconds. At 1 MiB the attention kernels of a small
# Llama (1-2 MiB, eight boxes of 128-256 KiB) are shared too: this thread
# does three times the worker's work otherwise (tunix case, per-thread CPU).
SHARED_FROM = 2**20

_entered = threading.local()  # the worker's allowing guard, held for the thread's life


def _worker() -> ThreadPoolExecutor:
    """The worker's pool (made anew in a forked child: `_threads.one_thread`)."""
    return one_thread("treegraft-copy", _allow_transfers)


def lent(block: Any) -> bool:
    """Whether block is a lent strided view: read-only, not C-ordered (jax copies it)."""
    return (
        isinstance(block, np.ndarray)
        and not block.flags.writeable
        and not block.flags.c_contiguous
    )


def _allow_transfers() -> None:
    """Allows transfers in the worker thread for its lifetime (set as the thread starts).

    The puts it makes are the ones graft was asked for, allowed whatever guard
    is set (docs/design.md section 12); a guard entered once, not per put
    (5 us each).
    """
    guard = jax.transfer_guard("allow")
    guard.__enter__()
    _entered.guard = guard  # kept: a context manager let go of restores the guard it set


def _put(block: np.ndarray, device: Any, x64: bool) -> jax.Array:
    """jax's copy of block on device, made under the caller's `enable_x64` in any thread.

    jax's `enable_x64` may be set for the calling thread only; the worker
    would otherwise put under the process's: a float64 block became float32
    there (a silent cast), or mixed with the caller's float64 shards.
    Transfers are allowed in both threads (`_allow_transfers`, `place_shared`).
    """
    if bool(jax.config.read("jax_enable_x64")) == x64:
        return jax.device_put(block, device, may_alias=False)
    with jax.enable_x64(x64):
        return jax.device_put(block, device, may_alias=False)


def place_shared(
    shape: tuple[int, ...], sharding: Any, block_of: Callable[[Box], Any]
) -> jax.Array:
    """As `placement.array_from_blocks(..., adopt=False)`, lent blocks copied by two threads.

    Blocks that are not lent strided views are put here, one at a time, as
    `array_from_blocks` puts them (a block returned twice is copied).

    Returns:
      The jax.Array of shape in sharding, every shard in a buffer of its own.
    """
    out: dict[Any, jax.Array] = {}
    handed: list[tuple[np.ndarray, Any, Future[jax.Array]]] = []
    used: set[int] = set()
    x64 = bool(jax.config.read("jax_enable_x64"))  # this thread's setting, for the worker
    # The transfers graft was asked for, allowed whatever guard the caller set
    # (docs/design.md section 12): once here, not per block.
    with jax.transfer_guard("allow"):
        try:
            for box, devices in devices_by_box(sharding, shape).items():
                block = block_of(box)
                if lent(block):
                    handed.extend((block, d, _worker().submit(_put, block, d, x64))
                                  for d in devices)
                    continue
                if id(block) in used:
                    block = copy_block(block)
                used.add(id(block))
                for device, got in zip(devices, put_block(block, devices, adopt=False),
                                       strict=True):
                    out[device] = got
                del block
            out.update(_collect(handed, x64))
        finally:
            for _, _, future in handed:
                future.cancel()  # a failed block: copies not started are not made
        return assemble(shape, sharding, out)


def _collect(handed: Sequence[tuple[np.ndarray, Any, Future[jax.Array]]],
             x64: bool) -> dict[Any, jax.Array]:
    """Each handed copy's array: made here if the worker has not started it, else its own."""
    out: dict[Any, jax.Array] = {}
    for block, device, future in reversed(handed):
        if future.cancel():
            out[device] = _put(block, device, x64)
    for _, device, future in handed:
        if device not in out:
            out[device] = future.result()
    return out
