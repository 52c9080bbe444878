"""The scanner of the path grammar: text to segments, for paths and patterns alike.

Reads Kauldron's `kontext` grammar (see `treegraft._parse.paths`) and, when
asked, the wildcards of patterns (`*`, `**`, `layers_*`): `parse_path`
rejects them and `treegraft._parse.patterns` accepts them. Every syntax error
is a `PathSyntaxError` naming the column.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from typing import Any, TypeAlias

from treegraft._errors import PathSyntaxError, PathTypeError

__all__ = ["Segment", "scan"]

_IDENT = re.compile(r"[^\W\d]\w*")
_DIGITS = re.compile(r"[0-9]+")
_GLOB = re.compile(r"[\w*]+")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_WORDS = {"None": None, "True": True, "False": False}



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
