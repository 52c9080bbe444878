"""Glob patterns over paths, with captures that carry across a mapping.

    **            zero or more whole segments
    *             exactly one segment, whatever its key type
    layers_*      one string segment; each `*` matches any run of characters

A pattern is compiled once, when parsed; matching never re-parses.

The module is one job, longer than most: `Pattern` compiles a pattern and
holds the matchers built from it (a leaf path, a prefix, a subtree, captures
filled back in), which share the compiled segments and their invariants;
split, each half would need the other's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treegraft._errors import GraftError, MappingError
from treegraft._parse.keys import loose_part
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._parse.scan import scan

__all__ = ["Pattern", "parse_pattern"]

# Segment kinds.
_LIT, _STAR, _GLOB, _DSTAR = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class _Seg:
    kind: int
    value: Any = None  # the part (_LIT), the compiled `_Glob` (_GLOB)
    text: str = ""  # the source text of a glob segment
    # An int literal's digits, which it also finds as a string key (orbax
    # saves int dict keys as '0'); None for every other segment.
    digits: str | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == _LIT and type(self.value) is int:
            object.__setattr__(self, "digits", loose_part(self.value))

    def matches(self, part: Part) -> tuple[Any, ...] | None:
        """Captures of this one-segment matcher on part, or None."""
        if self.kind == _LIT:
            v = self.value
            if type(part) is type(v) and part == v:
                return ()
            # Orbax turns int dict keys into strings: 0 also finds '0'
            # (_parse/keys.py; the digits are made once, not per part).
            if self.digits is not None and type(part) is str and part == self.digits:
                return ()
            return None
        if self.kind == _STAR:
            return (part,)
        # _GLOB
        if type(part) is str:
            return self.value.fullmatch(part)
        if type(part) is int:
            return self.value.fullmatch(str(part))
        return None


class _Glob:
    """A glob within one segment (`layers_*`, `*a*b`), matched without backtracking.

    Captures are those of the regex `p0(.*?)p1(.*?)...pn` matched whole: each
    `*` takes the shortest run that lets the rest match. That reading is the
    greedy leftmost one (the first piece after a `*` at its first occurrence),
    so one scan with `str.find` finds it: time linear in the key for a given
    glob, where the regex backtracks exponentially (`*a*a*a*a*b`).
    """

    __slots__ = ("pieces", "_head", "_tail", "_middle", "_fixed")

    def __init__(self, text: str):
        self.pieces = tuple(text.split("*"))
        self._head = self.pieces[0]
        self._tail = self.pieces[-1]
        self._middle = self.pieces[1:-1]
        self._fixed = sum(len(p) for p in self.pieces)

    def fullmatch(self, text: str) -> tuple[str, ...] | None:
        """The captures (one string per `*`) if the glob matches all of text."""
        if len(text) < self._fixed or not text.startswith(self._head):
            return None
        end = len(text) - len(self._tail)
        if not text.endswith(self._tail):
            return None
        caps = []
        pos = len(self._head)
        for piece in self._middle:
            at = text.find(piece, pos, end)
            if at < 0:
                return None
            caps.append(text[pos:at])
            pos = at + len(piece)
        caps.append(text[pos:end])
        return tuple(caps)


class Pattern:
    """A compiled path pattern: literal segments, `*`, `**` and `name_*` globs.

    Example:
      >>> import treegraft as tg
      >>> pat = tg.parse_pattern("params.**.bias")
      >>> pat.match(tg.parse_path("params.enc.dense.bias"))
      (('enc', 'dense'),)
      >>> pat.match(tg.parse_path("params.enc.dense.kernel")) is None
      True
      >>> layers = tg.parse_pattern("dec.layers_*")
      >>> layers.match_prefix(tg.parse_path("dec.layers_3.attn.q"))
      (2, ('3',))
    """

    __slots__ = (
        "text", "_segs", "_has_dstar", "_min_len", "_is_literal", "_n_dstar", "_dstar_at"
    )

    def __init__(self, text: str, *, _segments: Sequence[tuple[str, Any]] | None = None):
        self.text = text
        segs = []
        scanned = scan(text, wildcards=True) if _segments is None else _segments
        for kind, value in scanned:
            if kind == "part":
                segs.append(_Seg(_LIT, value))
            elif value == "**":
                segs.append(_Seg(_DSTAR))
            elif value == "*":
                segs.append(_Seg(_STAR))
            else:
                segs.append(_Seg(_GLOB, _Glob(value), value))
        self._segs: tuple[_Seg, ...] = tuple(segs)
        self._has_dstar = any(s.kind == _DSTAR for s in segs)
        self._n_dstar = sum(1 for s in segs if s.kind == _DSTAR)
        self._dstar_at = next((i for i, s in enumerate(segs) if s.kind == _DSTAR), -1)
        self._min_len = sum(1 for s in segs if s.kind != _DSTAR)
        self._is_literal = all(s.kind == _LIT for s in segs)

    # -- introspection -------------------------------------------------------

    @property
    def is_literal(self) -> bool:
        """Whether the pattern has no wildcard (it is a plain path)."""
        return self._is_literal

    @property
    def length(self) -> int | None:
        """How many parts every match has, or None for a pattern with `**`."""
        return None if self._has_dstar else len(self._segs)

    @property
    def literal_count(self) -> int:
        """How many segments are literal (no wildcard in them)."""
        return sum(1 for s in self._segs if s.kind == _LIT)

    def literal_prefix(self) -> tuple[Part, ...]:
        """The parts before the first wildcard segment."""
        out = []
        for s in self._segs:
            if s.kind != _LIT:
                break
            out.append(s.value)
        return tuple(out)

    def as_path(self) -> Path:
        """The plain path of a literal pattern.

        Raises:
          GraftError: the pattern has wildcards (a `ValueError`).
        """
        if not self._is_literal:
            raise GraftError(f"pattern {self.text!r} has wildcards")
        return Path(s.value for s in self._segs)

    def wildcards(self) -> tuple[str, ...]:
        """The wildcard kinds in order: '**' or '*' (one per star in a glob)."""
        out: list[str] = []
        for s in self._segs:
            if s.kind == _DSTAR:
                out.append("**")
            elif s.kind == _STAR:
                out.append("*")
            elif s.kind == _GLOB:
                out.extend("*" * s.text.count("*"))
        return tuple(out)

    # -- matching ------------------------------------------------------------

    def match(self, path: Path | Sequence[Part]) -> tuple[Any, ...] | None:
        """Matches the whole path.

        Returns:
          The captures in order, or None when the path does not match: a lone
          `*` captures the part, a `*` in a glob captures a string, a `**`
          captures a tuple of parts. Never raises for any path.
        """
        parts = path.parts if isinstance(path, Path) else tuple(path)
        if not self._has_dstar:
            if len(parts) != len(self._segs):
                return None
            return self._match_fixed(parts)
        if self._n_dstar == 1:
            return self._match_one_dstar(parts, len(parts))
        return self._match_dp(parts, len(parts))

    def match_prefix(self, path: Path | Sequence[Part]) -> tuple[int, tuple[Any, ...]] | None:
        """Matches the shortest prefix of path that the pattern matches whole.

        Returns:
          `(length, captures)`: the number of parts the pattern consumed and
          its captures, or None when no prefix matches.
        """
        parts = path.parts if isinstance(path, Path) else tuple(path)
        if not self._has_dstar:
            n = len(self._segs)
            if len(parts) < n:
                return None
            caps = self._match_fixed(parts[:n])
            return None if caps is None else (n, caps)
        if self._n_dstar == 1:
            for n in range(self._min_len, len(parts) + 1):
                caps = self._match_one_dstar(parts, n)
                if caps is not None:
                    return n, caps
            return None
        shortest = self._shortest_prefix(parts)
        if shortest is None:
            return None
        caps = self._match_dp(parts, shortest)
        return None if caps is None else (shortest, caps)

    def prefix_matcher(self) -> Callable[[tuple[Part, ...]], tuple[int, tuple[Any, ...]] | None]:
        """A fast `match_prefix` on part tuples, for matching many paths.

        For patterns without `**` the result is cached per prefix, so paths
        that share a prefix are matched once.
        """
        if self._has_dstar:
            return self.match_prefix
        n = len(self._segs)
        fixed = self._match_fixed
        cache: dict[tuple[Part, ...], tuple[Any, ...] | None] = {}

        def match(parts: tuple[Part, ...]) -> tuple[int, tuple[Any, ...]] | None:
            if len(parts) < n:
                return None
            prefix = parts[:n]
            try:
                caps = cache[prefix]
            except KeyError:
                caps = cache[prefix] = fixed(prefix)
            return None if caps is None else (n, caps)

        return match

    def _match_fixed(self, parts: tuple[Part, ...]) -> tuple[Any, ...] | None:
        caps: tuple[Any, ...] = ()
        for seg, part in zip(self._segs, parts, strict=True):
            got = seg.matches(part)
            if got is None:
                return None
            if got:
                caps += got
        return caps

    def _match_one_dstar(self, parts: tuple[Part, ...], n: int) -> tuple[Any, ...] | None:
        """Matches parts[:n] with a pattern holding exactly one `**`.

        The segments around the `**` have fixed lengths, so the `**` takes
        exactly what is left: one pass, no search.
        """
        segs = self._segs
        d = self._dstar_at
        after = len(segs) - d - 1
        if n < len(segs) - 1:
            return None
        caps: tuple[Any, ...] = ()
        for si in range(d):
            got = segs[si].matches(parts[si])
            if got is None:
                return None
            caps += got
        stop = n - after
        caps += (tuple(parts[d:stop]),)
        for si in range(after):
            got = segs[d + 1 + si].matches(parts[stop + si])
            if got is None:
                return None
            caps += got
        return caps

    def _match_dp(self, parts: tuple[Part, ...], n: int) -> tuple[Any, ...] | None:
        """Matches parts[:n] with several `**`: dynamic programming, no retries.

        `ok[si][pi]` says whether segments si.. match parts[pi:n] (filled from
        the end, each cell once); the captures are then read in one forward
        walk where each `**` takes the fewest segments that let the rest match,
        the reading a search trying the shortest first would find. Time is
        segments times parts, where the search was exponential in the `**`.
        """
        segs = self._segs
        m = len(segs)
        got: dict[tuple[int, int], tuple[Any, ...] | None] = {}
        ok = [[False] * (n + 2) for _ in range(m + 1)]
        ok[m][n] = True
        for si in range(m - 1, -1, -1):
            seg, row, nxt = segs[si], ok[si], ok[si + 1]
            if seg.kind == _DSTAR:
                row[n] = nxt[n]
                for pi in range(n - 1, -1, -1):
                    row[pi] = nxt[pi] or row[pi + 1]
            else:
                for pi in range(n - 1, -1, -1):
                    if nxt[pi + 1]:
                        caps = seg.matches(parts[pi])
                        got[si, pi] = caps
                        row[pi] = caps is not None
        if not ok[0][0]:
            return None
        out: list[Any] = []
        pi = 0
        for si, seg in enumerate(segs):
            if seg.kind == _DSTAR:
                k = pi
                while not ok[si + 1][k]:
                    k += 1
                out.append(tuple(parts[pi:k]))
                pi = k
            else:
                out.extend(got[si, pi])  # type: ignore[arg-type]
                pi += 1
        return tuple(out)

    def _shortest_prefix(self, parts: tuple[Part, ...]) -> int | None:
        """The length of the shortest prefix of parts the pattern matches whole.

        One forward pass over (segment, part) states: which positions each
        segment can end at.
        """
        n = len(parts)
        reach = [False] * (n + 1)  # positions the segments so far can end at
        reach[0] = True
        for seg in self._segs:
            if seg.kind == _DSTAR:
                for pi in range(1, n + 1):
                    reach[pi] = reach[pi] or reach[pi - 1]
            else:
                new = [False] * (n + 1)
                for pi in range(n):
                    if reach[pi] and seg.matches(parts[pi]) is not None:
                        new[pi + 1] = True
                reach = new
            if not any(reach):
                return None
        return next((pi for pi in range(n + 1) if reach[pi]), None)

    # -- substitution --------------------------------------------------------

    def substitute(self, captures: Sequence[Any]) -> Path:
        """Fills this pattern's wildcards with captures taken from another.

        Args:
          captures: as returned by `match` on a pattern with the same
            wildcards (see `check_corresponds`).

        Returns:
          The concrete path.

        Example:
          >>> import treegraft as tg
          >>> new = tg.parse_pattern("params.decoder.layers_*")
          >>> caps = new.match(tg.parse_path("params.decoder.layers_3"))
          >>> tg.parse_pattern("params.encoder.layers_*").substitute(caps)
          Path('params.encoder.layers_3')
        """
        return Path(self.substitute_parts(captures))

    def substitute_parts(self, captures: Sequence[Any]) -> tuple[Part, ...]:
        """`substitute`, as a tuple of parts (the planner's fast path)."""
        it = iter(captures)
        parts: list[Part] = []
        try:
            for seg in self._segs:
                if seg.kind == _LIT:
                    parts.append(seg.value)
                elif seg.kind == _DSTAR:
                    cap = next(it)
                    if not isinstance(cap, tuple):
                        raise MappingError(
                            f"pattern {self.text!r}: '**' needs a '**' capture, got {cap!r}"
                        )
                    parts.extend(cap)
                elif seg.kind == _STAR:
                    cap = next(it)
                    if isinstance(cap, tuple):
                        raise MappingError(
                            f"pattern {self.text!r}: '*' cannot take the '**' capture {cap!r}"
                        )
                    parts.append(cap)
                else:
                    pieces = seg.value.pieces
                    out = pieces[0]
                    for piece in pieces[1:]:
                        cap = next(it)
                        if isinstance(cap, tuple):
                            raise MappingError(
                                f"pattern {self.text!r}: '*' cannot take the '**' capture {cap!r}"
                            )
                        out += str(cap) + piece
                    parts.append(out)
        except StopIteration:
            raise MappingError(
                f"pattern {self.text!r} has more wildcards than the {len(captures)} "
                "capture(s) given"
            ) from None
        if next(it, _END) is not _END:
            raise MappingError(
                f"pattern {self.text!r} has fewer wildcards than the {len(captures)} "
                "capture(s) given"
            )
        return tuple(parts)

    def check_corresponds(self, other: Pattern) -> None:
        """Checks that captures of self can fill other's wildcards, in order.

        Raises:
          MappingError: the wildcard sequences differ (naming both).
        """
        mine, theirs = self.wildcards(), other.wildcards()
        if mine != theirs:
            raise MappingError(
                f"the wildcards of {self.text!r} ({' '.join(mine) or 'none'}) and "
                f"{other.text!r} ({' '.join(theirs) or 'none'}) do not correspond: both "
                "sides of a rule need the same '*' and '**' in the same order"
            )

    # -- dunder --------------------------------------------------------------

    def __str__(self) -> str:
        out = []
        for i, s in enumerate(self._segs):
            if s.kind == _LIT:
                out.append(render_parts([s.value]) if i == 0 else _tail(s.value))
            else:
                text = "**" if s.kind == _DSTAR else "*" if s.kind == _STAR else s.text
                out.append(text if i == 0 else "." + text)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Pattern({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pattern):
            return NotImplemented
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


Pattern.__module__ = "treegraft"

_END = object()


def _tail(part: Part) -> str:
    # Renders one non-first part: '.name' or '[repr]'.
    return render_parts(("x", part))[1:]


def parse_pattern(text: str | Pattern | Path) -> Pattern:
    """Parses a path pattern: a path whose segments may be `*`, `**` or globs.

    Args:
      text: e.g. `"params.**.bias"`, `"params.decoder.layers_*"`.

    Returns:
      The compiled `Pattern`.

    Raises:
      PathSyntaxError: the string is not a valid pattern.

    Example:
      >>> import treegraft as tg
      >>> tg.parse_pattern("params.*.kernel").match(tg.parse_path("params.dense.kernel"))
      ('dense',)
    """
    if isinstance(text, Pattern):
        return text
    if isinstance(text, Path):
        return Pattern(str(text), _segments=[("part", p) for p in text.parts])
    return Pattern(text)
