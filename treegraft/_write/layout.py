"""The layout a convert writes when no `like` is given: derived from the mapping alone.

docs/design.md section 15: every target leaf a rule produces, named by the
rule's new side with its captures bound from the source leaves it matches; an
`unstack` makes one leaf per index of the source axis, a `stack` one leaf per
group of layers; shapes and dtypes come from the plan's spec arithmetic
(`treegraft._plan.specs.output_spec`). The result is an abstract tree of
`jax.ShapeDtypeStruct`s that the normal plan then checks as a graft target.
Where two rules produce one leaf, the more specific wins as in the plan
(longest matched prefix, then more literal segments); a tie is left to the
plan, which reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import MappingError, MismatchError
from treegraft._parse.paths import Part, render_parts
from treegraft._parse.rules import Rule
from treegraft._plan.context import as_index
from treegraft._plan.specs import output_spec
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import TreeIndex

__all__ = ["derive_like", "abstract_of", "is_identity"]

Parts = tuple[Part, ...]


def abstract_of(leaf: Any) -> jax.ShapeDtypeStruct:
    """A leaf's shape and dtype as a `jax.ShapeDtypeStruct` (a Python scalar as a 0-d array)."""
    shape, dtype = _leaves.spec_of(leaf)
    if shape is None or isinstance(dtype, type):
        value = np.asarray(leaf)
        return jax.ShapeDtypeStruct(value.shape, value.dtype)
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def is_identity(rules: Sequence[Rule]) -> bool:
    """Whether the mapping copies the whole source as it is (`{"": ""}`, what `save` uses)."""
    return (
        len(rules) == 1
        and rules[0].gather == "copy"
        and not rules[0].steps
        and rules[0].old is not None
        and rules[0].new.text == ""
        and rules[0].old.text == ""
    )


def derive_like(rules: Sequence[Rule], source: TreeIndex) -> Any:
    """The abstract target tree the rules make of the source's leaves.

    Raises:
      MappingError: a keep rule (nothing to keep without `like`), or the
        rules produce no leaf at all.
      MismatchError: a rule cannot make its leaf (an operation that does not
        fit the source's shape), naming both.
    """
    keeps = [rule for rule in rules if rule.old is None]
    if keeps:
        names = ", ".join(repr(rule.new.text) for rule in keeps)
        raise MappingError(
            f"the keep rule(s) {names} keep a value of `like`, and no `like` was given: "
            "remove them, or pass like= (the tree whose values they keep)"
        )
    # target parts -> (rank, rule index, spec)
    found: dict[Parts, tuple[tuple[int, int], int, Any]] = {}
    problems: list[str] = []
    for r, rule in enumerate(rules):
        for parts, rank, spec in _produced(rule, source, problems):
            old = found.get(parts)
            if old is None or rank > old[0]:
                found[parts] = (rank, r, spec)
    if problems:
        raise MismatchError("; ".join(problems))
    if not found:
        raise MappingError(
            "the mapping produces no leaf from this source: no rule's source side matches "
            "a source path (look at the source's paths with tg.flatten, or pass like=)"
        )
    return _nest({parts: jax.ShapeDtypeStruct(*spec) for parts, (_, _, spec) in found.items()})


def _produced(rule: Rule, source: TreeIndex, problems: list[str]) -> list[tuple[Parts, Any, Any]]:
    """(target parts, rank, (shape, dtype)) of every leaf one rule makes of the source."""
    assert rule.old is not None
    rank_base = rule.new.literal_count
    match = rule.old.prefix_matcher()
    out: list[tuple[Parts, Any, Any]] = []
    groups: dict[Parts, list[tuple[int, int]]] = {}  # stack: target -> [(layer, source leaf)]
    for si, parts in enumerate(source.paths):
        hit = match(tuple(parts))
        if hit is None:
            continue
        n, caps = hit
        suffix = tuple(parts[n:])
        spec = _spec(source.leaves[si])
        if rule.gather == "stack":
            layer = as_index(caps[-1])
            if layer is None:
                continue  # not a layer: the plan reports what it does not stack
            prefix = rule.new.substitute_parts(caps[:-1])
            groups.setdefault(prefix + suffix, []).append((layer, si))
            continue
        if rule.gather == "unstack":
            shape = spec[0] or ()
            axis = rule.axis + len(shape) if rule.axis < 0 else rule.axis
            count = shape[axis] if 0 <= axis < len(shape) else 0
            for index in range(count):
                prefix = rule.new.substitute_parts(tuple(caps) + (index,))
                made = _made(rule, spec, 0, index, parts, problems)
                if made is not None:
                    out.append((prefix + suffix, (len(prefix), rank_base), made))
            if not count:
                problems.append(
                    f"rule {rule}: the source leaf {render_parts(parts)!r} "
                    f"({_leaves.describe(spec)}) has no axis {rule.axis} to unstack"
                )
            continue
        prefix = rule.new.substitute_parts(caps)
        made = _made(rule, spec, 0, None, parts, problems)
        if made is not None:
            out.append((prefix + suffix, (len(prefix), rank_base), made))
    for target, layers in groups.items():
        layers.sort()
        first = layers[0][1]
        made = _made(rule, _spec(source.leaves[first]), len(layers), None,
                     source.paths[first], problems)
        if made is not None:
            out.append((target, (len(target), rank_base), made))
    return out


def _spec(leaf: Any) -> Any:
    sds = abstract_of(leaf)
    return tuple(sds.shape), sds.dtype


def _made(rule: Rule, spec: Any, count: int, index: int | None, parts: Parts,
          problems: list[str]) -> Any:
    made, why = output_spec(rule, spec, count, index)
    if made is None:
        problems.append(f"rule {rule} cannot make a leaf of {render_parts(parts)!r}: {why}")
    return made


def _nest(flat: dict[Parts, Any]) -> Any:
    """A nested tree of the leaves at these paths: dicts, and lists where keys are 0..n-1."""
    root: dict[Part, Any] = {}
    for parts, leaf in flat.items():
        if not parts:
            return leaf  # the whole tree is one leaf
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MappingError(
                    f"the mapping makes both a leaf and a subtree at {render_parts(parts)!r}"
                )
            node = child
        if parts[-1] in node:
            raise MappingError(
                f"the mapping makes both a leaf and a subtree at {render_parts(parts)!r}"
            )
        node[parts[-1]] = leaf
    return _containers(root)


def _containers(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    children = {key: _containers(value) for key, value in node.items()}
    keys = list(children)
    if keys and all(isinstance(k, int) and not isinstance(k, bool) for k in keys) and sorted(
        keys
    ) == list(range(len(keys))):
        return [children[k] for k in range(len(keys))]
    if any(not isinstance(k, str) for k in keys):
        return {str(k): v for k, v in children.items()}
    return children
