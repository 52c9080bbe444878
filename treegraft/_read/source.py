"""What a graft reads from: an in-memory pytree or a lazy source (a checkpoint).

`plan` only needs a source's metadata: a pytree whose leaves have `.shape` and
`.dtype`. An in-memory pytree is its own metadata. A lazy source (subclass of
`Source`) returns a metadata tree without reading array bytes, and reads the
leaves the plan asks for later, in `read`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from treegraft._parse.paths import Path

__all__ = ["Source", "ReadRequest", "BoxRequest", "reads_boxes"]

_S = TypeVar("_S", bound="Source")


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One source leaf to read, and how the target wants it.

    Attributes:
      path: the leaf's path in the source.
      like: the target leaf it will replace (an array, a `jax.ShapeDtypeStruct`,
        a numpy array or a Python scalar): the value is read directly with its
        sharding.
      dtype: the dtype to read as: the source's own, unless casting was asked.
    """

    path: Path
    like: Any
    dtype: Any


@dataclass(frozen=True)
class BoxRequest:
    """A box (one slice per axis, step 1) of one source leaf, to read to the host.

    Attributes:
      path: the leaf's path in the source.
      box: one `slice` per axis of the leaf, each of step 1 (None bounds allowed).
      out: where the caller wants the box, or None: a writable numpy array (often
        a view into a larger block) of the box's shape and the source dtype. A
        source may read the box straight into it and hand `out` itself back; one
        that ignores it returns an array of its own, which the caller copies in.
    """

    path: Path
    box: tuple[slice, ...]
    out: np.ndarray | None = field(default=None, compare=False, repr=False)


class Source(abc.ABC):
    """A lazy source of leaves: metadata first, array bytes only on request."""

    @abc.abstractmethod
    def metadata(self) -> Any:
        """A pytree with the source's structure whose leaves have shape and dtype."""

    @abc.abstractmethod
    def read(self, requests: Sequence[ReadRequest]) -> list[Any]:
        """Reads the requested leaves, each placed like its `like`; in order."""

    def prefetch(self, leaves: Sequence[Any]) -> None:
        """Reads ahead, in one batch, the shapes and dtypes of these metadata leaves.

        A plan calls it with the source leaves it pairs, before it checks them.
        Sources whose metadata is already complete need not override it.
        """
        return None

    def describe(self) -> str:
        """How messages name this source, e.g. "the checkpoint /w/ckpt_3"."""
        return "the source"

    def read_boxes(self, requests: Sequence[BoxRequest]) -> Iterable[np.ndarray]:
        """Reads `leaf[box]` of each request as a host numpy array, in the source dtype.

        The default reads each whole leaf (to the host) and slices it; sources
        whose layout allows it read only the chunks that hold each box. Each
        result owns its memory.

        A graft asks for all the boxes of one block in one call and iterates
        the result once, in order, copying each part into its block before it
        asks for the next. A list is fine; an iterator (a generator) lets the
        source stream: keep a bounded window of reads in flight, hand over each
        part once it and those before it are read, and cancel what is still in
        flight when the consumer stops early (the generator is closed) or a read
        fails. Errors about the requests themselves (a path or box the source
        does not have) should still be raised by the call, before any read.

        A request may name an `out` array: the source may fill it and return
        it (as this default does), so that a block is filled with no part in
        between; a source that ignores `out` still works, its parts are copied.

        Returns:
          One array per request, in request order: a list or any iterable.
        """
        if not requests:
            return []
        import jax

        meta = self.metadata()
        reqs = []
        for r in requests:
            leaf = _leaf(meta, r.path)
            like = _host_like(leaf)
            reqs.append(ReadRequest(r.path, like, np.dtype(leaf.dtype)))
        out = []
        for r, value in zip(requests, self.read(reqs), strict=True):
            with jax.transfer_guard("allow"):
                host = np.asarray(value)
            part = host[tuple(r.box)]
            dest = getattr(r, "out", None)
            if isinstance(dest, np.ndarray) and dest.shape == part.shape and (
                    dest.dtype == part.dtype):
                dest[...] = part
                out.append(dest)
            else:  # no out, or one that does not fit: the caller's check says so
                out.append(np.array(part, copy=True))
        return out

    def box_nbytes(self, path: Path, box: tuple[slice, ...]) -> int:
        """Bytes `read_boxes` really reads for this box (the default: the whole leaf)."""
        leaf = _leaf(self.metadata(), path)
        return int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize

    def close(self) -> None:
        """Releases what the source holds open (the default holds nothing).

        Subclasses override it, not `__enter__`/`__exit__`: it opens nothing,
        and closing twice is harmless.
        """
        return None

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _leaf(meta: Any, path: Path) -> Any:
    from treegraft._errors import PathNotFoundError

    node = meta
    for part in path.parts:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            raise PathNotFoundError(f"{path} is not a leaf of the source") from None
    if not hasattr(node, "shape") or not hasattr(node, "dtype"):
        raise PathNotFoundError(f"{path} is not an array leaf of the source")
    return node


def _host_like(leaf: Any) -> np.ndarray:
    # A numpy target of the leaf's shape, which sources read to the host whole;
    # a broadcast view, so that it costs no memory.
    return np.broadcast_to(np.zeros((), dtype=np.dtype(leaf.dtype)), tuple(leaf.shape))


Source.__module__ = "treegraft"


def reads_boxes(source: Source) -> bool:
    """Whether source reads boxes itself (only their chunks), not the base class's whole leaves.

    For a source that does not, a graft reads each needed leaf whole once and
    slices it for every box, and counts its bytes once.
    """
    return type(source).read_boxes is not Source.read_boxes
