"""Plans of in-memory grafts, kept per structure: a weight sync plans once.

An RL trainer copies its parameters into a sampler's every few steps: the
same two structures, shapes, dtypes and shardings each time, only the values
differ. What `plan` finds depends on those alone (and on the mapping and
options), so its result is kept, without a single leaf (a cache must never
hold arrays alive), and the next call with equal inputs rebinds it to the new
leaves: no parse, no index, no resolve, no check.

The key holds everything a plan reads, so a kept plan is never stale:
- both trees' treedefs, for plain trees only (dicts with str keys, lists,
  tuples, None): there the treedef fixes every path (`flatten_plain`);
- per leaf, its type and what the checks read: a jax array's aval (shape,
  dtype, weak type) and sharding, a numpy array's shape and dtype, a Python
  scalar's value (it must fit its target by value, docs/design.md section 4);
  any other leaf (a tracer, a custom leaf) is not kept;
- the mapping (str keys, str or None values), the ignore patterns, the
  options, and whether flax.nnx is loaded (it changes how a path is found).

Deleted source arrays are the one thing a key cannot see: a kept plan is
used only when none of the leaves it reads is deleted; otherwise `plan`
runs in full and reports them as always.
"""

from __future__ import annotations

import operator
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from treegraft._parse.rules import Rule
from treegraft._plan.problems import Problem
from treegraft._plan.record import Pair
from treegraft._tree.index import TreeIndex
from treegraft._tree.leaves import array_type

__all__ = ["Kept", "tree_key", "options_key", "lookup", "keep"]

_SIZE = 8  # structures kept; the least recently used goes first
# Leaves (state and source) kept in all: the indexes of a kept plan stay in
# memory, and a big one slows the garbage collector for every later call (a
# 200,000-leaf plan kept made an unrelated failing plan 20 % slower). A weight
# sync of tens of thousands of leaves fits; a plan larger than this is not kept.
_MAX_LEAVES = 100_000
_lock = threading.Lock()
_kept: OrderedDict[Any, Kept] = OrderedDict()

_SCALARS = (bool, int, float, complex)
_aval = operator.attrgetter("aval")
_sharding = operator.attrgetter("sharding")


class Kept(NamedTuple):
    """A plan without its trees: what rebinds to new leaves of the same structure."""

    rules: tuple[Rule, ...]
    target: TreeIndex  # bare (`TreeIndex.bare`): paths and tables, no leaves
    source: TreeIndex
    pairs: tuple[Pair, ...]
    report: tuple[Problem, ...]


def tree_key(tree: Any) -> tuple[list[Any], Any] | None:
    """(the tree's leaves, its part of a cache key), or None when it cannot be keyed.

    jax's flatten in C, then two attribute reads per jax array (as flat
    tuples: a tuple per leaf cost 4x more); other leaves one by one.
    """
    try:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
    except Exception:  # noqa: BLE001 (a tree jax cannot flatten: plan says why)
        return None
    types = set(map(type, leaves))
    if types <= {array_type()}:
        return leaves, (treedef, tuple(map(_aval, leaves)), tuple(map(_sharding, leaves)))
    specs = tuple(map(_leaf_key, leaves))
    if None in specs:
        return None
    return leaves, (treedef, specs)


def _leaf_key(x: Any) -> Any:
    t = type(x)
    if t is array_type():
        return (t, x.aval, x.sharding)
    if t is np.ndarray:
        return (t, x.shape, x.dtype)
    if t in _SCALARS:
        return (t, x)
    if t is jax.ShapeDtypeStruct:
        return (t, x.shape, x.dtype, x.weak_type, x.sharding)
    return None


def options_key(
    mapping: Any,
    ignore_model: Any,
    ignore_restored: Any,
    *,
    strict: bool,
    cast: Any,
    check_ignores: bool,
) -> Any:
    """The mapping and options as a key, or None when they are not plain strings."""
    if type(mapping) is not dict:
        return None
    items = tuple(mapping.items())
    for new, old in items:
        if type(new) is not str or not (old is None or type(old) is str):
            return None
    ignores = []
    for patterns in (ignore_model, ignore_restored):
        if type(patterns) is str:
            patterns = (patterns,)
        if not isinstance(patterns, list | tuple) or any(type(p) is not str for p in patterns):
            return None
        ignores.append(tuple(patterns))
    if type(cast) not in (bool, str) or type(strict) is not bool:
        return None
    return (items, *ignores, strict, cast, bool(check_ignores), "flax.nnx" in sys.modules)


def lookup(key: Any) -> Kept | None:
    """The plan kept under key, if any."""
    with _lock:
        found = _kept.get(key)
        if found is not None:
            _kept.move_to_end(key)
        return found


def keep(
    key: Any,
    *,
    rules: Sequence[Rule],
    target: TreeIndex,
    source: TreeIndex,
    pairs: Sequence[Pair],
    report: Sequence[Problem],
) -> None:
    """Keeps a plan of plain trees under key (without their leaves)."""
    if not (target.plain and source.plain):
        return
    size = len(target.paths) + len(source.paths)
    if size > _MAX_LEAVES:
        return
    kept = Kept(tuple(rules), target.bare(), source.bare(), tuple(pairs), tuple(report))
    with _lock:
        _kept[key] = kept
        _kept.move_to_end(key)
        while len(_kept) > _SIZE or _kept_leaves() > _MAX_LEAVES:
            _kept.popitem(last=False)


def _kept_leaves() -> int:
    return sum(len(k.target.paths) + len(k.source.paths) for k in _kept.values())


def clear() -> None:
    """Forgets every kept plan."""
    with _lock:
        _kept.clear()
