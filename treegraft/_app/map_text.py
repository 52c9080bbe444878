"""The text of `--map NEW=OLD` options: rules, with operations written as in Python.

`OLD` is a path or pattern, `None` (a keep rule), or an operation call with
unquoted paths: `stack(params.layers_*, axis=0)`, `unstack(params.layers, 1)`,
`cast(params.enc, bfloat16)`, `transpose(w, 1, 0)` (or `transpose(w, (1, 0))`,
as a plan prints it), `reshape(q, 4, -1)`; calls nest. Every malformed entry
is a `MappingError` of one line naming the entry and what is wrong in it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import treegraft
from treegraft._errors import MappingError

__all__ = ["parse_map", "parse_rule_value"]

_OPS = ("stack", "unstack", "cast", "transpose", "reshape")
# A call starts with a bare name and '(': a path never does (its '(' would
# be inside quotes), so such text is an operation, known or not.
_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")
# ASCII digits only: int() would also take '١' or '1_0'.
_INT = re.compile(r"[+-]?[0-9]{1,4000}")  # int() refuses more than 4300 digits
_DTYPE_PREFIXES = ("jax.numpy.", "jnp.", "numpy.", "np.")


def parse_map(entries: Sequence[str]) -> dict[str, Any]:
    """The mapping of `NEW=OLD` entries; OLD may be `None` or an operation.

    Raises:
      MappingError: an entry is not `NEW=OLD`, or its operation is malformed
        (unknown name, unbalanced parentheses, wrong arguments).
    """
    mapping: dict[str, Any] = {}
    for entry in entries:
        new, sep, old = entry.partition("=")
        if not sep or not new.strip():
            raise MappingError(f"--map takes NEW=OLD, got {entry!r}")
        mapping[new.strip()] = _Entry(f"--map {entry!r}").value(old.strip())
    return mapping


def parse_rule_value(text: str, *, where: str) -> Any:
    """One rule's source side written as in `--map` (a path, `None`, an operation).

    Args:
      text: the text after `NEW=`.
      where: what names the entry in errors, e.g. `--mapping 'm.json', key 'params'`.

    Raises:
      MappingError: the operation is malformed.
    """
    return _Entry(where).value(text.strip())


class _Entry:
    """One `--map` entry (or mapping file entry), named in every error about it."""

    def __init__(self, where: str):
        self.where = where  # e.g. "--map 'a=b'": starts every message

    def error(self, reason: str) -> MappingError:
        return MappingError(f"{self.where}: {reason}")

    def value(self, text: str) -> Any:
        """A rule value: None, a path string, or an operation."""
        if text == "None":
            return None
        parens = _parens(text)
        if not parens:
            return text  # a path or pattern: its own parser reports its syntax
        call = _CALL.match(text)
        depth = _depth(parens)
        if depth != 0:
            if call is not None and depth > 0:
                missing = "its closing ')'" if depth == 1 else f"{depth} closing ')'"
                raise self.error(f"{call.group(1)}(...) is missing {missing}")
            raise self.error(f"unbalanced parentheses in {text!r}")
        if call is None:
            raise self.error(
                f"{text!r} is neither a path (paths have no parentheses outside quotes) "
                f"nor an operation ({', '.join(_OPS)})"
            )
        name = call.group(1)
        if name not in _OPS:
            raise self.error(f"unknown operation {name!r}; the operations are {', '.join(_OPS)}")
        close = _matching(parens, call.end() - 1)
        tail = text[close + 1 :].strip()
        if tail:
            raise self.error(f"unexpected {tail!r} after {name}(...)")
        return self.call(name, _split_args(text[call.end() : close]))

    def call(self, name: str, args: list[str]) -> Any:
        """The operation name applied to its argument texts."""
        if any(not a for a in args):
            raise self.error(f"{name}(...) has an empty argument")
        positional: list[str] = []
        keywords: dict[str, str] = {}
        for arg in args:
            key = _keyword(arg)
            if key is None:
                if keywords:
                    raise self.error(f"{name}: {arg!r} comes after a keyword argument")
                positional.append(arg)
                continue
            if key in keywords:
                raise self.error(f"{name}: {key}= is given twice")
            keywords[key] = arg.split("=", 1)[1].strip()
        if not positional:
            raise self.error(f"{name}() needs a source path as its first argument")
        value = self.value(positional[0])
        if value is None:
            raise self.error(f"{name}: its source is a path or an operation, not None")
        extra = positional[1:]
        try:
            if name in ("stack", "unstack"):
                axis = self.one(name, "axis", extra, keywords, default="0")
                return getattr(treegraft, name)(value, axis=self.integer(name, "axis", axis))
            if name == "cast":
                dtype = self.one(name, "dtype", extra, keywords, default=None)
                return treegraft.cast(value, _dtype_name(dtype))
            what = "axes" if name == "transpose" else "shape"
            self.no_keywords(name, keywords)
            return getattr(treegraft, name)(value, self.integers(name, what, extra))
        except MappingError as e:
            if str(e).startswith(self.where + ": "):
                raise  # about an inner operation: already names the entry
            raise self.error(str(e)) from None

    def one(
        self,
        name: str,
        key: str,
        extra: list[str],
        keywords: dict[str, str],
        *,
        default: str | None,
    ) -> str:
        """The one argument after the source, given by position or as key=."""
        unknown = set(keywords) - {key}
        if unknown:
            raise self.error(
                f"{name}: unknown argument {sorted(unknown)[0]}=; it takes {key}="
            )
        given = extra + ([keywords[key]] if key in keywords else [])
        if len(given) > 1:
            raise self.error(
                f"{name} takes a source and one {key}, got {len(given)} {key} values: "
                + ", ".join(given)
            )
        if given:
            return given[0]
        if default is None:
            raise self.error(f"{name} needs a {key}: {name}(path, {key})")
        return default

    def no_keywords(self, name: str, keywords: dict[str, str]) -> None:
        if keywords:
            raise self.error(
                f"{name}: unknown argument {sorted(keywords)[0]}=; write the numbers after "
                f"the source: {name}(path, 1, 0)"
            )

    def integers(self, name: str, what: str, args: list[str]) -> tuple[int, ...]:
        """The ints of args; one parenthesised tuple `(1, 0)` stands for its items."""
        if len(args) == 1 and args[0].startswith("(") and args[0].endswith(")"):
            args = _split_args(args[0][1:-1])
        elif not args and name == "transpose":
            raise self.error("transpose needs the axes: transpose(path, 1, 0)")
        elif not args:
            raise self.error("reshape needs the shape: reshape(path, 4, -1), or () for a scalar")
        return tuple(self.integer(name, what, a) for a in args)

    def integer(self, name: str, what: str, text: str) -> int:
        if not _INT.fullmatch(text):
            if what == "axis":
                raise self.error(f"{name}: the axis must be an integer, got {text!r}")
            raise self.error(f"{name}: the {what} must be integers, got {text!r}")
        return int(text)


def _keyword(arg: str) -> str | None:
    """The name of a `key=value` argument, else None."""
    m = re.match(r"([A-Za-z_]\w*)\s*=", arg)
    return m.group(1) if m else None


def _dtype_name(text: str | None) -> str:
    """A dtype's name as numpy knows it: `jnp.bfloat16` is `bfloat16`."""
    text = (text or "").strip()
    for prefix in _DTYPE_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _parens(text: str) -> list[tuple[int, str]]:
    """The parentheses of text outside quotes, with their indices."""
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "'\"":
            i = _quote_end(text, i)
            continue
        if c in "()":
            out.append((i, c))
        i += 1
    return out


def _depth(parens: list[tuple[int, str]]) -> int:
    """The '(' left open at the end (0: balanced); -1 when a ')' closes nothing."""
    depth = 0
    for _, c in parens:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return -1
    return depth


def _matching(parens: list[tuple[int, str]], start: int) -> int:
    """The index of the ')' closing the '(' at start, in balanced parentheses."""
    depth = 0
    for i, c in parens:
        if i < start:
            continue
        depth += 1 if c == "(" else -1
        if depth == 0:
            return i
    return parens[-1][0]  # not reached: the caller checked the balance


def _quote_end(text: str, i: int) -> int:
    """The index after the quoted key starting at i (backslash escapes, as paths have)."""
    quote, j = text[i], i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == quote:
            return j + 1
        j += 1
    return len(text)  # unclosed: the path's own parser reports it


def _split_args(text: str) -> list[str]:
    """Splits at the commas outside parentheses and quotes; a trailing comma is allowed."""
    out: list[str] = []
    depth, start, i = 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "'\"":
            i = _quote_end(text, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
        i += 1
    last = text[start:].strip()
    if last or out:
        out.append(last)
    if out and not out[-1]:
        out.pop()  # `f(a, b,)`, as Python allows
    return out
