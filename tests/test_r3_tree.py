"""Reliability round 3, trees and stack indices: what these tests prove.

- A custom pytree node may give its children in another order on every
  flatten (a set-like node, a dict subclass that sorts its own way). treegraft
  pairs leaves with paths by key, from one flatten, so every value lands under
  its own key, also when the children are one shared object (which identity
  cannot tell apart), through flax NNX Variables, and in `propagate_sharding`.
- Stack indices: `l_1` and `l_01` are one index; a stack (source keys) or an
  unstack (target keys) that spells one index twice is a typed error naming
  both, whatever `strict`. Indices far apart (`l_0`, `l_1000000000000`) are
  reported as ranges, in constant memory and time.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import textwrap
from typing import Any

import jax
import numpy as np
import pytest
from jax import tree_util

import treegraft as tg
from treegraft._tree.flat import flatten_parts

REPEATS = 30

# ----------------------------------------------------------------------------
# Nodes whose flatten order changes on every call; their keys are right.
# ----------------------------------------------------------------------------


class Bag:
    """A set-like node: each flatten starts at the next key (a rotation)."""

    turn = itertools.count()

    def __init__(self, items: Any):
        self.items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self.items[key]


def _flatten_bag(bag: Bag) -> tuple[list[tuple[Any, Any]], tuple[str, ...]]:
    keys = sorted(bag.items)
    r = next(Bag.turn) % len(keys) if keys else 0
    keys = keys[r:] + keys[:r]
    return [(tree_util.DictKey(k), bag.items[k]) for k in keys], tuple(keys)


tree_util.register_pytree_with_keys(
    Bag, _flatten_bag, lambda keys, kids: Bag(zip(keys, kids, strict=True))
)


class ShuffledDict(dict):
    """A dict subclass whose flatten gives its keys in a random order."""


_SHUFFLE = random.Random(0)


def _flatten_shuffled(d: ShuffledDict) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    keys = list(d)
    _SHUFFLE.shuffle(keys)
    return [(tree_util.DictKey(k), d[k]) for k in keys], tuple(keys)


tree_util.register_pytree_with_keys(
    ShuffledDict, _flatten_shuffled, lambda keys, kids: ShuffledDict(zip(keys, kids, strict=True))
)

NODES = [pytest.param(Bag, id="set-like"), pytest.param(ShuffledDict, id="dict-subclass")]
KEYS = ("a", "b", "c", "d")


def full(value: float) -> np.ndarray:
    return np.full(2, value, np.float32)


def values_by_key(node: Any) -> dict[str, float]:
    return {k: float(np.asarray(node[k]).ravel()[0]) for k in KEYS}


EXPECTED = {k: float(i + 1) for i, k in enumerate(KEYS)}


# ----------------------------------------------------------------------------
# Item 5: nodes that reorder their children.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("node", NODES)
def test_flatten_pairs_each_path_with_its_own_position_in_the_treedef(node):
    shared = np.zeros(2, np.float32)
    for _ in range(REPEATS):
        tree = {"p": node({k: shared for k in KEYS})}
        paths, _, treedef = flatten_parts(tree)
        # Each position gets its own path as the leaf: unflattened, every key
        # must hold its own path.
        rebuilt = treedef.unflatten([p[-1] for p in paths])
        assert {k: rebuilt["p"][k] for k in KEYS} == {k: k for k in KEYS}


@pytest.mark.parametrize("node", NODES)
def test_graft_into_a_reordering_node_with_one_shared_child(node):
    source = {"p": {k: full(v) for k, v in EXPECTED.items()}}
    for _ in range(REPEATS):
        shared = np.zeros(2, np.float32)  # e.g. one zeros array reused at init
        state = {"p": node({k: shared for k in KEYS})}
        out = tg.graft(state, source, {"p": "p"})
        assert type(out["p"]) is node
        assert values_by_key(out["p"]) == EXPECTED
        assert values_by_key(state["p"]) == dict.fromkeys(KEYS, 0.0)  # input untouched


@pytest.mark.parametrize("node", NODES)
def test_graft_from_a_reordering_node_into_one(node):
    source = {"p": node({k: full(v) for k, v in EXPECTED.items()})}
    for _ in range(REPEATS):
        shared = np.zeros(2, np.float32)
        out = tg.graft({"q": node({k: shared for k in KEYS})}, source, {"q": "p"})
        assert values_by_key(out["q"]) == EXPECTED


@pytest.mark.parametrize("node", NODES)
def test_insert_into_a_reordering_node(node):
    for _ in range(REPEATS):
        shared = np.zeros(2, np.float32)
        tree = {"p": node({k: shared for k in KEYS}), "other": shared}
        out = tg.insert(tree, "p", {k: full(v) for k, v in EXPECTED.items()})
        assert values_by_key(out["p"]) == EXPECTED
        assert out["other"] is shared


def test_nnx_variables_under_a_reordering_node_keep_their_keys():
    nnx = pytest.importorskip("flax.nnx")

    def param_value(v: Any) -> float:
        return float(np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)[0])

    source = {"p": {k: full(v) for k, v in EXPECTED.items()}}
    for _ in range(REPEATS):
        state = {"p": Bag({k: nnx.Param(np.zeros(2, np.float32)) for k in KEYS[:-1]})}
        state["p"].items[KEYS[-1]] = np.zeros(2, np.float32)  # one plain leaf beside them
        out = tg.graft(state, source, {"p": "p"})
        assert {k: param_value(out["p"][k]) for k in KEYS} == EXPECTED
        assert all(isinstance(out["p"][k], nnx.Param) for k in KEYS[:-1])
        # And back: from the node holding Variables into a plain dict.
        back = tg.graft({"p": {k: np.zeros(2, np.float32) for k in KEYS}}, out, {"p": "p"})
        assert {k: float(back["p"][k][0]) for k in KEYS} == EXPECTED


def test_propagate_sharding_pairs_reordering_nodes_by_key():
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like_leaf = jax.ShapeDtypeStruct((2,), np.float32, sharding=one)  # one shared object
    for _ in range(REPEATS):
        values = Bag({k: full(v) for k, v in EXPECTED.items()})
        out = tg.propagate_sharding(values, Bag(dict.fromkeys(KEYS, like_leaf)))
        assert values_by_key(out) == EXPECTED
        assert all(out[k].sharding == one for k in KEYS)


# ----------------------------------------------------------------------------
# Item 6: stack indices spelt twice, and far apart.
# ----------------------------------------------------------------------------


def layer(value: float = 0.0) -> dict:
    return {"w": full(value)}


@pytest.mark.parametrize("strict", [True, False])
def test_stack_indices_spelt_twice_are_an_error_naming_both(strict):
    source = {"l_0": layer(0), "l_1": layer(1), "l_01": layer(2)}
    state = {"layers": {"w": np.zeros((2, 2), np.float32)}}
    with pytest.raises(
        tg.MismatchError,
        match=r"'layers': the source subtrees matching 'l_\*' cannot be stacked: in the source, "
        r"'l_01' and 'l_1' are both index 1: leading zeros do not make another index.*"
        r"keep one key per index in the source \[rule 'layers' <- stack\('l_\*', axis=0\)\]",
    ):
        tg.plan(state, source, {"layers": tg.stack("l_*")}, strict=strict)


def test_stack_indices_spelt_three_times_name_all():
    source = {"l_0": layer(), "l_1": layer(), "l_01": layer(), "l_001": layer()}
    state = {"layers": {"w": np.zeros((2, 2), np.float32)}}
    with pytest.raises(tg.MismatchError, match=r"'l_001', 'l_01' and 'l_1' are all index 1"):
        tg.plan(state, source, {"layers": tg.stack("l_*")})


@pytest.mark.parametrize("strict", [True, False])
def test_unstack_target_keys_spelt_twice_are_an_error_naming_both(strict):
    state = {"layers_0": layer(), "layers_1": layer(), "layers_01": layer()}
    source = {"layers": {"w": np.zeros((3, 2), np.float32)}}
    with pytest.raises(
        tg.MismatchError,
        match=r"cannot be unstacked: in the state, 'layers_01' and 'layers_1' are both index 1"
        r".*keep one key per index in the state "
        r"\[rule 'layers_\*' <- unstack\('layers', axis=0\)\]",
    ):
        tg.plan(state, source, {"layers_*": tg.unstack("layers")}, strict=strict)


def test_stack_gaps_are_listed_short_and_as_ranges_long():
    source = {f"l_{k}": layer() for k in (0, 1, 5, 7, 300)}
    state = {"layers": {"w": np.zeros((5, 2), np.float32)}}
    with pytest.raises(
        tg.MismatchError,
        match=r"indices found 0, 1, 5, 7, 300, missing 2, 3, 4, 6, 8\.\.299 \(296 indices\): "
        r"a stack needs exactly 0\.\.N-1",
    ):
        tg.plan(state, source, {"layers": tg.stack("l_*")})


def test_a_capture_too_long_to_be_an_int_is_no_index_not_a_crash():
    source = {"l_0": layer(), "l_" + "9" * 5000: layer()}
    state = {"layers": {"w": np.zeros((2, 2), np.float32)}}
    with pytest.raises(tg.MismatchError, match=r"captured no integer index"):
        tg.plan(state, source, {"layers": tg.stack("l_*")})


_FAR_APART = """
import resource, time
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
import numpy as np, treegraft as tg
w = {{"w": np.zeros(2, np.float32)}}
start = time.monotonic()
try:
    tg.plan({{"layers": {{"w": np.zeros((2, 2), np.float32)}}}},
            {{"l_0": w, "l_{far}": w}}, {{"layers": tg.stack("l_*")}}, strict={strict})
except tg.GraftError as e:
    print(time.monotonic() - start)
    print(e)
"""


@pytest.mark.parametrize("strict", [True, False])
def test_stack_indices_far_apart_report_the_gap_in_constant_memory(strict):
    # In a child process under a 2 GiB address-space limit and a deadline: a
    # regression that counts up to the largest index fails, not eats memory.
    far = 10**12
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = textwrap.dedent(_FAR_APART.format(far=far, strict=strict))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, message = done.stdout.split("\n", 1)
    assert float(seconds) < 2.0, seconds
    assert (
        f"indices found 0, {far}, missing 1..{far - 1} ({far - 1} indices): a stack needs "
        "exactly 0..N-1" in message
    ), message
