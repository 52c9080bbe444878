"""Rule operations: what a rule does to source leaves on their way in (docs/design.md section 10).

A mapping value is a path string, `None` (keep the target's value), or an
operation built here. `stack` and `unstack` say which source leaves feed a
target leaf; `cast`, `transpose` and `reshape` change each value. Operations
nest: `cast(unstack("params.layers", axis=0), jnp.bfloat16)`.

Each operation is planned on shapes and dtypes alone (`Step.spec`), and applied
to a block of the result at a time (`Step.pull`): a target shard asks for its
box, and the box is pulled back through the steps to the source boxes it needs,
so a sharded result is never assembled whole on one host (except through
`reshape`, which needs its whole input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from treegraft._errors import MappingError
from treegraft._parse.paths import Path
from treegraft._parse.patterns import Pattern

__all__ = ["Operation", "stack", "unstack", "cast", "transpose", "reshape", "Step"]

# A shard's index into an array, as jax gives it (`devices_indices_map`); the
# placement step's `Box` is the same region as (start, stop) bounds.
Index = tuple[slice, ...]
# A concrete shape and its dtype, as a step sees them (`_tree.leaves.ShapeDtype` also
# allows an unknown shape, for leaves that are not arrays).
ShapeDtype = tuple[tuple[int, ...], Any]
Fetch = Callable[[Index], np.ndarray]


class Operation:
    """Base of the rule values that transform source leaves (see `tg.stack`)."""

    __slots__ = ()

    def describe(self) -> str:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


def _source_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path | Pattern):
        return str(value)
    raise MappingError(
        f"{what} takes a source path or pattern string, got {type(value).__name__} {value!r}"
    )


# Operations nest at most this deep. A real conversion nests a few; the
# dataclasses' repr, hash and == recurse once per level, so a deeper chain
# would end in a RecursionError far from its cause.
MAX_DEPTH = 100


def _depth(value: Any) -> int:
    """How many operations wrap each other in value (0 for a path), without recursion."""
    n = 0
    node = value
    while isinstance(node, Cast | Transpose | Reshape):
        n += 1
        node = node.value
    return n + isinstance(node, Operation)


def _too_deep(depth: int, what: str) -> MappingError:
    return MappingError(
        f"{what}: operations nest {depth} deep, more than the {MAX_DEPTH} allowed; "
        "merge consecutive steps (one transpose, one reshape, one cast)"
    )


def _inner(value: Any, what: str) -> str | Operation:
    if isinstance(value, Operation):
        depth = _depth(value) + 1
        if depth > MAX_DEPTH:
            raise _too_deep(depth, what)
        return value
    return _source_text(value, what)


def _axis(axis: Any, what: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise MappingError(f"{what}: axis must be an int, got {type(axis).__name__} {axis!r}")
    return int(axis)


def _show(value: str | Operation) -> str:
    """An operation as the user wrote it, e.g. `cast(unstack('l', axis=0), bfloat16)`.

    A loop over the chain, not a recursion: any depth renders.
    """
    heads: list[str] = []
    tails: list[str] = []
    node: Any = value
    while isinstance(node, Cast | Transpose | Reshape):
        if isinstance(node, Cast):
            name, arg = "cast", node.dtype
        elif isinstance(node, Transpose):
            name, arg = "transpose", node.axes
        else:
            name, arg = "reshape", node.shape
        heads.append(f"{name}(")
        tails.append(f", {arg})")
        node = node.value
    inner = node.describe() if isinstance(node, Operation) else repr(node)
    return "".join(heads) + inner + "".join(reversed(tails))


@dataclass(frozen=True)
class Stack(Operation):
    """Many source subtrees, one per index of the last `*`, stacked along axis."""

    source: str
    axis: int = 0

    def describe(self) -> str:
        return f"stack({self.source!r}, axis={self.axis})"


@dataclass(frozen=True)
class Unstack(Operation):
    """One stacked source subtree, indexed by the new side's last `*` along axis."""

    source: str
    axis: int = 0

    def describe(self) -> str:
        return f"unstack({self.source!r}, axis={self.axis})"


