"""Paths into pytrees: parsing, canonical rendering, conversion from key paths.

The grammar is Kauldron's `kontext` path grammar:

    params.decoder.layers_0      ('params', 'decoder', 'layers_0')
    a[0].b  and  a.0.b           ('a', 0, 'b')
    a['x.y'].z                   ('a', 'x.y', 'z')
    a[-1]  a[None]  a[True]      -1, None, True
    ''                           () (the root)

The scanner below also reads the wildcards of patterns (`*`, `**`, `layers_*`);
`parse_path` rejects them and `treegraft._parse.patterns` accepts them.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

import optree
from jax import tree_util

from treegraft._errors import PathSyntaxError, PathTypeError

__all__ = ["Path", "Part", "parse_path", "render_parts"]

Part: TypeAlias = Any  # str | int | float | bool | None, or any dict key

_IDENT = re.compile(r"[^\W\d]\w*")
_DIGITS = re.compile(r"[0-9]+")
_GLOB = re.compile(r"[\w*]+")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_WORDS = {"None": None, "True": True, "False": False}


# ----------------------------------------------------------------------------
# Scanning.
# ----------------------------------------------------------------------------

# A scanned segment is ("part", value) for a literal key, or ("glob", text)
# where text contains '*' (text is exactly '*' or '**' for the lone forms).
Segment: TypeAlias = tuple[str, Any]


def scan(text: str, *, wildcards: bool) -> list[Segment]:
    """Splits a path string into segments.

    Args:
      text: the path or pattern string.
      wildcards: whether `*` and `**` are allowed.

    Returns:
      The segments, in order.

    Raises:
      PathSyntaxError: naming the column of the first offending character.
    """
    if not isinstance(text, str):
        raise PathTypeError(f"a path must be a str, got {type(text).__name__}: {text!r}")
    segments: list[Segment] = []
    n = len(text)
    # Blanks around tokens are ignored, as kontext ignores them ('a . b' is
    # 'a.b', 'a [ 0 ]' is 'a[0]'); a blank between two names is an error.
    i = _skip_blanks(text, 0, n)
    end = n
    while end > i and text[end - 1].isspace():
        end -= 1
    if i == end:
        return segments
    first = True
    blank_at = -1  # where the blanks after the last segment started, or -1
    while i < end:
        c = text[i]
        if c == "[":
            i, seg = _scan_bracket(text, i, end, wildcards)
            segments.append(seg)
        else:
            if not first:
                if c != ".":
                    at = blank_at if blank_at >= 0 else i
                    raise PathSyntaxError(text, at, _unexpected(text[at], "'.' or '['"))
                i = _skip_blanks(text, i + 1, end)
                if i >= end:
                    raise PathSyntaxError(text, i, "expected a name after '.'")
            i, seg = _scan_name(text, i, end, wildcards)
            segments.append(seg)
        first = False
        j = _skip_blanks(text, i, end)
        blank_at = i if j > i else -1
        i = j
    return segments


def _skip_blanks(text: str, i: int, end: int) -> int:
    while i < end and text[i].isspace():
        i += 1
    return i


def _unexpected(c: str, wanted: str) -> str:
    if c.isspace():
        return f"unexpected blank, expected {wanted}"
    return f"unexpected {c!r}, expected {wanted}"


def _scan_name(text: str, i: int, end: int, wildcards: bool) -> tuple[int, Segment]:
    m = _GLOB.match(text, i, end)
    if m is None:
        c = text[i]
        if c == ".":
            raise PathSyntaxError(text, i, "empty name (two dots in a row, or a leading dot)")
        raise PathSyntaxError(text, i, _unexpected(c, "a name"))
    word = m.group()
    j = m.end()
    if j < end and text[j] not in ".[" and not text[j].isspace():
        raise PathSyntaxError(text, j, _unexpected(text[j], "'.' or '['"))
    if "*" in word:
        if not wildcards:
            raise PathSyntaxError(
                text, i + word.index("*"), "wildcards are only allowed in patterns"
            )
        if "**" in word and word != "**":
            raise PathSyntaxError(text, i + word.index("**"), "'**' must be a whole segment")
        return j, ("glob", word)
    if _DIGITS.fullmatch(word):
        return j, ("part", _to_int(text, i, word))
    if not _IDENT.fullmatch(word):
        raise PathSyntaxError(text, i, f"{word!r} is not a name (names start with a letter or '_')")
    return j, ("part", word)


def _scan_bracket(text: str, i: int, end: int, wildcards: bool) -> tuple[int, Segment]:
    start = i
    i += 1
    while i < end and text[i].isspace():
        i += 1
    if i >= end:
        raise PathSyntaxError(text, start, "unclosed '['")
    c = text[i]
    seg: Segment
    if c in "'\"":
        j = _string_end(text, i, end)
        literal = text[i:j]
        try:
            if "\\" in literal:
                # An invalid escape ('\\d') is only a warning in Python; make it
                # an error whatever the caller's warning filters are.
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    value = ast.literal_eval(literal)
            else:
                value = ast.literal_eval(literal)
        except (ValueError, SyntaxError, Warning) as e:
            raise PathSyntaxError(text, i, f"invalid string literal ({e})") from None
        if not isinstance(value, str):  # e.g. a bytes prefix cannot get here
            raise PathSyntaxError(text, i, "expected a string")
        seg = ("part", value)
        i = j
    elif c == "*":
        if not wildcards:
            raise PathSyntaxError(text, i, "wildcards are only allowed in patterns")
        j = i
        while j < end and text[j] == "*":
            j += 1
        if j - i > 2:
            raise PathSyntaxError(text, i, "too many '*' in a row")
        seg = ("glob", text[i:j])
        i = j
    else:
        m = _NUMBER.match(text, i, end)
        w = _IDENT.match(text, i, end)
        if m is not None:
            token = m.group()
            value = float(token) if (m.group(1) or m.group(2)) else _to_int(text, i, token)
            if type(value) is float and not math.isfinite(value):
                # No literal renders inf back: str(path) would not parse.
                raise PathSyntaxError(
                    text, i, f"number out of range ({token} is not a finite float)"
                )
            seg = ("part", value)
            i = m.end()
        elif w is not None and w.group() in _WORDS:
            seg = ("part", _WORDS[w.group()])
            i = w.end()
        elif w is not None:
            raise PathSyntaxError(
                text, i, f"bare name {w.group()!r} in brackets; quote it: [{w.group()!r}]"
            )
        elif c == "]":
            raise PathSyntaxError(text, i, "empty brackets")
        else:
            raise PathSyntaxError(text, i, _unexpected(c, "a key inside '[...]'"))
    while i < end and text[i].isspace():
        i += 1
    if i >= end:
        raise PathSyntaxError(text, start, "unclosed '['")
    if text[i] != "]":
        raise PathSyntaxError(text, i, _unexpected(text[i], "']'"))
    return i + 1, seg


def _to_int(text: str, i: int, token: str) -> int:
    try:
        return int(token)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise PathSyntaxError(text, i, f"number too long ({len(token)} characters)") from None


def _string_end(text: str, i: int, end: int) -> int:
    quote = text[i]
    j = i + 1
    while j < end:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == quote:
            return j + 1
        j += 1
    raise PathSyntaxError(text, i, "unclosed quote")


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------


def _render_part(part: Part, first: bool) -> str:
    if type(part) is str and part not in _WORDS and _IDENT.fullmatch(part):
        return part if first else "." + part
    return f"[{part!r}]"


def render_parts(parts: Iterable[Part]) -> str:
    """Renders parts canonically: `.name` for identifiers, `[repr]` otherwise."""
    return "".join(_render_part(p, i == 0) for i, p in enumerate(parts))


# ----------------------------------------------------------------------------
# Path.
# ----------------------------------------------------------------------------


def _sort_key(part: Part) -> tuple[int, Any]:
    # Keys of different types cannot be compared in Python; order by type first.
    if part is None:
        return (0, 0)
    if isinstance(part, bool):
        return (1, part)
    if isinstance(part, int | float):
        return (2, part)
    if isinstance(part, str):
        return (3, part)
    return (4, repr(part))


@functools.total_ordering
class Path:
    """An immutable, hashable path into a pytree.

    A path is a tuple of parts (dict keys, attribute names, sequence indices).
    It compares, hashes and orders like its parts, and renders canonically, so
    that `parse_path(str(p)) == p` for parts that are str, int, float, bool or
    None.

    Example:
      >>> import treegraft as tg
      >>> p = tg.parse_path("a[0]['x.y'].z")
      >>> p.parts
      ('a', 0, 'x.y', 'z')
      >>> str(p)
      "a[0]['x.y'].z"
      >>> p / "w"
      Path("a[0]['x.y'].z.w")
    """

    __slots__ = ("parts", "_hash")
    parts: tuple[Part, ...]
    _hash: int | None

    def __init__(self, parts: Iterable[Part] = ()):
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Path is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Path is immutable")

    @classmethod
    def from_keypath(cls, keypath: Iterable[Any]) -> Path:
        """Builds a Path from jax key entries or optree accessor entries.

        Args:
          keypath: a sequence of `DictKey`, `GetAttrKey`, `SequenceKey`,
            `FlattenedIndexKey` (jax), optree path entries, or plain keys.

        Example:
          >>> import jax, treegraft as tg
          >>> [(kp, _)] = jax.tree_util.tree_flatten_with_path({'a': [1]})[0]
          >>> tg.Path.from_keypath(kp)
          Path('a[0]')
        """
        return cls(key_to_part(k) for k in keypath)

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Iterator[Part]:
        return iter(self.parts)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Path(self.parts[index])
        return self.parts[index]

    def __truediv__(self, other: Part | Path) -> Path:
        if isinstance(other, Path):
            return Path(self.parts + other.parts)
        return Path((*self.parts, other))

    def startswith(self, prefix: Path) -> bool:
        """Whether `prefix` is a prefix of this path (the root prefixes all)."""
        n = len(prefix.parts)
        return _typed(self.parts[:n]) == _typed(prefix.parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Path):
            return NotImplemented
        return _typed(self.parts) == _typed(other.parts)

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = hash(self.parts)
            object.__setattr__(self, "_hash", h)
        return h

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Path):
            return NotImplemented
        return [_sort_key(p) for p in self.parts] < [_sort_key(p) for p in other.parts]

    def __str__(self) -> str:
        return render_parts(self.parts)

    def __repr__(self) -> str:
        return f"Path({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path, (self.parts,))


Path.__module__ = "treegraft"


def _typed(parts: tuple[Part, ...]) -> tuple[tuple[type, Part], ...]:
    # 1 == True and 0 == 0.0 in Python; paths must tell them apart.
    return tuple((type(p), p) for p in parts)


def key_to_part(key: Any) -> Part:
    """Converts one jax key entry (or optree entry, or plain key) to a part."""
    t = type(key)
    if t is tree_util.DictKey:
        return key.key
    if t is tree_util.GetAttrKey:
        return key.name
    if t is tree_util.SequenceKey:
        return key.idx
    if t is tree_util.FlattenedIndexKey:
        return key.key
    if isinstance(key, optree.PyTreeEntry):
        # A namedtuple's entry is its index; jax (and treegraft) use the field name.
        if isinstance(key, optree.NamedTupleEntry | optree.StructSequenceEntry):
            return key.field
        return key.entry
    # Other accessor-like entries expose the key as `.entry`.
    entry = getattr(key, "entry", _MISSING)
    if entry is not _MISSING:
        return entry
    return key


_MISSING = object()


def parse_path(text: str | Path) -> Path:
    """Parses a path string with Kauldron's `kontext` grammar.

    Args:
      text: e.g. `"params.decoder.layers_0"`, `"a[0]['x.y']"`, `""` (the root).
        A `Path` is returned as is.

    Returns:
      The parsed `Path`.

    Raises:
      PathSyntaxError: the string is not a path (it names the column).
      PathTypeError: text is neither a str nor a `Path` (a `GraftError` and
        a `TypeError`).

    Example:
      >>> import treegraft as tg
      >>> tg.parse_path("a.0['b c']").parts
      ('a', 0, 'b c')
      >>> str(tg.parse_path("a.0['b c']"))
      "a[0]['b c']"
    """
    if isinstance(text, Path):
        return text
    return Path(value for _, value in scan(text, wildcards=False))
