"""Boxes of the output, pulled through the plan from the source boxes they need.

docs/design.md section 15: a writer asks for one box of one output leaf at a
time (`BoxFetch`); the box is read from the source (a checkpoint's chunks, a
numpy array's slice, a sharded `jax.Array`'s addressable shards, never the
whole array gathered on one host), passed through the rule's operations
(`treegraft._insert.transform.leaf_fetch`), cast to the output's dtype where
the plan allows it, and handed over as a fresh host array (docs/design.md
section 12: it shares memory with nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import GraftError
from treegraft._insert.sharding import overflow_error
from treegraft._insert.transform import Blocks, leaf_fetch
from treegraft._parse.paths import Part, render_parts
from treegraft._plan import PlanRecord
from treegraft._read.source import ReadRequest
from treegraft._tree import leaves as _leaves
from treegraft._write.interface import BoxFetch, OutLeaf

__all__ = ["StreamBlocks", "array_box", "out_leaves", "box_fetch"]

Box = tuple[slice, ...]


def array_box(value: Any, box: Box, what: str = "") -> np.ndarray:
    """`value[box]` as a fresh host array, read without gathering value whole.

    A numpy array is sliced and copied; a `jax.Array` is read shard by shard
    from this process's addressable shards (each element once, whatever the
    replication); a Python scalar becomes a 0-d array.

    Raises:
      GraftError: part of the box lives only on another process.
    """
    if isinstance(value, jax.Array):
        return _jax_box(value, box, what)
    host = np.asarray(value)
    return np.array(host[box] if box else host)


def _jax_box(value: jax.Array, box: Box, what: str) -> np.ndarray:
    shape = tuple(value.shape)
    box = tuple(slice(*b.indices(d)[:2]) for b, d in zip(box, shape, strict=True))
    out = np.empty(tuple(b.stop - b.start for b in box), value.dtype)
    if out.size == 0:
        return out
    covered = 0
    seen: set[tuple[tuple[int, int], ...]] = set()
    with jax.transfer_guard("allow"):
        for shard in value.addressable_shards:
            inter = []
            for b, s, d in zip(box, shard.index, shape, strict=True):
                s0, s1 = s.indices(d)[:2]
                lo, hi = max(b.start, s0), min(b.stop, s1)
                if lo >= hi:
                    break
                inter.append((lo, hi, s0))
            else:
                key = tuple((lo, hi) for lo, hi, _ in inter)
                if key in seen:
                    continue  # a replica of a part already copied
                seen.add(key)
                src = tuple(slice(lo - s0, hi - s0) for lo, hi, s0 in inter)
                dst = tuple(
                    slice(lo - b.start, hi - b.start) for (lo, hi, _), b in zip(inter, box,
                                                                             strict=True)
                )
                data = shard.data
                # On CPU the shard's buffer is host memory already: a view, sliced,
                # costs no copy; on an accelerator only the box's part crosses.
                part = np.asarray(data)[src] if data.platform() == "cpu" else np.asarray(data[src])
                out[dst] = part
                covered += int(np.prod([hi - lo for lo, hi, _ in inter]))
    if covered != out.size:
        raise GraftError(
            f"the in-memory leaf {what!r}: part of the box {_show_box(box)} lives on another "
            "process; each process writes only the boxes its devices hold"
        )
    return out


def _show_box(box: Box) -> str:
    return "[" + ", ".join(f"{b.start}:{b.stop}" for b in box) + "]"


class StreamBlocks(Blocks):
    """`Blocks` for streaming: in-memory leaves read box by box, one whole leaf kept at most.

    The insert step's `Blocks` keeps one host copy of each in-memory leaf it
    slices (a graft builds every shard of a leaf from it); the write step asks
    for each box once, so it reads the box alone, shard by shard. A lazy
    source that cannot read boxes is read whole, and only the last such leaf
    is kept, so host memory holds one leaf, not the model.
    """

    def _fetch_one(self, si: int, box: Box) -> np.ndarray:
        rec = self.rec
        leaf = rec.source.leaves[si]
        if rec.lazy is None:
            return array_box(leaf, box, render_parts(rec.source.paths[si]))
        whole = self._whole.get(si)
        if whole is None:
            self._whole.clear()
            shape, dtype = _leaves.spec_of(leaf)
            like = np.broadcast_to(np.zeros((), dtype), shape or ())
            request = ReadRequest(_path(rec.source.paths[si]), like, dtype)
            whole = self._whole[si] = np.asarray(rec.lazy.read([request])[0])
        return np.array(whole[box] if box else whole)


def _path(parts: Sequence[Part]) -> Any:
    from treegraft._parse.paths import Path

    return Path(parts)


def out_leaves(rec: PlanRecord) -> list[OutLeaf]:
    """The output's leaves: every leaf of the plan's target, with its shape and dtype."""
    out = []
    for parts, leaf in zip(rec.target.paths, rec.target.leaves, strict=True):
        shape, dtype = _leaves.spec_of(leaf)
        if shape is None or isinstance(dtype, type):
            value = np.asarray(leaf)
            shape, dtype = value.shape, value.dtype
        out.append(OutLeaf(tuple(parts), tuple(int(d) for d in shape), np.dtype(dtype)))
    return out


def box_fetch(rec: PlanRecord, leaves: Sequence[OutLeaf],
              on_bytes: Callable[[int], None] | None = None) -> BoxFetch:
    """The output's `BoxFetch`: grafted leaves through their rules, the rest as `like` holds them.

    Args:
      rec: the plan's record (target: the output's layout).
      leaves: the output's leaves (`out_leaves(rec)`).
      on_bytes: called with the bytes of each fetched box (progress).
    """
    blocks = StreamBlocks(rec)
    pair_of = {pair.target: pair for pair in rec.pairs}
    fetches: dict[int, Callable[[Box], np.ndarray]] = {}

    def fetch(i: int, box: Box) -> np.ndarray:
        leaf = leaves[i]
        path = render_parts(leaf.path)
        inner = fetches.get(i)
        if inner is None:
            pair = pair_of.get(i)
            if pair is None:
                value = rec.target.leaves[i]
                if isinstance(value, jax.ShapeDtypeStruct):
                    raise GraftError(
                        f"the output leaf {path!r} has no value: `like` holds only its shape "
                        "and dtype and no rule fills it; map it, or give like= a value"
                    )

                def inner(b: Box, value: Any = value) -> np.ndarray:
                    return array_box(value, b, path)
            else:
                inner = leaf_fetch(rec, pair, blocks)
            fetches.clear()  # one leaf's fetch kept: the writer goes leaf by leaf
            fetches[i] = inner
        got = np.asarray(inner(box))
        got = _cast(got, leaf.dtype, rec.cast, path, box)
        if on_bytes is not None:
            on_bytes(got.nbytes)
        return got

    return fetch


def _cast(value: np.ndarray, dtype: np.dtype[Any], cast: bool | str, path: str,
          box: Box) -> np.ndarray:
    """A box in the output's dtype; a cast the plan allowed with checks is checked."""
    if value.dtype == dtype:
        return value
    with np.errstate(invalid="ignore", over="ignore"):  # checked below, or unsafe
        got = value.astype(dtype)
    if _leaves.values_checked(value.dtype, dtype, cast):
        found = _leaves.first_overflow(value, got)
        if found is not None:
            index = tuple(b.start + k for b, k in zip(box, found[0], strict=True))
            raise overflow_error(repr(path), value.dtype, got.dtype, index, found[1].item())
    return got
