"""Undoing one rule value: its tree of operations, inverted down to each source reference.

The step part of `tg.invert` (docs/design.md section 15; the mapping part,
rules, captures and partitions, is `treegraft._write.invert`). A rule's value
is a tree (operations nest, docs/design.md section 16); `spec_tree` traces it
through the specs of `like`'s leaves (or leaves every spec None without
`like`), `ref_paths` lists the nodes from its root down to each source
reference, and `inverse_chain` turns those into the inverse steps, applied
in order to the result's leaf by `build`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft._parse.ops import (
    Cast,
    Concat,
    Offset,
    Operation,
    Pad,
    Reshape,
    Scale,
    Slice,
    Stack,
    StackList,
    Step,
    Take,
    Transpose,
    Unstack,
    cast,
    offset,
    reshape,
    scale,
    stack,
    take,
    transpose,
    unstack,
)
from treegraft._parse.ops import slice as slice_

__all__ = [
    "CannotInvert",
    "Spec",
    "axis_of",
    "build",
    "inverse_chain",
    "kids_of",
    "partial_why",
    "ref_paths",
    "spec_tree",
]

Spec = tuple[tuple[int, ...], np.dtype[Any]]


class CannotInvert(Exception):
    """Why one rule (or one leaf of it) has no inverse; becomes a Problem."""


# ----------------------------------------------------------------------------
# The inverse steps: what a reversed chain is made of.
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inv:
    """One step of an inverse chain: ("cast", dtype), ("transpose", axes),
    ("reshape", shape), ("stack", axis), ("unstack", axis), ("take", (index,
    axis)), ("slice", (start, stop, axis)), ("scale", factor) or ("offset", amount)."""

    kind: str
    arg: Any


@dataclass(frozen=True)
class _Traced:
    """A forward operation with the specs around it (None where `like` was not given).

    For a join (concat, stack of a list): `part`, which of its values the
    inverse is for, and `parts`, the specs of all its values.
    """

    node: Operation
    before: Spec | None
    after: Spec | None
    part: int = 0
    parts: tuple[Spec | None, ...] = ()


def _inverse_cast(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Cast)
    if t.before is None:
        raise CannotInvert(
            f"cast to {node.dtype} cannot be undone without the source's dtype; "
            "pass like= (the source's metadata)"
        )
    return _Inv("cast", t.before[1])


def _inverse_transpose(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Transpose)
    return _Inv("transpose", tuple(int(a) for a in np.argsort(_perm(node.axes))))


def _inverse_reshape(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Reshape)
    if t.before is None:
        raise CannotInvert(
            f"reshape to {node.shape} cannot be undone without the source's shape; "
            "pass like= (the source's metadata)"
        )
    return _Inv("reshape", t.before[0])


def _inverse_stack(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Stack)
    return _Inv("unstack", node.axis)


def _inverse_unstack(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Unstack)
    return _Inv("stack", node.axis)


def _inverse_stack_list(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, StackList)
    return _Inv("take", (t.part, node.axis))


def _inverse_concat(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Concat)
    if any(p is None for p in t.parts):
        raise CannotInvert(
            f"concat along axis {node.axis} cannot be split back without the size of each "
            "part; pass like= (the source's metadata)"
        )
    sizes = []
    for spec in t.parts:
        assert spec is not None
        sizes.append(spec[0][axis_of(node.axis, len(spec[0]))])
    if sizes[t.part] == 0:
        raise CannotInvert(
            f"value {t.part} of the concat is empty along axis {node.axis}: no slice gives "
            "back an empty part; leave it out of the concat"
        )
    start = sum(sizes[: t.part])
    return _Inv("slice", (start, start + sizes[t.part], node.axis))


def _inverse_pad(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Pad)
    if t.before is None:
        raise CannotInvert(
            f"pad to {node.size} along axis {node.axis} cannot be cut back without the "
            "size before it; pass like= (the source's metadata)"
        )
    n = t.before[0][axis_of(node.axis, len(t.before[0]))]
    if n == 0:
        raise CannotInvert(f"pad of an empty axis {node.axis}: there is nothing to cut back")
    return _Inv("slice", (0, n, node.axis))


def _inverse_scale(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Scale)
    if node.factor == 0:
        raise CannotInvert("scale by 0 loses every value: it cannot be undone")
    return _Inv("scale", 1.0 / node.factor)


def _inverse_offset(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Offset)
    return _Inv("offset", -node.amount)


# One entry per operation class: the inverse of one forward step, given the
# specs around it. `take` and `slice` have none: they keep part of an axis,
# and only rules that together cover the axis are undone (`_partitions`).
_INVERSES: dict[type[Operation], Callable[[_Traced], _Inv]] = {
    Cast: _inverse_cast,
    Transpose: _inverse_transpose,
    Reshape: _inverse_reshape,
    Stack: _inverse_stack,
    Unstack: _inverse_unstack,
    StackList: _inverse_stack_list,
    Concat: _inverse_concat,
    Pad: _inverse_pad,
    Scale: _inverse_scale,
    Offset: _inverse_offset,
}
# Steps that act on each value alone: they commute with a stack or unstack.
_ELEMENTWISE = ("cast", "scale", "offset")


def _perm(axes: Sequence[int]) -> tuple[int, ...]:
    """transpose axes with negative ones made positive (a permutation has len(axes) axes)."""
    n = len(axes)
    out = tuple(int(a) + n if -n <= a < 0 else int(a) for a in axes)
    if sorted(out) != list(range(n)):
        raise CannotInvert(f"transpose axes {tuple(axes)} are not a permutation")
    return out


# ----------------------------------------------------------------------------
# A rule's value as a tree, traced through specs.
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Specs:
    """A value's output spec (None without like) and its values' (`kids`).

    `n`: for a source reference, how many leaves its stack gathers.
    """

    out: Spec | None
    kids: tuple[_Specs, ...] = ()
    n: int | None = None


def kids_of(node: Any) -> tuple[Any, ...]:
    if isinstance(node, Concat | StackList):
        return tuple(node.values)
    if isinstance(node, Stack | Unstack):
        return (node.source,)
    if isinstance(node, Operation):
        return (node.value,)  # type: ignore[attr-defined]
    return ()


def _step_of(node: Operation) -> Step:
    if isinstance(node, Cast):
        return Step("cast", node.dtype)
    if isinstance(node, Transpose):
        return Step("transpose", node.axes)
    if isinstance(node, Reshape):
        return Step("reshape", node.shape)
    if isinstance(node, Take):
        return Step("take", (node.index, node.axis))
    if isinstance(node, Slice):
        return Step("slice", (node.start, node.stop, node.axis))
    if isinstance(node, Pad):
        return Step("pad", (node.size, node.axis, node.constant))
    if isinstance(node, Scale):
        return Step("scale", node.factor)
    assert isinstance(node, Offset)
    return Step("offset", node.amount)


def spec_tree(value: Any, refs: Iterator[tuple[Spec, int]] | None) -> _Specs:
    """The specs of value's nodes, from its source references' (in order), or all None."""
    if not isinstance(value, Operation):
        if refs is None:
            return _Specs(None)
        spec, n = next(refs)
        return _Specs(spec, (), n)
    kids = tuple(spec_tree(k, refs) for k in kids_of(value))
    if refs is None:
        return _Specs(None, kids)
    return _Specs(_forward_spec(value, kids), kids)


def _forward_spec(node: Operation, kids: tuple[_Specs, ...]) -> Spec:
    """The spec after node, from its values' specs."""
    first = kids[0].out
    assert first is not None
    shape, dtype = first
    if isinstance(node, Stack):
        leaf = kids[0]
        while leaf.kids:
            leaf = leaf.kids[0]
        assert leaf.n is not None
        axis = axis_of(node.axis, len(shape) + 1)
        return shape[:axis] + (leaf.n,) + shape[axis:], dtype
    if isinstance(node, Unstack):
        axis = axis_of(node.axis, len(shape))
        return shape[:axis] + shape[axis + 1 :], dtype
    if isinstance(node, StackList | Concat):
        specs = [k.out for k in kids]
        if isinstance(node, StackList):
            axis = axis_of(node.axis, len(shape) + 1)
            return shape[:axis] + (len(kids),) + shape[axis:], dtype
        axis = axis_of(node.axis, len(shape))
        total = sum(s[0][axis] for s in specs if s is not None and len(s[0]) == len(shape))
        return shape[:axis] + (total,) + shape[axis + 1 :], dtype
    after, why = _step_of(node).spec(first)
    if after is None:
        raise CannotInvert(why)
    return (tuple(after[0]), after[1])