@dataclass(frozen=True)
class Cast(Operation):
    """Each value cast to dtype: an explicit, per-rule dtype change."""

    value: str | Operation
    dtype: Any

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Transpose(Operation):
    """Each value's axes permuted, as `np.transpose(value, axes)`."""

    value: str | Operation
    axes: tuple[int, ...]

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Reshape(Operation):
    """Each value reshaped, as `np.reshape(value, shape)` (one -1 allowed)."""

    value: str | Operation
    shape: tuple[int, ...]

    def describe(self) -> str:
        return _show(self)


for _cls in (Operation, Stack, Unstack, Cast, Transpose, Reshape):
    _cls.__module__ = "treegraft"


def stack(source: str | Path | Pattern, /, axis: int = 0) -> Stack:
    """A rule value: the source subtrees matching `source`, stacked along `axis`.

    `source` has one wildcard more than the rule's new side; its last `*`
    captures the layer index. Its matches, ordered by that integer, must be
    exactly 0..N-1, and each target leaf is the stack of the N source leaves
    with the same suffix.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> src = {'layers_0': {'w': np.zeros(2)}, 'layers_1': {'w': np.ones(2)}}
      >>> new = tg.graft({'layers': {'w': np.empty((2, 2))}}, src,
      ...                {'layers': tg.stack('layers_*', axis=0)})
      >>> new['layers']['w']
      array([[0., 0.],
             [1., 1.]])
    """
    return Stack(_source_text(source, "stack"), _axis(axis, "stack"))


def unstack(source: str | Path | Pattern, /, axis: int = 0) -> Unstack:
    """A rule value: one stacked source subtree, split along `axis`.

    The rule's new side has one wildcard more than `source`; its last `*`
    captures an integer `i`, and each target leaf is the source leaf with the
    same suffix, indexed `i` along `axis`. Only that slice's chunks are read
    where the checkpoint's chunking allows it.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'layers_0': {'w': np.zeros(2)}, 'layers_1': {'w': np.zeros(2)}}
      >>> new = tg.graft(state, {'layers': {'w': np.arange(4.0).reshape(2, 2)}},
      ...                {'layers_*': tg.unstack('layers', axis=0)})
      >>> new['layers_1']['w']
      array([2., 3.])
    """
    return Unstack(_source_text(source, "unstack"), _axis(axis, "unstack"))


def cast(value: str | Path | Pattern | Operation, dtype: Any, /) -> Cast:
    """A rule value: each leaf under the rule cast to `dtype` (explicitly).

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'w': np.zeros(2, np.float16)}, {'w': np.ones(2)},
      ...                {'w': tg.cast('w', np.float16)})
      >>> new['w'].dtype
      dtype('float16')
    """
    return Cast(_inner(value, "cast"), _dtype(dtype))


def transpose(value: str | Path | Pattern | Operation, axes: Sequence[int], /) -> Transpose:
    """A rule value: each leaf's axes permuted (e.g. a PyTorch `[out, in]` kernel).

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'kernel': np.zeros((3, 2))}, {'weight': np.ones((2, 3))},
      ...                {'kernel': tg.transpose('weight', (1, 0))})
      >>> new['kernel'].shape
      (3, 2)
    """
    return Transpose(_inner(value, "transpose"), _int_tuple(axes, "transpose", "axes"))


def reshape(value: str | Path | Pattern | Operation, shape: Sequence[int], /) -> Reshape:
    """A rule value: each leaf reshaped to `shape` (at most one -1).

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'w': np.zeros((2, 3))}, {'w': np.arange(6.0)},
      ...                {'w': tg.reshape('w', (2, -1))})
      >>> new['w'][1]
      array([3., 4., 5.])
    """
    shape = _int_tuple(shape, "reshape", "shape")
    if sum(1 for d in shape if d == -1) > 1 or any(d < -1 for d in shape):
        raise MappingError(f"reshape: shape {shape} may hold one -1 and no other negative size")
    return Reshape(_inner(value, "reshape"), shape)


def _int_tuple(values: Any, what: str, name: str) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise MappingError(
            f"{what}: {name} must be a sequence of ints, got {type(values).__name__}"
        ) from None
    if any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in items):
        raise MappingError(f"{what}: {name} must be a sequence of ints, got {items!r}")
    return tuple(int(v) for v in items)


