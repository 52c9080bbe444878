"""Inverting a mapping: the rules that take a graft's result back (docs/design.md section 15).

`invert(m)` gives the mapping `m'` such that `graft(source_layout, result, m')`
puts back what `result = graft(like, source, m)` took from the source. Each
rule is inverted on its own:

- its two sides swap, their captures with them (`{"a.l_*": "b.*"}` becomes
  `{"b.*": "a.l_*"}`: both sides have the same wildcards in the same order,
  so the captures line up either way);
- its operation chain is reversed, each operation replaced by its inverse
  (`_INVERSES`, one small function per operation class); the inverse of
  `cast` and `reshape` needs the dtype and shape the value had before it,
  which only `like` (the original source's metadata) knows;
- today's operation classes keep `stack`/`unstack` innermost, so the reversed
  chain, which ends with the inverse gather, is rewritten to start with it
  (`_gather_first`): a cast commutes with it, a transpose has its axes
  renumbered, a reshape keeps the stacked axis whole or cannot be inverted.

Keep rules (`{new: None}`) drop out. A rule whose inverse would be ambiguous
(two rules reading one source leaf) or impossible is a `MappingError` naming
it, every such rule listed at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft._errors import GraftError, MappingError, PathSyntaxError, Problem, count
from treegraft._parse.ops import (
    Cast,
    Operation,
    Reshape,
    Stack,
    Step,
    Transpose,
    Unstack,
    cast,
    reshape,
    stack,
    transpose,
    unstack,
)
from treegraft._parse.paths import Part, Path
from treegraft._parse.patterns import Pattern
from treegraft._parse.rules import MappingLike, Rule, RuleValue, parse_mapping
from treegraft._parse.scan import scan

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
    ("reshape", shape), ("stack", axis) or ("unstack", axis)."""

    kind: str
    arg: Any


@dataclass(frozen=True)
class _Traced:
    """A forward operation with the specs around it (None where `like` was not given)."""

    node: Operation
    before: Spec | None
    after: Spec | None


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


# One entry per operation class: the inverse of one forward step, given the
# specs around it. The operations of docs/design.md section 16 each add one
# entry (and, for those that gather, one case in `_gather_first`).
_INVERSES: dict[type[Operation], Callable[[_Traced], _Inv]] = {
    Cast: _inverse_cast,
    Transpose: _inverse_transpose,
    Reshape: _inverse_reshape,
    Stack: _inverse_stack,
    Unstack: _inverse_unstack,
}

# ----------------------------------------------------------------------------
# To come with the operations of docs/design.md section 16 (ops.py does not
# have them yet; nothing below is code). Each is one `_INVERSES` entry; the
# two that gather several values (StackList, Concat) return one inverse per
# value, and `_entries` makes one inverse rule of each (key: that value's
# source, value: the part of the result it became).
#
#   StackList(values, axis)   the stack of a list of values: one rule per
#                             element, `{values[k]: take(new, k, axis)}`, each
#                             element's own chain inverted around its take.
#   Take(value, index, axis)  not invertible alone (the other indices are
#                             lost): a MappingError naming the rule.
#   Concat(values, axis)      one rule per part, `{values[k]: slice(new,
#                             start_k, stop_k, axis)}`; the part sizes along
#                             axis from like (the source's metadata) or from
#                             the plan's specs of the parts.
#   Slice(value, start, stop, axis)
#                             not invertible alone (the rest of the axis is
#                             lost): a MappingError naming the rule.
#   Pad(value, size, axis, constant)
#                             `slice(new, before, before + n, axis)`, n the
#                             axis' size before the pad (the spec before the
#                             step, as for reshape).
#   Scale(value, factor)      `scale(new, 1 / factor)`.
#   Offset(value, amount)     `offset(new, -amount)`.
#                             Both round: the law's bit-for-bit round trip
#                             holds for a power-of-two factor and for an
#                             amount the values absorb exactly; the tests
#                             generate those.
#   Stack(source=Operation)   once Stack and Unstack take operations, the
#                             reversed chain is built as it is (gather where
#                             it falls) and `_gather_first` is not needed.
# ----------------------------------------------------------------------------


