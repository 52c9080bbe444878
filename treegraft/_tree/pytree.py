"""Pure tree operations: flatten to paths, extract a subtree, insert one.

Every function here returns new trees; none modifies its input.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jax import tree_util

from treegraft._errors import GraftError, PathNotFoundError, Problem, TreeError, suggest
from treegraft._parse.paths import Part, Path, key_to_part, parse_path, render_parts
from treegraft._tree import leaves as _leaves
from treegraft._tree import nnx as _nnx

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
        leaves, treedef = _jax_flatten(tree_util.tree_flatten, tree, None)
        walked = _walk_paths(tree, len(leaves))
        if walked is not None:
            paths, seen = walked
            if len(seen) == len(leaves) and all(map(operator.is_, seen, leaves)):
                return paths, leaves, treedef
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
    return paths, leaves, treedef


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
            kids = None if t in _NODE_TYPES else _generic_children(node, t, prefix)
            if kids is None and t not in _NODE_TYPES:
                add(prefix)
                keep(node)
                return
            if kids is None:
                kids = children(node, where=prefix) or []
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
            if type(key) is str and key == str(part):
                return key, child
    return None


_NO_NODE = object()


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
        kids = children(node, is_leaf=is_leaf, where=used)
        if kids is None:
            here = repr(render_parts(used)) if used else "the root"
            raise PathNotFoundError(
                f"path {str(path)!r} not found in {what}: {here} is a leaf "
                f"({_leaves.describe(_leaves.spec_of(node))}), it has no key {part!r}"
            )
        found = find_child(kids, part)
        if found is None:
            raise PathNotFoundError(
                not_found_message(path, used, part, [k for k, _ in kids], what, node=node)
            )
        key, node = found
        used.append(key)
    return tuple(used), node


def not_found_message(
    path: Path,
    found: list[Part] | tuple[Part, ...],
    part: Part,
    keys: list[Part],
    what: str,
    *,
    node: Any = _NO_NODE,
) -> str:
    """The message for a missing key: where it stopped, the keys there, close names.

    `node`, when given, is the node where the walk stopped: an empty one is
    named for what it is (None, an empty dict).
    """
    here = render_parts(found)
    where = f"{here!r}" if here else "the root"
    # Keys are compared as text but shown as keys, so that 0 and '0' differ.
    names = {str(k): k for k in keys}
    listed = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    if len(keys) > _MAX_LISTED:
        listed += f", ... ({len(keys)} keys)"
    if not keys:
        if node is None:
            empty = "None"
        elif node is _NO_NODE:
            empty = "empty"
        else:
            empty = f"an empty {type(node).__name__}"
        return f"path {str(path)!r} not found in {what}: {where} is {empty}, it has no key {part!r}"
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
    problems: list[Problem] = []

    def problem(parts: tuple[Part, ...], what: str) -> None:
        problems.append(Problem("insert", f"{render_parts(parts)!r}: {what}", target=Path(parts)))

    used: set[tuple[Part, ...]] = set()
    for i, parts in enumerate(paths):
        if parts[:n] != prefix or tuple(map(type, parts[:n])) != tuple(map(type, prefix)):
            continue
        suffix = parts[n:]
        if suffix not in new_by_suffix:
            problem(parts, "in the tree, missing from the subtree")
            continue
        used.add(suffix)
        new = new_by_suffix[suffix]
        tree_spec, sub_spec = _leaves.spec_of(leaves[i]), _leaves.spec_of(new)
        why = _leaves.mismatch(tree_spec, sub_spec)
        if why is not None:
            problem(
                parts,
                f"{why} differs: in the tree {_leaves.describe(tree_spec)}, "
                f"in the subtree {_leaves.describe(sub_spec)}",
            )
        out[i] = new
    for suffix in new_by_suffix:
        if suffix not in used:
            problem(prefix + suffix, "in the subtree, not a leaf of the tree")
    if problems:
        raise GraftError.from_problems(
            problems,
            header=f"cannot insert at {str(p)!r}: the subtree differs from the one it replaces "
            f"({len(problems)} problem(s)):",
        )
    return treedef.unflatten(out)

