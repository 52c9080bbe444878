"""Boxes of a C-ordered tensor as the byte ranges of its file that hold them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from treegraft._errors import GraftError
from treegraft._formats.safetensors.header import TensorInfo
from treegraft._insert.placement import Box, box_of

__all__ = [
    "Box",
    "box_of",
    "check_box",
    "covering",
    "first_bad_bool",
    "full_box",
    "merge",
    "nbytes",
    "row_box",
]

def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, d) for d in shape)


def check_box(box: Any, info: TensorInfo) -> Box:
    shape = info.shape
    ok = isinstance(box, tuple) and len(box) == len(shape)
    out = []
    if ok:
        for s, dim in zip(box, shape, strict=True):
            if not isinstance(s, slice) or s.step not in (None, 1):
                ok = False
                break
            start = 0 if s.start is None else s.start
            stop = dim if s.stop is None else s.stop
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= dim):
                ok = False
                break
            out.append((start, stop))
    if not ok:
        raise GraftError(
            f"box {box!r} for tensor {info.name!r} of shape {tuple(shape)} must be a tuple of "
            f"{len(shape)} slice(s) with step 1 and 0 <= start <= stop <= the axis length"
        )
    return tuple(out)


def covering(info: TensorInfo, box: Box) -> tuple[int, int, tuple[int, ...], tuple[slice, ...]]:
    """The smallest range of rows that holds box, as absolute file offsets.

    Leading axes where the box takes one index are fixed; the rows are then
    taken along the next axis. Returns `(begin, end, sub_shape, inner)`: the
    bytes `[begin, end)` viewed as `sub_shape` and indexed by `inner` give the
    box (with the fixed axes dropped).
    """
    shape = info.shape
    itemsize = info.dtype.itemsize
    if not shape:
        # One element viewed as [1] and sliced, not indexed by (): indexing a
        # 0-d array gives a numpy scalar, which keeps no stored byte as it is
        # (a BOOL byte 255 would become True before it could be checked).
        return info.begin, info.end, (1,), (slice(None),)
    if any(stop == start for start, stop in box):
        return info.begin, info.begin, (0,), (slice(None),)
    strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
    d = 0
    while d < len(shape) - 1 and box[d][1] - box[d][0] == 1:
        d += 1
    first = sum(box[k][0] * strides[k] for k in range(d)) + box[d][0] * strides[d]
    rows = box[d][1] - box[d][0]
    count = rows * strides[d]
    sub_shape = (rows, *shape[d + 1 :])
    inner = (slice(None), *(slice(a, b) for a, b in box[d + 1 :]))
    begin = info.begin + first * itemsize
    return begin, begin + count * itemsize, sub_shape, inner


def row_box(info: TensorInfo, box: Box) -> Box:
    """The box of whole rows whose bytes are `covering(info, box)`: what a read of box reads.

    Example:
      >>> import numpy as np
      >>> info = TensorInfo("w", (4, 6), np.dtype("float32"), "a.safetensors", 0, 96)
      >>> row_box(info, ((1, 3), (2, 5)))
      ((1, 3), (0, 6))
    """
    d = 0
    while d < len(info.shape) - 1 and box[d][1] - box[d][0] == 1:
        d += 1
    return (*box[: d + 1], *((0, n) for n in info.shape[d + 1 :]))


def merge(
    info: TensorInfo, boxes: Sequence[Box]
) -> tuple[
    list[tuple[int, int]],
    dict[Box, tuple[int, int, tuple[int, ...], tuple[slice, ...], tuple[int, ...]]],
]:
    """Byte ranges to read for boxes (overlapping ranges merged), and where each box is.

    Returns the ranges, and per box `(range index, element offset in it,
    sub_shape, inner, box shape)`.
    """
    itemsize = info.dtype.itemsize
    covers = {box: covering(info, box) for box in boxes}
    spans = sorted({(b, e) for b, e, _, _ in covers.values()})
    ranges: list[tuple[int, int]] = []
    for b, e in spans:
        if ranges and b < ranges[-1][1]:  # overlaps the previous range: widen it
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], e))
        else:
            ranges.append((b, e))
    where = {}
    for box, (b, e, sub_shape, inner) in covers.items():
        k = next(i for i, (rb, re_) in enumerate(ranges) if rb <= b and e <= re_)
        shape = tuple(stop - start for start, stop in box)
        where[box] = (k, (b - ranges[k][0]) // itemsize, sub_shape, inner, shape)
    return ranges, where


def nbytes(shape: tuple[int, ...], info: TensorInfo) -> int:
    return math.prod(shape) * info.dtype.itemsize


def first_bad_bool(info: TensorInfo, pieces: Mapping[Box, np.ndarray]) -> tuple[int, int] | None:
    """The first byte of a BOOL tensor's pieces that is neither 0 nor 1, if any.

    numpy keeps such a byte as it is in a bool array, which then disagrees
    with itself (shown True, yet `x == True` is False and `x.sum()` counts
    the byte's value).

    Returns:
      `(offset in the file, byte value)` of the lowest such byte over all
      pieces, or None when every byte is 0 or 1.
    """
    first: tuple[int, int] | None = None
    for box, piece in pieces.items():
        raw = np.ascontiguousarray(piece).view(np.uint8)
        bad = np.flatnonzero(raw > 1)
        if not bad.size:
            continue
        # The element's index in the piece, then in the whole tensor.
        where = np.unravel_index(int(bad[0]), piece.shape) if piece.shape else ()
        index = tuple(start + int(k) for (start, _), k in zip(box, where, strict=True))
        flat = int(np.ravel_multi_index(index, info.shape)) if info.shape else 0
        found = (info.begin + flat, int(raw.reshape(-1)[bad[0]]))
        if first is None or found < first:
            first = found
    return first
