"""Inverting a mapping: the rules that take a graft's result back (docs/design.md section 15).

`invert(m)` gives the mapping `m'` such that `graft(source_layout, result, m')`
puts back what `result = graft(like, source, m)` took from the source. Each
rule is inverted on its own, one inverse entry per source reference:

- its two sides swap, their captures with them (`{"a.l_*": "b.*"}` becomes
  `{"b.*": "a.l_*"}`: both sides have the same wildcards in the same order,
  so the captures line up either way);
- the rule's value is a tree (operations nest, docs/design.md section 16);
  the nodes from its root down to each source reference are undone in the
  reverse order, each replaced by its inverse (`_INVERSES`, one small
  function per operation class): a join (`concat`, a stack of a list) gives
  each of its values back by a `slice` or `take` of the result; `cast`,
  `reshape`, `pad` and `concat` need the specs before them, which only
  `like` (the original source's metadata) knows;
- when a chain's only gather is a `stack`/`unstack` on the path itself, the
  inverse gather is moved first (`_gather_first`) so that a reshape applies
  to one layer's leaf rather than to the whole stack (a reshape reads its
  whole input); where that cannot be done the natural order stands;
- a `take` or `slice` keeps part of an axis: alone it has no inverse; rules
  whose takes or slices of one value cover its axis exactly are undone
  together, by one `stack` of a list or `concat` of their parts in order
  (`_partitions`).

Keep rules (`{new: None}`) drop out. A rule whose inverse would be ambiguous
(two rules reading one source leaf) or impossible is a `MappingError` naming
it, every such rule listed at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft._errors import GraftError, MappingError, PathSyntaxError, Problem, count
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
    concat,
    offset,
    reshape,
    scale,
    stack,
    take,
    transpose,
    unstack,
)
from treegraft._parse.ops import slice as slice_
from treegraft._parse.paths import Part, Path
from treegraft._parse.patterns import Pattern
from treegraft._parse.rules import MappingLike, Rule, RuleValue, parse_mapping
from treegraft._parse.scan import scan
from treegraft._read.source import Source
from treegraft._tree.flat import flatten_parts
from treegraft._tree.leaves import spec_of

__all__ = ["invert", "invert_rules", "LikeLeaf"]

Parts = tuple[Part, ...]
# A leaf of `like` as inversion sees it: its path, shape and dtype.
LikeLeaf = tuple[Parts, tuple[int, ...], np.dtype[Any]]
Spec = tuple[tuple[int, ...], np.dtype[Any]]


class _CannotInvert(Exception):
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
        raise _CannotInvert(
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
        raise _CannotInvert(
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
        raise _CannotInvert(
            f"concat along axis {node.axis} cannot be split back without the size of each "
            "part; pass like= (the source's metadata)"
        )
    sizes = []
    for spec in t.parts:
        assert spec is not None
        sizes.append(spec[0][_axis(node.axis, len(spec[0]))])
    if sizes[t.part] == 0:
        raise _CannotInvert(
            f"value {t.part} of the concat is empty along axis {node.axis}: no slice gives "
            "back an empty part; leave it out of the concat"
        )
    start = sum(sizes[: t.part])
    return _Inv("slice", (start, start + sizes[t.part], node.axis))


def _inverse_pad(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Pad)
    if t.before is None:
        raise _CannotInvert(
            f"pad to {node.size} along axis {node.axis} cannot be cut back without the "
            "size before it; pass like= (the source's metadata)"
        )
    n = t.before[0][_axis(node.axis, len(t.before[0]))]
    if n == 0:
        raise _CannotInvert(f"pad of an empty axis {node.axis}: there is nothing to cut back")
    return _Inv("slice", (0, n, node.axis))


def _inverse_scale(t: _Traced) -> _Inv:
    node = t.node
    assert isinstance(node, Scale)
    if node.factor == 0:
        raise _CannotInvert("scale by 0 loses every value: it cannot be undone")
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
        raise _CannotInvert(f"transpose axes {tuple(axes)} are not a permutation")
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


def _kids(node: Any) -> tuple[Any, ...]:
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


def _spec_tree(value: Any, refs: Iterator[tuple[Spec, int]] | None) -> _Specs:
    """The specs of value's nodes, from its source references' (in order), or all None."""
    if not isinstance(value, Operation):
        if refs is None:
            return _Specs(None)
        spec, n = next(refs)
        return _Specs(spec, (), n)
    kids = tuple(_spec_tree(k, refs) for k in _kids(value))
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
        axis = _axis(node.axis, len(shape) + 1)
        return shape[:axis] + (leaf.n,) + shape[axis:], dtype
    if isinstance(node, Unstack):
        axis = _axis(node.axis, len(shape))
        return shape[:axis] + shape[axis + 1 :], dtype
    if isinstance(node, StackList | Concat):
        specs = [k.out for k in kids]
        if isinstance(node, StackList):
            axis = _axis(node.axis, len(shape) + 1)
            return shape[:axis] + (len(kids),) + shape[axis:], dtype
        axis = _axis(node.axis, len(shape))
        total = sum(s[0][axis] for s in specs if s is not None and len(s[0]) == len(shape))
        return shape[:axis] + (total,) + shape[axis + 1 :], dtype
    after, why = _step_of(node).spec(first)
    if after is None:
        raise _CannotInvert(why)
    return (tuple(after[0]), after[1])


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise _CannotInvert(f"axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


# What undoing a rule down to one of its source references takes.
_Path = tuple[str, list[_Traced]]  # (the reference's text, its nodes, innermost first)


def _ref_paths(value: Any, specs: _Specs, stop: Operation | None = None) -> list[_Path]:
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
            raise _CannotInvert(_partial_why(node))
        kids = _kids(node)
        parts = tuple(k.out for k in s.kids)
        for j in reversed(range(len(kids))):
            t = _Traced(node, s.kids[j].out, s.out, j, parts)
            todo.append((kids[j], s.kids[j], [t, *above]))
    return out


def _partial_why(node: Operation) -> str:
    kind = "take" if isinstance(node, Take) else "slice"
    return (
        f"{node.describe()} keeps only part of its axis: a {kind} drops data, so it has no "
        "inverse alone; it is undone only when other rules read the rest of that axis "
        f"({kind}s that partition it), with like= to know the axis' size"
    )


def _reversed_chain(traced: list[_Traced]) -> list[_Inv]:
    """The inverse steps, in the order they apply to the result's leaf."""
    return [_INVERSES[type(t.node)](t) for t in reversed(traced)]