def _perm(axes: Sequence[int]) -> tuple[int, ...]:
    """transpose axes with negative ones made positive (a permutation has len(axes) axes)."""
    n = len(axes)
    out = tuple(int(a) + n if -n <= a < 0 else int(a) for a in axes)
    if sorted(out) != list(range(n)):
        raise _CannotInvert(f"transpose axes {tuple(axes)} are not a permutation")
    return out


# ----------------------------------------------------------------------------
# A rule's value as a chain, traced through specs.
# ----------------------------------------------------------------------------


def _chain(value: str | Operation) -> tuple[str, list[Operation]]:
    """The value's source text and its operations, innermost first."""
    nodes: list[Operation] = []
    node: Any = value
    while isinstance(node, Operation):
        if type(node) not in _INVERSES:
            raise _CannotInvert(f"{type(node).__name__} has no inverse yet")
        nodes.append(node)
        node = node.source if isinstance(node, Stack | Unstack) else node.value  # type: ignore[attr-defined]
    nodes.reverse()
    return node, nodes


def _forward_spec(node: Operation, before: Spec, n: int | None) -> Spec:
    """The spec after node, from the spec before it (n: how many leaves a stack gathers)."""
    shape, dtype = before
    if isinstance(node, Stack):
        assert n is not None
        axis = _axis(node.axis, len(shape) + 1)
        return shape[:axis] + (n,) + shape[axis:], dtype
    if isinstance(node, Unstack):
        axis = _axis(node.axis, len(shape))
        return shape[:axis] + shape[axis + 1 :], dtype
    step = {Cast: "cast", Transpose: "transpose", Reshape: "reshape"}[type(node)]
    arg = {Cast: "dtype", Transpose: "axes", Reshape: "shape"}[type(node)]
    after, why = Step(step, getattr(node, arg)).spec(before)
    if after is None:
        raise _CannotInvert(why)
    return (tuple(after[0]), after[1])


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise _CannotInvert(f"axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


def _trace(nodes: list[Operation], start: Spec | None, n: int | None) -> list[_Traced]:
    """Each node with the specs around it; all None when start is unknown."""
    out = []
    spec = start
    for node in nodes:
        after = None if spec is None else _forward_spec(node, spec, n)
        out.append(_Traced(node, spec, after))
        spec = after
    return out


def _reversed_chain(traced: list[_Traced]) -> list[_Inv]:
    """The inverse steps, in the order they apply to the result's leaf."""
    return [_INVERSES[type(t.node)](t) for t in reversed(traced)]


# ----------------------------------------------------------------------------
# Moving the inverse gather to the front (today's classes nest it innermost).
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
        if step.kind == "cast":
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
        if step.kind == "cast":
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


def _build(chain: list[_Inv], source: str) -> str | Operation:
    """The rule value applying chain (gather first) to the result's leaves at source."""
    value: str | Operation = source
    for step in chain:
        if step.kind == "stack":
            value = stack(source, axis=step.arg)
        elif step.kind == "unstack":
            value = unstack(source, axis=step.arg)
        elif step.kind == "cast":
            value = cast(value, step.arg)
        elif step.kind == "transpose":
            value = transpose(value, step.arg)
        else:
            value = reshape(value, step.arg)
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
    spec: Spec  # of the gathered value's input (one stacked leaf's for a stack)
    n: int | None  # how many leaves a stack gathers


def _needs_like(nodes: list[Operation]) -> bool:
    return any(isinstance(n, Cast | Reshape) for n in nodes)


def _value_of(nodes: list[Operation], source: str, unit: _Unit | None) -> str | Operation:
    """The inverse value over one unit (or over the whole rule, without like)."""
    traced = _trace(nodes, None if unit is None else unit.spec, None if unit is None else unit.n)
    return _build(_gather_first(_reversed_chain(traced), traced), source)


def _entries(
    rule: Rule, value: RuleValue, units: list[_Unit] | None
) -> list[tuple[str, RuleValue]]:
    """The inverse entries of one rule: one for the whole rule, or one per unit."""
    assert rule.old is not None
    nodes = _chain(value)[1] if isinstance(value, Operation) else []
    key, src = str(rule.old), str(rule.new)
    if not nodes:
        return [(key, src)]
    if units is None or not _needs_like(nodes):
        return [(key, _value_of(nodes, src, None))]
    if not units:
        raise _CannotInvert(f"like has no leaf under {key!r}: its dtypes and shapes are unknown")
    values = [_value_of(nodes, src, u) for u in units]
    if all(v == values[0] for v in values):
        return [(key, values[0])]
    # the leaves differ in shape or dtype: one entry each
    keep_old, keep_new = rule.gather == "stack", rule.gather == "unstack"
    return [
        (
            _bind(rule.old, u.captures, u.suffix, keep_last=keep_old),
            _value_of(nodes, _bind(rule.new, u.captures, u.suffix, keep_last=keep_new), u),
        )
        for u in units
    ]


def _target_of(rule: Rule, captures: tuple[Any, ...], suffix: Parts) -> Parts:
    """Where in the result a source leaf goes under rule (an unstack's first index)."""
    if rule.gather == "stack":
        captures = captures[:-1]
    elif rule.gather == "unstack":
        captures = captures + (0,)
    return rule.new.substitute_parts(captures) + suffix


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
    grouped: dict[int, dict[tuple[tuple[Any, ...], Parts], list[Spec]]] = {}
    unread: list[Parts] = []
    matchers = [None if r.old is None else r.old.prefix_matcher() for r in rules]
    for parts, shape, dtype in leaves:
        readers: list[int] = []
        covered = False
        for r, rule in enumerate(rules):
            match = matchers[r]
            m = None if match is None else match(parts)
            if m is None:
                continue
            covered = True
            n, caps = m
            # the rule reads this leaf only if it wins the leaf's target
            if _winner(rules, _target_of(rule, caps, parts[n:])) != r:
                continue
            readers.append(r)
            key = (caps[:-1] if rule.gather == "stack" else caps, parts[n:])
            grouped.setdefault(r, {}).setdefault(key, []).append((shape, dtype))
        if covered and not readers:
            unread.append(parts)
        for i, a in enumerate(readers):
            for b in readers[i + 1 :]:
                _share(shared, a, b, repr(str(Path(parts))))
    units = {
        r: [_Unit(caps, suffix, specs[0], len(specs)) for (caps, suffix), specs in groups.items()]
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
    if leaves is None:
        _overlaps_without_like(rules, shared)
    else:
        units, unread = _units_and_readers(rules, leaves, shared)
    out: dict[str, RuleValue] = {}
    owner: dict[str, int] = {}
    for r, (rule, value) in enumerate(zip(rules, values, strict=True)):
        if rule.old is None:
            continue  # a keep rule read nothing: nothing to give back
        try:
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
    # Reading a tree is the tree step's job, which comes after parsing
    # (docs/design.md section 1); invert is the one parse function that needs
    # it, so it imports it here, when called.
    from treegraft._read.source import Source
    from treegraft._tree.flat import flatten_parts
    from treegraft._tree.leaves import spec_of

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
    `transpose(axes)` becomes `transpose(argsort(axes))`, and a chain of
    operations is undone in the reverse order. `cast` and `reshape` are undone
    to the dtype and shape each leaf had in the source, which `like` gives.
    Keep rules drop out. The input is not modified; use the return value.

    Args:
      mapping: a `{new: old}` mapping, as `graft` takes it.
      like: the original source's metadata: a pytree of arrays or
        `jax.ShapeDtypeStruct`s, or a lazy `tg.Source` (its `metadata()` is
        used). Needed to undo `cast` and `reshape`; with it, every source
        leaf is checked to be read by at most one rule.

    Returns:
      The inverse mapping `{old: new}`, to graft from the result into the
      source's layout.

    Raises:
      MappingError: listing every rule that cannot be inverted: a `cast` or
        `reshape` without `like`, two rules reading the same source leaf, a
        reshape that mixes a stacked axis with others, or an invalid mapping.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> m = {"dec.l_*.w": "enc.block_*.kernel", "dec.stack": tg.stack("enc.x_*", axis=0)}
      >>> tg.invert(m)
      {'enc.block_*.kernel': 'dec.l_*.w', 'enc.x_*': Unstack(source='dec.stack', axis=0)}
      >>> src = {"w": np.ones((2, 3), np.float16)}
      >>> m = {"k": tg.cast(tg.transpose("w", (1, 0)), np.float32)}
      >>> tg.invert(m, like=src)
      {'w': Transpose(value=Cast(value='k', dtype=dtype('float16')), axes=(1, 0))}
    """
    rules = parse_mapping(mapping)
    values = list(mapping.values())
    leaves = None if like is None else _like_leaves(like)
    return invert_rules(rules, values, leaves)
