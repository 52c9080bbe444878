"""Fast paths of planning and in-memory grafts give what the slow ones gave.

Proves, on behaviour only (the timings are in `benchmarks/run.py` and
`benchmarks/planscale.py`):
- the grouping of repeated problems finds the same indices inside quoted paths as
  a scan of every quoted string (the algorithm it replaced, kept here as the oracle),
  and never one outside quotes (a shape such as float32[2]);
- an in-memory plan kept per structure (`_plan/cache.py`) is rebound to the new leaves:
  a second graft takes the new values, in buffers of its own; a changed shape, dtype,
  sharding, scalar value, mapping or option plans again; a source array deleted since
  is reported as without the cache; trees with custom nodes are not kept;
- arrays moved between shardings of one layout on two meshes (replicated on an 8-way
  mesh to replicated on a 2x4 mesh of the same devices) are copied by compiled chunks
  into buffers of their own, on the target's sharding, with their values.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from helpers import assert_owns_buffers
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._errors import _slots
from treegraft._insert import sharding
from treegraft._plan import cache
from treegraft._tree.index import TreeIndex

_QUOTED = re.compile(r"(?<!\w)(?:'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\")")
_INDEX = re.compile(r"\[(-?\d+)\]")


def _slots_by_quote(text: str) -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    """The oracle: every quoted string searched for indices on its own."""
    pieces, firsts, values = [], [], []
    last = 0
    for quoted in _QUOTED.finditer(text):
        for m in _INDEX.finditer(text, quoted.start() + 1, quoted.end() - 1):
            pieces.append(text[last : m.start()])
            firsts.append(m.start() == quoted.start() + 1)
            values.append(int(m.group(1)))
            last = m.end()
    pieces.append(text[last:])
    return tuple(pieces), tuple(firsts), tuple(values)


# Texts made of the characters that matter: quotes, escapes, brackets, digits, letters.
_TEXTS = st.lists(
    st.sampled_from(["'", '"', "\\", "[", "]", "-", "0", "7", "12", "a", "w", ".", " ", "\n", "*"]),
    max_size=40,
).map("".join)


@given(_TEXTS)
def test_slots_match_a_scan_of_every_quoted_string(text):
    assert _slots(text) == _slots_by_quote(text)


def test_slots_take_indices_in_quotes_only():
    text = "'dec.l[3].w' in the state is float32[1], 'enc[0].w' in the source is float32[2]"
    pieces, firsts, values = _slots(text)
    assert values == (3, 0)
    assert firsts == (False, False)
    assert "float32[1]" in pieces[1] and pieces[-1].endswith("float32[2]")
    assert _slots("no index here: float32[2]") == (("no index here: float32[2]",), (), ())


# ----------------------------------------------------------------------------
# Plans kept per structure.
# ----------------------------------------------------------------------------


def _meshes():
    devices = jax.devices()[:8]
    return (
        jax.make_mesh((8,), ("fsdp",), devices=devices),
        jax.make_mesh((2, 4), ("data", "model"), devices=devices),
    )


def _trainer(value, n=3, spec=None):
    fsdp, _ = _meshes()
    spec = P("fsdp") if spec is None else spec
    return {
        "model": {
            f"layers_{i}": {"w": jax.device_put(np.full((8,), value + i, np.float32),
                                                NamedSharding(fsdp, spec))}
            for i in range(n)
        },
        "step": 7,
    }


def _sampler(n=3):
    _, tp = _meshes()
    return {
        "decoder": {
            f"block_{i}": {"w": jax.device_put(np.zeros(8, np.float32),
                                               NamedSharding(tp, P("model")))}
            for i in range(n)
        },
        "step": 0,
    }


MAPPING = {"decoder.block_*": "model.layers_*", "step": "step"}


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def test_second_graft_of_one_structure_takes_the_new_values_in_buffers_of_its_own():
    target = _sampler()
    first_source, second_source = _trainer(1.0), _trainer(10.0)
    first = tg.graft(target, first_source, MAPPING)
    assert len(cache._kept) == 1
    second = tg.graft(target, second_source, MAPPING)
    assert len(cache._kept) == 1  # the same key: kept once, used again
    for i in range(3):
        got, was = second["decoder"][f"block_{i}"]["w"], first["decoder"][f"block_{i}"]["w"]
        np.testing.assert_array_equal(np.asarray(got), np.full(8, 10.0 + i, np.float32))
        np.testing.assert_array_equal(np.asarray(was), np.full(8, 1.0 + i, np.float32))
        assert got.sharding == target["decoder"][f"block_{i}"]["w"].sharding
        assert_owns_buffers(got, second_source["model"][f"layers_{i}"]["w"], was)
    assert second["step"] == 7


def test_kept_plan_reports_what_the_full_plan_reports():
    target, source = _sampler(), _trainer(1.0)
    kept_plan = tg.plan(target, source, MAPPING)
    again = tg.plan(target, _trainer(2.0), MAPPING)
    assert [(str(e.target), str(e.source), e.nbytes) for e in again.entries] == [
        (str(e.target), str(e.source), e.nbytes) for e in kept_plan.entries
    ]
    assert again.state is target and again.report == kept_plan.report
    assert str(again) == str(kept_plan)


@pytest.mark.parametrize(
    "change",
    ["shape", "dtype", "sharding", "scalar", "mapping", "cast"],
)
def test_a_changed_input_plans_again(change):
    target = _sampler()
    tg.graft(target, _trainer(1.0), MAPPING)
    source, mapping, options = _trainer(2.0), dict(MAPPING), {}
    fsdp, _ = _meshes()
    if change == "shape":
        source["model"]["layers_1"]["w"] = jax.device_put(np.zeros(16, np.float32))
        with pytest.raises(tg.MismatchError, match="layers_1"):
            tg.graft(target, source, mapping)
        return
    if change == "dtype":
        source["model"]["layers_1"]["w"] = jax.device_put(np.zeros(8, np.int32))
        with pytest.raises(tg.MismatchError, match="int32"):
            tg.graft(target, source, mapping)
        return
    if change == "scalar":
        target = dict(target, step=np.int8(0))
        tg.graft(target, _trainer(1.0), mapping)
        source["step"] = 300  # does not fit int8: refused by value
        with pytest.raises(tg.MismatchError, match="300"):
            tg.graft(target, source, mapping)
        return
    if change == "sharding":
        source = _trainer(2.0, spec=P())
    if change == "mapping":
        mapping = {"decoder.block_*": "model.layers_*", "step": None}
    if change == "cast":
        options = {"cast": True}
    out = tg.graft(target, source, mapping, **options)
    assert len(cache._kept) == 2  # planned again, kept under its own key
    np.testing.assert_array_equal(np.asarray(out["decoder"]["block_2"]["w"]),
                                  np.full(8, 4.0, np.float32))
    assert out["step"] == (0 if change == "mapping" else 7)


def test_deleted_source_array_is_reported_after_a_kept_plan():
    target = _sampler()
    tg.graft(target, _trainer(1.0), MAPPING)
    source = _trainer(2.0)
    source["model"]["layers_0"]["w"].delete()
    with pytest.raises(tg.GraftError, match="deleted"):
        tg.graft(target, source, MAPPING)
    with pytest.raises(tg.GraftError, match="deleted"):
        tg.plan(target, source, MAPPING)


def test_only_trees_of_plain_containers_are_kept():
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Layer:
        w: object

    jax.tree_util.register_dataclass(Layer, data_fields=["w"], meta_fields=[])
    assert TreeIndex({"a": [1, (2, None)]}, "t").plain
    assert not TreeIndex({"a": Layer(np.zeros(2))}, "t").plain
    assert not TreeIndex({1: np.zeros(2)}, "t").plain  # a key jax compares loosely (1 == True)
    assert not TreeIndex(collections.OrderedDict(a=np.zeros(2)), "t").plain
    state = {"a": Layer(np.zeros(2, np.float32))}
    tg.graft(state, {"b": Layer(np.ones(2, np.float32))}, {"a": "b"})
    assert not cache._kept


# ----------------------------------------------------------------------------
# Copies between shardings of one layout.
# ----------------------------------------------------------------------------


def test_replicated_leaves_move_to_another_mesh_by_chunks_in_buffers_of_their_own():
    fsdp, tp = _meshes()
    n = 300  # more than one chunk of 256, and a rest for device_put
    source = {f"l{i}": jax.device_put(np.full(4, i, np.float32), NamedSharding(fsdp, P()))
              for i in range(n)}
    target = {f"l{i}": jax.device_put(np.zeros(4, np.float32), NamedSharding(tp, P()))
              for i in range(n)}
    compiled = sharding._chunk_copier.cache_info()
    out = tg.graft(target, source, {"": ""})
    after = sharding._chunk_copier.cache_info()
    assert after.hits + after.misses == compiled.hits + compiled.misses + 1  # one chunk
    for i in (0, 255, 256, n - 1):
        got = out[f"l{i}"]
        assert got.sharding == target[f"l{i}"].sharding
        np.testing.assert_array_equal(np.asarray(got), np.full(4, i, np.float32))
        assert_owns_buffers(got, source[f"l{i}"])


def test_leaf_descriptions_are_the_same_remembered_or_not():
    from treegraft._errors import describe_leaf

    for _ in range(2):
        assert describe_leaf((2, 3), np.dtype("float32")) == "float32[2, 3]"
        assert describe_leaf(None, int) == "<class 'int'>"
    assert describe_leaf([4], "bfloat16") == "bfloat16[4]"  # unhashable: rendered each time


def test_plans_beyond_the_leaf_budget_are_not_kept(monkeypatch):
    # A kept plan's indexes stay in memory: a big one is not kept, and the
    # least recently used go first once the kept leaves pass the budget.
    cache.clear()
    monkeypatch.setattr(cache, "_MAX_LEAVES", 10)
    big = {f"w{i}": np.zeros(1, np.float32) for i in range(6)}
    tg.plan(big, big, {"": ""})  # 12 leaves in all
    assert len(cache._kept) == 0
    small = {f"w{i}": np.zeros(1, np.float32) for i in range(2)}
    other = {f"v{i}": np.zeros(1, np.float32) for i in range(2)}
    tg.plan(small, small, {"": ""})
    tg.plan(other, other, {"": ""})
    assert len(cache._kept) == 2  # 4 + 4 leaves
    third = {f"u{i}": np.zeros(1, np.float32) for i in range(2)}
    tg.plan(third, third, {"": ""})
    assert len(cache._kept) == 2  # the first went: 12 > 10
    cache.clear()