def _inverse_chain(traced: list[_Traced]) -> list[_Inv]:
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
        except _CannotInvert:
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
            b = _axis(b, ndim)
        elif b < 0:
            raise _CannotInvert(f"unstack along axis {axis} needs like= to know the rank")
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
                raise _CannotInvert(
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
            b = _axis(b, ndim + 1)
        elif b < 0:
            raise _CannotInvert(f"stack along axis {axis} needs like= to know the rank")
        if step.kind in _ELEMENTWISE:
            lifted.append([step])
        elif step.kind == "transpose":
            p = step.arg
            q = [b if j == b else p[j - (j > b)] + (p[j - (j > b)] >= b) for j in range(len(p) + 1)]
            lifted.append([_Inv("transpose", tuple(q))])
        else:  # reshape: done on the stack with the stacked axis first
            shape = step.arg
            if math.prod(shape) == 0:
                raise _CannotInvert(f"a reshape to the empty shape {shape} cannot be stacked back")
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


def _build(chain: list[_Inv], start: str | Operation) -> str | Operation:
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


# ----------------------------------------------------------------------------
# Patterns: the sides swapped, with some captures bound.
# ----------------------------------------------------------------------------


def _bind(pattern: Pattern, captures: Sequence[Any], suffix: Parts, *, keep_last: bool) -> str:
    """pattern's text with captures filled in (its last `*` left as is with keep_last)."""
    segments = scan(pattern.text, wildcards=True)
    stars = len(pattern.wildcards())
    it = iter(captures)
    seen = 0
    out: list[tuple[str, Any]] = []
    for kind, value in segments:
        if kind == "part":
            out.append((kind, value))
        elif value == "**":
            seen += 1
            out.extend(("part", p) for p in next(it))
        elif value == "*":
            seen += 1
            out.append(("glob", "*") if keep_last and seen == stars else ("part", next(it)))
        else:
            pieces = value.split("*")
            text, kept = pieces[0], False
            for piece in pieces[1:]:
                seen += 1
                if keep_last and seen == stars:
                    text, kept = text + "*", True
                else:
                    text += str(next(it))
                text += piece
            out.append(("glob", text) if kept else ("part", text))
    out.extend(("part", p) for p in suffix)
    rendered = str(Pattern("", _segments=out))
    try:  # a capture may hold what a glob cannot (a '.', a '*'): read it back to see
        if scan(rendered, wildcards=True) == out:
            return rendered
    except PathSyntaxError:
        pass
    raise _CannotInvert(
        f"the captures {tuple(captures)!r} cannot be written into {pattern.text!r} beside "
        "its layer index '*'; give the leaves under the rule one dtype and shape, or name "
        "them in rules of their own"
    )


# ----------------------------------------------------------------------------
# Rules and units (one inverse entry each).
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """What one inverse entry covers: a rule's captures (gather index left out) and suffix."""

    captures: tuple[Any, ...]
    suffix: Parts
    # per source reference: the spec of one of its leaves, and how many leaves
    # a stack of it gathers
    refs: tuple[tuple[Spec, int], ...]


def _needs_like(value: Any) -> bool:
    """Whether undoing value needs the specs only like gives."""
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, Cast | Reshape | Concat | Pad):
            return True
        todo.extend(_kids(node))
    return False


