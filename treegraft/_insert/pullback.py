"""A reshape's output box as the one box of its input that holds it, where one does.

Building a reshaped leaf device by device, the general pull (`Step.pull`)
reads the whole input for every device box and reshapes it. A reshape that
splits and merges axes keeps most boxes one box of the input (a range of
heads of `[D, N * H] -> [D, N, H]` is a range of columns): the insert step
then reads that box alone (`transform._reshape_pull`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["reshape_box"]


def reshape_box(
    shape_in: tuple[int, ...], shape_out: tuple[int, ...], box: tuple[slice, ...]
) -> tuple[slice, ...] | None:
    """The box of a reshape's input that holds exactly a box of its output, or None.

    The axes fall into groups whose sizes multiply to the same on both sides;
    within each group a box whose elements are one flat range in the output
    (fixed leading axes, one range, then whole axes) is one box of the input
    when that range is one there too. Then the input box's values, in C order,
    are the output box's.

    Example:
      >>> reshape_box((4, 6), (4, 2, 3), (slice(0, 2), slice(1, 2), slice(0, 3)))
      (slice(0, 2, None), slice(3, 6, None))
      >>> reshape_box((4, 6), (4, 2, 3), (slice(0, 4), slice(0, 2), slice(1, 2))) is None
      True
    """
    if not shape_in or not shape_out or 0 in shape_in or 0 in shape_out:
        return None
    if any(s.stop <= s.start for s in box):
        return None
    groups = _axis_groups(shape_in, shape_out)
    if groups is None:
        return None
    out: list[slice] = []
    for axes_in, axes_out in groups:
        flat = _flat_range([shape_out[a] for a in axes_out], [box[a] for a in axes_out])
        if flat is None:
            return None
        ranges = _range_box([shape_in[a] for a in axes_in], *flat)
        if ranges is None:
            return None
        out.extend(ranges)
    return tuple(out)


def _axis_groups(
    a: tuple[int, ...], b: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Consecutive axes of a and of b grouped so that each pair of groups has one size."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pi, pj = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(a):
                pi, i = pi * a[i], i + 1
                gi.append(i - 1)
            elif pj < pi and j < len(b):
                pj, j = pj * b[j], j + 1
                gj.append(j - 1)
            else:
                return None
        groups.append((gi, gj))
    # Trailing axes of size 1 join the last group.
    if any(d != 1 for d in a[i:]) or any(d != 1 for d in b[j:]) or not groups:
        return None
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups


def _flat_range(dims: list[int], box: list[slice]) -> tuple[int, int] | None:
    """The C-order flat range `[lo, hi)` that box covers within dims, if it is one range."""
    k = next((n for n, s in enumerate(box) if s.stop - s.start != 1), len(box) - 1)
    if any(s.start != 0 or s.stop != d for s, d in zip(box[k + 1 :], dims[k + 1 :], strict=True)):
        return None
    lo = 0
    for s, d in zip(box, dims, strict=True):
        lo = lo * d + s.start
    return lo, lo + (box[k].stop - box[k].start) * math.prod(dims[k + 1 :])


def _range_box(dims: list[int], lo: int, hi: int) -> list[slice] | None:
    """The box of dims whose C-order elements are the flat range `[lo, hi)`, if one is."""
    for k, d in enumerate(dims):
        inner = math.prod(dims[k + 1 :])
        if lo % inner or hi % inner or (lo // inner) // d != (hi // inner - 1) // d:
            continue
        prefix = np.unravel_index(lo // inner // d, dims[:k]) if k else ()
        return (
            [slice(int(p), int(p) + 1) for p in prefix]
            + [slice(lo // inner % d, (hi // inner - 1) % d + 1)]
            + [slice(0, n) for n in dims[k + 1 :]]
        )
    return None
