"""Exception types and the formatting shared by every message.

Every error treegraft raises on bad input is a `GraftError` (a `ValueError`).
Errors that report several problems keep them in `.problems` so a program can
inspect them; the message lists them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "GraftError",
    "PathSyntaxError",
    "PathTypeError",
    "PathNotFoundError",
    "MismatchError",
    "MappingError",
    "TreeError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "suggest",
    "first_line",
]


class GraftError(ValueError):
    """Base class of every error treegraft raises on bad input.

    Attributes:
      problems: the individual problems, when the error reports several.
    """

    def __init__(self, message: str, *, problems: Sequence[object] = ()):
        super().__init__(message)
        self.message = message
        self.problems = tuple(problems)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message; keep it readable.
        return self.message


class PathSyntaxError(GraftError):
    """A path or pattern string does not follow the path grammar."""

    def __init__(self, text: str, column: int, reason: str):
        caret = " " * (column + 2) + "^"
        message = (
            f"invalid path {text!r}: {reason} at column {column + 1}\n  {text}\n{caret}"
        )
        super().__init__(message)
        self.text = text
        self.column = column
        self.reason = reason


class PathTypeError(GraftError, TypeError):
    """A path or pattern is not a string (also a `TypeError`, as it used to be)."""


class PathNotFoundError(GraftError, KeyError):
    """A path does not exist in a tree or checkpoint (also a `KeyError`)."""


class MismatchError(GraftError):
    """Structure, shape or dtype differ between two sides that must agree."""


class MappingError(GraftError):
    """The mapping itself is invalid: wrong type, wildcards, or rules tied."""


class TreeError(GraftError):
    """A pytree treegraft cannot walk: two children under one key, dict keys of
    kinds that do not sort together, or nesting deeper than jax flattens."""


class CheckpointError(GraftError):
    """A checkpoint cannot be used: unreadable, corrupt or inconsistent."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, workdir or step does not exist (also a `FileNotFoundError`)."""

    def __str__(self) -> str:
        return self.message


for _cls in (
    GraftError,
    PathSyntaxError,
    PathTypeError,
    PathNotFoundError,
    MismatchError,
    MappingError,
    TreeError,
    CheckpointError,
    CheckpointNotFoundError,
):
    _cls.__module__ = "treegraft"


def suggest(
    word: str,
    candidates: Iterable[str],
    *,
    n: int = 3,
    cutoff: float = 0.6,
    render: Callable[[str], str] = repr,
) -> str:
    """Returns ` (did you mean 'x'?)` for close matches of word, or ''.

    `render` shows each close candidate (by default its `repr`).
    """
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(render(c) for c in close) + "?)"


def first_line(error: BaseException, *, limit: int = 400) -> tuple[str, str]:
    """The type name and first message line of an error's root cause.

    tensorstore's messages carry kilobytes of spec; the root cause's first
    line names the file and what was wrong with it.
    """
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    line = text.splitlines()[0] if text else type(root).__name__
    if len(line) > limit:
        line = line[:limit] + " ..."
    return type(root).__name__, line


def describe_leaf(shape: object, dtype: object) -> str:
    """Renders a leaf's shape and dtype the same way in every message."""
    if shape is None:
        return str(dtype)
    dims = ", ".join(str(d) for d in shape)  # type: ignore[attr-defined]
    return f"{dtype}[{dims}]"