def _unit_entries(
    value: Any, unit: _Unit | None, start: str | Operation
) -> list[tuple[str, str | Operation]]:
    """One (source reference, inverse value) per reference of value, over one unit
    (or over the whole rule, without like); start is the result's side."""
    specs = _spec_tree(value, None if unit is None else iter(unit.refs))
    return [(text, _build(_inverse_chain(traced), start)) for text, traced in
            _ref_paths(value, specs)]


def _check_levels(rule: Rule) -> None:
    for ref in rule.refs:
        if ref.levels > 1:
            raise _CannotInvert(
                f"nested stacks of {ref.pattern.text!r} ({ref.levels} levels) cannot be undone: "
                "an unstack gives back one index; map each outer index in a rule of its own "
                "(tg.take of it, then unstack)"
            )


def _entries(
    rule: Rule, value: RuleValue, units: list[_Unit] | None
) -> list[tuple[str, RuleValue]]:
    """The inverse entries of one rule: one per source reference, or those per unit."""
    assert rule.old is not None
    key, src = str(rule.old), str(rule.new)
    if not isinstance(value, Operation):
        return [(key, src)]
    _check_levels(rule)
    if units is None or not _needs_like(value):
        return list(_unit_entries(value, None, src))
    if not units:
        raise _CannotInvert(f"like has no leaf under {key!r}: its dtypes and shapes are unknown")
    values = [_unit_entries(value, u, src) for u in units]
    if all(v == values[0] for v in values):
        return list(values[0])
    # the leaves differ in shape or dtype: one entry each
    keep_new = any(ref.unstack for ref in rule.refs)
    out: list[tuple[str, RuleValue]] = []
    for u in units:
        bound = _bind(rule.new, u.captures, u.suffix, keep_last=keep_new)
        entries = _unit_entries(value, u, bound)
        for ref, (_, inverse) in zip(rule.refs, entries, strict=True):
            out.append((_bind(ref.pattern, u.captures, u.suffix, keep_last=ref.levels > 0),
                        inverse))
    return out


def _target_of(rule: Rule, ref: int, captures: tuple[Any, ...], suffix: Parts) -> Parts:
    """Where in the result a source leaf goes under rule (an unstack's first index)."""
    return rule.new.substitute_parts(_common(rule, ref, captures, index=0)) + suffix


def _common(rule: Rule, ref: int, captures: tuple[Any, ...], index: Any = None) -> tuple[Any, ...]:
    """A reference's captures as the new side's: a stacked index dropped, an unstack's
    index appended when given."""
    levels = rule.refs[ref].levels
    if levels:
        return captures[:-levels]
    if rule.refs[ref].unstack and index is not None:
        return captures + (index,)
    return captures


