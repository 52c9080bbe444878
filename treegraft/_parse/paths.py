"""Paths into pytrees: parsing, canonical rendering, conversion from key paths.

The grammar is Kauldron's `kontext` path grammar:

    params.decoder.layers_0      ('params', 'decoder', 'layers_0')
    a[0].b  and  a.0.b           ('a', 0, 'b')
    a['x.y'].z                   ('a', 'x.y', 'z')
    a[-1]  a[None]  a[True]      -1, None, True
    ''                           () (the root)

The scanner, shared with patterns, is in `treegraft._parse.scan`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

import optree
from jax import tree_util

from treegraft._parse.scan import _IDENT, _WORDS, Segment, scan  # noqa: F401 (Segment: re-exported)

__all__ = ["Path", "Part", "parse_path", "render_parts", "render_pattern", "is_index"]

Part: TypeAlias = Any  # str | int | float | bool | None, or any dict key


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


def is_index(part: Part) -> bool:
    """Whether a part is an index: an int (not a bool), or digits as orbax saves int keys."""
    return type(part) is int or (type(part) is str and part.isdigit() and part.isascii())


def render_pattern(parts: Iterable[Part]) -> str:
    """Renders parts as the pattern of their kind: every index (`3`, `'3'`) is a `*`.

    `model.layers[3].mlp` gives `model.layers.*.mlp`: what a mistyped pattern
    is answered with, one pattern for every layer.
    """
    out = []
    for i, p in enumerate(parts):
        out.append(("*" if i == 0 else ".*") if is_index(p) else _render_part(p, i == 0))
    return "".join(out)


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
