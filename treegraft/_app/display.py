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


class _Node:
    __slots__ = ("children", "spec", "leaves", "nbytes")

    def __init__(self) -> None:
        self.children: dict[Any, _Node] = {}
        self.spec: Any = None
        self.leaves = 0
        self.nbytes = 0


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
) -> list[str]:
    """Renders leaves as an indented tree with shape, dtype and size per leaf.

    Args:
      items: `(parts, leaf)` pairs; a leaf has shape and dtype.
      title: the first line.
      depth: levels shown; deeper subtrees are folded into their totals.
      style: styling; plain when None.

    Returns:
      The lines.
    """
    style = style or Style(sys.stdout, plain=True)
    root = _trie(items)
    lines = [style.bold(title) + f"  {_count(root.leaves)}, {format_bytes(root.nbytes)}"]

    def walk(node: _Node, prefix: str, level: int) -> None:
        keys = list(node.children)
        for n, key in enumerate(keys):
            child = node.children[key]
            last = n == len(keys) - 1
            branch = "└── " if last else "├── "
            name = render_parts(["x", key[1]])[1:].lstrip(".")
            if child.spec is not None and not child.children:
                lines.append(
                    f"{prefix}{branch}{name}  {_leaves.describe(child.spec)}  "
                    + style.dim(format_bytes(child.nbytes))
                )
                continue
            folded = depth is not None and level + 1 >= depth
            summary = f"{_count(child.leaves)}, {format_bytes(child.nbytes)}"
            if folded:
                summary += " …"
            lines.append(f"{prefix}{branch}{style.bold(name)}  " + style.dim(summary))
            if not folded:
                walk(child, prefix + ("    " if last else "│   "), level + 1)

    if depth is None or depth > 0:
        walk(root, "", 0)
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
