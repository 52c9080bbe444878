"""Terminal display: trees of leaves with sizes.

Plain text that reads well in a log, with bold headers and colour only on a
terminal that wants them (not with `--plain`, `NO_COLOR`, or a pipe).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from treegraft._parse.paths import Part, render_parts
from treegraft._tree import leaves as _leaves
from treegraft._tree.leaves import format_bytes

__all__ = ["Style", "render_tree", "leaf_rows"]


class Style:
    """ANSI styling, switched off for pipes, `--plain` and `NO_COLOR`."""

    def __init__(self, stream: TextIO, *, plain: bool = False):
        self.on = (
            not plain
            and "NO_COLOR" not in os.environ
            and hasattr(stream, "isatty")
            and stream.isatty()
        )

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def good(self, text: str) -> str:
        return self._wrap("32", text)

    def bad(self, text: str) -> str:
        return self._wrap("31", text)


# Runs of at least this many alike siblings are folded: a short list reads as it is.
FOLD_AT = 4


class _Node:
    __slots__ = ("children", "spec", "leaves", "nbytes", "repeat")

    def __init__(self) -> None:
        self.children: dict[Any, _Node] = {}
        self.spec: Any = None
        self.leaves = 0  # of the whole subtree, every repeat included
        self.nbytes = 0
        self.repeat = 1  # a folded run of this many alike siblings

    def shape(self) -> Any:
        """What makes two subtrees alike: their keys, specs and folds, recursively."""
        return (
            self.spec,
            self.repeat,
            tuple((key, child.shape()) for key, child in self.children.items()),
        )


def _fold(node: _Node) -> None:
    """Folds runs of consecutive integer keys whose subtrees are alike, bottom up.

    `layers[0]` .. `layers[47]`, all alike, become one child keyed by the
    range `(0, 47)` whose `repeat` is 48; an inner fold happens first, so
    the layers' experts fold too before the layers are compared.
    """
    for child in node.children.values():
        _fold(child)
    keys = list(node.children)
    folded: dict[Any, _Node] = {}
    i = 0
    while i < len(keys):
        j = i + 1
        if _is_index(keys[i]):
            first = node.children[keys[i]]
            shape = first.shape()
            while (
                j < len(keys)
                and _is_index(keys[j])
                and keys[j][1] == keys[j - 1][1] + 1
                and node.children[keys[j]].shape() == shape
            ):
                j += 1
        if j - i >= FOLD_AT:
            run = [node.children[k] for k in keys[i:j]]
            merged = run[0]
            merged.repeat = j - i
            merged.leaves = sum(n.leaves for n in run)
            merged.nbytes = sum(n.nbytes for n in run)
            folded[(_Range, (keys[i][1], keys[j - 1][1]))] = merged
        else:
            for k in keys[i:j]:
                folded[k] = node.children[k]
        i = j
    node.children = folded


class _Range:
    """The key type of a folded run of indices."""


def _is_index(key: tuple[type, Any]) -> bool:
    return key[0] is int


def _name(key: tuple[type, Any]) -> str:
    """A child's name as the tree shows it: `.name`, `[3]`, or `[0..47]` for a fold."""
    if key[0] is _Range:
        return f"[{key[1][0]}..{key[1][1]}]"
    return render_parts(["x", key[1]])[1:].lstrip(".")


def _trie(items: Sequence[tuple[tuple[Part, ...], Any]]) -> _Node:
    root = _Node()
    for parts, leaf in items:
        spec = _leaves.spec_of(leaf)
        size = _leaves.nbytes(spec)
        node = root
        node.leaves += 1
        node.nbytes += size
        for part in parts:
            node = node.children.setdefault((type(part), part), _Node())
            node.leaves += 1
            node.nbytes += size
        node.spec = spec
    return root


def render_tree(
    items: Sequence[tuple[tuple[Part, ...], Any]],
    *,
    title: str,
    depth: int | None = None,
    style: Style | None = None,
    fold: bool = False,
) -> list[str]:
    """Renders leaves as an indented tree with shape, dtype and size per leaf.

    Args:
      items: `(parts, leaf)` pairs; a leaf has shape and dtype.
      title: the first line.
      depth: levels shown; deeper subtrees are folded into their totals.
      style: styling; plain when None.
      fold: fold runs of `FOLD_AT` or more consecutive indices whose subtrees
        are alike into one `[0..47]` entry; a leaf under folds shows `x N`,
        the number of leaves it stands for.

    Returns:
      The lines.
    """
    style = style or Style(sys.stdout, plain=True)
    root = _trie(items)
    if fold:
        _fold(root)
    lines = [style.bold(title) + f"  {_count(root.leaves)}, {format_bytes(root.nbytes)}"]

    def walk(node: _Node, prefix: str, level: int, times: int) -> None:
        keys = list(node.children)
        for n, key in enumerate(keys):
            child = node.children[key]
            last = n == len(keys) - 1
            branch = "└── " if last else "├── "
            name = _name(key)
            count = times * child.repeat  # the leaves (or subtrees) this line stands for
            if child.spec is not None and not child.children:
                repeated = f"  x {count}" if count > 1 else ""
                lines.append(
                    f"{prefix}{branch}{name}  {_leaves.describe(child.spec)}{repeated}  "
                    + style.dim(format_bytes(child.nbytes * times))
                )
                continue
            folded = depth is not None and level + 1 >= depth
            summary = f"{_count(child.leaves * times)}, {format_bytes(child.nbytes * times)}"
            if folded:
                summary += " …"
            lines.append(f"{prefix}{branch}{style.bold(name)}  " + style.dim(summary))
            if not folded:
                walk(child, prefix + ("    " if last else "│   "), level + 1, count)

    if depth is None or depth > 0:
        walk(root, "", 0, 1)
    return lines


def _count(n: int) -> str:
    return "1 leaf" if n == 1 else f"{n} leaves"


def leaf_rows(items: Sequence[tuple[tuple[Part, ...], Any]]) -> list[dict[str, Any]]:
    """One JSON-ready dict per leaf: path, shape, dtype, nbytes."""
    rows = []
    for parts, leaf in items:
        shape, dtype = _leaves.spec_of(leaf)
        rows.append(
            {
                "path": render_parts(parts),
                "shape": list(shape) if shape is not None else None,
                "dtype": dtype.__name__ if isinstance(dtype, type) else str(dtype),
                "nbytes": _leaves.nbytes((shape, dtype)),
            }
        )
    return rows
