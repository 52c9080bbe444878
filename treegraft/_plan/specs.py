"""Shapes and dtypes of what a rule makes of its source leaves, on metadata only.

A rule's compiled tree (`treegraft._parse.ops.Node`) is evaluated on the
specs of its source references (`tree_spec`): gathers, joins and per-leaf
steps each check their input and say what they make. The plan checks the
result against the target exactly, before anything is read.
`gathered_spec` and `output_spec` are the same for the plain form (a gather
on a path, then steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from treegraft._parse.ops import Node
from treegraft._parse.paths import Part
from treegraft._parse.rules import Rule
from treegraft._tree import leaves as _leaves

Parts = tuple[Part, ...]


def index_box(shape: Sequence[int], axis: int, index: int) -> tuple[slice, ...]:
    """The box of `x[index]` along axis, as one slice per axis."""
    return tuple(slice(index, index + 1) if k == axis else slice(0, d) for k, d in enumerate(shape))


def gathered_spec(
    rule: Rule, spec: Any, count: int, index: int | None
) -> tuple[Any | None, str]:
    """The spec a stack or unstack makes of a source spec, or None and why not."""
    shape, dtype = spec
    if rule.gather not in ("stack", "unstack"):
        return spec, ""
    if shape is None:
        source = _leaves.describe(spec)
        return None, f"{rule.gather} needs array leaves, the source leaf is {source}"
    ndim = len(shape)
    if rule.gather == "stack":
        axis = rule.axis + ndim + 1 if rule.axis < 0 else rule.axis
        if not 0 <= axis <= ndim:
            return None, f"stack axis {rule.axis} is out of range for {ndim}-d source leaves"
        return (tuple(shape[:axis]) + (count,) + tuple(shape[axis:]), dtype), ""
    axis = rule.axis + ndim if rule.axis < 0 else rule.axis
    if not 0 <= axis < ndim:
        return None, f"unstack axis {rule.axis} is out of range for a {ndim}-d source leaf"
    if index is None or not 0 <= index < shape[axis]:
        return None, (
            f"unstack index {index} is out of range: the source has {shape[axis]} along "
            f"axis {rule.axis}"
        )
    return (tuple(shape[:axis]) + tuple(shape[axis + 1 :]), dtype), ""


def output_spec(
    rule: Rule, spec: Any, count: int = 0, index: int | None = None
) -> tuple[Any | None, str]:
    """The spec of what a rule makes of a source spec: gather, then each step."""
    out, why = gathered_spec(rule, spec, count, index)
    for step in rule.steps:
        if out is None:
            break
        if out[0] is None:
            return None, f"{step.kind} needs an array, the source leaf is {_leaves.describe(out)}"
        out, why = step.spec(out)
    return out, why


def pair_inputs(pair: Any) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per source reference of a `Pair`, (its grid of stacked sizes, its leaves, row-major)."""
    if not pair.grids:
        if pair.sources:
            return [((len(pair.sources),), tuple(pair.sources))]
        return [((), (pair.source,))]
    out = []
    at = 0
    for grid in pair.grids:
        n = 1
        for size in grid:
            n *= size
        out.append((tuple(grid), tuple(pair.sources[at : at + n])))
        at += n
    return out


class TreeSpec(NamedTuple):
    """What a rule's tree makes of its inputs' specs: the spec, or why not and its kind.

    Attributes:
      spec: the output (shape, dtype), or None.
      why: why there is none ("" when there is).
      kind: the problem kind of `why`: "shape" or "dtype".
      shown: the operations, innermost first, as the plan shows them.
    """

    spec: Any
    why: str = ""
    kind: str = "shape"
    shown: tuple[str, ...] = ()


def tree_spec(rule: Rule, specs: Sequence[Any], grids: Sequence[tuple[int, ...]],
              layer: int | None) -> TreeSpec:
    """The spec a rule's tree makes of one spec per source reference, checked at each node.

    `grids` are the stacked sizes per reference (`pair_inputs`); `layer` the
    index an unstack takes. Nodes nest at most `MAX_DEPTH` deep (checked when
    the rule was parsed), so the recursion is bounded.
    """
    assert rule.tree is not None
    return _node_spec(rule.tree, 0, specs, grids, layer)


