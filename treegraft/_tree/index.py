"""A flattened tree with the look-ups a plan needs: by path, by prefix, loosely.

Built once per tree; every look-up is a dict access, so resolving a mapping
costs a small constant per leaf.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import operator
import sys
from typing import Any

import jax

from treegraft._errors import Names, PathNotFoundError
from treegraft._parse.keys import could_loosen, loose
from treegraft._parse.paths import Part, Path, is_index, render_parts, render_pattern
from treegraft._tree.flat import flatten_index
from treegraft._tree.leaves import check_not_traced
from treegraft._tree.pytree import children, walk_path

__all__ = ["TreeIndex", "is_abstract", "is_deleted"]

Parts = tuple[Part, ...]


class TreeIndex:
    """The leaves of a pytree by path, with lazy indexes built on first use.

    Attributes:
      root: the pytree itself.
      what: how messages name it ("the state", "the source").
      paths: each leaf's parts, in leaf order.
      leaves: the leaves, in the same order.
      treedef: the tree's structure.
      plain: whether every node is a dict with str keys, a list, a tuple or
        None: then another tree with the same treedef has the same paths.
    """

    def __init__(self, root: Any, what: str):
        self.root = root
        self.what = what
        self.paths, self.leaves, self.treedef, self.plain, str_only = flatten_index(root)
        check_not_traced(self.leaves, self.paths, what)
        self._index: dict[Parts, int] | None = None
        self._all_str = bool(str_only)  # every part a str: an equal path has the same types
        self._str_known = str_only is not None  # whether _all_str has been found
        self._sorted: bool | None = None  # `sorted_str`, once asked
        self._loose: dict[Parts, int] | None = None
        self._groups: dict[int, dict[Parts, list[int]]] = {}
        self._loose_groups: dict[int, dict[Parts, list[int]]] = {}
        self._at_groups: dict[tuple[int, int], dict[Parts, list[int]]] = {}
        self._node_names: dict[bool, Names] = {}
        self._missing: dict[Parts, str] = {}  # why each path looked up and absent is

    def __len__(self) -> int:
        return len(self.paths)

    def bare(self) -> TreeIndex:
        """This index without its tree and leaves: paths and look-up tables only.

        What a cache may keep: it holds no array alive. Its tables describe
        paths alone, so they stay true for every tree of the same paths.
        """
        out = copy.copy(self)
        out.root, out.leaves = None, []
        return out

    def holding(self, root: Any, leaves: list[Any]) -> TreeIndex:
        """The index of root, a tree of this index's paths (in order) whose leaves are leaves.

        The caller vouches for the paths (a plain tree of the same treedef).
        The look-up tables are shared: they are built from paths only.
        """
        out = copy.copy(self)
        out.root, out.leaves = root, leaves
        return out

    def find(self, parts: Parts) -> int | None:
        """The index of the leaf at parts (int keys also find '0'), or None.

        With flax NNX in use, a Variable's value is addressed by the
        Variable's own path: orbax saves an `nnx.State`'s Variable as a dict
        holding `value`, so `kernel` finds a lone `kernel.value` and the
        reverse.
        """
        index = self._index
        if index is not None and self._all_str:
            # The common case inline (a plan asks once per leaf): str paths
            # only, so an equal path has the same types.
            i = index.get(parts)
            if i is not None:
                return i
        i = self._find(parts)
        if i is not None or "flax.nnx" not in sys.modules:
            return i
        if parts and parts[-1] == "value":
            i = self._find(parts[:-1])
            return i if i is not None and len(self.under(parts[:-1])) == 1 else None
        i = self._find(parts + ("value",))
        return i if i is not None and len(self.under(parts)) == 1 else None

    def find_all(self, wanted: list[Parts]) -> list[int | None]:
        """`find` of each path, in order: one dict look-up each when paths hold str parts only.

        Example:
          >>> TreeIndex({'a': 1, 'b': {'c': 2}}, 'the tree').find_all([('b', 'c'), ('x',)])
          [1, None]
        """
        if self.str_only():
            if self._index is None:
                self._build_index()
            assert self._index is not None
            found = list(map(self._index.get, wanted))
            if None not in found:
                return found
        return [self.find(parts) for parts in wanted]

    def _find(self, parts: Parts) -> int | None:
        if self._index is None:
            self._build_index()
        assert self._index is not None
        i = self._index.get(parts)
        if i is not None and (self._all_str or _same_types(self.paths[i], parts)):
            return i
        if self._loose is None:
            table: dict[Parts, int] = {}
            for j, p in enumerate(self.paths):
                table.setdefault(loose(p), j)
            self._loose = table
        return self._loose.get(loose(parts))

    def under(self, prefix: Parts) -> list[int]:
        """Indices of the leaves whose path starts with prefix (int keys loose)."""
        k = len(prefix)
        if _all_str(prefix) and self.sorted_str():
            # Str parts in sorted order: the leaves under prefix are one range,
            # found by bisection with no table (loose look-ups find no more:
            # every part is a str already).
            paths = self.paths
            a = bisect.bisect_left(paths, prefix)
            b = bisect.bisect_right(paths, prefix, a, key=operator.itemgetter(slice(0, k)))
            return list(range(a, b))
        groups = self._groups.get(k)
        if groups is None:
            # Tables are published whole: indexes of equal paths share them
            # (`holding`), possibly across threads.
            groups = prefix_groups(self.paths, k)
            self._groups[k] = groups
        found = groups.get(prefix)
        if found is not None and (
            (self._str_only() and _all_str(prefix))
            or _same_types(self.paths[found[0]][:k], prefix)
        ):
            return found
        if found is None and not could_loosen(prefix):
            return []  # only an int or digits can match loosely: no need to index that way
        lgroups = self._loose_groups.get(k)
        if lgroups is None:
            lgroups = {}
            for key, members in groups.items():
                lgroups.setdefault(loose(key), []).extend(members)
            self._loose_groups[k] = lgroups
        return lgroups.get(loose(prefix), [])

    def _build_index(self) -> None:
        self._index = dict(zip(self.paths, range(len(self.paths)), strict=True))
        self._str_only()

    def sorted_str(self) -> bool:
        """Whether every part is a str and the paths come in sorted order.

        Then a prefix's leaves are one range of the paths. So it is for trees
        of dicts, whose keys jax sorts; a custom node may order its keys
        otherwise, so the order is looked at, not assumed.

        Example:
          >>> TreeIndex({'b': {'y': 1, 'x': 2}, 'a': 3}, 't').sorted_str()
          True
          >>> TreeIndex({'a': [1, 2]}, 't').sorted_str()
          False
        """
        if self._sorted is None:
            paths = self.paths
            self._sorted = self.str_only() and all(
                map(operator.lt, paths, itertools.islice(paths, 1, None))
            )
        return self._sorted

    def str_only(self) -> bool:
        """Whether every part of every path is a str (then equal paths have equal types)."""
        return self._str_only()

    def _str_only(self) -> bool:
        """Whether every part of every path is a str (then equal paths have equal types)."""
        if not self._str_known:
            # Without the path table: a plan may never look a target leaf up by path.
            self._all_str = set(map(type, itertools.chain.from_iterable(self.paths))) <= {str}
            self._str_known = True
        return self._all_str

    def node_exists(self, parts: Parts) -> bool:
        """Whether parts names a node: a leaf, a subtree, or an empty node."""
        if self.under(parts):
            return True
        try:
            walk_path(self.root, Path(parts), what=self.what_at(parts))
        except PathNotFoundError as e:
            # Kept for why_missing: walking a node of many keys again costs as much.
            self._missing[parts] = str(e)
            return False
        return True

    def why_missing(self, parts: Parts) -> str:
        """A message saying where a path stops existing, with close names."""
        known = self._missing.get(parts)
        if known is not None:
            return known
        try:
            _, node = walk_path(self.root, Path(parts), what=self.what_at(parts))
        except PathNotFoundError as e:
            return self._missing.setdefault(parts, str(e))
        where = repr(render_parts(parts)) if parts else "the root"
        return f"{where} is {_what_node(node)} in {self.what_at(parts)}"

    def what_at(self, parts: Parts) -> str:
        """How messages name the tree a path is in: `what` (several sources name each one)."""
        return self.what

    def names_near(self, text: str) -> Names:
        """The node names a mistyped path or pattern is compared with: all of them here."""
        return self.node_names(patterns="*" in text)

    def node_paths(self) -> list[Parts]:
        """Every node's path, empty nodes and None included (a full walk)."""
        out: list[Parts] = []
        stack: list[tuple[Parts, Any]] = [((), self.root)]
        while stack:
            parts, node = stack.pop()
            out.append(parts)
            kids = children(node)
            if kids:
                stack.extend((parts + (k,), c) for k, c in reversed(kids))
        return out

    def node_names(self, *, patterns: bool = False) -> Names:
        """Every node's path rendered, indexed for did-you-mean; built once per tree.

        With `patterns`, each index is a `*` (`layers.*.mlp`): a mistyped
        pattern is answered with a pattern, not with one of its instances.
        Those come from the leaves' paths (a pattern names leaves), so a tree
        of 48 layers of 128 experts is one short list, made without a walk.
        """
        names = self._node_names.get(patterns)
        if names is None:
            if patterns:
                kinds = {tuple(map(_as_index, p)) for p in self.paths}
                prefixes = {k[:n] for k in kinds for n in range(len(k) + 1)}
                rendered = {render_pattern(p) for p in prefixes}
            else:
                rendered = {render_parts(p) for p in self.node_paths()}
            names = self._node_names[patterns] = Names(sorted(rendered))
        return names

    def under_at(self, n: int, head: Parts) -> list[int]:
        """Indices of the leaves whose parts after the first n start with head (loosely)."""
        key = (n, len(head))
        groups = self._at_groups.get(key)
        if groups is None:
            groups = {}
            k = len(head)
            for i, p in enumerate(self.paths):
                if len(p) >= n + k:
                    groups.setdefault(loose(p[n : n + k]), []).append(i)
            self._at_groups[key] = groups
        return groups.get(loose(head), [])


