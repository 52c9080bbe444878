"""The target leaves a mapping produces from a source index, with their shapes and dtypes.

docs/design.md section 15: without `like`, the layout is every leaf a rule
produces. Each rule's source references are matched against the source
(`source_prefixes`, as the plan finds a glob rule's source instances); a
match's captures, less a stack's stacked ones (`Inputs.carried`) and plus an
unstack's index for each position of the source axis, name the target. The
candidates are then resolved by the plan's own `resolve`: the most specific
rule wins each leaf (a leaf its winner does not produce is dropped), and each
pair's spec is the plan's spec arithmetic over the rule's tree (`tree_spec`).
A tie is left to the plan, which reports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from treegraft._errors import GraftError, MappingError, Problem
from treegraft._parse.keys import loose
from treegraft._parse.ops import Node
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._parse.rules import Rule
from treegraft._plan.checks import check_missing, check_stacks
from treegraft._plan.context import Inputs, source_prefixes
from treegraft._plan.problems import raise_problems
from treegraft._plan.resolution import Resolution
from treegraft._plan.resolve import resolve
from treegraft._plan.specs import pair_inputs, tree_spec
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import TreeIndex

__all__ = ["produced_leaves", "leaf_spec", "nest"]

Parts = tuple[Part, ...]
_PLACEHOLDER = np.zeros((), np.float32)  # a candidate's leaf: only its path counts
# Without like there is no value to keep: the plan's remedy (map it to None) does not apply.
_MADE_REMEDY = ("a rule produces this leaf but the source lacks what makes it: give the "
                "source that value, narrow the rule's pattern, or pass like=")


def produced_leaves(rules: Sequence[Rule], source: TreeIndex) -> dict[Parts, Any]:
    """Every target leaf the rules make of the source: its path and its (shape, dtype).

    Args:
      rules: the parsed mapping, without keep rules (they make nothing).
      source: the source's index (metadata leaves are enough).

    Returns:
      {target parts: (shape, dtype)}, in the order a plan lists its target.

    Raises:
      GraftError: listing every leaf a winning rule produces but cannot make
        (a stack that is no full grid, a reference the source lacks, an
        operation that does not fit the source's shape or dtype), or a
        `MappingError` when two rules make a leaf and a subtree at one path.
    """
    # One Inputs throughout: its memos (stack members, stacked positions) depend
    # on the rules and the source only, so each layout resolved shares them.
    inputs = Inputs(tuple(rules), (), (), TreeIndex({}, "the layout"), source, False)
    made = _candidates(inputs)
    res = _resolved(inputs, made)
    makers: dict[Parts, set[int]] = {}  # int keys loose: the plan finds '0' with 0
    for parts, by in made.items():
        makers.setdefault(loose(parts), set()).update(by)
    paths = res.inputs.tgt.paths
    dropped = {loose(paths[u.target]) for u in res.unpaired
               if u.rule not in makers.get(loose(paths[u.target]), ())}
    if dropped:  # a more specific rule wins a leaf it does not make: the leaf is not made
        res = _resolved(inputs, {p: r for p, r in made.items() if loose(p) not in dropped})
    problems = check_stacks(res) + [
        dataclasses.replace(p, remedy=_MADE_REMEDY) for p in check_missing(res)]
    out: dict[Parts, Any] = {}
    for pair in res.pairs:
        spec = _pair_spec(res, pair, problems)
        if spec is not None:
            out[res.inputs.tgt.paths[pair.target]] = spec
    if problems:
        raise_problems(problems, len(inputs.rules))
    return out


def leaf_spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """A leaf's (shape, dtype) as an array holds it (a Python scalar as a 0-d array)."""
    shape, dtype = _leaves.spec_of(leaf)
    if shape is None or isinstance(dtype, type):
        value = np.asarray(leaf)
        return value.shape, value.dtype
    return tuple(shape), dtype


def _candidates(inputs: Inputs) -> dict[Parts, set[int]]:
    """Each target path some rule makes of the source, and the rules making it."""
    src = inputs.src
    made: dict[Parts, set[int]] = {}
    for r, rule in enumerate(inputs.rules):
        for j, ref in enumerate(rule.refs):
            for old_prefix, caps in source_prefixes(ref.pattern, src).items():
                if ref.levels:
                    caps = inputs.carried(r, caps, j)
                k = len(old_prefix)
                named: dict[int | None, Parts | None] = {}  # index -> new prefix, once each
                for si in src.under(old_prefix):
                    indices = _unstack_indices(rule, j, src.leaves[si]) if ref.unstack else [None]
                    for index in indices:
                        if index not in named:
                            named[index] = _new_prefix(rule, caps, index)
                        new = named[index]
                        if new is not None:
                            made.setdefault(new + src.paths[si][k:], set()).add(r)
    return made


def _new_prefix(rule: Rule, caps: tuple[Any, ...], index: int | None) -> Parts | None:
    """The new side with these captures (and an unstack's index); None if it cannot take them."""
    try:
        return rule.new.substitute_parts(caps if index is None else tuple(caps) + (index,))
    except GraftError:  # a capture the new side cannot take
        return None


def _unstack_indices(rule: Rule, ref: int, leaf: Any) -> range:
    """The indices an unstack takes of one source leaf: 0..N-1 along its axis, after its steps."""
    assert rule.tree is not None
    node = _unstack_of(rule.tree, ref)
    if node is None:
        return range(0)
    below = dataclasses.replace(rule, tree=node.children[0])
    specs: list[Any] = [None] * len(rule.refs)
    specs[ref] = _leaves.spec_of(leaf)
    shape = tree_spec(below, specs, [()] * len(rule.refs), None).spec
    if shape is None or shape[0] is None:
        return range(1)  # one leaf, so that the plan's check names why it cannot be made
    ndim = len(shape[0])
    axis = node.axis + ndim if node.axis < 0 else node.axis
    return range(shape[0][axis]) if 0 <= axis < ndim else range(1)


def _unstack_of(node: Node, ref: int) -> Node | None:
    """The unstack node over a reference's input, if any."""
    if node.kind == "unstack" and ref in node.inputs_below():
        return node
    for child in node.children:
        found = _unstack_of(child, ref)
        if found is not None:
            return found
    return None


def _resolved(inputs: Inputs, made: dict[Parts, Any]) -> Resolution:
    """The plan's resolution of the rules against a layout holding the made paths."""
    tree = nest(dict.fromkeys(made, _PLACEHOLDER))
    return resolve(dataclasses.replace(inputs, tgt=TreeIndex(tree, "the layout")))


def _pair_spec(res: Resolution, pair: Any, problems: list[Problem]) -> Any:
    """What a pair's rule makes of its source leaves, or None (a problem added)."""
    rule = res.inputs.rules[pair.rule]
    src = res.inputs.src
    if rule.tree is None or rule.tree.kind == "source":
        return leaf_spec(src.leaves[pair.source])
    refs = pair_inputs(pair)
    specs = [_leaves.spec_of(src.leaves[leaves[0]]) for _, leaves in refs]
    made = tree_spec(rule, specs, [grid for grid, _ in refs], pair.layer)
    if made.spec is not None:
        return made.spec
    target = res.inputs.tgt.paths[pair.target]
    problems.append(Problem(
        "dtype" if made.kind == "dtype" else "shape",
        f"{render_parts(target)!r}: the rule cannot make it of "
        f"{render_parts(src.paths[pair.source])!r} "
        f"({_leaves.describe(specs[0])}): {made.why} [rule {rule}]",
        target=Path(target), source=Path(src.paths[pair.source]), rule=str(rule),
    ))
    return None


def nest(flat: dict[Parts, Any]) -> Any:
    """A nested tree of the leaves at these paths: dicts, and lists where keys are 0..n-1.

    Raises:
      MappingError: a path is both a leaf and a subtree's root, or a node
        would hold both an int key and a string key of its digits.
    """
    if () in flat:
        if len(flat) > 1:
            raise _leaf_and_subtree(())
        return flat[()]  # the whole tree is one leaf
    root: dict[Part, Any] = {}
    for parts, leaf in flat.items():
        node = root
        for k, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _leaf_and_subtree(parts[: k + 1])
            node = child
        if parts[-1] in node:
            raise _leaf_and_subtree(parts)
        node[parts[-1]] = leaf
    return _containers(root, ())


def _leaf_and_subtree(parts: Parts) -> MappingError:
    return MappingError(
        f"the mapping makes both a leaf and a subtree at {render_parts(parts) or '(the root)'!r}: "
        "change one rule's new side, or pass like="
    )


def _containers(node: Any, at: Parts) -> Any:
    if not isinstance(node, dict):
        return node
    children = {key: _containers(value, at + (key,)) for key, value in node.items()}
    keys = list(children)
    if keys and all(type(k) is int for k in keys) and sorted(keys) == list(range(len(keys))):
        return [children[k] for k in range(len(keys))]
    if all(isinstance(k, str) for k in keys):
        return children
    named = {str(k): v for k, v in children.items()}
    if len(named) != len(children):
        raise MappingError(
            f"the mapping makes, under {render_parts(at) or '(the root)'!r}, both an int key "
            "and a string key of its digits: make the rules' new sides spell them alike"
        )
    return named
