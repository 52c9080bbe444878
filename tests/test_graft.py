"""`tg.graft`: values, structure, purity, Kauldron's scenarios, and properties."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trees
from helpers import (
    assert_owns_buffers,
    assert_placed_like,
    assert_trees_equal,
    attention,
    buffer_pointers,
    f32,
)
from hypothesis import given
from hypothesis import strategies as st

import treegraft as tg

# ----------------------------------------------------------------------------
# Kauldron's scenarios.
# ----------------------------------------------------------------------------


def kauldron_state():
    return {
        "step": 0,
        "params": {
            "encoder": attention(),
            "decoder": {"layers_0": attention(), "layers_1": attention()},
        },
        "collections": {},
        "opt_state": ({"mu": {"w": f32(2)}}, None),
    }


def kauldron_checkpoint():
    return {
        "step": 1000,
        "params": {
            "encoder": attention(1.0),
            "decoder": {"layers_0": attention(2.0), "layers_1": attention(3.0)},
        },
        "collections": {},
        "opt_state": [{"mu": {"w": f32(2, value=9.0)}}, None],
    }


def test_encoder_into_decoder_layer_leaves_the_rest_untouched():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    out = tg.graft(state, ckpt, {"params.decoder.layers_1": "params.encoder"})
    layer = out["params"]["decoder"]["layers_1"]["attn"]
    np.testing.assert_array_equal(layer["kernel"], f32(4, 2, value=1.0))
    np.testing.assert_array_equal(layer["bias"], f32(2, value=1.0))
    for untouched in (out["params"]["encoder"], out["params"]["decoder"]["layers_0"]):
        np.testing.assert_array_equal(untouched["attn"]["kernel"], f32(4, 2))
    assert (
        out["params"]["encoder"]["attn"]["kernel"] is state["params"]["encoder"]["attn"]["kernel"]
    )
    assert out["step"] == 0


def test_kauldron_default_mapping_with_empty_collections():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    out = tg.graft(state, ckpt, {"params": "params", "collections": "collections"})
    assert out["collections"] == {}
    np.testing.assert_array_equal(
        out["params"]["decoder"]["layers_0"]["attn"]["kernel"], f32(4, 2, value=2.0)
    )
    np.testing.assert_array_equal(out["params"]["encoder"]["attn"]["bias"], f32(2, value=1.0))
    # Not covered by the mapping: kept as they were.
    assert out["step"] == 0
    assert out["opt_state"][0]["mu"]["w"] is state["opt_state"][0]["mu"]["w"]


def test_kauldron_extra_source_keys_excused_by_double_star_ignore():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    ckpt["params"]["encoder"]["attn"]["b"] = f32(3)
    ckpt["params"]["decoder"]["layers_0"]["attn"]["b"] = f32(3)
    with pytest.raises(tg.PathNotFoundError, match=r"unexpected in the source.*: 2"):
        tg.graft(state, ckpt, {"params": "params"})
    out = tg.graft(state, ckpt, {"params": "params"}, ignore_restored_keys=("**.b",))
    np.testing.assert_array_equal(out["params"]["encoder"]["attn"]["bias"], f32(2, value=1.0))
    assert "b" not in out["params"]["encoder"]["attn"]


def test_kauldron_missing_target_keys_kept_by_double_star_ignore():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    state["params"]["encoder"]["attn"]["b"] = f32(3, value=7.0)
    state["params"]["decoder"]["layers_1"]["attn"]["b"] = f32(3, value=8.0)
    with pytest.raises(tg.PathNotFoundError, match=r"missing in the source.*: 2"):
        tg.graft(state, ckpt, {"params": "params"})
    out = tg.graft(state, ckpt, {"params": "params"}, ignore_model_keys=("**.b",))
    assert out["params"]["encoder"]["attn"]["b"] is state["params"]["encoder"]["attn"]["b"]
    np.testing.assert_array_equal(
        out["params"]["decoder"]["layers_1"]["attn"]["b"], f32(3, value=8.0)
    )
    np.testing.assert_array_equal(out["params"]["encoder"]["attn"]["bias"], f32(2, value=1.0))


@pytest.mark.parametrize(
    "mapping, pattern",
    [
        # Relative to the rule's new prefix, as Kauldron matches them.
        pytest.param({"params.layer": "params.layer"}, "bias", id="bare-name"),
        pytest.param({"params": "params"}, "*.bias", id="star-dot-name"),
        pytest.param({"params": "params"}, "layer.*", id="name-dot-star"),
        pytest.param({"params": "params"}, "layer.bias", id="relative-path"),
        pytest.param({"params": "params"}, "layer", id="relative-subtree"),
        pytest.param({"params": "params"}, "params.layer.bias", id="absolute-path"),
    ],
)
def test_non_double_star_ignore_patterns_work(mapping, pattern):
    # Kauldron raises KeyError on any ignore pattern not starting with '**'.
    state = {"params": {"layer": {"kernel": f32(2), "bias": f32(3, value=5.0)}}}
    ckpt = {"params": {"layer": {"kernel": f32(2, value=1.0)}}}
    out = tg.graft(state, ckpt, mapping, ignore_model_keys=[pattern])
    np.testing.assert_array_equal(out["params"]["layer"]["kernel"], f32(2, value=1.0))
    assert out["params"]["layer"]["bias"] is state["params"]["layer"]["bias"]


@pytest.mark.parametrize(
    "pattern", ["extra", "*.extra", "layer.*", "layer.extra", "**.extra", "params.layer.extra"]
)
def test_non_double_star_ignore_restored_patterns_work(pattern):
    state = {"params": {"layer": {"kernel": f32(2)}}}
    ckpt = {"params": {"layer": {"kernel": f32(2, value=1.0), "extra": f32(4)}}}
    mapping = {"params.layer": "params.layer"} if pattern == "extra" else {"params": "params"}
    out = tg.graft(state, ckpt, mapping, ignore_restored_keys=pattern)
    np.testing.assert_array_equal(out["params"]["layer"]["kernel"], f32(2, value=1.0))
    assert set(out["params"]["layer"]) == {"kernel"}


def test_checkpoint_lists_fill_state_tuples():
    # Orbax stores tuples as lists: the state's tuple must stay a tuple.
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    out = tg.graft(state, ckpt, {"opt_state": "opt_state"})
    assert type(out["opt_state"]) is tuple and out["opt_state"][1] is None
    np.testing.assert_array_equal(out["opt_state"][0]["mu"]["w"], f32(2, value=9.0))


# ----------------------------------------------------------------------------
# Several rules, globs, one source for several targets.
# ----------------------------------------------------------------------------


def test_glob_rule_copies_layer_by_layer():
    state = {"dec": {f"layers_{i}": attention() for i in range(3)}}
    source = {"enc": {f"layers_{i}": attention(float(i + 1)) for i in range(3)}}
    out = tg.graft(state, source, {"dec.layers_*": "enc.layers_*"})
    for i in range(3):
        np.testing.assert_array_equal(
            out["dec"][f"layers_{i}"]["attn"]["kernel"], f32(4, 2, value=i + 1.0)
        )


def test_one_source_subtree_into_several_targets():
    state = {"dec": {"l0": attention(), "l1": attention(), "l2": attention()}}
    source = {"enc": attention(4.0)}
    out = tg.graft(state, source, {"dec.l0": "enc", "dec.l2": "enc"})
    np.testing.assert_array_equal(out["dec"]["l0"]["attn"]["bias"], f32(2, value=4.0))
    np.testing.assert_array_equal(out["dec"]["l2"]["attn"]["bias"], f32(2, value=4.0))
    assert out["dec"]["l1"]["attn"]["bias"] is state["dec"]["l1"]["attn"]["bias"]


def test_overlapping_rules_most_specific_wins_in_values():
    state = {"dec": {"layers_0": attention(), "layers_1": attention()}}
    source = {
        "dec": {"layers_0": attention(1.0), "layers_1": attention(2.0)},
        "enc": attention(9.0),
    }
    out = tg.graft(state, source, {"dec.layers_*": "dec.layers_*", "dec.layers_1": "enc"})
    np.testing.assert_array_equal(out["dec"]["layers_0"]["attn"]["bias"], f32(2, value=1.0))
    np.testing.assert_array_equal(out["dec"]["layers_1"]["attn"]["bias"], f32(2, value=9.0))


def test_overlapping_rules_tie_is_an_error_and_state_is_unchanged():
    state = {"dec": {"layers_0": attention()}}
    snap = trees.snapshot(state)
    with pytest.raises(tg.MappingError, match=r"'dec\.\*' <- 'dec\.\*' and 'dec\.layers_\*'"):
        tg.graft(state, state, {"dec.*": "dec.*", "dec.layers_*": "dec.layers_*"})
    trees.assert_unchanged(state, snap)


def test_strict_false_keeps_the_value_of_missing_leaves():
    state = {"dec": {"w": f32(2), "b": f32(1, value=3.0)}}
    source = {"enc": {"w": f32(2, value=1.0), "x": f32(5)}}
    out = tg.graft(state, source, {"dec": "enc"}, strict=False)
    np.testing.assert_array_equal(out["dec"]["w"], f32(2, value=1.0))
    assert out["dec"]["b"] is state["dec"]["b"]


# ----------------------------------------------------------------------------
# Dtypes.
# ----------------------------------------------------------------------------


def test_dtype_mismatch_is_an_error_without_cast():
    state = {"w": np.zeros(2, np.int32)}
    with pytest.raises(
        tg.MismatchError, match=r"'w' in the state is int32\[2\], 'w' in the source is float64\[2\]"
    ):
        tg.graft(state, {"w": np.array([1.5, 2.5])}, {"w": "w"})


def test_cast_casts_to_the_target_dtype():
    state = {
        "np": np.zeros(2, np.float16),
        "jax": jnp.zeros(2, jnp.bfloat16),
        "i": np.zeros(2, np.int64),
    }
    source = {
        "np": np.array([1.5, 2.5]),
        "jax": np.array([1.5, 2.5], np.float32),
        "i": np.array([3, 4], np.int8),  # a wider int keeps every value: cast=True
    }
    out = tg.graft(state, source, {"": ""}, cast=True)
    assert out["np"].dtype == np.float16 and isinstance(out["np"], np.ndarray)
    assert out["jax"].dtype == jnp.bfloat16 and isinstance(out["jax"], jax.Array)
    assert out["i"].dtype == np.int64
    np.testing.assert_array_equal(out["np"], np.array([1.5, 2.5], np.float16))
    np.testing.assert_array_equal(np.asarray(out["jax"], np.float32), [1.5, 2.5])
    np.testing.assert_array_equal(out["i"], [3, 4])


def test_python_scalar_source_keeps_the_target_array_dtype():
    state = {
        "i8": jnp.zeros((), jnp.int8),
        "f16": jnp.zeros((), jnp.float16),
        "np": np.zeros((), np.uint8),
    }
    out = tg.graft(state, {"i8": 7, "f16": 1.5, "np": 3}, {"": ""})
    assert out["i8"].dtype == jnp.int8 and not out["i8"].weak_type
    assert out["f16"].dtype == jnp.float16 and not out["f16"].weak_type
    assert out["np"].dtype == np.uint8 and isinstance(out["np"], np.ndarray)
    assert (int(out["i8"]), float(out["f16"]), int(out["np"])) == (7, 1.5, 3)


def test_python_float_source_into_a_bfloat16_target():
    out = tg.graft(
        {"x": jnp.zeros((2,), jnp.bfloat16), "s": jnp.zeros((), jnp.bfloat16)},
        {"x": np.ones(2, np.float32), "s": 2.5},
        {"s": "s"},
        ignore_model_keys="x",
    )
    assert out["s"].dtype == jnp.bfloat16 and not out["s"].weak_type
    assert float(out["s"]) == 2.5


def test_cast_with_python_scalar_source():
    # float to int can change values: it needs cast="unsafe" (docs/design.md section 10).
    state = {"x": jnp.zeros((), jnp.int32)}
    with pytest.raises(
        tg.MismatchError,
        match=r"'x' in the state is int32\[\], 'x' in the source is float \(python\)",
    ):
        tg.graft(state, {"x": 2.0}, {"x": "x"}, cast=True)
    out = tg.graft(state, {"x": 2.0}, {"x": "x"}, cast="unsafe")
    assert out["x"].dtype == jnp.int32 and int(out["x"]) == 2


# ----------------------------------------------------------------------------
# Structure and container types.
# ----------------------------------------------------------------------------

Point = collections.namedtuple("Point", ["x", "y"])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=["name"])
@dataclasses.dataclass
class Layer:
    w: Any
    b: Any
    name: str = "layer"


def test_containers_none_and_empty_nodes_are_preserved():
    state = {
        "point": Point(x=f32(2), y=None),
        "layer": Layer(w=[f32(1), ()], b={}, name="mine"),
        "tuple": (f32(3), []),
        "none": None,
        "empty": {},
        "box": trees.Box({"v": f32(1)}, label="kept"),
    }
    source = {
        "point": {"x": f32(2, value=1.0)},  # orbax stores a namedtuple as a dict
        "layer": {"w": [f32(1, value=2.0)], "b": None},
        "tuple": [f32(3, value=3.0), None],
        "box": {"value": {"v": f32(1, value=4.0)}},
    }
    mapping = {"point": "point", "layer": "layer", "tuple": "tuple", "box": "box"}
    out = tg.graft(state, source, mapping)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert type(out["point"]) is Point and out["point"].y is None
    assert type(out["layer"]) is Layer and out["layer"].name == "mine"
    assert out["layer"].w[1] == () and out["layer"].b == {}
    assert type(out["tuple"]) is tuple and out["tuple"][1] == []
    assert out["none"] is None and out["empty"] == {}
    assert type(out["box"]) is trees.Box and out["box"].label == "kept"
    np.testing.assert_array_equal(out["point"].x, f32(2, value=1.0))
    np.testing.assert_array_equal(out["layer"].w[0], f32(1, value=2.0))
    np.testing.assert_array_equal(out["tuple"][0], f32(3, value=3.0))
    np.testing.assert_array_equal(out["box"].value["v"], f32(1, value=4.0))


def test_flax_struct_and_frozendict_are_preserved():
    flax_struct = pytest.importorskip("flax.struct")
    frozen = pytest.importorskip("flax.core").FrozenDict

    @flax_struct.dataclass
    class TrainState:
        step: Any
        params: Any
        tag: str = flax_struct.field(pytree_node=False, default="t")

    state = TrainState(step=0, params=frozen({"dense": {"w": f32(2), "b": f32(1)}}), tag="mine")
    source = {"params": {"dense": {"w": f32(2, value=1.0), "b": f32(1, value=2.0)}}, "step": 5}
    out = tg.graft(state, source, {"params": "params"})
    assert type(out) is TrainState and out.tag == "mine" and out.step == 0
    assert type(out.params) is frozen
    assert jax.tree.structure(out) == jax.tree.structure(state)
    np.testing.assert_array_equal(out.params["dense"]["w"], f32(2, value=1.0))
    # And the other way round: from a FrozenDict source into a plain dict state.
    out2 = tg.graft(
        {"dense": {"w": f32(2)}},
        frozen({"p": {"dense": {"w": f32(2, value=3.0)}}}),
        {"dense": "p.dense"},
    )
    assert type(out2) is dict
    np.testing.assert_array_equal(out2["dense"]["w"], f32(2, value=3.0))


@pytest.mark.parametrize("case", trees.TREES, ids=trees.case_id)
def test_identity_graft_on_the_corpus(case):
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(case.tree)):
        with pytest.raises(
            tg.GraftError,
            match=r"(is|are) abstract \(jax.ShapeDtypeStruct\) and (has|have) no value",
        ):
            tg.graft(case.tree, case.tree, {"": ""})
        return
    snap = trees.snapshot(case.tree)
    out = tg.graft(case.tree, case.tree, {"": ""})
    assert_trees_equal(out, case.tree)
    trees.assert_unchanged(case.tree, snap)


# ----------------------------------------------------------------------------
# Purity.
# ----------------------------------------------------------------------------


def test_nothing_is_mutated():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    state_copy, ckpt_copy = copy.deepcopy(state), copy.deepcopy(ckpt)
    mapping = {"params.decoder.layers_0": "params.encoder"}
    ignore = ["nothing_here_but_allowed"]
    out = tg.graft(state, ckpt, mapping, strict=False, ignore_model_keys=ignore)
    assert_trees_equal(state, state_copy)
    assert_trees_equal(ckpt, ckpt_copy)
    assert mapping == {"params.decoder.layers_0": "params.encoder"}
    assert ignore == ["nothing_here_but_allowed"]
    assert out is not state and out["params"] is not state["params"]


def test_a_failed_graft_leaves_the_input_unchanged():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    ckpt["params"]["encoder"]["attn"]["kernel"] = f32(2, 4)  # wrong shape
    state_copy = copy.deepcopy(state)
    snap = trees.snapshot(state)
    with pytest.raises(
        tg.MismatchError,
        match=r"'params\.decoder\.layers_1\.attn\.kernel' in the state is float32\[4, 2\]",
    ):
        tg.graft(state, ckpt, {"params.decoder.layers_1": "params.encoder"})
    trees.assert_unchanged(state, snap)
    assert_trees_equal(state, state_copy)


def test_untouched_leaves_are_the_same_objects():
    state, ckpt = kauldron_state(), kauldron_checkpoint()
    out = tg.graft(state, ckpt, {"params.decoder.layers_1": "params.encoder"})
    p = tg.plan(state, ckpt, {"params.decoder.layers_1": "params.encoder"})
    flat_in, flat_out = tg.flatten(state), tg.flatten(out)
    for path in p.untouched:
        assert flat_out[path] is flat_in[path]
    assert len(p.untouched) == len(flat_in) - 2


def test_abstract_source_leaves_cannot_be_grafted():
    state = {"w": f32(2), "b": f32(1)}
    source = {
        "w": jax.ShapeDtypeStruct((2,), jnp.float32),
        "b": jax.ShapeDtypeStruct((1,), jnp.float32),
    }
    assert len(tg.plan(state, source, {"": ""}).entries) == 2  # planning needs no values
    with pytest.raises(
        tg.GraftError, match=r"2 source leaves are abstract .* no value to graft: 'b', 'w'"
    ):
        tg.graft(state, source, {"": ""})


# ----------------------------------------------------------------------------
# A lazy source: plan reads nothing, graft reads each needed leaf once.
# ----------------------------------------------------------------------------


class FakeCheckpoint(tg.Source):
    def __init__(self, tree):
        self.tree = tree
        self.requests: list[tg.ReadRequest] = []

    def metadata(self):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.tree)

    def read(self, requests: Sequence[tg.ReadRequest]):
        self.requests.extend(requests)
        return [np.asarray(tg.extract(self.tree, r.path), r.dtype) for r in requests]

    def describe(self):
        return "the fake checkpoint"


def test_lazy_source_reads_each_needed_leaf_once():
    ckpt = FakeCheckpoint({"enc": attention(2.0), "other": {"big": f32(100)}})
    state = {"dec": {"l0": attention(), "l1": attention()}}
    p = tg.plan(state, ckpt, {"dec.l0": "enc", "dec.l1": "enc"})
    assert ckpt.requests == []
    assert p.nbytes == (8 + 2) * 4
    out = tg.graft(state, ckpt, {"dec.l0": "enc", "dec.l1": "enc"})
    assert sorted(str(r.path) for r in ckpt.requests) == ["enc.attn.bias", "enc.attn.kernel"]
    assert all(r.dtype == np.float32 for r in ckpt.requests)
    np.testing.assert_array_equal(out["dec"]["l1"]["attn"]["kernel"], f32(4, 2, value=2.0))


def test_lazy_source_is_named_in_messages_and_read_in_its_own_dtype_unless_cast():
    ckpt = FakeCheckpoint({"w": np.arange(3, dtype=np.int64)})
    with pytest.raises(tg.PathNotFoundError, match=r"path 'x' not found in the fake checkpoint"):
        tg.graft({"w": np.zeros(3, np.int32)}, ckpt, {"w": "x"})
    with pytest.raises(
        tg.MismatchError, match=r"'w' in the state is int32\[3\], 'w' in the source is int64\[3\]"
    ):
        tg.graft({"w": np.zeros(3, np.int32)}, ckpt, {"w": "w"})
    with pytest.raises(tg.MismatchError, match=r"int64 -> int32 can change values"):
        tg.graft({"w": np.zeros(3, np.int32)}, ckpt, {"w": "w"}, cast=True)
    out = tg.graft({"w": np.zeros(3, np.int32)}, ckpt, {"w": "w"}, cast="unsafe")
    # Read in the source's dtype; each target is cast to its own afterwards.
    assert [r.dtype for r in ckpt.requests] == [np.int64]
    assert out["w"].dtype == np.int32
    np.testing.assert_array_equal(out["w"], [0, 1, 2])


# ----------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------

_DEVICES = jax.devices()
_MESH = jax.sharding.Mesh(np.array(_DEVICES).reshape(2, 4), ("x", "y"))


def _placed(shape_dtype_where):
    (shape, dtype), where = shape_dtype_where
    value = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 5
    value = value.astype(dtype)
    if where == "replicated":
        sharding = jax.sharding.NamedSharding(_MESH, jax.sharding.PartitionSpec())
    elif where == "rows" and shape and shape[0] % 2 == 0:
        sharding = jax.sharding.NamedSharding(_MESH, jax.sharding.PartitionSpec("x"))
    else:
        sharding = jax.sharding.SingleDeviceSharding(_DEVICES[hash(where) % len(_DEVICES)])
    return jax.device_put(value, sharding)


def sharded_arrays():
    shapes = st.sampled_from([(), (2,), (4, 2), (0,), (3,)])
    dtypes = st.sampled_from([np.float32, np.int32, np.bool_, jnp.bfloat16])
    where = st.sampled_from(["replicated", "rows", "dev3", "dev6"])
    return st.tuples(st.tuples(shapes, dtypes), where).map(_placed)


def leaves_with_shardings():
    return st.one_of(trees.leaves(), sharded_arrays())


_SOURCE_DEVICE = jax.sharding.SingleDeviceSharding(_DEVICES[-1])


def source_like(state):
    """New values of the same shapes and dtypes, on a different placement."""

    def move(i_leaf):
        i, x = i_leaf
        new = trees.renew(x)
        if isinstance(new, jax.Array):
            return jax.device_put(new, _SOURCE_DEVICE) if i % 2 else np.asarray(new)
        return new

    leaves, treedef = jax.tree.flatten(state)
    return treedef.unflatten([move(t) for t in enumerate(leaves)])


def _spec(x):
    if type(x) in (bool, int, float, complex):
        return ("python", type(x))
    return (tuple(x.shape), np.dtype(x.dtype))


def _typed(parts):
    return tuple((type(p), p) for p in parts)


def _signature(flat, node):
    """The typed relative paths, shapes and dtypes of the leaves under node."""
    n = len(node)
    return tuple(
        sorted(
            (
                (_typed(path.parts[n:]), _spec(x))
                for path, x in flat.items()
                if path.startswith(node)
            ),
            key=repr,
        )
    )


def _renewed(tree):
    return jax.tree.map(trees.renew, tree)


@st.composite
def states(draw):
    """Random pytrees, often holding several copies of one module (so rules have choices)."""
    other = draw(trees.pytrees(leaves_with_shardings()))
    layout = draw(st.sampled_from(["random", "dict", "list", "custom"]))
    if layout == "random":
        return other
    module = draw(trees.pytrees(leaves_with_shardings(), max_leaves=4))
    a, b = _renewed(module), _renewed(_renewed(module))
    if layout == "dict":
        return {"enc": module, "dec": {"layers_0": a, "layers_1": b}, "other": other}
    if layout == "list":
        return [module, other, (a, [b])]
    return trees.Pair(first=module, second=trees.Dense(w=trees.Box(a), b=[b, other]))


@st.composite
def grafts(draw):
    """A state, a source of the same structure, and 1-3 rules between equal subtrees."""
    state = draw(states())
    source = source_like(state)
    flat = tg.flatten(state)
    nodes = trees.node_paths(state)
    groups: dict[Any, list[tg.Path]] = collections.defaultdict(list)
    for node in nodes:
        groups[_signature(flat, node)].append(node)
    news = draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=3, unique=True))
    mapping = {}
    for new in news:
        group = groups[_signature(flat, new)]
        others = [g for g in group if g != new]
        old = draw(st.sampled_from(others if others and draw(st.booleans()) else group))
        mapping[str(new)] = str(old)
    return state, source, mapping


def _expected(state, source, mapping):
    """Per target leaf: the source value the most specific rule gives it, or None."""
    rules = [(tg.parse_path(n), tg.parse_path(o)) for n, o in mapping.items()]
    flat_src = tg.flatten(source)
    out = {}
    for path in tg.flatten(state):
        covering = [(n, o) for n, o in rules if path.startswith(n)]
        if not covering:
            out[path] = None
            continue
        new, old = max(covering, key=lambda r: len(r[0]))
        out[path] = flat_src[old / path[len(new) :]]
    return out


@given(grafts())
def test_graft_property_matches_reference_and_preserves_placement(case):
    state, source, mapping = case
    snap_state, snap_source = trees.snapshot(state), trees.snapshot(source)
    out = tg.graft(state, source, mapping)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    expected = _expected(state, source, mapping)
    flat_in, flat_out = tg.flatten(state), tg.flatten(out)
    assert list(flat_out) == list(flat_in)
    for path, like in flat_in.items():
        got = flat_out[path]
        assert_placed_like(got, like)
        want = expected[path]
        if want is None:
            assert got is like
        elif hasattr(got, "shape"):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:
            assert got == want
    trees.assert_unchanged(state, snap_state)
    trees.assert_unchanged(source, snap_source)


# The reference model with globs, tie-breaks and keep rules: an independent
# statement of docs/design.md section 4 (longest matched prefix, then most literal
# segments, equal on both is an error) and section 10 (None keeps).
_MENU = [
    ("dec.layers_*", "dec.layers_*"),
    ("dec.*", "dec.*"),  # ties with the one above on every layer
    ("dec.layers_1", "enc"),
    ("enc", "dec.layers_0"),
    ("**", "**"),
    ("dec.layers_0", None),
]


@st.composite
def glob_grafts(draw):
    module = draw(trees.pytrees(leaves_with_shardings(), max_leaves=4))
    state = {"enc": module, "dec": {"layers_0": _renewed(module), "layers_1": _renewed(module)}}
    source = source_like(state)
    chosen = draw(st.lists(st.sampled_from(range(len(_MENU))), min_size=1, max_size=4,
                           unique=True))
    mapping = {_MENU[k][0]: _MENU[k][1] for k in chosen}
    nodes = [n for n in trees.node_paths(module) if len(n)]
    if nodes and draw(st.booleans()):  # keep one subtree of a grafted layer
        mapping[str(tg.Path(("dec", "layers_1")) / draw(st.sampled_from(nodes)))] = None
    return state, source, mapping


def _reference(state, source, mapping):
    """Per target leaf: ('copy', source path), ('keep',), ('none',) or ('tie',)."""
    rules = []
    for new, old in mapping.items():
        pattern = tg.parse_pattern(new)
        rules.append((pattern, None if old is None else tg.parse_pattern(old)))
    out = {}
    for path in tg.flatten(state):
        ranked = []
        for new, old in rules:
            m = new.match_prefix(path)
            if m is not None:
                ranked.append(((m[0], new.literal_count), new, old, m))
        if not ranked:
            out[path] = ("none",)
            continue
        best = max(r[0] for r in ranked)
        top = [r for r in ranked if r[0] == best]
        if len(top) > 1:
            out[path] = ("tie",)
            continue
        _, _, old, (n, caps) = top[0]
        out[path] = ("keep",) if old is None else ("copy", old.substitute(caps) / path[n:])
    return out


@given(glob_grafts())
def test_graft_property_with_globs_ties_and_keep_rules_matches_the_reference(case):
    state, source, mapping = case
    snaps = trees.snapshot(state), trees.snapshot(source)
    expected = _reference(state, source, mapping)
    if any(e == ("tie",) for e in expected.values()):
        with pytest.raises(tg.MappingError, match="rules tied on the same leaf"):
            tg.graft(state, source, mapping)
        return
    out = tg.graft(state, source, mapping)  # no tie: the graft must succeed
    flat_in, flat_out, flat_src = tg.flatten(state), tg.flatten(out), tg.flatten(source)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    for path, like in flat_in.items():
        got, want = flat_out[path], expected[path]
        if want[0] != "copy":
            assert got is like
            continue
        assert_placed_like(got, like)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(flat_src[want[1]]))
    trees.assert_unchanged(state, snaps[0])
    trees.assert_unchanged(source, snaps[1])


@given(grafts())
def test_graft_property_is_idempotent(case):
    state, source, mapping = case
    once = tg.graft(state, source, mapping)
    twice = tg.graft(once, source, mapping)
    assert_trees_equal(twice, once)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True):
        if isinstance(a, jax.Array):
            assert a.sharding == b.sharding


@given(states())
def test_graft_property_identity_mapping_from_itself(state):
    snap = trees.snapshot(state)
    out = tg.graft(state, state, {"": ""})
    assert_trees_equal(out, state)
    for got, like in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
        assert_placed_like(got, like)
    trees.assert_unchanged(state, snap)


# ----------------------------------------------------------------------------
# Reliability, round 2: casts, typed PRNG keys, buffers of their own.
# ----------------------------------------------------------------------------


def test_cast_true_never_turns_nan_into_int_min():
    # float to an int type can change values: cast=True refuses it (docs/design.md section 10).
    state = {"w": np.zeros(2, np.uint8), "j": jnp.zeros(2, jnp.int32)}
    source = {"w": np.array([np.nan, 300.0], np.float32), "j": jnp.array([np.nan, -1.0])}
    with pytest.raises(tg.MismatchError, match=r"uint8\[2\]"):
        tg.graft(state, source, {"w": "w"}, cast=True, ignore_model_keys="j")
    with pytest.raises(tg.MismatchError, match=r"int32\[2\]"):
        tg.graft(state, source, {"j": "j"}, cast=True, ignore_model_keys="w")
    out = tg.graft(state, {"w": np.array([1.0, 2.0], np.float32)}, {"w": "w"},
                   cast="unsafe", ignore_model_keys="j")
    np.testing.assert_array_equal(out["w"], [1, 2])


def _key_state():
    return {"rng": jax.random.split(jax.random.key(1), 2), "w": jnp.zeros(3)}


def test_key_arrays_plan_print_and_graft_from_memory():
    source = {"rng": jax.random.split(jax.random.key(7), 2), "w": jnp.ones(3)}
    p = tg.plan(_key_state(), source, {"": ""})
    assert "key<fry>[2]" in str(p)
    assert [e.nbytes for e in p.entries] == [16, 12] and p.nbytes == 28
    out = tg.graft(_key_state(), source, {"": ""})
    assert out["rng"].dtype == source["rng"].dtype
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(out["rng"])), np.asarray(jax.random.key_data(source["rng"]))
    )
    # The grafted keys work as keys.
    assert jax.random.normal(out["rng"][0], (2,)).shape == (2,)


def test_key_array_against_its_raw_data_is_a_typed_dtype_mismatch():
    raw = {"rng": jnp.zeros(2, jnp.uint32), "w": jnp.ones(3)}
    with pytest.raises(
        tg.MismatchError,
        match=r"'rng' in the state is key<fry>\[2\], 'rng' in the source is uint32\[2\]",
    ):
        tg.plan(_key_state(), raw, {"": ""})
    with pytest.raises(tg.MismatchError, match=r"key<fry>\[2\]"):
        tg.graft(raw, _key_state(), {"": ""}, cast="unsafe")


@pytest.mark.parametrize("cast", [True, "unsafe"])
def test_keys_of_another_impl_are_never_cast(cast):
    rbg = {"rng": jax.random.split(jax.random.key(1, impl="rbg"), 2), "w": jnp.ones(3)}
    with pytest.raises(tg.MismatchError, match=r"key<rbg>\[2\]"):
        tg.graft(_key_state(), rbg, {"": ""}, cast=cast)


def test_one_layer_into_many_then_a_donating_step():
    # docs/design.md section 12: every grafted leaf owns its buffers.
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    layer = {"w": jax.device_put(jnp.arange(16.0), sharded), "b": np.arange(8.0)}
    state = {
        "layers": [{"w": jax.device_put(jnp.zeros(16), sharded), "b": np.zeros(8)}
                   for _ in range(3)],
        "step": jnp.zeros((), jnp.int32),
    }
    out = tg.graft(state, {"enc": layer}, {f"layers[{i}]": "enc" for i in range(3)})
    ws = [out["layers"][i]["w"] for i in range(3)]
    assert len({id(w) for w in ws}) == 3
    for i, w in enumerate(ws):
        assert_owns_buffers(w, layer["w"], *ws[i + 1 :])
    bs = [out["layers"][i]["b"] for i in range(3)]
    assert not any(np.shares_memory(b, layer["b"]) for b in bs)
    assert not np.shares_memory(bs[0], bs[1])
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    new = step({"layers": [{"w": w} for w in ws]})
    np.testing.assert_array_equal(np.asarray(new["layers"][2]["w"]), np.arange(16.0) + 1)
    assert not layer["w"].is_deleted()
    np.testing.assert_array_equal(np.asarray(layer["w"]), np.arange(16.0))


@pytest.mark.parametrize("devices", [1, 8])
def test_many_same_shape_leaves_are_copied_into_buffers_of_their_own(devices):
    # Hundreds of same-shape leaves take the compiled-copy path of placing
    # (chunks of 256): each result must still own its buffers, hold the
    # source's values and keep the target's sharding.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    n = 600  # two whole chunks and a remainder
    source = {
        "enc": {f"w{i}": jax.device_put(np.full((8,), float(i), np.float32), sharding)
                for i in range(n)}
    }
    state = {"dec": {f"w{i}": jax.device_put(np.zeros(8, np.float32), sharding)
                     for i in range(n)}}
    out = tg.graft(state, source, {"dec": "enc"})
    got = [out["dec"][f"w{i}"] for i in range(n)]
    for i, x in enumerate(got):
        np.testing.assert_array_equal(np.asarray(x), np.full((8,), float(i), np.float32))
        assert x.sharding == state["dec"][f"w{i}"].sharding
    everything = [p for x in got for p in buffer_pointers(x)]
    assert len(set(everything)) == len(everything)
    assert_owns_buffers(got[0], *source["enc"].values(), *state["dec"].values())
    assert_owns_buffers(got[-1], *source["enc"].values(), *state["dec"].values())
    # Donating the result leaves the caller's source intact.
    jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t), donate_argnums=0)(out)
    np.testing.assert_array_equal(np.asarray(source["enc"]["w5"]), np.full((8,), 5.0))
