"""Shapes and dtypes of what a rule makes of its source leaves, on metadata only.

A stack or unstack gathers source leaves (`gathered_spec`); each per-leaf step
(cast, transpose, reshape) then changes the spec (`output_spec`). The plan
checks the result against the target exactly, before anything is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