def _winner(rules: Sequence[Rule], parts: Parts) -> int | None:
    """The rule a graft gives the target leaf `parts` (docs/design.md section 4)."""
    best, rank, tied = None, (-1, -1), False
    for r, rule in enumerate(rules):
        m = rule.new.match_prefix(parts)
        if m is None:
            continue
        key = (m[0], rule.new.literal_count)
        if key > rank:
            best, rank, tied = r, key, False
        elif key == rank:
            tied = True
    return None if tied else best


# (rule a, rule b) -> the first source leaf (or pattern) both read, and how many.
Shared = dict[tuple[int, int], tuple[str, int]]


def _share(shared: Shared, a: int, b: int, where: str) -> None:
    key = (min(a, b), max(a, b))
    first, n = shared.get(key, (where, 0))
    shared[key] = (first, n + 1)


def _units_and_readers(
    rules: Sequence[Rule], leaves: Sequence[LikeLeaf], shared: Shared
) -> tuple[dict[int, list[_Unit]], list[Parts]]:
    """Per rule, the units it reads in like; and the leaves no rule reads that
    an inverse key would cover (they are kept). Leaves two rules read go to shared."""
    # rule -> (captures, suffix) -> per reference, the specs of its leaves there
    grouped: dict[int, dict[tuple[tuple[Any, ...], Parts], dict[int, list[Spec]]]] = {}
    unread: list[Parts] = []
    matchers = [[ref.pattern.prefix_matcher() for ref in r.refs] if r.old is not None else []
                for r in rules]
    for parts, shape, dtype in leaves:
        readers: list[int] = []
        covered = False
        for r, rule in enumerate(rules):
            for k, match in enumerate(matchers[r]):
                m = match(parts)
                if m is None:
                    continue
                covered = True
                n, caps = m
                # the rule reads this leaf only if it wins the leaf's target
                if _winner(rules, _target_of(rule, k, caps, parts[n:])) != r:
                    continue
                if r not in readers:
                    readers.append(r)
                key = (_common(rule, k, caps), parts[n:])
                grouped.setdefault(r, {}).setdefault(key, {}).setdefault(k, []).append(
                    (shape, dtype)
                )
        if covered and not readers:
            unread.append(parts)
        for i, a in enumerate(readers):
            for b in readers[i + 1 :]:
                _share(shared, a, b, repr(str(Path(parts))))
    units = {
        r: [
            _Unit(caps, suffix, tuple((per[k][0], len(per[k])) for k in range(len(rules[r].refs))))
            for (caps, suffix), per in groups.items()
            if len(per) == len(rules[r].refs)  # a join missing a value there is the plan's error
        ]
        for r, groups in grouped.items()
    }
    return units, unread


def _overlaps_without_like(rules: Sequence[Rule], shared: Shared) -> None:
    """Literal rules that read the same source leaves, seen on their paths alone.

    (Rules reading the same pattern are found as duplicate inverse keys.)
    """
    literal = [
        (r, rule.old.as_path().parts, rule.new.as_path().parts)
        for r, rule in enumerate(rules)
        if rule.old is not None and rule.old.is_literal and rule.new.is_literal
    ]
    for i, (a, a_old, a_new) in enumerate(literal):
        for b, b_old, b_new in literal[i + 1 :]:
            if len(a_old) == len(b_old):
                continue
            (o, o_old, o_new), (n, n_old, n_new) = sorted(
                [(a, a_old, a_new), (b, b_old, b_new)], key=lambda x: len(x[1])
            )
            # the longer rule only refines the shorter one when its new side
            # is the shorter rule's image of its old side
            if n_old[: len(o_old)] == o_old and n_new != o_new + n_old[len(o_old) :]:
                _share(shared, o, n, repr(str(Path(n_old))))


def _ambiguous(rules: Sequence[Rule], shared: Shared) -> list[Problem]:
    out = []
    for (a, b), (where, n) in shared.items():
        more = f" and {count(n - 1, 'more leaf', 'more leaves')}" if n > 1 else ""
        out.append(
            Problem(
                "mapping",
                f"rules {rules[a]} and {rules[b]} both read {where}{more} from the source: "
                "the inverse would have two values for it",
                rule=str(rules[a]),
                remedy="invert a mapping in which each source leaf feeds one target leaf "
                "(drop or narrow one of the rules)",
            )
        )
    return out


# ----------------------------------------------------------------------------
# Takes and slices that partition an axis: one inverse for all of them.
# ----------------------------------------------------------------------------


