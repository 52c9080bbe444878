"""Exception types, the problems they list, and the formatting shared by every message.

Every error treegraft raises on bad input (a tree, a mapping, a path, a
checkpoint) is a `GraftError` (a `ValueError`). Calling one of its classes
wrongly (a positional argument where a keyword is needed, an object that is not
an init transform given to `MultiTransform`) is a `TypeError`, as Python raises
for such mistakes.

Errors that report several problems keep them in `.problems`, as `Problem`s,
so a program can inspect them; the message is made from them in one format: a
header, the problems grouped by kind under a heading each, then "to fix:" and
the remedies chosen by their causes.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # For the annotations only: the path grammar raises these errors, so this
    # module must not import it at run time.
    from treegraft._parse.paths import Path

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
    "Problem",
    "suggest",
    "first_line",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a graft.

    Attributes:
      kind: what is wrong, one of `KINDS`: "missing", "unexpected",
        "unmatched_rule", "unmatched_ignore", "shape", "dtype", "structure",
        "tie", "abstract", "deleted" or "unfilled" (found by a plan); "mapping"
        or "ignore" (an entry of a mapping or an ignore pattern that does not
        parse); "insert" (a leaf of `insert`'s subtree that does not fit);
        "sharding" (a leaf of `propagate_sharding` whose shape differs).
      message: names the paths and shows both sides; one line, but for a
        syntax error's caret lines.
      target: the path in the state, where there is one.
      source: the path in the source, where there is one.
      rule: the rule involved, as "'new' <- 'old'", where there is one.
      pattern: the ignore pattern involved, where there is one.
      remedy: the fix that fits this problem's cause, or "" when the message
        says it (a close name) or there is no generic fix.
    """

    kind: str
    message: str
    target: Path | None = None
    source: Path | None = None
    rule: str | None = None
    pattern: str | None = None
    remedy: str = ""


class GraftError(ValueError):
    """Base class of every error treegraft raises on bad input.

    Attributes:
      message: the message (also `str(error)`).
      problems: the individual `Problem`s, when the error reports several
        (empty when the message is the one problem).
    """

    def __init__(self, message: str, *, problems: Sequence[Problem] = ()):
        super().__init__(message)
        self.message = message
        self.problems: tuple[Problem, ...] = tuple(problems)

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message; keep it readable.
        return self.message

    @classmethod
    def from_problems(
        cls, problems: Sequence[Problem], *, rules: int | None = None, header: str | None = None
    ) -> GraftError:
        """The error that lists problems, of the subclass their kinds call for.

        The subclass is the one all the problems' kinds share (see `KINDS`):
        `PathNotFoundError` for paths that match nothing, `MismatchError` for
        differing shapes, dtypes or structures, `MappingError` for tied rules
        and invalid mapping entries; `GraftError` itself when they differ.

        Args:
          problems: at least one problem.
          rules: the number of rules of the mapping, for the default header.
          header: the message's first line; by default "cannot graft (N rules):
            M problems". Under a header of its own, an error whose problems are
            all of one kind lists them without a section heading: the header
            says what they are.

        Returns:
          The error (to raise); its `problems` are the ones given.

        Example:
          >>> import treegraft as tg
          >>> e = tg.GraftError.from_problems(
          ...     [tg.Problem("shape", "'w' in the state is float32[2], in the source float32[3]")],
          ...     rules=1)
          >>> type(e).__name__
          'MismatchError'
          >>> print(e)
          cannot graft (1 rule): 1 problem
          shape differs: 1
            'w' in the state is float32[2], in the source float32[3]
        """
        problems = tuple(problems)
        classes = {KINDS[p.kind][1] if p.kind in KINDS else GraftError for p in problems}
        error = classes.pop() if len(classes) == 1 else GraftError
        return error(format_problems(problems, rules=rules, header=header), problems=problems)

    def with_prefix(self, prefix: str) -> GraftError:
        """A copy of this error (same class, problems and attributes), its message prefixed.

        `MultiTransform` uses it to name the transform that failed.

        Example:
          >>> import treegraft as tg
          >>> e = tg.MappingError("new_to_old is empty").with_prefix("init_transform 'a' failed: ")
          >>> type(e).__name__, str(e)
          ('MappingError', "init_transform 'a' failed: new_to_old is empty")
        """
        new = copy.copy(self)
        new.message = prefix + self.message
        new.args = (new.message,)
        return new


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

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies and pickles are rebuilt from the three fields, not from the message.
        return (type(self), (self.text, self.column, self.reason), self.__dict__)


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
Problem.__module__ = "treegraft"

