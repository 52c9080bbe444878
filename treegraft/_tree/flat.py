"""Flattening a pytree to its leaf paths: a fast walk of builtin containers, jax for the rest.

Every function here returns new lists; none modifies its input.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jax import tree_util

from treegraft._errors import TreeError
from treegraft._parse.paths import Part, Path, key_to_part, render_parts
from treegraft._tree import nnx as _nnx
from treegraft._tree.nodes import IsLeaf, _find_unsortable, _is_variable, _kids, children

__all__ = ["flatten", "flatten_index", "flatten_parts", "flatten_plain"]


def flatten_parts(
    tree: Any, *, is_leaf: IsLeaf = None
) -> tuple[list[tuple[Part, ...]], list[Any], tree_util.PyTreeDef]:
    """Flattens tree into parallel lists of part tuples and leaves, plus the treedef.

    This is the internal fast path: parts are plain tuples, not `Path`s.
    """
    paths, leaves, treedef, _ = flatten_plain(tree, is_leaf=is_leaf)
    return paths, leaves, treedef


def flatten_plain(
    tree: Any, *, is_leaf: IsLeaf = None
) -> tuple[list[tuple[Part, ...]], list[Any], tree_util.PyTreeDef, bool]:
    """`flatten_parts`, and whether the tree is plain.

    Plain: every node is a dict with str keys, a list, a tuple or None. Then
    the paths are a function of the treedef alone (jax's treedef keeps dict
    keys and container kinds), so two trees with equal treedefs have the
    same paths; a custom node may not say so (its keys can come from its
    children, or change order from one flatten to the next).
    """
    return flatten_index(tree, is_leaf=is_leaf)[:4]


def flatten_index(
    tree: Any, *, is_leaf: IsLeaf = None
) -> tuple[list[tuple[Part, ...]], list[Any], tree_util.PyTreeDef, bool, bool | None]:
    """`flatten_plain`, and True when every part of every path is a str, None when not known.

    True when the walk met a plain tree holding no list or tuple with a
    child (its dict keys were checked to be str on the way): then no part
    needs looking at. None leaves the question to the caller.

    Example:
      >>> flatten_index({'a': {'b': 1}, 'c': []})[3:]
      (True, True)
      >>> flatten_index({'a': [1]})[3:]
      (True, None)
    """
    if is_leaf is None:
        leaves, treedef = _jax_flatten(tree_util.tree_flatten, tree, None)
        walked = _walk_paths(tree, len(leaves))
        if walked is not None:
            paths, seen, custom, plain, sequences = walked
            if len(seen) == len(leaves) and all(map(operator.is_, seen, leaves)):
                if not custom or _all_distinct(leaves):
                    str_only = True if plain and not sequences else None
                    return paths, leaves, treedef, plain, str_only
                # The walk flattened the custom nodes a second time, and a
                # node may order its children differently on each call (a
                # set-like node): identity pairs only distinct leaves, so a
                # shared leaf could take another key's path. jax's own key
                # paths come from the one flatten that made the treedef.
            else:
                # A type seen as a leaf was registered with jax since: learn again.
                _forget_types()
    keyed, treedef = _jax_flatten(tree_util.tree_flatten_with_path, tree, is_leaf)
    if "flax.nnx" in sys.modules:  # NNX Variables' `value` keys are not in paths
        keyed = _nnx.drop_value_keys(tree, keyed, is_leaf)
    cache: dict[Any, Part] = {}
    paths = []
    leaves = []
    for keypath, leaf in keyed:
        parts = []
        for k in keypath:
            try:
                p = cache[k]
            except KeyError:
                p = key_to_part(k)
                # Only str parts are cached: DictKey(1), DictKey(True) and
                # DictKey(1.0) are equal and hash alike, but are different keys.
                if type(p) is str:
                    cache[k] = p
            except TypeError:  # an unhashable key entry
                p = key_to_part(k)
            parts.append(p)
        paths.append(tuple(parts))
        leaves.append(leaf)
    _check_distinct_paths(tree, paths, is_leaf)
    return paths, leaves, treedef, False, None


# jax's flatten gives up (SystemError) at about 1000 levels, fewer when called
# from deep in the stack: a failure past this depth is taken for that.
_JAX_MAX_DEPTH = 500


def _jax_flatten(fn: Callable[..., Any], tree: Any, is_leaf: IsLeaf) -> Any:
    """Calls a jax flatten function; its low-level failures become TreeErrors."""
    try:
        return fn(tree, is_leaf=is_leaf) if is_leaf is not None else fn(tree)
    except ValueError as e:
        if "sort" not in str(e):
            raise
        found = _find_unsortable(tree, is_leaf)
        if found is None:
            raise
        raise found from e
    except (SystemError, RecursionError) as e:
        depth, parts = _depth(tree, is_leaf)
        if depth < _JAX_MAX_DEPTH:
            raise
        raise TreeError(
            f"tree too deep: {depth} levels, at {_short_path(parts)}; jax cannot flatten "
            f"pytrees deeper than about 1000 levels. Keep long chains as a list (one "
            f"level) or as a dict keyed by path strings"
        ) from e


def _short_path(parts: Sequence[Part]) -> str:
    """A path for a message, its middle elided when it is long."""
    if len(parts) <= 8:
        return repr(render_parts(parts)) if parts else "the root"
    head, tail = render_parts(parts[:4]), render_parts(parts[-3:])
    return f"{head!r} ... {tail!r} ({len(parts)} keys)"


def _depth(tree: Any, is_leaf: IsLeaf) -> tuple[int, tuple[Part, ...]]:
    """The number of levels of tree and the path to its deepest node (no recursion)."""
    best: tuple[int, tuple[Part, ...]] = (0, ())
    stack: list[tuple[Any, tuple[Part, ...]]] = [(tree, ())]
    while stack:
        node, parts = stack.pop()
        if len(parts) > best[0]:
            best = (len(parts), parts)
        kids = _kids(node, is_leaf)
        if kids:
            stack.extend((child, parts + (key,)) for key, child in kids)
    return best


def _check_distinct_paths(tree: Any, paths: list[tuple[Part, ...]], is_leaf: IsLeaf) -> None:
    """Raises when two leaves have one path: a node with two children under one key."""
    # Equal typed paths are equal as tuples: check those (C speed) first.
    unique = set(paths)
    clash = len(unique) != len(paths)
    if not clash:
        # A leaf and a subtree under one key: a leaf's path prefixes another's.
        clash = any(parts[:n] in unique for parts in paths for n in range(1, len(parts)))
    if not clash:
        return
    # Find the node: children() raises naming it.
    stack: list[tuple[Any, tuple[Part, ...]]] = [(tree, ())]
    while stack:
        node, parts = stack.pop()
        kids = children(node, is_leaf=is_leaf, where=parts)
        if kids:
            stack.extend((child, parts + (key,)) for key, child in kids)
    raise TreeError("two leaves of the tree have the same path")  # not reached in practice


# Types seen to be leaves, or generic nodes, in this process. A type registered
# with jax is a node for good, so the answer can be kept.
_STR_TYPES = frozenset({str})
_BUILTIN_LEAF_TYPES = frozenset({bool, int, float, complex, str, bytes})
_LEAF_TYPES: set[type] = set(_BUILTIN_LEAF_TYPES)
_NODE_TYPES: set[type] = set()


def _forget_types() -> None:
    _LEAF_TYPES.clear()
    _LEAF_TYPES.update(_BUILTIN_LEAF_TYPES)
    _NODE_TYPES.clear()


def _all_distinct(leaves: list[Any]) -> bool:
    """Whether no object is two of the leaves (the list holds them all alive)."""
    return len(set(map(id, leaves))) == len(leaves)


def _walk_paths(
    tree: Any, n_leaves: int
) -> tuple[list[tuple[Part, ...]], list[Any], bool, bool, bool] | None:
    """Leaf paths by a direct walk: several times faster than jax's key paths.

    Builtin containers are walked here, in jax's order (dict keys sorted);
    other node types go through jax one level at a time. Returns None when the
    walk cannot vouch for matching jax's leaf order (the caller then asks jax).
    Also returns the leaves it found, for the caller to check against jax's,
    and whether it met a node type that is not a builtin container (whose
    flatten may not give its children in the same order every time), and
    whether it met only dicts with str keys, lists, tuples and None (plain),
    and whether it met a list or tuple holding a child (then a part may be an int).
    """
    paths: list[tuple[Part, ...]] = []
    found: list[Any] = []
    custom = False
    plain = True
    sequences = False
    add, keep = paths.append, found.append
    leaf_types = _LEAF_TYPES

    def visit(prefix: tuple[Part, ...], node: Any) -> None:
        nonlocal custom, plain, sequences
        # Children that are known leaves are taken in place: most of a big
        # tree's nodes are leaves, and a call per leaf is what costs.
        t = type(node)
        if t is dict:
            if plain and not _STR_TYPES.issuperset(map(type, node)):
                plain = False
            for k in sorted(node):
                child = node[k]
                if type(child) in leaf_types:
                    add(prefix + (k,))
                    keep(child)
                else:
                    visit(prefix + (k,), child)
        elif t is list or t is tuple:
            sequences = sequences or bool(node)
            for i, child in enumerate(node):
                if type(child) in leaf_types:
                    add(prefix + (i,))
                    keep(child)
                else:
                    visit(prefix + (i,), child)
        elif node is None:
            return
        elif t in leaf_types:
            add(prefix)
            keep(node)
        elif t not in _NODE_TYPES and _is_variable(t):
            plain = False
            visit(prefix, _nnx.value_of(node))
        else:
            kids = None if t in _NODE_TYPES else _generic_children(node, t, prefix)
            if kids is None and t not in _NODE_TYPES:
                add(prefix)
                keep(node)
                return
            if kids is None:
                kids = children(node, where=prefix) or []
            plain = False
            if len(kids) > 1:
                custom = True
            for k, c in kids:
                visit(prefix + (k,), c)

    try:
        visit((), tree)
    except TypeError:  # dict keys that do not sort: jax has its own order for them
        return None
    except RecursionError:  # deeper than Python's stack: jax walks it
        return None
    return (paths, found, custom, plain, sequences) if len(paths) == n_leaves else None


def _generic_children(node: Any, t: type, where: tuple[Part, ...]) -> list[tuple[Part, Any]] | None:
    kids = children(node, where=where)
    if kids is None:
        _LEAF_TYPES.add(t)
    else:
        _NODE_TYPES.add(t)
    return kids


def flatten(tree: Any, /, *, is_leaf: IsLeaf = None) -> dict[Path, Any]:
    """Flattens any pytree to `{Path: leaf}`, in the pytree's leaf order.

    `None` and empty containers have no leaves, so they do not appear; they are
    still part of the tree's structure.

    Args:
      tree: any pytree (dicts, lists, tuples, namedtuples, registered dataclasses,
        flax structs, custom nodes).
      is_leaf: as in `jax.tree_util`.

    Returns:
      A dict from each leaf's `Path` to the leaf. The input is not modified.

    Example:
      >>> import treegraft as tg
      >>> tg.flatten({'a': [1, 2], 'b': {'c': 3}, 'd': None})
      {Path('a[0]'): 1, Path('a[1]'): 2, Path('b.c'): 3}
    """
    paths, leaves, _ = flatten_parts(tree, is_leaf=is_leaf)
    return {Path(p): leaf for p, leaf in zip(paths, leaves, strict=True)}