def _partial_node(value: Any) -> Take | Slice | None:
    """The take or slice on value's chain of one-value operations, if any."""
    node = value
    while isinstance(node, Operation) and not isinstance(node, Concat | StackList):
        if isinstance(node, Take | Slice):
            return node
        node = _kids(node)[0]
    return None


@dataclass(frozen=True)
class _Part:
    """One rule of a partition: where its take or slice starts and stops."""

    rule: int
    start: int
    stop: int


def _part_of(node: Take | Slice, n: int) -> tuple[int, int]:
    if isinstance(node, Take):
        index = node.index + n if node.index < 0 else node.index
        return index, index + 1
    return node.start, node.stop


def _partitions(
    rules: Sequence[Rule], values: Sequence[RuleValue], units: dict[int, list[_Unit]]
) -> tuple[dict[int, list[tuple[str, RuleValue]]], set[int], list[Problem]]:
    """The inverse entries of the take and slice rules that partition an axis.

    Returns:
      (entries per rule, the rules those entries stand for or that are
      reported in problems, problems).
    """
    groups: dict[tuple[Any, ...], list[_Part]] = {}
    problems: list[Problem] = []
    reported: set[int] = set()
    axis_size: dict[tuple[Any, ...], int] = {}
    for r, value in enumerate(values):
        node = _partial_node(value)
        if node is None or rules[r].old is None:
            continue
        try:
            _check_levels(rules[r])
            mine = units.get(r, [])
            if not mine:
                raise _CannotInvert(f"like has no leaf under {str(rules[r].old)!r}")
            shapes = set()
            for u in mine:
                spec = _spec_tree(node.value, iter(u.refs)).out
                assert spec is not None
                shapes.add(spec[0])
            before = _spec_tree(node.value, iter(mine[0].refs)).out
            assert before is not None
            ndim = len(before[0])
            axis = _axis(node.axis, ndim)
            sizes = {(len(shape), shape[axis] if len(shape) == ndim else None) for shape in shapes}
            if len(sizes) > 1:
                raise _CannotInvert(
                    f"the leaves it reads differ in size along axis {node.axis} (shapes "
                    f"{', '.join(map(str, sorted(shapes)))}): a partition is undone for leaves "
                    "of one size only; name them in rules of their own"
                )
            kind = "take" if isinstance(node, Take) else "slice"
            key = (node.value, kind, axis)
            axis_size[key] = before[0][axis]
            start, stop = _part_of(node, before[0][axis])
            groups.setdefault(key, []).append(_Part(r, start, stop))
        except (_CannotInvert, MappingError) as e:
            problems.append(Problem("mapping", f"rule {rules[r]}: {e}", rule=str(rules[r])))
            reported.add(r)
    out: dict[int, list[tuple[str, RuleValue]]] = {}
    done = reported
    for key, parts in groups.items():
        parts.sort(key=lambda p: p.start)
        size = axis_size[key]
        ends = [0] + [p.stop for p in parts]
        if any(p.start != end for p, end in zip(parts, ends, strict=False)) or ends[-1] != size:
            covered = ", ".join(f"{p.start}:{p.stop}" for p in parts)
            for p in parts:
                rule = rules[p.rule]
                why = _partial_why(_partial_node(values[p.rule]))  # type: ignore[arg-type]
                problems.append(Problem(
                    "mapping",
                    f"rule {rule}: {why}; the rules reading that axis cover {covered} of its "
                    f"{size}",
                    rule=str(rule),
                    remedy="map the rest of the axis with takes or slices too (the inverse "
                    "joins them), or invert a mapping without this rule",
                ))
            done.update(p.rule for p in parts)
            continue
        try:
            entries = _partition_entries(rules, values, units, parts, key)
        except (_CannotInvert, MappingError) as e:
            rule = rules[parts[0].rule]
            problems.append(Problem("mapping", f"rule {rule}: {e}", rule=str(rule)))
            done.update(p.rule for p in parts)
            continue
        out[parts[0].rule] = entries
        done.update(p.rule for p in parts)
    return out, done, problems


