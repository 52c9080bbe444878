"""Rule operations: what a rule does to source leaves on their way in (docs/design.md section 16).

A mapping value is a path string, `None` (keep the target's value), or an
operation built here. `stack` and `unstack` say which source leaves feed a
target leaf; `concat` and `stack` of a list join several named values;
`cast`, `transpose`, `reshape`, `take`, `slice`, `pad`, `scale` and `offset`
change each value. Operations nest everywhere:
`stack(stack(transpose("layers_*.experts_*.w", (1, 0))))`.

A rule's value compiles (`compile_operation`) into a small tree of `Node`s
whose leaves are source references, one pattern each (`Input`). Each node is
planned on shapes and dtypes alone, and applied to a block of the result at
a time: a target shard asks for its box, and the box is pulled back through
the nodes to the source boxes it needs, so a sharded result is never
assembled whole on one host (except through `reshape`, which needs its whole
input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from treegraft._errors import MappingError
from treegraft._parse.paths import Path
from treegraft._parse.patterns import Pattern

__all__ = [
    "Operation",
    "stack",
    "unstack",
    "cast",
    "transpose",
    "reshape",
    "take",
    "slice",
    "pad",
    "scale",
    "offset",
    "concat",
    "Step",
    "Node",
    "Input",
    "compile_operation",
]

# A shard's index into an array, as jax gives it (`devices_indices_map`); the
# placement step's `Box` is the same region as (start, stop) bounds.
Index = tuple[slice, ...]
# A concrete shape and its dtype, as a step sees them (`_tree.leaves.ShapeDtype` also
# allows an unknown shape, for leaves that are not arrays).
ShapeDtype = tuple[tuple[int, ...], Any]
Fetch = Callable[[Index], np.ndarray]
_slice = slice  # the builtin, before `slice` the operation shadows it


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


def _children(node: Any) -> tuple[Any, ...]:
    """The values an operation takes (paths or operations), in order."""
    if isinstance(node, Concat | StackList):
        return tuple(node.values)
    if isinstance(node, Stack | Unstack):
        return (node.source,)
    if isinstance(node, Operation):
        return (getattr(node, "value", None),)
    return ()


def _depth(value: Any) -> int:
    """How many operations wrap each other in value at most (0 for a path), without recursion."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        node, n = todo.pop()
        if isinstance(node, Operation):
            todo.extend((child, n + 1) for child in _children(node))
        else:
            deepest = max(deepest, n)
    return deepest


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


def _values(values: Any, what: str) -> tuple[str | Operation, ...]:
    """A list of values (paths, patterns or operations), at least one."""
    if isinstance(values, str | Path | Pattern | Operation) or not isinstance(
        values, list | tuple
    ):
        raise MappingError(
            f"{what} takes a list of values (paths, patterns or operations), got "
            f"{type(values).__name__} {values!r}"
        )
    if not values:
        raise MappingError(f"{what} takes at least one value, got an empty list")
    return tuple(_inner(v, what) for v in values)