# Each problem kind: the heading of its section in a message (in this order),
# and the error class that reports it.
KINDS: dict[str, tuple[str, type[GraftError]]] = {
    "mapping": ("invalid mapping entries", MappingError),
    "ignore": ("invalid ignore patterns", MappingError),
    "unmatched_rule": ("rules that match nothing", PathNotFoundError),
    "unmatched_ignore": ("ignore patterns that match nothing", PathNotFoundError),
    "missing": (
        "missing in the source: target leaves covered by a rule with no source leaf",
        PathNotFoundError,
    ),
    "unexpected": (
        "unexpected in the source: source leaves under a rule with no target leaf",
        PathNotFoundError,
    ),
    "structure": ("structure differs", MismatchError),
    "shape": ("shape differs", MismatchError),
    "dtype": ("dtype differs (casting is never implicit)", MismatchError),
    "tie": ("rules tied on the same leaf (make one more specific)", MappingError),
    "abstract": ("source leaves without values", GraftError),
    "deleted": ("source arrays deleted (donated) before they were read", GraftError),
    "unfilled": ("abstract target leaves no rule fills (they would stay abstract)", MappingError),
    "insert": ("the subtree differs from the one it replaces", MismatchError),
    "sharding": ("values and like differ in shape", MismatchError),
}

LISTED = 20  # problems listed per kind in a message before "... and N more"


def count(n: int, one: str, many: str | None = None) -> str:
    """'1 problem', '2 problems': a count with its noun in the right number."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def format_problems(
    problems: Sequence[Problem], *, rules: int | None = None, header: str | None = None
) -> str:
    """The message of an error listing problems (see `GraftError.from_problems`)."""
    kinds = list(dict.fromkeys(p.kind for p in problems))
    headings = header is None or len(kinds) > 1
    if header is None:
        header = f"cannot graft ({count(rules or 0, 'rule')}): {count(len(problems), 'problem')}"
    lines = [header]
    order = list(KINDS) + [k for k in kinds if k not in KINDS]
    for kind in order:
        group = [p for p in problems if p.kind == kind]
        if not group:
            continue
        if headings:
            lines.append(f"{KINDS.get(kind, (kind,))[0]}: {len(group)}")
        # Continuation lines (a syntax error's caret) stay under their problem.
        lines += ["  " + p.message.replace("\n", "\n    ") for p in group[:LISTED]]
        if len(group) > LISTED:
            lines.append(f"  ... and {len(group) - LISTED} more")
    remedies = list(dict.fromkeys(p.remedy for p in problems if p.remedy))
    if remedies:
        lines.append("to fix:")
        lines += [f"  - {remedy}" for remedy in remedies[:LISTED]]
    return "\n".join(lines)


# How close a name must be to be suggested: whole paths differ in more places
# than single keys, so they get a lower cutoff.
KEY_CUTOFF = 0.6
PATH_CUTOFF = 0.5


def suggest(
    word: str,
    candidates: Iterable[str],
    *,
    n: int = 3,
    cutoff: float = KEY_CUTOFF,
    render: Callable[[str], str] = repr,
) -> str:
    """Returns ` (did you mean 'x'?)` for close matches of word, or ''.

    The one did-you-mean of every message. `cutoff` is `KEY_CUTOFF` for a
    single key or name, `PATH_CUTOFF` for whole rendered paths; `render` shows
    each close candidate (by default its `repr`).
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