def prefix_groups(paths: list[Parts], k: int) -> dict[Parts, list[int]]:
    """{first k parts: indices of the paths of at least k parts starting so}, in order.

    The leaves under one node are neighbours in leaf order, so each group is
    one run of equal prefixes: found by comparing neighbours, with no Python
    step per path. Paths where that does not hold (a prefix in two runs) are
    grouped one by one.

    Example:
      >>> prefix_groups([('a', 'x'), ('a', 'y'), ('b',), ('c', 'z')], 1)
      {('a',): [0, 1], ('b',): [2], ('c',): [3]}
      >>> prefix_groups([('a', 'x'), ('a', 'y'), ('b',), ('c', 'z')], 2)
      {('a', 'x'): [0], ('a', 'y'): [1], ('c', 'z'): [3]}
    """
    n = len(paths)
    if not n:
        return {}
    heads = list(map(operator.itemgetter(slice(0, k)), paths))
    starts = [0, *itertools.compress(range(1, n), map(operator.ne, heads[1:], heads[:-1]))]
    groups: dict[Parts, list[int]] = {}
    runs = 0
    for a, b in zip(starts, [*starts[1:], n], strict=True):
        head = heads[a]
        if len(head) == k:  # shorter paths (a leaf above depth k) are in no group
            groups[head] = list(range(a, b))
            runs += 1
    if len(groups) == runs:
        return groups
    # A prefix in two runs: equal parts of distinct nodes (1 and True), or
    # paths not in leaf order. Grouped one path at a time, as they come.
    groups = {}
    for i, p in enumerate(paths):
        if len(p) >= k:
            groups.setdefault(p[:k], []).append(i)
    return groups