def _axis(axis: Any, what: str, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise MappingError(f"{what}: {name} must be an int, got {type(axis).__name__} {axis!r}")
    return int(axis)


def _number(value: Any, what: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise MappingError(
            f"{what}: {name} must be a real number, got {type(value).__name__} {value!r}"
        )
    out = float(value)
    if not math.isfinite(out):
        raise MappingError(f"{what}: {name} must be finite, got {out!r}")
    return out


def _show(value: str | Operation) -> str:
    """An operation as the user wrote it, e.g. `cast(unstack('l', axis=0), bfloat16)`.

    A loop over the chain of one-value operations, not a recursion: any depth
    renders; only lists of values (concat, stack of a list) recurse.
    """
    heads: list[str] = []
    tails: list[str] = []
    node: Any = value
    while isinstance(node, Operation) and not isinstance(node, Concat | StackList):
        if isinstance(node, Stack | Unstack) and not isinstance(node.source, Operation):
            break
        name, tail = node._parts()  # type: ignore[attr-defined]
        heads.append(f"{name}(")
        tails.append(tail)
        node = _children(node)[0]
    if isinstance(node, Operation):
        inner = node._own()  # type: ignore[attr-defined]
    else:
        inner = repr(node)
    return "".join(heads) + inner + "".join(reversed(tails))


def _list_text(values: Sequence[Any]) -> str:
    return "[" + ", ".join(_show(v) for v in values) + "]"


@dataclass(frozen=True)
class Stack(Operation):
    """Many source subtrees, one per index of the last `*` capturing integers, stacked."""

    source: str | Operation
    axis: int = 0

    def _parts(self) -> tuple[str, str]:
        return "stack", f", axis={self.axis})"

    def _own(self) -> str:
        return f"stack({self.source!r}, axis={self.axis})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Unstack(Operation):
    """One stacked source subtree, indexed by the new side's last `*` along axis."""

    source: str | Operation
    axis: int = 0

    def _parts(self) -> tuple[str, str]:
        return "unstack", f", axis={self.axis})"

    def _own(self) -> str:
        return f"unstack({self.source!r}, axis={self.axis})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class StackList(Operation):
    """Several values, stacked in order on a new axis (`tg.stack([a, b])`)."""

    values: tuple[str | Operation, ...]
    axis: int = 0

    def _own(self) -> str:
        return f"stack({_list_text(self.values)}, axis={self.axis})"

    def describe(self) -> str:
        return self._own()


@dataclass(frozen=True)
class Concat(Operation):
    """Several values joined along an existing axis."""

    values: tuple[str | Operation, ...]
    axis: int = 0

    def _own(self) -> str:
        return f"concat({_list_text(self.values)}, axis={self.axis})"

    def describe(self) -> str:
        return self._own()


@dataclass(frozen=True)
class Cast(Operation):
    """Each value cast to dtype: an explicit, per-rule dtype change."""

    value: str | Operation
    dtype: Any

    def _parts(self) -> tuple[str, str]:
        return "cast", f", {self.dtype})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Transpose(Operation):
    """Each value's axes permuted, as `np.transpose(value, axes)`."""

    value: str | Operation
    axes: tuple[int, ...]

    def _parts(self) -> tuple[str, str]:
        return "transpose", f", {self.axes})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Reshape(Operation):
    """Each value reshaped, as `np.reshape(value, shape)` (one -1 allowed)."""

    value: str | Operation
    shape: tuple[int, ...]

    def _parts(self) -> tuple[str, str]:
        return "reshape", f", {self.shape})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Take(Operation):
    """One index of an axis, the axis removed (`np.take(value, index, axis)`)."""

    value: str | Operation
    index: int
    axis: int = 0

    def _parts(self) -> tuple[str, str]:
        return "take", f", {self.index}, axis={self.axis})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Slice(Operation):
    """A range `start:stop` of one axis."""

    value: str | Operation
    start: int
    stop: int
    axis: int = 0

    def _parts(self) -> tuple[str, str]:
        return "slice", f", {self.start}, {self.stop}, axis={self.axis})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Pad(Operation):
    """One axis grown to `size`, the new end filled with `constant`."""

    value: str | Operation
    size: int
    axis: int = 0
    constant: Any = 0

    def _parts(self) -> tuple[str, str]:
        return "pad", f", {self.size}, axis={self.axis}, constant={self.constant!r})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Scale(Operation):
    """Each value times `factor` (floating leaves only)."""

    value: str | Operation
    factor: float

    def _parts(self) -> tuple[str, str]:
        return "scale", f", {self.factor!r})"

    def describe(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Offset(Operation):
    """Each value plus `amount` (floating leaves only)."""

    value: str | Operation
    amount: float

    def _parts(self) -> tuple[str, str]:
        return "offset", f", {self.amount!r})"

    def describe(self) -> str:
        return _show(self)


_CLASSES = (Operation, Stack, Unstack, StackList, Concat, Cast, Transpose, Reshape, Take,
            Slice, Pad, Scale, Offset)
for _cls in _CLASSES:
    _cls.__module__ = "treegraft"


def stack(source: Any, /, axis: int = 0) -> Stack | StackList:
    """A rule value: source subtrees stacked along a new `axis`.

    `source` is one of:
      - a path or pattern string with one wildcard more than the rule's new
        side: the last `*` that captures integer indices (`layers_*`,
        `experts.*`) is stacked, its matches ordered by index and exactly
        0..N-1; the other wildcards carry to the new side in order;
      - an operation over such a pattern (`stack(transpose('l_*', (1, 0)))`),
        or another stack (the inner one stacks the last index, the outer one
        the index before it: `[layers, experts, ...]`);
      - a list of values (paths, patterns with the new side's captures, or
        operations), stacked in that order.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> src = {'layers_0': {'w': np.zeros(2)}, 'layers_1': {'w': np.ones(2)}}
      >>> new = tg.graft({'layers': {'w': np.empty((2, 2))}}, src,
      ...                {'layers': tg.stack('layers_*', axis=0)})
      >>> new['layers']['w']
      array([[0., 0.],
             [1., 1.]])
      >>> kv = tg.graft({'kv': np.empty((2, 3))}, {'k': np.zeros(3), 'v': np.ones(3)},
      ...               {'kv': tg.stack(['k', 'v'])})
      >>> kv['kv'][1]
      array([1., 1., 1.])
    """
    if isinstance(source, list | tuple):
        return StackList(_values(source, "stack"), _axis(axis, "stack"))
    if isinstance(source, Operation):
        return Stack(_inner(source, "stack"), _axis(axis, "stack"))
    try:
        text = _source_text(source, "stack")
    except MappingError as e:
        raise MappingError(f"{e}; it also takes an operation or a list of values") from None
    return Stack(text, _axis(axis, "stack"))


def unstack(source: Any, /, axis: int = 0) -> Unstack:
    """A rule value: one stacked source subtree, split along `axis`.

    The rule's new side has one wildcard more than `source`; its last `*`
    captures an integer `i`, and each target leaf is the source leaf with the
    same suffix, indexed `i` along `axis`. Only that slice's chunks are read
    where the checkpoint's chunking allows it. `source` may be an operation.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'layers_0': {'w': np.zeros(2)}, 'layers_1': {'w': np.zeros(2)}}
      >>> new = tg.graft(state, {'layers': {'w': np.arange(4.0).reshape(2, 2)}},
      ...                {'layers_*': tg.unstack('layers', axis=0)})
      >>> new['layers_1']['w']
      array([2., 3.])
    """
    return Unstack(_inner(source, "unstack"), _axis(axis, "unstack"))


def concat(values: Any, /, axis: int = 0) -> Concat:
    """A rule value: several values joined along an existing `axis` (a fused kernel).

    Each value is a path, a pattern with the new side's captures, or an
    operation; their shapes must agree but for `axis`, and their dtypes must
    be equal.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'qkv': np.empty(5)}, {'q': np.zeros(3), 'k': np.ones(2)},
      ...                {'qkv': tg.concat(['q', 'k'])})
      >>> new['qkv']
      array([0., 0., 0., 1., 1.])
    """
    return Concat(_values(values, "concat"), _axis(axis, "concat"))


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


def take(value: str | Path | Pattern | Operation, index: int, /, axis: int = 0) -> Take:
    """A rule value: index `index` of `axis`, the axis removed (`np.take`).

    A negative index counts from the end. Only that index's chunks are read
    where the checkpoint's chunking allows it.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'k': np.empty(3)}, {'kv': np.arange(6.0).reshape(2, 3)},
      ...                {'k': tg.take('kv', 0)})
      >>> new['k']
      array([0., 1., 2.])
    """
    return Take(_inner(value, "take"), _axis(index, "take", "index"), _axis(axis, "take"))


def slice(  # noqa: A001 - the operation's public name, as numpy's `slice` reads
    value: str | Path | Pattern | Operation, start: int, stop: int, /, axis: int = 0
) -> Slice:
    """A rule value: the range `start:stop` of `axis` (unfusing a fused kernel).

    `0 <= start < stop`; `stop` must not pass the axis's size (checked in
    `plan`). Only the chunks holding the range are read where the
    checkpoint's chunking allows it.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'up': np.empty(2)}, {'gate_up': np.arange(4.0)},
      ...                {'up': tg.slice('gate_up', 2, 4)})
      >>> new['up']
      array([2., 3.])
    """
    start = _axis(start, "slice", "start")
    stop = _axis(stop, "slice", "stop")
    if not 0 <= start < stop:
        raise MappingError(f"slice: needs 0 <= start < stop, got start={start}, stop={stop}")
    return Slice(_inner(value, "slice"), start, stop, _axis(axis, "slice"))


def pad(
    value: str | Path | Pattern | Operation, size: int, /, axis: int = 0, constant: Any = 0
) -> Pad:
    """A rule value: `axis` grown to `size`, the new end filled with `constant`.

    The constant must be a value of the leaf's dtype (checked in `plan`).

    Example:
      >>> import numpy as np, treegraft as tg
      >>> new = tg.graft({'emb': np.empty(4)}, {'emb': np.ones(3)},
      ...                {'emb': tg.pad('emb', 4)})
      >>> new['emb']
      array([1., 1., 1., 0.])
    """
    size = _axis(size, "pad", "size")
    if size < 0:
        raise MappingError(f"pad: size must be >= 0, got {size}")
    if isinstance(constant, bool | np.bool_):
        constant = bool(constant)
    elif isinstance(constant, int | np.integer):
        constant = int(constant)
    else:
        constant = _number(constant, "pad", "constant")
    return Pad(_inner(value, "pad"), size, _axis(axis, "pad"), constant)


def scale(value: str | Path | Pattern | Operation, factor: float, /) -> Scale:
    """A rule value: each value times `factor` (query scaling).

    Floating leaves only; bfloat16, float16 and float8 values are computed in
    float32 and rounded once to their dtype.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> tg.graft({'q': np.empty(2)}, {'q': np.ones(2)}, {'q': tg.scale('q', 0.5)})['q']
      array([0.5, 0.5])
    """
    return Scale(_inner(value, "scale"), _number(factor, "scale", "factor"))


def offset(value: str | Path | Pattern | Operation, amount: float, /) -> Offset:
    """A rule value: each value plus `amount` (a `1 + w` norm).

    Floating leaves only; bfloat16, float16 and float8 values are computed in
    float32 and rounded once to their dtype.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> tg.graft({'n': np.empty(2)}, {'n': np.zeros(2)}, {'n': tg.offset('n', 1.0)})['n']
      array([1., 1.])
    """
    return Offset(_inner(value, "offset"), _number(amount, "offset", "amount"))


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


def is_floating(dtype: Any) -> bool:
    """Whether dtype is a real floating dtype (numpy's or ml_dtypes' bfloat16, float8...)."""
    if not isinstance(dtype, np.dtype):
        return False
    if dtype.kind == "f":
        return True
    return _is_ml_dtype(dtype) and "float" in dtype.name


# ----------------------------------------------------------------------------
# Steps: the per-leaf part of an operation, on specs and on blocks.
# ----------------------------------------------------------------------------


def _norm_axis(axis: int, ndim: int) -> int | None:
    """axis in 0..ndim-1 (negative counts from the end), or None when out of range."""
    a = axis + ndim if axis < 0 else axis
    return a if 0 <= a < ndim else None


def _float_compute(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype scale and offset compute in: float32 for narrower floats, else the leaf's."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


@dataclass(frozen=True)
class Step:
    """One per-leaf change, `kind` with its `arg`.

    ("cast", dtype), ("transpose", axes), ("reshape", shape), ("take", (index,
    axis)), ("slice", (start, stop, axis)), ("pad", (size, axis, constant)),
    ("scale", factor) or ("offset", amount).
    """

    kind: str
    arg: Any

    def describe(self, before: ShapeDtype) -> str:
        k, arg = self.kind, self.arg
        if k == "cast":
            return f"cast {before[1]} -> {arg}"
        if k == "take":
            return f"take [{arg[0]}] along axis {arg[1]}"
        if k == "slice":
            return f"slice {arg[0]}:{arg[1]} along axis {arg[2]}"
        if k == "pad":
            return f"pad axis {arg[1]} to {arg[0]} with {arg[2]!r}"
        if k == "scale":
            return f"scale by {arg!r}"
        if k == "offset":
            return f"offset by {arg!r}"
        return f"{k} {tuple(arg)}"

    def spec(self, before: ShapeDtype) -> tuple[ShapeDtype | None, str]:
        """The spec after this step, or None and why it does not apply."""
        shape, dtype = before
        k = self.kind
        if k == "cast":
            return (shape, self.arg), ""
        if k == "transpose":
            axes = self.arg
            ndim = len(shape)
            in_range = all(-ndim <= a < ndim for a in axes)
            if not in_range or sorted(a % ndim for a in axes) != list(range(ndim)):
                return None, f"transpose axes {tuple(axes)} are not a permutation of {ndim} axes"
            return (tuple(shape[a] for a in axes), dtype), ""
        if k in ("take", "slice", "pad"):
            return _axis_step_spec(k, self.arg, tuple(shape), dtype)
        if k in ("scale", "offset"):
            if not is_floating(dtype):
                return None, (
                    f"{k} applies to floating leaves only, the leaf is {dtype}; "
                    "integer, bool and key leaves are refused"
                )
            return (tuple(shape), dtype), ""
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
        k = self.kind
        if k == "cast":
            dtype = self.arg
            return lambda box: np.asarray(fetch(box)).astype(dtype)
        if k == "transpose":
            axes = tuple(a % len(before[0]) for a in self.arg)
            inverse = np.argsort(axes)

            def transposed(box: Index) -> np.ndarray:
                inner = tuple(box[int(inverse[k])] for k in range(len(axes)))
                return np.asarray(fetch(inner)).transpose(axes)

            return transposed
        if k in ("take", "slice", "pad"):
            return _axis_step_pull(k, self.arg, fetch, before)
        if k in ("scale", "offset"):
            return _arith_pull(k, self.arg, fetch, before[1])
        after = self.spec(before)[0]
        assert after is not None
        whole = tuple(_slice(0, d) for d in before[0])
        return lambda box: np.asarray(fetch(whole)).reshape(after[0])[box]


def _axis_step_spec(
    kind: str, arg: Any, shape: tuple[int, ...], dtype: Any
) -> tuple[ShapeDtype | None, str]:
    """The spec after a take, slice or pad, or None and why (axis or range out of bounds)."""
    axis = arg[1] if kind in ("take", "pad") else arg[2]
    ndim = len(shape)
    a = _norm_axis(axis, ndim)
    if a is None:
        return None, f"{kind} axis {axis} is out of range for a {ndim}-d value"
    n = shape[a]
    if kind == "take":
        index = arg[0]
        if not -n <= index < n:
            return None, f"take index {index} is out of range: the value has {n} along axis {axis}"
        return (shape[:a] + shape[a + 1 :], dtype), ""
    if kind == "slice":
        start, stop = arg[0], arg[1]
        if stop > n:
            return None, (
                f"slice {start}:{stop} is out of range: the value has {n} along axis {axis}"
            )
        return (shape[:a] + (stop - start,) + shape[a + 1 :], dtype), ""
    size, constant = arg[0], arg[2]
    if size < n:
        return None, (
            f"pad to {size} along axis {axis} is smaller than the value's {n}: pad only grows "
            "an axis (use slice to cut it)"
        )
    why = _constant_misfit(constant, dtype)
    if why:
        return None, why
    return (shape[:a] + (size,) + shape[a + 1 :], dtype), ""


def _constant_misfit(constant: Any, dtype: Any) -> str:
    """Why pad's constant is not a value of dtype ("" when it is)."""
    if not isinstance(dtype, np.dtype) or dtype.kind in "OSUV" and not _is_ml_dtype(dtype):
        return f"pad needs a numeric leaf, the leaf is {dtype}"
    with np.errstate(all="ignore"):
        try:
            made = np.asarray(constant).astype(dtype)
        except (TypeError, ValueError, OverflowError):
            made = None
    if made is None or made.astype(np.float64 if dtype.kind != "c" else np.complex128) != constant:
        return f"pad constant {constant!r} is not a value of {dtype}: it would change when cast"
    return ""


def _axis_step_pull(kind: str, arg: Any, fetch: Fetch, before: ShapeDtype) -> Fetch:
    shape = tuple(before[0])
    axis = arg[1] if kind in ("take", "pad") else arg[2]
    a = _norm_axis(axis, len(shape))
    assert a is not None
    n = shape[a]
    if kind == "take":
        index = arg[0] + n if arg[0] < 0 else arg[0]

        def taken(box: Index) -> np.ndarray:
            inner = box[:a] + (_slice(index, index + 1),) + box[a:]
            return np.squeeze(np.asarray(fetch(inner)), axis=a)

        return taken
    if kind == "slice":
        start = arg[0]

        def sliced(box: Index) -> np.ndarray:
            b = box[a]
            inner = box[:a] + (_slice(b.start + start, b.stop + start),) + box[a + 1 :]
            return np.asarray(fetch(inner))

        return sliced
    constant, dtype = arg[2], before[1]

    def padded(box: Index) -> np.ndarray:
        b = box[a]
        out = np.full(tuple(s.stop - s.start for s in box), constant, dtype)
        if b.start < n:  # the part of the box inside the value
            stop = min(b.stop, n)
            inner = box[:a] + (_slice(b.start, stop),) + box[a + 1 :]
            out[(_slice(None),) * a + (_slice(0, stop - b.start),)] = fetch(inner)
        return out

    return padded


def _arith_pull(kind: str, amount: float, fetch: Fetch, dtype: Any) -> Fetch:
    work = _float_compute(np.dtype(dtype))
    value = work.type(amount)

    def computed(box: Index) -> np.ndarray:
        x = np.asarray(fetch(box)).astype(work)
        out = x * value if kind == "scale" else x + value
        return out.astype(dtype)  # rounded once to the leaf's dtype

    return computed


# ----------------------------------------------------------------------------
# The compiled tree: source references (inputs) under gather, join and step nodes.
# ----------------------------------------------------------------------------


class Input(NamedTuple):
    """One source reference of a rule: a pattern and how its leaves are gathered.

    Attributes:
      text: the source pattern's text.
      levels: how many capture stacks stand above it (each stacks one more
        integer capture of the pattern: the innermost the last one).
      unstack: whether an unstack stands above it (it takes the new side's
        last capture as its index).
    """

    text: str
    levels: int = 0
    unstack: bool = False


@dataclass(frozen=True)
class Node:
    """A node of a compiled rule value.

    kind "source" (input `slot`), "step" (`step` on its one child), "stack"
    (a capture stack of its one child along `axis`), "unstack" (its one
    child indexed by the new side's last capture along `axis`), "concat" or
    "stack_list" (its children joined along `axis`).
    """

    kind: str
    children: tuple[Node, ...] = ()
    axis: int = 0
    step: Step | None = None
    slot: int = -1

    def inputs_below(self) -> list[int]:
        """The slots of the inputs under this node, in order."""
        out: list[int] = []
        todo: list[Node] = [self]
        while todo:
            node = todo.pop()
            if node.kind == "source":
                out.append(node.slot)
            todo.extend(reversed(node.children))
        return out


_STEP_OF: dict[type, Callable[[Any], Step]] = {
    Cast: lambda o: Step("cast", o.dtype),
    Transpose: lambda o: Step("transpose", o.axes),
    Reshape: lambda o: Step("reshape", o.shape),
    Take: lambda o: Step("take", (o.index, o.axis)),
    Slice: lambda o: Step("slice", (o.start, o.stop, o.axis)),
    Pad: lambda o: Step("pad", (o.size, o.axis, o.constant)),
    Scale: lambda o: Step("scale", o.factor),
    Offset: lambda o: Step("offset", o.amount),
}


def compile_operation(value: Any) -> tuple[Node, tuple[Input, ...]]:
    """A rule value as a tree of nodes over its source references.

    Raises:
      MappingError: nesting too deep; a capture stack or unstack over more
        than one source (stack or unstack each one instead); two unstacks,
        or a stack and an unstack, of one source; an innermost value that is
        not a path.
    """
    depth = _depth(value)
    if depth > MAX_DEPTH:  # built from the classes, past the functions' check
        raise _too_deep(depth, "the rule's value")
    inputs: list[Input] = []
    node = _compile(value, inputs)
    return node, tuple(inputs)


def _compile(value: Any, inputs: list[Input]) -> Node:
    if isinstance(value, str | Path | Pattern):
        inputs.append(Input(str(value)))
        return Node("source", slot=len(inputs) - 1)
    if isinstance(value, Concat | StackList):
        kids = tuple(_compile(v, inputs) for v in value.values)
        return Node("concat" if isinstance(value, Concat) else "stack_list", kids, value.axis)
    if isinstance(value, Stack | Unstack):
        first = len(inputs)
        child = _compile(value.source, inputs)
        what = "stack" if isinstance(value, Stack) else "unstack"
        if len(inputs) - first != 1:
            raise MappingError(
                f"{value.describe()}: a {what} of a pattern takes one source pattern, this one "
                f"holds {len(inputs) - first}; {what} each value inside instead"
            )
        ref = inputs[first]
        if ref.unstack:
            raise MappingError(
                f"{value.describe()}: the source {ref.text!r} is already unstacked; a {what} "
                "over an unstack of one source does not nest (take a fixed index with take)"
            )
        if isinstance(value, Unstack) and ref.levels:
            raise MappingError(
                f"{value.describe()}: an unstack over a stack of one source does not nest"
            )
        if isinstance(value, Stack):
            inputs[first] = ref._replace(levels=ref.levels + 1)
        else:
            inputs[first] = ref._replace(unstack=True)
        return Node(what, (child,), value.axis)
    make = _STEP_OF.get(type(value))
    if make is None:
        raise MappingError(
            f"an operation's innermost value must be a path string, stack or unstack; got "
            f"{type(value).__name__}"
        )
    return Node("step", (_compile(value.value, inputs),), step=make(value))


def flatten_operation(value: Operation) -> tuple[str, str, int, tuple[Step, ...]]:
    """Splits a one-source operation into (gather kind, source text, axis, per-leaf steps).

    The form rules had before operations nested everywhere: the gather
    ("copy", "stack" or "unstack") directly on a path, then steps (innermost
    first). Other forms are a `MappingError` here; `compile_operation` takes
    every form.
    """
    node, inputs = compile_operation(value)
    steps: list[Step] = []
    while node.kind == "step":
        assert node.step is not None
        steps.append(node.step)
        node = node.children[0]
    steps.reverse()
    if node.kind == "source":
        return "copy", inputs[0].text, 0, tuple(steps)
    if node.kind in ("stack", "unstack") and node.children[0].kind == "source":
        return node.kind, inputs[0].text, node.axis, tuple(steps)
    raise MappingError(f"{value.describe()} is not a gather on a path followed by steps")
