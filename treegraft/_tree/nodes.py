"""One node of a pytree: its children by key, checked, and finding one by a path part.

Every function here reads trees and returns new values; none modifies its input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jax import tree_util

from treegraft._errors import TreeError
from treegraft._parse.keys import finds_digits
from treegraft._parse.paths import Part, key_to_part, render_parts
from treegraft._tree import nnx as _nnx

__all__ = ["children", "find_child"]

IsLeaf = Callable[[Any], bool] | None

_MAX_LISTED = 12


def _kids(node: Any, is_leaf: IsLeaf) -> list[tuple[Part, Any]] | None:
    """Children for the walks below, without sorting dict keys (no jax for builtins)."""
    if is_leaf is not None and is_leaf(node):
        return None
    t = type(node)
    if t is dict:
        return list(node.items())
    if t is list or t is tuple:
        return list(enumerate(node))
    if node is None:
        return []
    try:
        return children(node, is_leaf=is_leaf)
    except (TypeError, ValueError, SystemError, RecursionError):
        return None


def _find_unsortable(
    tree: Any, is_leaf: IsLeaf, base: tuple[Part, ...] = ()
) -> TreeError | None:
    """The error for the first dict whose keys do not sort (jax must sort them)."""
    stack: list[tuple[Any, tuple[Part, ...]]] = [(tree, base)]
    while stack:
        node, parts = stack.pop()
        if isinstance(node, dict) and not (is_leaf is not None and is_leaf(node)):
            try:
                sorted(node)
            except TypeError:
                keys = list(node)
                kinds = sorted({type(k).__name__ for k in keys})
                shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
                where = repr(render_parts(parts)) if parts else "the root"
                return TreeError(
                    f"the dict at {where} mixes keys that do not sort together "
                    f"({' and '.join(kinds)}: {shown}); jax sorts dict keys, so a pytree "
                    "dict needs keys that compare with each other: make them all str"
                )
        kids = _kids(node, is_leaf)
        if kids:
            stack.extend((child, parts + (key,)) for key, child in reversed(kids))
    return None


# Which types are flax NNX Variables: nodes whose one child (the value) takes
# their own path. Fixed per type: a Variable type cannot exist before flax.nnx.
_IS_VARIABLE: dict[type, bool] = {}


def _is_variable(t: type) -> bool:
    known = _IS_VARIABLE.get(t)
    if known is None:
        known = _IS_VARIABLE[t] = _nnx.is_variable_type(t)
    return known


def children(
    node: Any, *, is_leaf: IsLeaf = None, where: Sequence[Part] = ()
) -> list[tuple[Part, Any]] | None:
    """The direct children of node as `(part, child)`, or None if node is a leaf.

    `None` and empty containers are nodes with no children. A flax NNX Variable
    has its value's children (a Variable holding an array is a leaf).

    Args:
      node: any pytree node.
      is_leaf: as in `jax.tree_util`.
      where: the node's path, for messages.

    Raises:
      TreeError: two children have the same key (a custom node whose flatten
        function repeats a key), or the node is a dict whose keys do not sort.
    """
    if is_leaf is not None and is_leaf(node):
        return None
    if _is_variable(type(node)):  # an NNX Variable: its value's children
        return children(_nnx.value_of(node), is_leaf=is_leaf, where=where)
    if type(node) is dict and is_leaf is None:
        # A plain dict's children are its items in sorted key order, as jax's
        # flatten gives them, without flattening (a node of 100k keys: 0.3 s).
        try:
            keys = sorted(node)
        except TypeError:
            pass  # keys that do not sort: jax's flatten below raises, and is reported
        else:
            return [(k, node[k]) for k in keys]
    try:
        keyed, _ = tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node or (is_leaf is not None and is_leaf(x))
        )
    except ValueError as e:
        if "sort" not in str(e):
            raise
        found = _find_unsortable(node, is_leaf, tuple(where))
        if found is None:
            raise
        raise found from e
    if len(keyed) == 1 and keyed[0][0] == () and keyed[0][1] is node:
        return None
    kids = [(key_to_part(kp[0]), child) for kp, child in keyed]
    if len(kids) > 1 and type(node) not in (dict, list, tuple):
        _check_unique_keys(node, kids, where)
    return kids


def _check_unique_keys(node: Any, kids: list[tuple[Part, Any]], where: Sequence[Part]) -> None:
    seen: set[Any] = set()
    for key, _ in kids:
        try:
            typed = (type(key), key)
            if typed in seen:
                break
            seen.add(typed)
        except TypeError:  # an unhashable key: compare by its rendering
            typed = (type(key), repr(key))
            if typed in seen:
                break
            seen.add(typed)
    else:
        return
    here = repr(render_parts(where)) if where else "the root"
    raise TreeError(
        f"the {type(node).__name__} node at {here} has two children under the key "
        f"{key!r}: a path can reach only one of them, and a graft would give both the "
        "same value. Give every child its own key in the node's flatten function "
        "(jax.tree_util.register_pytree_with_keys)"
    )


def find_child(kids: list[tuple[Part, Any]], part: Part) -> tuple[Part, Any] | None:
    """The child for part; an int part also finds the string key of its digits."""
    for key, child in kids:
        if type(key) is type(part) and key == part:
            return key, child
    if type(part) is int:
        for key, child in kids:
            if finds_digits(part, key):
                return key, child
    return None