def _as_index(part: Part) -> Part:
    """0 for every index (an int, or a str of digits as orbax saves them), else part."""
    return 0 if is_index(part) else part


def _all_str(parts: Parts) -> bool:
    for p in parts:
        if type(p) is not str:
            return False
    return True

def _what_node(node: Any) -> str:
    """Says what a node that holds no leaf is: 'None', 'an empty dict', ..."""
    if node is None:
        return "None"
    kids = children(node)
    name = type(node).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if kids is None:
        return f"a leaf ({name})"
    if not kids:
        return f"an empty {name}"
    return f"{article} {name} with no leaves"


def _same_types(a: Parts, b: Parts) -> bool:
    # A dict lookup treats 1 and True alike; paths must not.
    return tuple(map(type, a)) == tuple(map(type, b))


def is_abstract(leaf: Any) -> bool:
    """Whether a leaf is a shape-only placeholder (no values)."""
    return isinstance(leaf, jax.ShapeDtypeStruct)


def is_deleted(leaf: Any) -> bool:
    """Whether a leaf is a jax array whose buffer is gone (deleted, or donated to a jit)."""
    cls = type(leaf)
    concrete = _CONCRETE_ARRAY.get(cls)
    if concrete is None:
        # Asked once per leaf type: `isinstance` against jax.Array's ABC is what a
        # check of every source leaf would otherwise spend its time on.
        concrete = _CONCRETE_ARRAY[cls] = issubclass(cls, jax.Array) and not issubclass(
            cls, jax.core.Tracer
        )
    return concrete and leaf.is_deleted()


_CONCRETE_ARRAY: dict[type, bool] = {}