def _partition_entries(
    rules: Sequence[Rule],
    values: Sequence[RuleValue],
    units: dict[int, list[_Unit]],
    parts: list[_Part],
    key: tuple[Any, ...],
) -> list[tuple[str, RuleValue]]:
    """The inverse of rules whose takes or slices cover one axis: their parts joined.

    One set of entries for the whole partition, or, when its leaves differ
    in shape or dtype, one per leaf (as `_entries` does).
    """
    first = rules[parts[0].rule]
    per_unit = [_partition_unit(rules, values, units, parts, key, u, bind=False)
                for u in units[parts[0].rule]]
    if all(e == per_unit[0] for e in per_unit):
        return per_unit[0]
    out: list[tuple[str, RuleValue]] = []
    for u in units[parts[0].rule]:
        entries = _partition_unit(rules, values, units, parts, key, u, bind=True)
        for ref, (_, inverse) in zip(first.refs, entries, strict=True):
            out.append((_bind(ref.pattern, u.captures, u.suffix, keep_last=ref.levels > 0),
                        inverse))
    return out


def _partition_unit(
    rules: Sequence[Rule],
    values: Sequence[RuleValue],
    units: dict[int, list[_Unit]],
    parts: list[_Part],
    key: tuple[Any, ...],
    u: _Unit,
    *,
    bind: bool,
) -> list[tuple[str, RuleValue]]:
    """A partition's entries over one unit (the new sides bound to it when bind)."""
    inner, kind, axis = key
    pieces: list[str | Operation] = []
    for p in parts:
        rule, value = rules[p.rule], values[p.rule]
        mine = next((m for m in units.get(p.rule, []) if (m.captures, m.suffix) ==
                     (u.captures, u.suffix)), None)
        if mine is None:
            raise _CannotInvert(
                f"rule {rule} reads no leaf where {rules[parts[0].rule]} does: the parts of "
                "the axis do not line up"
            )
        specs = _spec_tree(value, iter(mine.refs))
        [(_, traced)] = _ref_paths(value, specs, stop=_partial_node(value))
        keep = any(ref.unstack for ref in rule.refs)
        start = _bind(rule.new, u.captures, u.suffix, keep_last=keep) if bind else str(rule.new)
        pieces.append(_build(_inverse_chain(traced), start))
    joined = concat(pieces, axis=axis) if kind == "slice" else stack(pieces, axis=axis)
    return list(_unit_entries(inner, u, joined))


def invert_rules(
    rules: Sequence[Rule], values: Sequence[RuleValue], leaves: Sequence[LikeLeaf] | None
) -> dict[str, RuleValue]:
    """The inverse of parsed rules (values: the mapping's values, in order).

    Args:
      rules: from `parse_mapping`.
      values: the mapping's values, one per rule.
      leaves: the original source's leaves, or None when `like` was not given.

    Returns:
      The inverse mapping, in the rules' order; with leaves, an entry
      `{leaf: None}` for each source leaf under a rule's old side that no
      rule reads (another rule took its target), which the inverse would
      otherwise fill from a value that never came from it.

    Raises:
      MappingError: every rule that cannot be inverted, at once.
    """
    problems: list[Problem] = []
    shared: Shared = {}
    units: dict[int, list[_Unit]] | None = None
    unread: list[Parts] = []
    joined: dict[int, list[tuple[str, RuleValue]]] = {}
    partitioned: set[int] = set()
    if leaves is None:
        _overlaps_without_like(rules, shared)
    else:
        units, unread = _units_and_readers(rules, leaves, shared)
        joined, partitioned, problems = _partitions(rules, values, units)
        # the rules of one partition read the same leaves by design
        for pair in [p for p in shared if p[0] in partitioned and p[1] in partitioned]:
            del shared[pair]
    out: dict[str, RuleValue] = {}
    owner: dict[str, int] = {}
    for r, (rule, value) in enumerate(zip(rules, values, strict=True)):
        if rule.old is None:
            continue  # a keep rule read nothing: nothing to give back
        if r in partitioned and r not in joined:
            continue  # its partition's first rule gives the inverse
        try:
            if r in joined:
                entries = joined[r]
            else:
                entries = _entries(rule, value, None if units is None else units.get(r, []))
        except (_CannotInvert, MappingError) as e:
            problems.append(Problem("mapping", f"rule {rule}: {e}", rule=str(rule)))
            continue
        for key, inverse in entries:
            if key in owner:
                _share(shared, owner[key], r, f"every leaf under {key!r}")
                continue
            owner[key] = r
            out[key] = inverse
    for parts in unread:
        out[str(Path(parts))] = None
    problems += _ambiguous(rules, shared)
    if problems:
        header = f"cannot invert the mapping ({count(len(problems), 'problem')}):"
        raise GraftError.from_problems(problems, header=header)
    return out


