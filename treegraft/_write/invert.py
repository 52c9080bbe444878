"""Inverting a mapping: the rules that take a graft's result back (docs/design.md section 15).

`invert(m)` gives the mapping `m'` such that `graft(source_layout, result, m')`
puts back what `result = graft(like, source, m)` took from the source. Each
rule is inverted on its own, one inverse entry per source reference:

- its two sides swap, their captures with them (`{"a.l_*": "b.*"}` becomes
  `{"b.*": "a.l_*"}`: both sides have the same wildcards in the same order,
  so the captures line up either way);
- the rule's value is a tree (operations nest, docs/design.md section 16);
  the nodes from its root down to each source reference are undone in the
  reverse order, each replaced by its inverse (`invert_steps._INVERSES`, one
  small function per operation class): a join (`concat`, a stack of a list) gives
  each of its values back by a `slice` or `take` of the result; `cast`,
  `reshape`, `pad` and `concat` need the specs before them, which only
  `like` (the original source's metadata) knows;
- when a chain's only gather is a `stack`/`unstack` on the path itself, the
  inverse gather is moved first (`_gather_first`) so that a reshape applies
  to one layer's leaf rather than to the whole stack (a reshape reads its
  whole input); where that cannot be done the natural order stands
  (`invert_steps.inverse_chain`);
- a `take` or `slice` keeps part of an axis: alone it has no inverse; rules
  whose takes or slices of one value cover its axis exactly are undone
  together, by one `stack` of a list or `concat` of their parts in order
  (`_partitions`).

Keep rules (`{new: None}`) drop out. A rule whose inverse would be ambiguous
(two rules reading one source leaf) or impossible is a `MappingError` naming
it, every such rule listed at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft._errors import GraftError, MappingError, PathSyntaxError, Problem, count
from treegraft._parse.ops import (
    Cast,
    Concat,
    Operation,
    Pad,
    Reshape,
    Slice,
    StackList,
    Take,
    concat,
    stack,
)
from treegraft._parse.paths import Part, Path
from treegraft._parse.patterns import Pattern
from treegraft._parse.rules import MappingLike, Rule, RuleValue, parse_mapping
from treegraft._parse.scan import scan
from treegraft._read.source import Source
from treegraft._tree.flat import flatten_parts
from treegraft._tree.leaves import spec_of
from treegraft._write.invert_bind import bind_later_wildcards
from treegraft._write.invert_steps import (
    CannotInvert,
    Spec,
    axis_of,
    build,
    inverse_chain,
    kids_of,
    partial_why,
    ref_paths,
    spec_tree,
)

__all__ = ["invert", "invert_rules", "LikeLeaf"]

Parts = tuple[Part, ...]
# A leaf of `like` as inversion sees it: its path, shape and dtype.
LikeLeaf = tuple[Parts, tuple[int, ...], np.dtype[Any]]


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
    raise CannotInvert(
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
        todo.extend(kids_of(node))
    return False


def _unit_entries(
    value: Any, unit: _Unit | None, start: str | Operation
) -> list[tuple[str, str | Operation]]:
    """One (source reference, inverse value) per reference of value, over one unit
    (or over the whole rule, without like); start is the result's side."""
    specs = spec_tree(value, None if unit is None else iter(unit.refs))
    return [(text, build(inverse_chain(traced), start)) for text, traced in
            ref_paths(value, specs)]


def _check_levels(rule: Rule) -> None:
    for ref in rule.refs:
        if ref.levels > 1:
            raise CannotInvert(
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
        raise CannotInvert(f"like has no leaf under {key!r}: its dtypes and shapes are unknown")
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
        node = kids_of(node)[0]
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
                raise CannotInvert(f"like has no leaf under {str(rules[r].old)!r}")
            shapes = set()
            for u in mine:
                spec = spec_tree(node.value, iter(u.refs)).out
                assert spec is not None
                shapes.add(spec[0])
            before = spec_tree(node.value, iter(mine[0].refs)).out
            assert before is not None
            ndim = len(before[0])
            axis = axis_of(node.axis, ndim)
            sizes = {(len(shape), shape[axis] if len(shape) == ndim else None) for shape in shapes}
            if len(sizes) > 1:
                raise CannotInvert(
                    f"the leaves it reads differ in size along axis {node.axis} (shapes "
                    f"{', '.join(map(str, sorted(shapes)))}): a partition is undone for leaves "
                    "of one size only; name them in rules of their own"
                )
            kind = "take" if isinstance(node, Take) else "slice"
            key = (node.value, kind, axis)
            axis_size[key] = before[0][axis]
            start, stop = _part_of(node, before[0][axis])
            groups.setdefault(key, []).append(_Part(r, start, stop))
        except (CannotInvert, MappingError) as e:
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
                why = partial_why(_partial_node(values[p.rule]))  # type: ignore[arg-type]
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
        except (CannotInvert, MappingError) as e:
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
            raise CannotInvert(
                f"rule {rule} reads no leaf where {rules[parts[0].rule]} does: the parts of "
                "the axis do not line up"
            )
        specs = spec_tree(value, iter(mine.refs))
        [(_, traced)] = ref_paths(value, specs, stop=_partial_node(value))
        keep = any(ref.unstack for ref in rule.refs)
        start = _bind(rule.new, u.captures, u.suffix, keep_last=keep) if bind else str(rule.new)
        pieces.append(build(inverse_chain(traced), start))
    joined = concat(pieces, axis=axis) if kind == "slice" else stack(pieces, axis=axis)
    return list(_unit_entries(inner, u, joined))


def invert_rules(
    rules: Sequence[Rule], values: Sequence[RuleValue], leaves: Sequence[LikeLeaf] | None,
    refused: Sequence[Problem] = (),
) -> dict[str, RuleValue]:
    """The inverse of parsed rules (values: the mapping's values, in order).

    Args:
      rules: from `parse_mapping`.
      values: the mapping's values, one per rule.
      leaves: the original source's leaves, or None when `like` was not given.
      refused: the problems of rules already refused (left out of rules),
        listed with these rules' own.

    Returns:
      The inverse mapping, in the rules' order; with leaves, an entry
      `{leaf: None}` for each source leaf under a rule's old side that no
      rule reads (another rule took its target), which the inverse would
      otherwise fill from a value that never came from it.

    Raises:
      MappingError: every rule that cannot be inverted, at once.
    """
    problems: list[Problem] = list(refused)
    shared: Shared = {}
    units: dict[int, list[_Unit]] | None = None
    unread: list[Parts] = []
    joined: dict[int, list[tuple[str, RuleValue]]] = {}
    partitioned: set[int] = set()
    if leaves is None:
        _overlaps_without_like(rules, shared)
    else:
        units, unread = _units_and_readers(rules, leaves, shared)
        joined, partitioned, partition_problems = _partitions(rules, values, units)
        problems += partition_problems
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
        except (CannotInvert, MappingError) as e:
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
    leaves = None if like is None else _like_leaves(like)
    bound, refused = bind_later_wildcards(rules, dict(mapping), leaves)
    if list(bound) != list(mapping):  # a rule was split or refused
        rules = parse_mapping(bound) if bound else []  # all refused: refused says why
    return invert_rules(rules, list(bound.values()), leaves, refused)
