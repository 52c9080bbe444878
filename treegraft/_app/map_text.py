"""The text of `--map NEW=OLD` options: rules, with operations written as in Python.

`OLD` is a path or pattern, `None` (a keep rule), or an operation call with
unquoted paths: `stack(params.layers_*, axis=0)`, `unstack(params.layers, 1)`,
`cast(params.enc, bfloat16)`, `transpose(w, 1, 0)` (or `transpose(w, (1, 0))`,
as a plan prints it), `reshape(q, 4, -1)`, `take(kv, 0, axis=0)`,
`slice(qkv, 0, 128, axis=-1)`, `pad(embed, 32128, axis=0, constant=0)`,
`scale(q, 0.125)`, `offset(norm, 1.0)`, and over a list of values in square
brackets `concat([q, k, v], axis=0)`, `stack([k, v], axis=0)`; calls nest
(`stack([transpose(k, 1, 0), v])`). A path may also be quoted, as Python
and a plan write it (`concat(['q', 'k'], axis=1)`). Every malformed entry is a `MappingError`
of one line naming the entry and what is wrong in it (a bracket that does not
close, with its column in the entry).
"""

from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Sequence
from typing import Any

import treegraft
from treegraft._errors import MappingError

__all__ = ["parse_map", "parse_rule_value"]

_OPS = ("stack", "unstack", "cast", "transpose", "reshape", "take", "slice", "pad", "scale",
        "offset", "concat")