def _like_leaves(like: Any) -> list[LikeLeaf]:
    """The leaves of like (a pytree of arrays or ShapeDtypeStructs, or a lazy Source)."""
    tree = like.metadata() if isinstance(like, Source) else like
    paths, values, _ = flatten_parts(tree)
    out = []
    for parts, leaf in zip(paths, values, strict=True):
        shape, dtype = spec_of(leaf)
        if shape is None or not isinstance(dtype, np.dtype):
            continue  # not an array: no operation applies to it
        out.append((tuple(parts), tuple(shape), dtype))
    return out


def invert(mapping: MappingLike, /, *, like: Any = None) -> dict[str, RuleValue]:
    """The mapping that takes the result of `graft(state, source, mapping)` back to the source.

    Each rule's sides swap with their captures, `stack` and `unstack` swap,
    a stack of a list becomes one `take` per element and a `concat` one
    `slice` per part, `pad` becomes a `slice` of the size before it,
    `transpose(axes)` becomes `transpose(argsort(axes))`, `scale(f)` becomes
    `scale(1/f)` and `offset(c)` becomes `offset(-c)`, and nested operations
    are undone in the reverse order. `cast` and `reshape` are undone to the
    dtype and shape each leaf had in the source, which `like` gives. A `take`
    or `slice` drops data: rules whose takes or slices of one value cover its
    whole axis are undone together (one `stack` of a list, or one `concat`,
    of their parts in order); one alone cannot be. Keep rules drop out. The
    input is not modified; use the return value.

    Bit for bit: `scale` and `offset` round their results to the leaf's
    dtype, so undoing them gives back every bit only when no rounding
    happened: a power-of-two factor (without overflow or subnormal results),
    an amount that the values absorb exactly. Other factors and amounts come
    back within rounding.

    Args:
      mapping: a `{new: old}` mapping, as `graft` takes it.
      like: the original source's metadata: a pytree of arrays or
        `jax.ShapeDtypeStruct`s, or a lazy `tg.Source` (its `metadata()` is
        used). Needed to undo `cast`, `reshape`, `pad`, `concat` and a
        partition by takes or slices; with it, every source leaf is checked
        to be read by at most one rule.

    Returns:
      The inverse mapping `{old: new}`, to graft from the result into the
      source's layout.

    Raises:
      MappingError: listing every rule that cannot be inverted: a `cast`,
        `reshape`, `pad` or `concat` without `like`; a `take` or `slice`
        whose axis other rules do not cover (or without `like`); a scale by
        0; nested stacks of one pattern; two rules reading the same source
        leaf; or an invalid mapping.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> m = {"dec.l_*.w": "enc.block_*.kernel", "dec.stack": tg.stack("enc.x_*", axis=0)}
      >>> tg.invert(m)
      {'enc.block_*.kernel': 'dec.l_*.w', 'enc.x_*': Unstack(source='dec.stack', axis=0)}
      >>> src = {"w": np.ones((2, 3), np.float16)}
      >>> m = {"k": tg.cast(tg.transpose("w", (1, 0)), np.float32)}
      >>> tg.invert(m, like=src)
      {'w': Transpose(value=Cast(value='k', dtype=dtype('float16')), axes=(1, 0))}
      >>> qkv = {"qkv": np.zeros((4, 12), np.float32)}
      >>> m = {"q": tg.slice("qkv", 0, 8, axis=1), "kv": tg.slice("qkv", 8, 12, axis=1)}
      >>> tg.invert(m, like=qkv)
      {'qkv': Concat(values=('q', 'kv'), axis=1)}
      >>> tg.invert({"kv": tg.stack(["k", tg.scale("v", 0.5)])})["v"]
      Scale(value=Take(value='kv', index=1, axis=0), factor=2.0)
    """
    rules = parse_mapping(mapping)
    values = list(mapping.values())
    leaves = None if like is None else _like_leaves(like)
    return invert_rules(rules, values, leaves)
