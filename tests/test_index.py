"""TreeIndex: traced leaves refused, and what a missing path finds instead."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treegraft as tg
from treegraft._tree.index import TreeIndex

_TRACED = (
    r"holds a traced value at 'w' \(\w+Tracer\): treegraft runs outside jax\.jit / "
    r"jax\.grad / jax\.vmap\. Plan and graft outside the traced function, then pass the new "
    r"state in as an argument"
)


def test_graft_under_jit_is_a_typed_error_naming_the_leaf():
    state = {"w": jnp.zeros(3)}
    source = {"w": jnp.ones(3)}

    def step(s, src):
        return tg.graft(s, src, {"w": "w"})

    with pytest.raises(tg.GraftError, match="the state " + _TRACED):
        jax.jit(step)(state, source)
    with pytest.raises(tg.GraftError, match="the source " + _TRACED):
        jax.jit(lambda src: tg.graft(state, src, {"w": "w"}))(source)
    with pytest.raises(tg.GraftError, match="the state " + _TRACED):
        jax.grad(lambda s: tg.plan(s, source, {"w": "w"}) and 0.0)(state)
    # Outside jit, the same graft works, and its result goes into jit.
    new = step(state, source)
    assert float(jax.jit(lambda s: s["w"].sum())(new)) == 3.0


def test_a_traced_leaf_is_found_past_untraced_ones():
    def index(x):
        TreeIndex({"a": np.zeros(2), "b": [1, {"c": x}]}, "the state")
        return x

    with pytest.raises(tg.GraftError, match=r"the state holds a traced value at 'b\[1\]\.c'"):
        jax.jit(index)(jnp.zeros(2))


Pair = collections.namedtuple("Pair", "x y")


@pytest.mark.parametrize(
    "node, said",
    [
        pytest.param(None, "is None", id="None"),
        pytest.param({}, "is an empty dict", id="empty-dict"),
        pytest.param([], "is an empty list", id="empty-list"),
        pytest.param((), "is an empty tuple", id="empty-tuple"),
        pytest.param({"y": None}, "is a dict with no leaves", id="dict-of-None"),
        pytest.param(Pair(None, None), "is a Pair with no leaves", id="namedtuple-of-None"),
    ],
)
def test_missing_says_what_the_source_has_there(node, said):
    with pytest.raises(tg.PathNotFoundError, match=rf"'x' <- 'x': 'x' {said} in the source"):
        tg.plan({"x": np.zeros(2)}, {"x": node}, {"": ""})
    assert TreeIndex({"x": node}, "the source").why_missing(("x",)) == f"'x' {said} in the source"
    assert "exists" not in TreeIndex({"x": node}, "the source").why_missing(("x",))


def test_missing_at_the_root():
    assert TreeIndex(None, "the source").why_missing(()) == "the root is None in the source"