def _node_spec(node: Node, above: int, specs: Sequence[Any], grids: Sequence[tuple[int, ...]],
               layer: int | None) -> TreeSpec:
    if node.kind == "source":
        return TreeSpec(specs[node.slot])
    if node.kind in ("concat", "stack_list"):
        return _join_spec(node, above, specs, grids, layer)
    child = _node_spec(node.children[0], above + (node.kind == "stack"), specs, grids, layer)
    if child.spec is None:
        return child
    shape, dtype = child.spec
    if shape is None:
        what = node.step.kind if node.step is not None else node.kind
        return TreeSpec(None, f"{what} needs array leaves, the source leaf is "
                        f"{_leaves.describe(child.spec)}")
    ndim = len(shape)
    if node.kind == "step":
        step = node.step
        assert step is not None
        made, why = step.spec((tuple(shape), dtype))
        kind = "dtype" if step.kind in ("scale", "offset") or why.startswith("pad constant") \
            else "shape"
        if made is None:
            return TreeSpec(None, why, kind)
        return TreeSpec(made, shown=child.shown + (step.describe((tuple(shape), dtype)),))
    if node.kind == "stack":
        count = grids[node.inputs_below()[0]][above]
        axis = node.axis + ndim + 1 if node.axis < 0 else node.axis
        if not 0 <= axis <= ndim:
            return TreeSpec(None, f"stack axis {node.axis} is out of range for {ndim}-d source "
                            "leaves")
        made = (tuple(shape[:axis]) + (count,) + tuple(shape[axis:]), dtype)
        return TreeSpec(made, shown=child.shown + (f"stack {count} along axis {node.axis}",))
    axis = node.axis + ndim if node.axis < 0 else node.axis
    if not 0 <= axis < ndim:
        return TreeSpec(None, f"unstack axis {node.axis} is out of range for a {ndim}-d source "
                        "leaf")
    if layer is None or not 0 <= layer < shape[axis]:
        return TreeSpec(None, f"unstack index {layer} is out of range: the source has "
                        f"{shape[axis]} along axis {node.axis}")
    made = (tuple(shape[:axis]) + tuple(shape[axis + 1 :]), dtype)
    return TreeSpec(made, shown=child.shown + (f"[{layer}] along axis {node.axis}",))


def _join_spec(node: Node, above: int, specs: Sequence[Any], grids: Sequence[tuple[int, ...]],
               layer: int | None) -> TreeSpec:
    """A concat's or a stack of a list's spec: its values must agree (but concat's axis)."""
    parts = [_node_spec(child, above, specs, grids, layer) for child in node.children]
    for part in parts:
        if part.spec is None:
            return part
    made = [part.spec for part in parts]
    what = "concat" if node.kind == "concat" else "stack"
    if any(shape is None for shape, _ in made):
        return TreeSpec(None, f"{what} needs array values, got "
                        f"{', '.join(_leaves.describe(m) for m in made)}")
    dtypes = [dtype for _, dtype in made]
    if any(d != dtypes[0] for d in dtypes[1:]):
        return TreeSpec(None, f"the values to {what} differ in dtype: "
                        f"{', '.join(_leaves.describe(m) for m in made)}; cast them to one "
                        "dtype first", "dtype")
    shapes = [tuple(shape) for shape, _ in made]
    ndim = len(shapes[0])
    if node.kind == "concat":
        axis = node.axis + ndim if node.axis < 0 else node.axis
        bad = not 0 <= axis < ndim or any(len(s) != ndim for s in shapes)
        if bad or any(s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]
                      for s in shapes):
            return TreeSpec(None, f"the values to concat along axis {node.axis} must agree on "
                            f"every other axis: {', '.join(_leaves.describe(m) for m in made)}")
        out = shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1 :]
    else:
        axis = node.axis + ndim + 1 if node.axis < 0 else node.axis
        if any(s != shapes[0] for s in shapes) or not 0 <= axis <= ndim:
            return TreeSpec(None, f"the values to stack along axis {node.axis} must have one "
                            f"shape: {', '.join(_leaves.describe(m) for m in made)}")
        out = shapes[0][:axis] + (len(shapes),) + shapes[0][axis:]
    head = f"{what} {len(parts)} along axis {node.axis}"
    if any(part.shown for part in parts):
        inner = " | ".join("; ".join(part.shown) or "as is" for part in parts)
        head += f" of ({inner})"
    return TreeSpec((out, dtypes[0]), shown=(head,))


def operation_shown(rule: Rule, source: Any, pair: Any) -> tuple[list[str], Any]:
    """A pair's operations as the plan shows them, and the spec they make.

    E.g. `["stack 4 along axis 0", "cast float32 -> bfloat16"]`; [] for a
    plain copy. `source` is the source's `TreeIndex`.
    """
    refs = pair_inputs(pair)
    specs = [_leaves.spec_of(source.leaves[leaves[0]]) for _, leaves in refs]
    if rule.tree is None or rule.tree.kind == "source":
        return [], specs[0]
    made = tree_spec(rule, specs, [grid for grid, _ in refs], pair.layer)
    return list(made.shown), (made.spec if made.spec is not None else specs[0])