def _dtype(dtype: Any) -> np.dtype[Any]:
    try:
        out = np.dtype(dtype)
    except TypeError:
        raise MappingError(
            f"cast: {dtype!r} is not an array dtype (typed PRNG keys and Python objects "
            "cannot be cast)"
        ) from None
    if out.kind in "OSUV" and not _is_ml_dtype(out):
        raise MappingError(f"cast: {out} is not a numeric dtype; only numbers can be cast")
    return out


def _is_ml_dtype(dtype: np.dtype[Any]) -> bool:
    # bfloat16, float8_*, int4 and friends report kind 'V'.
    return dtype.kind == "V" and type(dtype).__module__.startswith("ml_dtypes")


# ----------------------------------------------------------------------------
# Steps: the per-leaf part of an operation, on specs and on blocks.
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One per-leaf change: ("cast", dtype), ("transpose", axes) or ("reshape", shape)."""

    kind: str
    arg: Any

    def describe(self, before: ShapeDtype) -> str:
        if self.kind == "cast":
            return f"cast {before[1]} -> {self.arg}"
        return f"{self.kind} {tuple(self.arg)}"

    def spec(self, before: ShapeDtype) -> tuple[ShapeDtype | None, str]:
        """The spec after this step, or None and why it does not apply."""
        shape, dtype = before
        if self.kind == "cast":
            return (shape, self.arg), ""
        if self.kind == "transpose":
            axes = self.arg
            ndim = len(shape)
            in_range = all(-ndim <= a < ndim for a in axes)
            if not in_range or sorted(a % ndim for a in axes) != list(range(ndim)):
                return None, f"transpose axes {tuple(axes)} are not a permutation of {ndim} axes"
            return (tuple(shape[a] for a in axes), dtype), ""
        size = math.prod(shape)
        target = list(self.arg)
        if -1 in target:
            known = math.prod(d for d in target if d != -1)
            if known == 0 or size % known:
                return None, f"cannot reshape {len(shape)}-d {tuple(shape)} into {tuple(target)}"
            target[target.index(-1)] = size // known
        if math.prod(target) != size:
            return None, f"cannot reshape {tuple(shape)} ({size} values) into {tuple(self.arg)}"
        return (tuple(target), dtype), ""

    def pull(self, fetch: Fetch, before: ShapeDtype) -> Fetch:
        """A fetch of this step's output boxes, from a fetch of its input boxes."""
        if self.kind == "cast":
            dtype = self.arg
            return lambda box: np.asarray(fetch(box)).astype(dtype)
        if self.kind == "transpose":
            axes = tuple(a % len(before[0]) for a in self.arg)
            inverse = np.argsort(axes)

            def transposed(box: Index) -> np.ndarray:
                inner = tuple(box[int(inverse[k])] for k in range(len(axes)))
                return np.asarray(fetch(inner)).transpose(axes)

            return transposed
        after = self.spec(before)[0]
        assert after is not None
        whole = tuple(slice(0, d) for d in before[0])
        return lambda box: np.asarray(fetch(whole)).reshape(after[0])[box]


def flatten_operation(value: Operation) -> tuple[str, str, int, tuple[Step, ...]]:
    """Splits an operation into (gather kind, source text, axis, per-leaf steps).

    The gather kind is "copy", "stack" or "unstack"; steps are in the order
    they apply (innermost first).
    """
    depth = _depth(value)
    if depth > MAX_DEPTH:  # built from the classes, past the functions' check
        raise _too_deep(depth, "the rule's value")
    steps: list[Step] = []
    node: Any = value
    while isinstance(node, Cast | Transpose | Reshape):
        if isinstance(node, Cast):
            steps.append(Step("cast", node.dtype))
        elif isinstance(node, Transpose):
            steps.append(Step("transpose", node.axes))
        else:
            steps.append(Step("reshape", node.shape))
        node = node.value
    steps.reverse()
    if isinstance(node, Stack):
        return "stack", node.source, node.axis, tuple(steps)
    if isinstance(node, Unstack):
        return "unstack", node.source, node.axis, tuple(steps)
    if isinstance(node, str):
        return "copy", node, 0, tuple(steps)
    raise MappingError(
        f"an operation's innermost value must be a path string, stack or unstack; got "
        f"{type(node).__name__}"
    )
