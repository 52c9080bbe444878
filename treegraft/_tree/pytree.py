"""Pure tree operations: flatten to paths, extract a subtree, insert one.

Flattening lives in `treegraft._tree.flat` and a node's children in
`treegraft._tree.nodes`; their public names are re-exported here. Every
function here returns new trees; none modifies its input.
"""

from __future__ import annotations

from typing import Any

from treegraft._errors import GraftError, PathNotFoundError, Problem, suggest
from treegraft._parse.paths import Part, Path, parse_path, render_parts
from treegraft._tree import leaves as _leaves
from treegraft._tree.flat import flatten as flatten
from treegraft._tree.flat import flatten_parts as flatten_parts
from treegraft._tree.nodes import _MAX_LISTED, IsLeaf, find_child
from treegraft._tree.nodes import children as children

__all__ = ["flatten", "extract", "insert", "flatten_parts", "children", "walk_path"]


_NO_NODE = object()


def walk_path(
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
    return walk_path(tree, parse_path(path), is_leaf=is_leaf)[1]


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
    prefix, _ = walk_path(tree, p, is_leaf=is_leaf)
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

