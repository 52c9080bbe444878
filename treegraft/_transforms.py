"""Init transforms: their base class, the no-op one, and a sequence of named ones.

Kauldron's `kd.ckpts` names: a trainer calls `transform(state)` before the
optimizer state exists, then `transform_after_optimizer(state)`.
`treegraft._loaders` builds the checkpoint loaders on this base.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from treegraft._errors import GraftError

__all__ = ["InitTransform", "AbstractPartialLoader", "NoopTransform", "MultiTransform"]

_T = TypeVar("_T")


class InitTransform(abc.ABC):
    """Base of the transforms applied to a state when training starts.

    A transform may change values, never the structure, shapes or dtypes, and
    keeps each leaf's sharding.
    """

    @abc.abstractmethod
    def transform(self, state: _T) -> _T:
        """Returns the state with new values, before the optimizer exists."""

    def transform_after_optimizer(self, state: _T) -> _T:
        """Returns the state with new values, once the optimizer state exists."""
        return state


AbstractPartialLoader = InitTransform


@dataclasses.dataclass(frozen=True)
class NoopTransform(InitTransform):
    """A transform that returns the state unchanged.

    Example:
      >>> import treegraft as tg
      >>> tg.NoopTransform().transform({'a': 1})
      {'a': 1}
    """

    def transform(self, state: _T) -> _T:
        return state


class MultiTransform(InitTransform):
    """Applies named transforms in order, in both phases.

    An error is re-raised with the failing transform's name as a prefix.

    Example:
      >>> import treegraft as tg
      >>> t = tg.MultiTransform(first=tg.NoopTransform(), second=tg.NoopTransform())
      >>> t.transform({'a': 1})
      {'a': 1}
    """

    def __init__(self, **transforms: InitTransform):
        for name, t in transforms.items():
            if not isinstance(t, InitTransform) and not (
                hasattr(t, "transform") and hasattr(t, "transform_after_optimizer")
            ):
                raise TypeError(
                    f"MultiTransform: {name!r} is a {type(t).__name__}, not an init transform "
                    "(it needs transform and transform_after_optimizer)"
                )
        self.transforms: Mapping[str, InitTransform] = MappingProxyType(dict(transforms))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.transforms.items())
        return f"MultiTransform({inner})"

    def transform(self, state: _T) -> _T:
        for name, t in self.transforms.items():
            state = _named(name, t.transform, state)
        return state

    def transform_after_optimizer(self, state: _T) -> _T:
        for name, t in self.transforms.items():
            state = _named(name, t.transform_after_optimizer, state)
        return state


def _named(name: str, fn: Any, state: Any) -> Any:
    prefix = f"init_transform {name!r} failed: "
    try:
        return fn(state)
    except GraftError as e:
        raise e.with_prefix(prefix) from e
    except Exception as e:
        new = _prefixed(e, prefix)
        if new is None:  # an exception type that cannot be rebuilt
            e.add_note(prefix.removesuffix(": "))
            raise
        raise new from e


def _prefixed(e: Exception, prefix: str) -> Exception | None:
    """A copy of a foreign exception (same class and attributes), its message prefixed.

    Built without calling `__init__`, whose signature may differ from the
    exception's args. None when the class cannot be made so.
    """
    try:
        new = type(e).__new__(type(e))
        new.__dict__.update(e.__dict__)
        new.args = (prefix + str(e),)
        if isinstance(e, OSError):
            # Keep errno; leave strerror unset so that str() is the new message.
            new.errno = e.errno  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (the caller falls back to a note)
        return None
    return new


for _cls in (InitTransform, NoopTransform, MultiTransform):
    _cls.__module__ = "treegraft"
