"""Pure tree operations: flatten to paths, extract a subtree, insert one.

Every function here returns new trees; none modifies its input.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

from jax import tree_util

from treegraft import _leaves, _nnx
from treegraft._errors import MismatchError, PathNotFoundError, suggest
from treegraft._paths import Part, Path, key_to_part, parse_path, render_parts

__all__ = ["flatten", "extract", "insert", "flatten_parts", "children", "resolve"]

IsLeaf = Callable[[Any], bool] | None

_MAX_LISTED = 12


def flatten_parts(
    tree: Any, *, is_leaf: IsLeaf = None
) -> tuple[list[tuple[Part, ...]], list[Any], tree_util.PyTreeDef]:
    """Flattens tree into parallel lists of part tuples and leaves, plus the treedef.

    This is the internal fast path: parts are plain tuples, not `Path`s.
    """
    if is_leaf is None:
        leaves, treedef = tree_util.tree_flatten(tree)
        walked = _walk_paths(tree, len(leaves))
        if walked is not None:
            paths, seen = walked
            if len(seen) == len(leaves) and all(map(operator.is_, seen, leaves)):
                return paths, leaves, treedef
            # A type seen as a leaf was registered with jax since: learn again.
            _forget_types()
    keyed, treedef = tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
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
    return paths, leaves, treedef


# Types seen to be leaves, or generic nodes, in this process. A type registered
# with jax is a node for good, so the answer can be kept.
_BUILTIN_LEAF_TYPES = frozenset({bool, int, float, complex, str, bytes})
_LEAF_TYPES: set[type] = set(_BUILTIN_LEAF_TYPES)
_NODE_TYPES: set[type] = set()
# Which types are flax NNX Variables: nodes whose one child (the value) takes
# their own path. Fixed per type: a Variable type cannot exist before flax.nnx.
_IS_VARIABLE: dict[type, bool] = {}


def _forget_types() -> None:
    _LEAF_TYPES.clear()
    _LEAF_TYPES.update(_BUILTIN_LEAF_TYPES)
    _NODE_TYPES.clear()


def _walk_paths(tree: Any, n_leaves: int) -> tuple[list[tuple[Part, ...]], list[Any]] | None:
    """Leaf paths by a direct walk: several times faster than jax's key paths.

    Builtin containers are walked here, in jax's order (dict keys sorted);
    other node types go through jax one level at a time. Returns None when the
    walk cannot vouch for matching jax's leaf order (the caller then asks jax).
    Also returns the leaves it found, for the caller to check against jax's.
    """
    paths: list[tuple[Part, ...]] = []
    found: list[Any] = []
    add, keep = paths.append, found.append
    leaf_types = _LEAF_TYPES

    def visit(prefix: tuple[Part, ...], node: Any) -> None:
        # Children that are known leaves are taken in place: most of a big
        # tree's nodes are leaves, and a call per leaf is what costs.
        t = type(node)
        if t is dict:
            for k in sorted(node):
                child = node[k]
                if type(child) in leaf_types:
                    add(prefix + (k,))
                    keep(child)
                else:
                    visit(prefix + (k,), child)
        elif t is list or t is tuple:
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
            visit(prefix, _nnx.value_of(node))
        else:
            kids = None if t in _NODE_TYPES else _generic_children(node, t)
            if kids is None and t not in _NODE_TYPES:
                add(prefix)
                keep(node)
                return
            if kids is None:
                kids = children(node) or []
            for k, c in kids:
                visit(prefix + (k,), c)

    try:
        visit((), tree)
    except TypeError:  # dict keys that do not sort: jax has its own order for them
        return None
    except RecursionError:  # deeper than Python's stack: jax walks it
        return None
    return (paths, found) if len(paths) == n_leaves else None


def _is_variable(t: type) -> bool:
    known = _IS_VARIABLE.get(t)
    if known is None:
        known = _IS_VARIABLE[t] = _nnx.is_variable_type(t)
    return known


def _generic_children(node: Any, t: type) -> list[tuple[Part, Any]] | None:
    kids = children(node)
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


def children(node: Any, *, is_leaf: IsLeaf = None) -> list[tuple[Part, Any]] | None:
    """The direct children of node as `(part, child)`, or None if node is a leaf.

    `None` and empty containers are nodes with no children. A flax NNX Variable
    has its value's children (a Variable holding an array is a leaf).
    """
    if is_leaf is not None and is_leaf(node):
        return None
    if _is_variable(type(node)):
        return children(_nnx.value_of(node), is_leaf=is_leaf)  # an NNX Variable
    keyed, _ = tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node or (is_leaf is not None and is_leaf(x))
    )
    if len(keyed) == 1 and keyed[0][0] == () and keyed[0][1] is node:
        return None
    return [(key_to_part(kp[0]), child) for kp, child in keyed]


def find_child(kids: list[tuple[Part, Any]], part: Part) -> tuple[Part, Any] | None:
    """The child for part; an int part also finds the string key of its digits."""
    for key, child in kids:
        if type(key) is type(part) and key == part:
            return key, child
    if type(part) is int:
        for key, child in kids:
            if type(key) is str and key == str(part):
                return key, child
    return None


def resolve(
    tree: Any, path: Path, *, is_leaf: IsLeaf = None, what: str = "the tree"
) -> tuple[tuple[Part, ...], Any]:
    """Walks path in tree; returns the keys actually used and the subtree.

    Raises:
      PathNotFoundError: naming the deepest prefix that exists, its keys, and
        close matches.
    """
    node = tree
    used: list[Part] = []
    for part in path.parts:
        kids = children(node, is_leaf=is_leaf)
        if kids is None:
            here = repr(render_parts(used)) if used else "the root"
            raise PathNotFoundError(
                f"path {str(path)!r} not found in {what}: {here} is a leaf "
                f"({_leaves.describe(_leaves.spec_of(node))}), it has no key {part!r}"
            )
        found = find_child(kids, part)
        if found is None:
            raise PathNotFoundError(not_found_message(path, used, part, [k for k, _ in kids], what))
        key, node = found
        used.append(key)
    return tuple(used), node


def not_found_message(
    path: Path, found: list[Part] | tuple[Part, ...], part: Part, keys: list[Part], what: str
) -> str:
    """The message for a missing key: where it stopped, the keys there, close names."""
    here = render_parts(found)
    where = f"{here!r}" if here else "the root"
    # Keys are compared as text but shown as keys, so that 0 and '0' differ.
    names = {str(k): k for k in keys}
    listed = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    if len(keys) > _MAX_LISTED:
        listed += f", ... ({len(keys)} keys)"
    if not keys:
        return f"path {str(path)!r} not found in {what}: {where} is empty, it has no key {part!r}"
    return (
        f"path {str(path)!r} not found in {what}: {where} has no key {part!r}"
        f"{suggest(str(part), names, render=lambda name: repr(names[name]))}; "
        f"its keys are {listed}"
    )


def extract(tree: Any, path: str | Path, /, *, is_leaf: IsLeaf = None) -> Any:
    """Returns the subtree of tree at path.

    An int part also finds a string key of the same digits (orbax saves int
    dict keys as strings).

    Args:
      tree: any pytree.
      path: a path string or `Path`; `''` is the root.
      is_leaf: as in `jax.tree_util`.

    Returns:
      The subtree (the same object as in tree, not a copy).

    Raises:
      PathNotFoundError: the path does not exist (also a `KeyError`).

    Example:
      >>> import treegraft as tg
      >>> tg.extract({'a': {'b': [1, 2]}}, 'a.b[1]')
      2
    """
    return resolve(tree, parse_path(path), is_leaf=is_leaf)[1]


def insert(tree: Any, path: str | Path, subtree: Any, /, *, is_leaf: IsLeaf = None) -> Any:
    """Returns a new tree with the subtree at path replaced by subtree.

    The replacement must have the same leaves (by path), each with the same
    shape and dtype, as the subtree it replaces; its container types may
    differ (a dict can replace a FrozenDict): the result keeps tree's treedef.
    The input is not modified; use the return value.

    Args:
      tree: any pytree.
      path: where to insert; `''` replaces the whole tree.
      subtree: the replacement.
      is_leaf: as in `jax.tree_util`.

    Returns:
      A new tree with exactly tree's structure.

    Raises:
      PathNotFoundError: path does not exist in tree.
      MismatchError: listing every leaf whose presence, shape or dtype differs.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> t = {'enc': {'w': np.zeros(2)}, 'dec': {'w': np.zeros(2)}}
      >>> tg.insert(t, 'dec', {'w': np.ones(2)})['dec']['w']
      array([1., 1.])
    """
    p = parse_path(path)
    prefix, _ = resolve(tree, p, is_leaf=is_leaf)
    paths, leaves, treedef = flatten_parts(tree, is_leaf=is_leaf)
    new_paths, new_leaves, _ = flatten_parts(subtree, is_leaf=is_leaf)
    new_by_suffix = dict(zip(new_paths, new_leaves, strict=True))
    n = len(prefix)
    out = list(leaves)
    problems: list[str] = []
    used: set[tuple[Part, ...]] = set()
    for i, parts in enumerate(paths):
        if parts[:n] != prefix or tuple(map(type, parts[:n])) != tuple(map(type, prefix)):
            continue
        suffix = parts[n:]
        if suffix not in new_by_suffix:
            problems.append(f"  {render_parts(parts)!r}: in the tree, missing from the subtree")
            continue
        used.add(suffix)
        new = new_by_suffix[suffix]
        old_spec, new_spec = _leaves.spec_of(leaves[i]), _leaves.spec_of(new)
        why = _leaves.mismatch(old_spec, new_spec)
        if why is not None:
            problems.append(
                f"  {render_parts(parts)!r}: {why} differs: in the tree "
                f"{_leaves.describe(old_spec)}, in the subtree {_leaves.describe(new_spec)}"
            )
        out[i] = new
    for suffix in new_by_suffix:
        if suffix not in used:
            problems.append(
                f"  {render_parts(prefix + suffix)!r}: in the subtree, not a leaf of the tree"
            )
    if problems:
        raise MismatchError(
            f"cannot insert at {str(p)!r}: the subtree differs from the one it replaces "
            f"({len(problems)} problem(s)):\n" + "\n".join(problems),
            problems=problems,
        )
    return treedef.unflatten(out)

