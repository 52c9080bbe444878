"""Exception types, the problems they list, and the formatting shared by every message.

Every error treegraft raises on bad input (a tree, a mapping, a path, a
checkpoint) is a `GraftError` (a `ValueError`). Calling one of its classes
wrongly (a positional argument where a keyword is needed, an object that is not
an init transform given to `MultiTransform`) is a `TypeError`, as Python raises
for such mistakes.

Errors that report several problems keep them in `.problems`, as `Problem`s,
so a program can inspect them; the message is made from them in one format: a
header, the problems grouped by kind under a heading each (those that differ
only in path indices as one line, `'layers[0..47].mlp' ... (x48)`), then "to
fix:" and the remedies chosen by their causes, one per cause.

Close names ("did you mean") come from `Names`, an index of candidates built
once and searched once per distinct mistake.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
    "Kind",
    "suggest",
    "Names",
    "first_line",
]


# The problem kinds, written once: `KINDS` below gives each its heading and error
# class (a test checks that the two agree), and mypy checks every `Problem(kind=...)`.
Kind = Literal[
    "mapping", "ignore", "unmatched_rule", "unmatched_ignore", "missing", "unexpected",
    "structure", "shape", "dtype", "tie", "abstract", "deleted", "unfilled", "insert",
    "sharding", "indivisible", "x64",
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
        "sharding" (a leaf of `propagate_sharding` whose shape differs);
        "indivisible" (an abstract target whose sharding cannot split its shape);
        "x64" (a device target of a 64-bit dtype while jax's 64-bit types are
        off, found by `execute` before it reads).
      message: names the paths and shows both sides; one line, but for a
        syntax error's caret lines.
      target: the path in the state, where there is one.
      source: the path in the source, where there is one.
      rule: the rule involved, as "'new' <- 'old'", where there is one.
      pattern: the ignore pattern involved, where there is one.
      remedy: the fix that fits this problem's cause, or "" when the message
        says it (a close name) or there is no generic fix.
    """

    kind: Kind
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
KINDS: dict[Kind, tuple[str, type[GraftError]]] = {
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
    "indivisible": ("target shardings that do not divide their leaf's shape", MismatchError),
    "x64": ("device targets of 64-bit dtypes while jax's 64-bit types are off", MismatchError),
}

LISTED = 20  # problems listed per kind in a message before "... and N more"


