"""Shared test helpers: small array and tree builders, and assertions on trees and placement.

Import them beside the test files (pytest puts `tests/` on `sys.path`):

    from helpers import assert_trees_equal, f32

Value checks go through chex where it states the same check; placement and buffer
ownership, which chex does not know, are plain code.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import numpy as np

# ----------------------------------------------------------------------------
# Builders.
# ----------------------------------------------------------------------------


def f32(*shape: int, value: float = 0.0) -> np.ndarray:
    """A float32 numpy array of `shape`, every element `value`."""
    return np.full(shape, value, np.float32)


def attention(value: float = 0.0) -> dict:
    """One attention level: {'attn': {'kernel': [4, 2], 'bias': [2]}}, all `value`."""
    return {"attn": {"kernel": f32(4, 2, value=value), "bias": f32(2, value=value)}}


def block(value: float = 0.0) -> dict:
    """A small transformer-ish block: two levels of nesting below its root, all `value`."""
    return {
        "attn": {"q": {"kernel": f32(4, 2, value=value), "bias": f32(2, value=value)}},
        "norm": {"scale": f32(4, value=value)},
    }


# ----------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same treedef, and per leaf the same type, shape, dtype and values (exact)."""
    # strict: numpy's equality then also requires equal shapes and dtypes.
    chex.assert_trees_all_equal(a, b, strict=True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array)), (
            type(x),
            type(y),
        )
        if not hasattr(x, "shape"):  # python scalars: equal as python compares them
            assert x == y, (x, y)


def assert_same_values(a: Any, b: Any) -> None:
    """Same treedef and the same values, leaf by leaf (exact, as numpy's assert_array_equal)."""
    chex.assert_trees_all_equal(a, b)


def assert_leaves_equal(a: Any, b: Any) -> None:
    """The same non-empty list of leaf values, whatever containers hold them (exact)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0, (len(la), len(lb))
    chex.assert_trees_all_equal(la, lb)


def assert_same_objects(got: Any, want: Any) -> None:
    """Same treedef, and every leaf the very same object (containers may be rebuilt)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x is y, (x, y)


def assert_same_specs(a: Any, b: Any) -> None:
    """Same treedef, and per leaf the same shape and dtype (values not compared)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


# ----------------------------------------------------------------------------
# Placement and buffers.
# ----------------------------------------------------------------------------


def assert_placed_like(got: Any, like: Any) -> None:
    """got is what a graft puts in place of `like`: its kind, shape, dtype and sharding.

    An abstract `like` (a `jax.ShapeDtypeStruct`) becomes a `jax.Array`, on the
    sharding the struct names when it names one.
    """
    if isinstance(like, jax.ShapeDtypeStruct):
        assert isinstance(got, jax.Array), type(got)
        if getattr(like, "sharding", None) is not None:
            assert got.sharding == like.sharding, (got.sharding, like.sharding)
    elif isinstance(like, jax.Array):
        assert isinstance(got, jax.Array), type(got)
        assert got.sharding == like.sharding, (got.sharding, like.sharding)
    else:
        assert type(got) is type(like), (type(got), type(like))
    if hasattr(like, "shape"):
        assert tuple(got.shape) == tuple(like.shape), (got.shape, like.shape)
        assert np.dtype(got.dtype) == np.dtype(like.dtype), (got.dtype, like.dtype)


def buffer_pointers(x: Any) -> list[int]:
    """The buffer address of every addressable shard of x (numpy: its data address)."""
    if isinstance(x, np.ndarray):
        return [x.ctypes.data]
    return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


def assert_owns_buffers(x: Any, *others: Any) -> None:
    """Every shard of x has a buffer of its own, shared with no shard of `others`."""
    mine = buffer_pointers(x)
    assert len(set(mine)) == len(mine), mine
    theirs = {p for other in others for p in buffer_pointers(other)}
    assert not set(mine) & theirs, (mine, theirs)


def mesh_2x4() -> jax.sharding.Mesh:
    """The 2 x 4 (`a`, `b`) mesh over the 8 CPU devices the suite runs with."""
    return jax.make_mesh((2, 4), ("a", "b"))


# ----------------------------------------------------------------------------
# Reads.
# ----------------------------------------------------------------------------


def rchar() -> int:
    """Bytes this process has read so far (`rchar` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def safetensors_oracle(path: str, name: str) -> np.ndarray:
    """The tensor as safetensors' own reader gives it."""
    import safetensors

    with safetensors.safe_open(path, "numpy") as f:
        return f.get_tensor(name)