def axis_of(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise CannotInvert(f"axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


# What undoing a rule down to one of its source references takes.
_Path = tuple[str, list[_Traced]]  # (the reference's text, its nodes, innermost first)


def ref_paths(value: Any, specs: _Specs, stop: Operation | None = None) -> list[_Path]:
    """Each source reference under value with the nodes above it, traced.

    Stops at the node `stop` (a partitioning take or slice), giving it as
    the reference (text "").
    """
    out: list[_Path] = []
    todo: list[tuple[Any, _Specs, list[_Traced]]] = [(value, specs, [])]
    while todo:
        node, s, above = todo.pop()
        if node is stop and stop is not None:
            out.append(("", above))
            continue
        if not isinstance(node, Operation):
            out.append((str(node), above))
            continue
        if type(node) not in _INVERSES:
            raise CannotInvert(partial_why(node))
        kids = kids_of(node)
        parts = tuple(k.out for k in s.kids)
        for j in reversed(range(len(kids))):
            t = _Traced(node, s.kids[j].out, s.out, j, parts)
            todo.append((kids[j], s.kids[j], [t, *above]))
    return out


def partial_why(node: Operation) -> str:
    kind = "take" if isinstance(node, Take) else "slice"
    return (
        f"{node.describe()} keeps only part of its axis: a {kind} drops data, so it has no "
        "inverse alone; it is undone only when other rules read the rest of that axis "
        f"({kind}s that partition it), with like= to know the axis' size"
    )


def _reversed_chain(traced: list[_Traced]) -> list[_Inv]:
    """The inverse steps, in the order they apply to the result's leaf."""
    return [_INVERSES[type(t.node)](t) for t in reversed(traced)]


def inverse_chain(traced: list[_Traced]) -> list[_Inv]:
    """The inverse steps of traced (innermost first), the gather moved first where it can be.

    Starting with the gather keeps a reshape to one layer's leaf (a reshape
    reads its whole input); the steps are otherwise applied in the natural,
    reversed order.
    """
    chain = _reversed_chain(traced)
    gathers = [k for k, step in enumerate(chain) if step.kind in ("stack", "unstack")]
    movable = ("transpose", "reshape", *_ELEMENTWISE)
    if gathers == [len(chain) - 1] and all(step.kind in movable for step in chain[:-1]):
        try:
            return _gather_first(chain, traced)
        except CannotInvert:
            pass  # e.g. a reshape that mixes the stacked axis: undo it on the whole
    return chain


# ----------------------------------------------------------------------------
# Moving the inverse gather to the front (when the forward one is on the path).
# ----------------------------------------------------------------------------


def _gather_first(chain: list[_Inv], traced: list[_Traced]) -> list[_Inv]:
    """The same function as chain, rewritten to start with its gather (if any).

    The gather is the chain's last step (the forward gather is innermost).
    Specs of the steps before it are those of `traced`, reversed.
    """
    if not chain or chain[-1].kind not in ("stack", "unstack"):
        return chain
    gather, steps = chain[-1], chain[:-1]
    # specs around each inverse step: inverse step k undoes traced[-1 - k]
    specs = [(traced[-1 - k].after, traced[-1 - k].before) for k in range(len(steps))]
    if gather.kind == "unstack":
        return _unstack_first(gather.arg, steps, specs)
    return _stack_first(gather.arg, steps, specs)


def _unstack_first(
    axis: int, steps: list[_Inv], specs: list[tuple[Spec | None, Spec | None]]
) -> list[_Inv]:
    """`take(s_k(...s_1(r)), i, axis)` as `s'_k(...s'_1(take(r, i, b)))`."""
    out: list[_Inv] = []
    b = axis
    for step, (before, after) in reversed(list(zip(steps, specs, strict=True))):
        ndim = _ndim(step, after)
        if ndim is not None:
            b = axis_of(b, ndim)
        elif b < 0:
            raise CannotInvert(f"unstack along axis {axis} needs like= to know the rank")
        if step.kind in _ELEMENTWISE:
            out.append(step)
        elif step.kind == "transpose":
            p = step.arg
            src = p[b]
            out.append(_Inv("transpose", tuple(a - (a > src) for j, a in enumerate(p) if j != b)))
            b = src
        else:  # reshape: the stacked axis must pass whole, in place
            assert before is not None and after is not None
            at = _same_axis(after[0], b, before[0])
            if at is None:
                raise CannotInvert(
                    f"the reshape {after[0]} -> {before[0]} mixes the stacked axis {b} with "
                    "others; a stack can be undone only through a reshape that keeps it whole"
                )
            out.append(_Inv("reshape", after[0][:b] + after[0][b + 1 :]))
            b = at
    out.reverse()
    return [_Inv("unstack", b)] + out


def _same_axis(shape: tuple[int, ...], axis: int, other: tuple[int, ...]) -> int | None:
    """The axis of other that holds shape's `axis` in row-major order, if one does."""
    head = math.prod(shape[:axis])
    for j in range(len(other)):
        if other[j] == shape[axis] and math.prod(other[:j]) == head:
            return j
    return None


def _stack_first(
    axis: int, steps: list[_Inv], specs: list[tuple[Spec | None, Spec | None]]
) -> list[_Inv]:
    """`stack([s_k(...s_1(r_i))], axis)` as `s'_k(...s'_1(stack([r_i], b)))`."""
    lifted: list[list[_Inv]] = []
    b = axis
    for step, (_before, after) in reversed(list(zip(steps, specs, strict=True))):
        ndim = _ndim(step, after)  # of the element after the step
        if ndim is not None:
            b = axis_of(b, ndim + 1)
        elif b < 0:
            raise CannotInvert(f"stack along axis {axis} needs like= to know the rank")
        if step.kind in _ELEMENTWISE:
            lifted.append([step])
        elif step.kind == "transpose":
            p = step.arg
            q = [b if j == b else p[j - (j > b)] + (p[j - (j > b)] >= b) for j in range(len(p) + 1)]
            lifted.append([_Inv("transpose", tuple(q))])
        else:  # reshape: done on the stack with the stacked axis first
            shape = step.arg
            if math.prod(shape) == 0:
                raise CannotInvert(f"a reshape to the empty shape {shape} cannot be stacked back")
            move = list(range(1, len(shape) + 1))
            move.insert(b, 0)
            todo = [_Inv("reshape", (-1,) + tuple(shape))]
            if b:
                todo.append(_Inv("transpose", tuple(move)))
            lifted.append(todo)
            b = 0
    # the element steps seen last here apply first
    out = [_Inv("stack", b)]
    for todo in reversed(lifted):
        out.extend(todo)
    return out


def _ndim(step: _Inv, after: Spec | None) -> int | None:
    if after is not None:
        return len(after[0])
    if step.kind == "transpose":
        return len(step.arg)
    if step.kind == "reshape":
        return len(step.arg)
    return None


def build(chain: list[_Inv], start: str | Operation) -> str | Operation:
    """The rule value applying chain, in order, to start (the result's leaves)."""
    value = start
    for step in chain:
        k, arg = step.kind, step.arg
        if k == "stack":
            value = stack(value, axis=arg)
        elif k == "unstack":
            value = unstack(value, axis=arg)
        elif k == "cast":
            value = cast(value, arg)
        elif k == "transpose":
            value = transpose(value, arg)
        elif k == "reshape":
            value = reshape(value, arg)
        elif k == "take":
            value = take(value, arg[0], axis=arg[1])
        elif k == "slice":
            value = slice_(value, arg[0], arg[1], axis=arg[2])
        elif k == "scale":
            value = scale(value, arg)
        else:
            value = offset(value, arg)
    return value