# The arguments after the source, in order, with their defaults (None: required).
_ARGS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "stack": (("axis", "0"),),
    "unstack": (("axis", "0"),),
    "concat": (("axis", "0"),),
    "cast": (("dtype", None),),
    "take": (("index", None), ("axis", "0")),
    "slice": (("start", None), ("stop", None), ("axis", "0")),
    "pad": (("size", None), ("axis", "0"), ("constant", "0")),
    "scale": (("factor", None),),
    "offset": (("amount", None),),
}
# A real number as Python writes one (no inf or nan: operations refuse them).
_REAL = re.compile(
    r"[+-]?(?:[0-9]{1,400}(?:\.[0-9]{0,400})?|\.[0-9]{1,400})(?:[eE][+-]?[0-9]{1,4})?"
)
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
        (unknown name, unbalanced parentheses or brackets, wrong arguments).
    """
    mapping: dict[str, Any] = {}
    for entry in entries:
        new, sep, old = entry.partition("=")
        if not sep or not new.strip():
            raise MappingError(f"--map takes NEW=OLD, got {entry!r}")
        at = len(new) + 1 + len(old) - len(old.lstrip())
        mapping[new.strip()] = _Entry(f"--map {entry!r}").value(old.strip(), at)
    return mapping


def parse_rule_value(text: str, *, where: str) -> Any:
    """One rule's source side written as in `--map` (a path, `None`, an operation).

    Args:
      text: the text after `NEW=`.
      where: what names the entry in errors, e.g. `--mapping 'm.json', key 'params'`.

    Raises:
      MappingError: the operation is malformed.
    """
    return _Entry(where).value(text.strip(), len(text) - len(text.lstrip()))


class _Entry:
    """One `--map` entry (or mapping file entry), named in every error about it.

    Texts carry `at`, their offset in the entry, so that a bracket error can
    give its column.
    """

    def __init__(self, where: str):
        self.where = where  # e.g. "--map 'a=b'": starts every message

    def error(self, reason: str) -> MappingError:
        return MappingError(f"{self.where}: {reason}")

    def value(self, text: str, at: int = 0) -> Any:
        """A rule value: None, a path string, or an operation."""
        if text == "None":
            return None
        if text[:1] in "'\"" and _quote_end(text, 0) == len(text):
            return self.string(text)  # a path as Python (and a plan) writes it: 'a.b'
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
        inside = text[call.end() : close]
        self.brackets(inside, at + call.end())
        args = [(at + call.end() + i, a) for i, a in _split_args_at(inside)]
        return self.call(name, args)

    def string(self, text: str) -> str:
        """A quoted path, its quotes and escapes read as Python reads them.

        Text that is not a closed Python string is left as it is, for the
        path's own parser to report with its column.
        """
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an invalid escape: kept, as Python does
                value = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            return text
        return value if isinstance(value, str) else text

    def brackets(self, text: str, at: int) -> None:
        """Checks that the square brackets of text (outside quotes) pair up."""
        opened: list[int] = []
        i = 0
        while i < len(text):
            c = text[i]
            if c in "'\"":
                i = _quote_end(text, i)
                continue
            if c == "[":
                opened.append(i)
            elif c == "]":
                if not opened:
                    raise self.error(f"the ']' at column {at + i + 1} closes no '['")
                opened.pop()
            i += 1
        if opened:
            raise self.error(f"the '[' at column {at + opened[-1] + 1} is never closed by a ']'")

    def call(self, name: str, args: list[tuple[int, str]]) -> Any:
        """The operation name applied to its argument texts (with their offsets)."""
        if any(not a for _, a in args):
            raise self.error(f"{name}(...) has an empty argument")
        positional: list[tuple[int, str]] = []
        keywords: dict[str, str] = {}
        for at, arg in args:
            key = _keyword(arg)
            if key is None:
                if keywords:
                    raise self.error(f"{name}: {arg!r} comes after a keyword argument")
                positional.append((at, arg))
                continue
            if key in keywords:
                raise self.error(f"{name}: {key}= is given twice")
            keywords[key] = arg.split("=", 1)[1].strip()
        if not positional:
            what = "a list of values" if name == "concat" else "a source path"
            raise self.error(f"{name}() needs {what} as its first argument")
        value = self.source(name, *positional[0])
        extra = [a for _, a in positional[1:]]
        try:
            if name in ("transpose", "reshape"):
                what = "axes" if name == "transpose" else "shape"
                self.no_keywords(name, keywords)
                return getattr(treegraft, name)(value, self.integers(name, what, extra))
            given = self.arguments(name, extra, keywords)
            if name == "cast":
                return treegraft.cast(value, _dtype_name(given["dtype"]))
            if name in ("scale", "offset"):
                key = _ARGS[name][0][0]
                return getattr(treegraft, name)(value, self.real(name, key, given[key]))
            ints = {k: self.integer(name, k, v) for k, v in given.items() if k != "constant"}
            if name == "pad":
                constant = self.constant(given["constant"])
                return treegraft.pad(value, ints["size"], axis=ints["axis"], constant=constant)
            order = [k for k, _ in _ARGS[name] if k != "axis"]
            return getattr(treegraft, name)(value, *(ints[k] for k in order), axis=ints["axis"])
        except MappingError as e:
            if str(e).startswith(self.where + ": "):
                raise  # about an inner operation: already names the entry
            raise self.error(str(e)) from None

    def source(self, name: str, at: int, text: str) -> Any:
        """The operation's first argument: a value, or for stack and concat a `[...]` list."""
        if text.startswith("[") and name in ("stack", "concat"):
            if not text.endswith("]") or _matching_bracket(text) != len(text) - 1:
                raise self.error(
                    f"{name}: unexpected text after the list closed at column "
                    f"{at + _matching_bracket(text) + 1}"
                )
            items = _split_args_at(text[1:-1])
            if any(not item for _, item in items):
                raise self.error(f"{name}: its list has an empty value")
            values = [self.value(item, at + 1 + i) for i, item in items]
            if any(v is None for v in values):
                raise self.error(f"{name}: a value of its list is None; give a path or operation")
            return values
        if name == "concat":
            raise self.error(
                f"concat takes a list of values in square brackets, got {text!r}: "
                "concat([a, b], axis=0)"
            )
        value = self.value(text, at)
        if value is None:
            raise self.error(f"{name}: its source is a path or an operation, not None")
        return value

    def arguments(self, name: str, extra: list[str], keywords: dict[str, str]) -> dict[str, str]:
        """The arguments after the source by name (by position or as key=), defaults filled."""
        names = [k for k, _ in _ARGS[name]]
        unknown = set(keywords) - set(names)
        if unknown:
            takes = ", ".join(k + "=" for k in names)
            raise self.error(f"{name}: unknown argument {sorted(unknown)[0]}=; it takes {takes}")
        if len(names) == 1:
            key = names[0]
            given = extra + ([keywords[key]] if key in keywords else [])
            if len(given) > 1:
                raise self.error(
                    f"{name} takes a source and one {key}, got {len(given)} {key} values: "
                    + ", ".join(given)
                )
            out = dict(zip(names, given, strict=False))
        else:
            if len(extra) > len(names):
                raise self.error(
                    f"{name} takes a source and at most {len(names)} arguments "
                    f"({', '.join(names)}), got {len(extra)}: {', '.join(extra)}"
                )
            out = dict(zip(names, extra, strict=False))
            for key, text in keywords.items():
                if key in out:
                    raise self.error(f"{name}: {key} is given by position and as {key}=")
                out[key] = text
        for key, default in _ARGS[name]:
            if key in out:
                continue
            if default is None:
                article = "an" if key[0] in "aeiou" else "a"
                raise self.error(f"{name} needs {article} {key}: {_usage(name)}")
            out[key] = default
        return out

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
            if what in ("axis", "index", "start", "stop", "size"):
                raise self.error(f"{name}: the {what} must be an integer, got {text!r}")
            raise self.error(f"{name}: the {what} must be integers, got {text!r}")
        return int(text)

    def real(self, name: str, what: str, text: str) -> float:
        if not _REAL.fullmatch(text):
            raise self.error(f"{name}: the {what} must be a number such as 0.125, got {text!r}")
        return float(text)

    def constant(self, text: str) -> Any:
        """pad's constant: an int, a float or a bool, kept as written (an int stays exact)."""
        if text in ("True", "False"):
            return text == "True"
        if _INT.fullmatch(text):
            return int(text)
        return self.real("pad", "constant", text)


def _usage(name: str) -> str:
    """How the operation is called, e.g. `slice(path, start, stop, axis=0)`."""
    parts = ["path"] + [k if d is None else f"{k}={d}" for k, d in _ARGS[name]]
    return f"{name}({', '.join(parts)})"


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
    """Splits at the commas outside brackets and quotes; a trailing comma is allowed."""
    return [a for _, a in _split_args_at(text)]


def _split_args_at(text: str) -> list[tuple[int, str]]:
    """The arguments of text with their offsets in it (see `_split_args`)."""
    out: list[tuple[int, str]] = []
    depth, start, i = 0, 0, 0

    def piece(a: int, b: int) -> tuple[int, str]:
        raw = text[a:b]
        return a + len(raw) - len(raw.lstrip()), raw.strip()

    while i < len(text):
        c = text[i]
        if c in "'\"":
            i = _quote_end(text, i)
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(piece(start, i))
            start = i + 1
        i += 1
    last = piece(start, len(text))
    if last[1] or out:
        out.append(last)
    if out and not out[-1][1]:
        out.pop()  # `f(a, b,)`, as Python allows
    return out


def _matching_bracket(text: str) -> int:
    """The index of the ']' closing the '[' at text[0] (balanced brackets checked before)."""
    depth, i = 0, 0
    while i < len(text):
        c = text[i]
        if c in "'\"":
            i = _quote_end(text, i)
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return len(text) - 1