def count(n: int, one: str, many: str | None = None) -> str:
    """'1 problem', '2 problems': a count with its noun in the right number."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def format_problems(
    problems: Sequence[Problem], *, rules: int | None = None, header: str | None = None
) -> str:
    """The message of an error listing problems (see `GraftError.from_problems`).

    Problems that differ only in the indices of their paths (the same mistake
    on every layer) are one line, with the indices as ranges and a count:
    `'layers[0..47].mlp.up' has no source: ... (x48)`; their remedies are one,
    its paths as patterns (`'layers.*.mlp.up'`). The problems themselves stay
    as they are in `GraftError.problems`.
    """
    kinds = list(dict.fromkeys(p.kind for p in problems))
    headings = header is None or len(kinds) > 1
    if header is None:
        header = f"cannot graft ({count(rules or 0, 'rule')}): {count(len(problems), 'problem')}"
    lines = [header]
    order = list(KINDS) + [k for k in kinds if k not in KINDS]
    by_kind: dict[str, list[Problem]] = {}
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p)
    for kind in order:
        group = by_kind.get(kind)
        if not group:
            continue
        if headings:
            lines.append(f"{KINDS.get(kind, (kind,))[0]}: {len(group)}")
        shown = _grouped([p.message for p in group], pattern=False,
                         scan=[_may_repeat(p) for p in group])
        # Continuation lines (a syntax error's caret) stay under their problem.
        lines += ["  " + text.replace("\n", "\n    ") for text in shown[:LISTED]]
        if len(shown) > LISTED:
            lines.append(f"  ... and {len(shown) - LISTED} more")
    with_remedy = [p for p in problems if p.remedy]
    remedies = _grouped([p.remedy for p in with_remedy], pattern=True,
                        scan=[_may_repeat(p) for p in with_remedy])
    if remedies:
        lines.append("to fix:")
        lines += [f"  - {remedy}" for remedy in remedies[:LISTED]]
    return "\n".join(lines)


# A quoted string in a message (a rendered path, as repr shows it), and an
# index inside one. Indices are looked for only inside quotes: a shape such as
# float32[2] is not quoted, and must never be merged with float32[3]. A quote
# after a letter is an apostrophe ("the state's values"), not an opening one.
_QUOTED = re.compile(r"(?<!\w)(?:'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\")")
_INDEX = re.compile(r"\[(-?\d+)\]")


def _slots(text: str) -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    """Splits text around the indices in its quoted paths: (texts between, flags, indices).

    A flag is True where the index is a path's first part (`'[0].w'`), which a
    pattern writes `*` rather than `.*`.
    """
    # Most messages have no index at all: one scan says so, with no look for
    # quotes (an error listing 24,000 problems spent 0.1 s on those looks).
    indices = list(_INDEX.finditer(text)) if "[" in text else []
    if not indices:
        return (text,), (), ()
    pieces: list[str] = []
    firsts: list[bool] = []
    values: list[int] = []
    last = 0
    # An index cannot hold a quote, so the indices inside a quoted string are
    # the text's indices that lie within it.
    k = 0
    for quoted in _QUOTED.finditer(text):
        start, end = quoted.start() + 1, quoted.end() - 1
        while k < len(indices) and indices[k].start() < start:
            k += 1
        while k < len(indices) and indices[k].end() <= end:
            m = indices[k]
            pieces.append(text[last : m.start()])
            firsts.append(m.start() == start)
            values.append(int(m.group(1)))
            last = m.end()
            k += 1
        if k == len(indices):
            break
    pieces.append(text[last:])
    return tuple(pieces), tuple(firsts), tuple(values)


def _may_repeat(problem: Problem) -> bool:
    """Whether a problem's text can hold an indexed path: its paths have an index, or it has none.

    The same mistake on every layer is about paths with an index (`layers[3]`);
    a problem whose paths have none is not looked through for indices (24,000
    messages of shapes such as float32[2] took 0.1 s to look through).
    """
    target, source = problem.target, problem.source
    if target is None and source is None:
        return True
    return (target is not None and int in map(type, target.parts)) or (
        source is not None and int in map(type, source.parts)
    )


def _grouped(
    texts: Sequence[str], *, pattern: bool, scan: Sequence[bool] | None = None
) -> list[str]:
    """texts, those that differ only in path indices merged, in order of first appearance.

    A merged message shows each varying index as its ranges (`[0..47]`) and
    ends with the count (` (x48)`); with `pattern`, a varying index is a `*`
    instead (for remedies: one per cause, as a pattern that can be pasted).
    `scan` says, per text, whether to look for indices in it (default: all).
    """
    groups: dict[tuple[tuple[str, ...], tuple[bool, ...]], list[tuple[int, ...]]] = {}
    for k, text in enumerate(texts):
        pieces, firsts, values = _slots(text) if scan is None or scan[k] else ((text,), (), ())
        groups.setdefault((pieces, firsts), []).append(values)
    out = []
    for (pieces, firsts), members in groups.items():
        if len(pieces) == 1 and len(members) == 1:
            out.append(pieces[0])  # no index: the text as it is
            continue
        if len(members) == 1 or (pattern and len(set(members)) == 1):
            out.append(_fill(pieces, [f"[{v}]" for v in members[0]]))
            continue
        filled = []
        for k, first in enumerate(firsts):
            seen = [m[k] for m in members]
            if len(set(seen)) == 1:
                filled.append(f"[{seen[0]}]")
            elif pattern:
                filled.append("*" if first else ".*")
            else:
                filled.append(f"[{_spans(seen)}]")
        text = _fill(pieces, filled)
        out.append(text if pattern else f"{text} (x{len(members)})")
    return out


def _fill(pieces: Sequence[str], slots: Sequence[str]) -> str:
    return "".join(p + s for p, s in zip(pieces, [*slots, ""], strict=True))


def _spans(values: Iterable[int], *, most: int = 4) -> str:
    """'0..47', '0..3,7,9..12': sorted distinct values as runs (the first few)."""
    runs: list[list[int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    shown = [f"{a}..{b}" if b > a else str(a) for a, b in runs[:most]]
    return ",".join(shown) + (",..." if len(runs) > most else "")


# How close a name must be to be suggested: whole paths differ in more places
# than single keys, so they get a lower cutoff.
KEY_CUTOFF = 0.6
PATH_CUTOFF = 0.5

# Above this many candidates, difflib sees only the SCAN closest by their
# characters (an upper bound of difflib's ratio, computed for all at once).
SCAN = 64


class Names:
    """Candidate names for did-you-mean, indexed once, each answer computed once.

    difflib compares a word with every candidate in pure Python; over tens of
    thousands of long paths that is seconds per word. Here the candidates'
    character counts are kept in one array, so a word's bound on difflib's
    ratio with every candidate (difflib's own `quick_ratio`) is one vectorised
    step; difflib then ranks only the `SCAN` best bounds. Answers are memoized
    per (word, n, cutoff): a mistake repeated on many leaves costs one search.
    """

    def __init__(self, names: Iterable[str]):
        self.names: list[str] = list(dict.fromkeys(names))
        self._counts: Any = None  # (characters -> column, counts, lengths), built on first use
        self._answers: dict[tuple[str, int, float], list[str]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def close(self, word: str, *, n: int = 3, cutoff: float = KEY_CUTOFF) -> list[str]:
        """The n names closest to word with difflib's ratio of at least cutoff, best first."""
        key = (word, n, cutoff)
        found = self._answers.get(key)
        if found is None:
            pool = self.names if len(self.names) <= SCAN else self._nearest(word, cutoff)
            found = self._answers[key] = _close_matches(word, pool, n, cutoff)
        return found

    def _nearest(self, word: str, cutoff: float) -> list[str]:
        """The SCAN names whose character counts could give word a ratio >= cutoff, best first."""
        import numpy as np  # only failing plans over many names need it

        if self._counts is None:
            self._counts = _char_counts(self.names)
        columns, counts, lengths = self._counts
        query = np.zeros(counts.shape[1], counts.dtype)
        for ch in word:
            query[columns.get(ch, -1)] += 1  # unknown characters: the last column
        shared = np.minimum(counts, query).sum(axis=1, dtype=np.int64)
        bound = 2.0 * shared / (lengths + len(word))
        keep = np.flatnonzero(bound >= cutoff)
        if len(keep) > SCAN:
            keep = keep[np.argsort(-bound[keep], kind="stable")[:SCAN]]
        return [self.names[i] for i in keep]


def _char_counts(names: list[str]) -> tuple[dict[str, int], Any, Any]:
    """Per name, how often each character occurs: (column of each character, counts, lengths).

    The 63 most frequent characters have a column each; the rest share the
    last one, which only loosens the bound (it stays an upper bound).
    """
    import numpy as np

    lengths = np.fromiter((len(s) for s in names), np.int64, len(names))
    codes = np.frombuffer("".join(names).encode("utf-32-le"), np.uint32)
    freq = np.bincount(codes)  # code points are at most 0x10FFFF: no sort needed
    chars = np.flatnonzero(freq)
    top = chars[np.argsort(-freq[chars], kind="stable")[:63]]
    width = len(top) + 1
    column_of = np.full(len(freq), width - 1, np.uint8)  # uint8: a fast gather
    column_of[top] = np.arange(len(top))
    rows = np.repeat(np.arange(len(names)) * width, lengths)
    flat = np.bincount(rows + column_of[codes.astype(np.intp)], minlength=len(names) * width)
    # uint16: 100k names take 13 MB (a character past 65,535 times is counted 65,535).
    counts = np.minimum(flat, 65535).reshape(len(names), width).astype(np.uint16)
    columns = {chr(c): k for k, c in enumerate(top.tolist())}
    return columns, counts, lengths


def _close_matches(word: str, pool: Sequence[str], n: int, cutoff: float) -> list[str]:
    """difflib's close matches (one function, so a test can count the searches)."""
    return difflib.get_close_matches(word, pool, n=n, cutoff=cutoff)


@functools.lru_cache(maxsize=4)
def _names_of(candidates: tuple[str, ...]) -> Names:
    # The same keys are searched again and again (a node's keys, once per
    # rule that stops there): their index is kept for the next word.
    return Names(candidates)


def suggest(
    word: str,
    candidates: Iterable[str] | Names,
    *,
    n: int = 3,
    cutoff: float = KEY_CUTOFF,
    render: Callable[[str], str] = repr,
    not_itself: bool = False,
) -> str:
    """Returns ` (did you mean 'x'?)` for close matches of word, or ''.

    The one did-you-mean of every message. `cutoff` is `KEY_CUTOFF` for a
    single key or name, `PATH_CUTOFF` for whole rendered paths; `render` shows
    each close candidate (by default its `repr`); `not_itself` leaves word
    itself out of them. `candidates` searched again
    should be a `Names`, built once; other iterables are indexed here, and the
    last few are kept.
    """
    names = candidates if isinstance(candidates, Names) else _names_of(tuple(candidates))
    if not_itself:
        # One more asked for, as the word itself may be among them.
        close = [c for c in names.close(word, n=n + 1, cutoff=cutoff) if c != word][:n]
    else:
        close = names.close(word, n=n, cutoff=cutoff)
    if not close:
        return ""
    return " (did you mean " + " or ".join(render(c) for c in close) + "?)"


def suggest_path(text: str, candidates: Iterable[str] | Names, *, not_itself: bool = False) -> str:
    """`suggest` for a whole rendered path or pattern among rendered paths (`PATH_CUTOFF`).

    Args:
      not_itself: never suggest text itself (a pattern that names leaves
        elsewhere is not a typo).
    """
    return suggest(text, candidates, cutoff=PATH_CUTOFF, not_itself=not_itself)


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
    try:
        key = (shape, dtype)
        text = _DESCRIBED.get(key)
    except TypeError:  # an unhashable shape or dtype: rendered each time
        return _describe(shape, dtype)
    if text is None:
        # numpy renders a dtype in Python (7 us): an error listing 16,000
        # leaves of a few specs spent 0.1 s on it.
        text = _describe(shape, dtype)
        if len(_DESCRIBED) < 4096:
            _DESCRIBED[key] = text
    return text


_DESCRIBED: dict[tuple[object, object], str] = {}


def _describe(shape: object, dtype: object) -> str:
    if shape is None:
        return str(dtype)
    dims = ", ".join(str(d) for d in shape)  # type: ignore[attr-defined]
    return f"{dtype}[{dims}]"
