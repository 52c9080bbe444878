"""What a graft reads from: an in-memory pytree or a lazy source (a checkpoint).

`plan` only needs a source's metadata: a pytree whose leaves have `.shape` and
`.dtype`. An in-memory pytree is its own metadata. A lazy source (subclass of
`Source`) returns a metadata tree without reading array bytes, and reads the
leaves the plan asks for later, in `read`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from treegraft._paths import Path

__all__ = ["Source", "ReadRequest"]


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


Source.__module__ = "treegraft"
