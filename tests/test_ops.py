"""Rule values beyond a path: keep (None), stack, unstack, cast, transpose, reshape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import buffer_pointers
from hypothesis import given
from hypothesis import strategies as st
from kauldron_run import TrainState, train_state, write_item, write_run

import treegraft as tg

MESH_SHAPE = (2, 4)


def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh(MESH_SHAPE, ("a", "b"))


def sharded(x: np.ndarray, spec: jax.sharding.PartitionSpec) -> jax.Array:
    return jax.device_put(x, jax.sharding.NamedSharding(mesh(), spec))


def layered(n: int, shape: tuple[int, ...] = (4, 6), dtype=np.float32, start: int = 0):
    """{'layers_i': {'w': ..., 'b': ...}} with distinct values per layer."""
    size = int(np.prod(shape))
    return {
        f"layers_{i}": {
            "w": (np.arange(size, dtype=np.float64).reshape(shape) + 100 * (i + start)).astype(
                dtype
            ),
            "b": np.full((shape[-1],), i + start, dtype),
        }
        for i in range(n)
    }


# ----------------------------------------------------------------------------
# Keep rules.
# ----------------------------------------------------------------------------


def test_all_but_the_new_head_with_one_keep_rule():
    state = {"params": {"enc": {"w": np.zeros(3)}, "head": {"w": np.zeros(5), "b": np.zeros(5)}}}
    source = {"params": {"enc": {"w": np.ones(3)}, "head": {"w": np.ones(2), "b": np.ones(2)}}}
    head = state["params"]["head"]
    new = tg.graft(state, source, {"params": "params", "params.head": None})
    np.testing.assert_array_equal(new["params"]["enc"]["w"], np.ones(3))
    assert new["params"]["head"]["w"] is head["w"] and new["params"]["head"]["b"] is head["b"]
    p = tg.plan(state, source, {"params": "params", "params.head": None})
    assert [str(e.target) for e in p.entries] == ["params.enc.w"]
    assert sorted(map(str, p.untouched)) == ["params.head.b", "params.head.w"]
    # The source's head is not unexpected: its target was taken by the keep rule.
    assert p.nbytes == 3 * 8


def test_keep_rule_that_matches_nothing_is_an_error_with_a_close_name():
    state = {"params": {"enc": {"w": np.zeros(3)}, "head": {"w": np.zeros(5)}}}
    with pytest.raises(tg.PathNotFoundError, match=r"rule 'params\.haed' <- None \(keep\): .*"
                       r"did you mean 'head'"):
        tg.plan(state, state, {"params": "params", "params.haed": None})


def test_keep_rule_needs_no_ignore_patterns_for_a_missing_source_head():
    state = {"params": {"enc": {"w": np.zeros(3)}, "head": {"w": np.zeros(5)}}}
    source = {"params": {"enc": {"w": np.ones(3)}}}
    new = tg.graft(state, source, {"params": "params", "params.head": None})
    assert new["params"]["head"]["w"] is state["params"]["head"]["w"]


def test_equinox_style_all_layers_but_one():
    state = {"layers": [{"w": np.zeros(2)} for _ in range(5)]}
    source = {"layers": [{"w": np.full(2, i, np.float64)} for i in range(5)]}
    new = tg.graft(state, source, {"layers": "layers", "layers[3]": None})
    assert [float(layer["w"][0]) for layer in new["layers"]] == [0, 1, 2, 0, 4]


# ----------------------------------------------------------------------------
# Stack and unstack: values, shapes, sharding.
# ----------------------------------------------------------------------------


def test_unstack_then_stack_round_trips_from_memory():
    src = {"layers": {"w": np.arange(3 * 4 * 6, dtype=np.float32).reshape(4, 3, 6)}}
    state = {f"layers_{i}": {"w": np.zeros((4, 6), np.float32)} for i in range(3)}
    split = tg.graft(state, src, {"layers_*": tg.unstack("layers", axis=1)})
    for i in range(3):
        np.testing.assert_array_equal(split[f"layers_{i}"]["w"], src["layers"]["w"][:, i])
    back = tg.graft({"layers": {"w": np.zeros((4, 3, 6), np.float32)}}, split,
                    {"layers": tg.stack("layers_*", axis=1)})
    np.testing.assert_array_equal(back["layers"]["w"], src["layers"]["w"])


@given(
    n=st.integers(1, 5),
    axis=st.integers(-3, 2),
    dtype=st.sampled_from([np.float32, np.int8, jnp.bfloat16]),
    spec=st.sampled_from([(None,), ("a",), ("b", "a"), (None, "b")]),
)
def test_stack_then_unstack_is_the_identity_property(n, axis, dtype, spec):
    layers = layered(n, (4, 8), dtype)
    stacked_shape = list((4, 8))
    axis_n = axis % 3
    stacked_shape.insert(axis_n, n)
    pspec = jax.sharding.PartitionSpec(*spec)
    ok = all(
        s is None or stacked_shape[k] % mesh().shape[s] == 0 for k, s in enumerate(spec)
    )
    sharding = jax.sharding.NamedSharding(mesh(), pspec if ok else jax.sharding.PartitionSpec())
    like = {"stack": {"w": jax.ShapeDtypeStruct(tuple(stacked_shape), dtype, sharding=sharding),
                      "b": np.zeros((n, 8) if axis_n == 0 else (8, n), dtype)}}
    mapping = {"stack.w": tg.stack("layers_*.w", axis=axis),
               "stack.b": tg.stack("layers_*.b", axis=0 if axis_n == 0 else 1)}
    snap = jax.tree.map(np.copy, layers)
    stacked = tg.graft(like, layers, mapping)
    assert stacked["stack"]["w"].sharding == sharding
    assert stacked["stack"]["w"].dtype == dtype and stacked["stack"]["w"].shape == tuple(
        stacked_shape
    )
    np.testing.assert_array_equal(
        np.asarray(stacked["stack"]["w"]), np.stack([layers[f"layers_{i}"]["w"] for i in range(n)],
                                                    axis=axis_n)
    )
    state = {f"layers_{i}": {"w": np.zeros((4, 8), dtype)} for i in range(n)}
    back = tg.graft(state, stacked, {"layers_*.w": tg.unstack("stack.w", axis=axis)})
    for i in range(n):
        np.testing.assert_array_equal(back[f"layers_{i}"]["w"], layers[f"layers_{i}"]["w"])
        assert back[f"layers_{i}"]["w"].dtype == dtype
    jax.tree.map(np.testing.assert_array_equal, layers, snap)  # the input is not mutated


@given(axes=st.permutations([0, 1, 2]))
def test_transpose_twice_with_inverse_axes_is_the_identity(axes):
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    inverse = tuple(int(a) for a in np.argsort(axes))
    once = tg.graft({"t": np.zeros(tuple(x.shape[a] for a in axes), np.float32)}, {"x": x},
                    {"t": tg.transpose("x", axes)})
    twice = tg.graft({"x": np.zeros_like(x)}, once, {"x": tg.transpose("t", inverse)})
    np.testing.assert_array_equal(twice["x"], x)


def test_a_sharded_transpose_lands_in_the_target_sharding():
    weight = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)  # torch Linear: [out, in]
    sharding = jax.sharding.NamedSharding(mesh(), jax.sharding.PartitionSpec("b", "a"))
    like = {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharding)}
    new = tg.graft(like, {"weight": weight}, {"kernel": tg.transpose("weight", (1, 0))})
    assert new["kernel"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(new["kernel"]), weight.T)
    # Each device holds only its own block.
    for shard in new["kernel"].addressable_shards:
        assert shard.data.shape == (2, 8)


def test_nested_operations_cast_an_unstacked_layer():
    src = {"layers": {"w": np.linspace(0, 1, 3 * 5, dtype=np.float32).reshape(3, 5)}}
    state = {"layer_1": {"w": jnp.zeros(5, jnp.bfloat16)}}
    op = tg.cast(tg.unstack("layers", axis=0), jnp.bfloat16)
    p = tg.plan(state, src, {"layer_*": op})
    [entry] = p.entries
    assert entry.operation == "[1] along axis 0; cast float32 -> bfloat16"
    assert "cast(unstack('layers', axis=0), bfloat16)" in str(p)
    new = tg.execute(p)
    assert new["layer_1"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(new["layer_1"]["w"]), src["layers"]["w"][1].astype(jnp.bfloat16)
    )


def test_reshape_fuses_heads():
    q = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)  # [embed, heads, head_dim]
    new = tg.graft({"q": np.zeros((4, 6), np.float32)}, {"q": q}, {"q": tg.reshape("q", (4, -1))})
    np.testing.assert_array_equal(new["q"], q.reshape(4, 6))


def test_a_cast_rule_casts_only_its_own_leaves():
    state = {"enc": {"w": jnp.zeros(3, jnp.bfloat16)}, "dec": {"w": jnp.zeros(3, jnp.float32)}}
    src = {"enc": {"w": np.full(3, 1 / 3, np.float32)}, "dec": {"w": np.full(3, 1 / 3, np.float32)}}
    new = tg.graft(state, src, {"enc": tg.cast("enc", jnp.bfloat16), "dec": "dec"})
    assert new["enc"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new["dec"]["w"]), src["dec"]["w"])


# ----------------------------------------------------------------------------
# Each target gets its own values (reliability issue, item 1).
# ----------------------------------------------------------------------------


def test_one_checkpoint_leaf_cast_for_two_targets_is_exact_for_each(tmp_path):
    value = np.array([1 / 3, 16777217.0, -2.5], np.float64)
    item = write_item(tmp_path / "item", {"w": value})
    state = {"a": jnp.zeros(3, jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
    new = tg.graft(state, tg.OrbaxCheckpoint(item), {"a": "w", "b": "w"}, cast=True)
    np.testing.assert_array_equal(np.asarray(new["a"]), value.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(new["b"]), value.astype(np.float32))
    from_memory = tg.graft(state, {"w": value}, {"a": "w", "b": "w"}, cast=True)
    np.testing.assert_array_equal(np.asarray(from_memory["b"]), np.asarray(new["b"]))


# ----------------------------------------------------------------------------
# Bad inputs: each names the rule and the path.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, source, mapping, error, match",
    [
        pytest.param(
            {"layers": {"w": np.zeros((3, 2))}},
            layered(3, (2,)) | {"layers_5": {"w": np.zeros(2)}},
            {"layers": tg.stack("layers_*", axis=0)}, tg.GraftError,
            r"'layers': the source subtrees matching 'layers_\*' cannot be stacked: indices "
            r"found 0, 1, 2, 5, missing 3, 4: a stack needs exactly 0\.\.N-1 \[rule 'layers' <- "
            r"stack\('layers_\*', axis=0\)\]",
            id="stack-gap",
        ),
        pytest.param(
            {"layers": {"w": np.zeros((4, 2), np.float32)}},
            {k: {"w": v["w"]} for k, v in layered(3, (2,)).items()},
            {"layers": tg.stack("layers_*", axis=0)}, tg.MismatchError,
            r"'layers\.w' in the state is float32\[4, 2\], stack\('layers_\*', axis=0\) makes "
            r"float32\[3, 2\] of 'layers_0\.w' \(float32\[2\]\)",
            id="stack-count",
        ),
        pytest.param(
            {"layers": {"w": np.zeros((2, 2), np.float32)}},
            {"layers_0": {"w": np.zeros(2, np.float32)},
             "layers_1": {"w": np.zeros(3, np.float32)}},
            {"layers": tg.stack("layers_*", axis=0)}, tg.MismatchError,
            r"'layers\.w': the 2 source leaves to stack differ: 'layers_0\.w' is float32\[2\] but "
            r"'layers_1\.w' is float32\[3\]",
            id="stack-members-differ",
        ),
        pytest.param(
            {"layers": {"w": np.zeros((2, 2), np.float32)}},
            {k: {"w": v["w"]} for k, v in layered(2, (2,)).items()},
            {"layers": tg.stack("layers_*", axis=3)}, tg.MismatchError,
            r"'layers\.w' <- 'layers_0\.w' \(float32\[2\]\): stack axis 3 is out of range for "
            r"1-d source leaves",
            id="stack-axis",
        ),
        pytest.param(
            {"layers_7": {"w": np.zeros(2, np.float32)}},
            {"layers": {"w": np.zeros((3, 2), np.float32)}},
            {"layers_*": tg.unstack("layers", axis=0)}, tg.MismatchError,
            r"'layers_7\.w' <- 'layers\.w' \(float32\[3, 2\]\): unstack index 7 is out of range: "
            r"the source has 3 along axis 0 \[rule 'layers_\*' <- unstack\('layers', axis=0\)\]",
            id="unstack-index",
        ),
        pytest.param(
            {"layers_x": {"w": np.zeros(2, np.float32)}},
            {"layers": {"w": np.zeros((3, 2), np.float32)}},
            {"layers_*": tg.unstack("layers", axis=0)}, tg.GraftError,
            r"'layers_x': the last '\*' of 'layers_\*' captured 'x', not an integer index",
            id="unstack-not-an-index",
        ),
        pytest.param(
            {"k": np.zeros((2, 3), np.float32)}, {"w": np.zeros((3, 2), np.float32)},
            {"k": tg.transpose("w", (0, 0))}, tg.MismatchError,
            r"'k' <- 'w' \(float32\[3, 2\]\): transpose axes \(0, 0\) are not a permutation of "
            r"2 axes",
            id="transpose-axes",
        ),
        pytest.param(
            {"k": np.zeros((2, 3), np.float32)}, {"w": np.zeros(5, np.float32)},
            {"k": tg.reshape("w", (2, 3))}, tg.MismatchError,
            r"cannot reshape \(5,\) \(5 values\) into \(2, 3\)",
            id="reshape-size",
        ),
        pytest.param(
            {"k": np.zeros(3, np.int8)}, {"w": np.zeros(3, np.float32)},
            {"k": tg.transpose("w", (0,))}, tg.MismatchError,
            r"'k' in the state is int8\[3\], transpose\('w', \(0,\)\) makes float32\[3\] of 'w'"
            r"(.|\n)*to fix:\n  - float32 -> int8 can change values; pass cast='unsafe'",
            id="op-dtype",
        ),
        pytest.param(
            {"layers": {"w": np.zeros((2, 2))}}, {"x": {"w": np.zeros(2)}},
            {"layers": tg.stack("layers_*")}, tg.PathNotFoundError,
            r"'layers' has no source: no subtree of the source matches 'layers_\*'",
            id="stack-matches-nothing",
        ),
    ],
)
def test_bad_operations_name_the_rule_and_the_path(state, source, mapping, error, match):
    snap = jax.tree.map(np.copy, state)
    with pytest.raises(error, match=match):
        tg.graft(state, source, mapping)
    jax.tree.map(np.testing.assert_array_equal, state, snap)


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"a": tg.stack("b")}, r"stack: the source 'b' \(no wildcards\) must have the wildcards of "
                               r"'a' \(none\) plus one last '\*'"),
        ({"a": tg.unstack("b_*")}, r"unstack: the new side 'a' \(no wildcards\) must have"),
        ({"a_*": tg.unstack("b.**")}, r"unstack: the new side 'a_\*' \(\*\) must have the "
                                      r"wildcards of 'b\.\*\*' \(\*\*\)"),
    ],
)
def test_operation_wildcards_are_checked_before_anything_is_read(mapping, match):
    with pytest.raises(tg.MappingError, match=match):
        tg.plan(object(), object(), mapping)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: tg.stack(3), r"stack takes a source path or pattern string, got int 3"),
        (lambda: tg.stack("a_*", axis="0"), r"stack: axis must be an int, got str '0'"),
        (lambda: tg.cast("a", "key<fry>"), r"cast: 'key<fry>' is not an array dtype"),
        (lambda: tg.cast("a", object), r"cast: object is not a numeric dtype"),
        (lambda: tg.transpose("a", 1), r"transpose: axes must be a sequence of ints, got int"),
        (lambda: tg.reshape("a", (-1, -1)), r"reshape: shape \(-1, -1\) may hold one -1"),
    ],
)
def test_operation_arguments_are_checked_when_built(make, match):
    with pytest.raises(tg.MappingError, match=match):
        make()


def test_cast_option_values_other_than_false_true_unsafe_are_refused():
    state = {"w": np.zeros(2, np.float32)}
    for bad in ("no", "same_kind", 1, None):
        with pytest.raises(tg.MappingError, match=r"cast must be False .* True .* or 'unsafe'"):
            tg.plan(state, state, {"w": "w"}, cast=bad)


def test_a_path_string_as_the_source_says_to_wrap_it():
    with pytest.raises(tg.MappingError, match=r"the source '/runs/x' is a path, not a tree: wrap "
                       r"it in tg\.OrbaxCheckpoint\('/runs/x'\)"):
        tg.graft({"w": np.zeros(2)}, "/runs/x", {"w": "w"})


# ----------------------------------------------------------------------------
# From real checkpoints in Kauldron's layout.
# ----------------------------------------------------------------------------


def test_unstack_one_layer_and_stack_all_from_a_kauldron_checkpoint(tmp_path):
    n = 4
    rng = np.random.default_rng(0)
    stacked = {"w": rng.standard_normal((n, 8, 16)).astype(np.float32),
               "b": rng.standard_normal((n, 16)).astype(np.float32)}
    per_layer = {f"layers_{i}": {"w": stacked["w"][i], "b": stacked["b"][i]} for i in range(n)}
    params = {"scanned": {"layers": jax.tree.map(jnp.asarray, stacked)},
              "unscanned": jax.tree.map(jnp.asarray, per_layer)}
    write_run(tmp_path, {5: train_state(params, step=5)})
    src = tg.KauldronCheckpoint(tmp_path)
    # One layer of the scanned stack into an unscanned model, into a sharding.
    sharding = jax.sharding.NamedSharding(mesh(), jax.sharding.PartitionSpec("a", "b"))
    like = {"params": {"dec": {"layers_2": {
        "w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharding),
        "b": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=jax.sharding.NamedSharding(
            mesh(), jax.sharding.PartitionSpec("b"))),
    }}}}
    mapping = {"params.dec.layers_*": tg.unstack("params.scanned.layers", axis=0)}
    p = tg.plan(like, src, mapping)
    assert [e.operation for e in p.entries] == ["[2] along axis 0", "[2] along axis 0"]
    new = tg.execute(p)
    assert new["params"]["dec"]["layers_2"]["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(new["params"]["dec"]["layers_2"]["w"]),
                                  stacked["w"][2])
    np.testing.assert_array_equal(np.asarray(new["params"]["dec"]["layers_2"]["b"]),
                                  stacked["b"][2])
    # All layers of the unscanned model stacked into a scanned one, sharded on the layer axis.
    ssharding = jax.sharding.NamedSharding(mesh(), jax.sharding.PartitionSpec("a"))
    like = {"params": {"layers": {
        "w": jax.ShapeDtypeStruct((n, 8, 16), jnp.float32, sharding=ssharding),
        "b": jax.ShapeDtypeStruct((n, 16), jnp.float32, sharding=ssharding),
    }}}
    new = tg.graft(like, src, {"params.layers": tg.stack("params.unscanned.layers_*")})
    assert new["params"]["layers"]["w"].sharding == ssharding
    np.testing.assert_array_equal(np.asarray(new["params"]["layers"]["w"]), stacked["w"])
    np.testing.assert_array_equal(np.asarray(new["params"]["layers"]["b"]), stacked["b"])


def test_loader_unstacks_params_and_adam_state_in_both_phases(tmp_path):
    n = 3
    adam = optax.adam(1e-3)
    stacked = {"w": jnp.arange(n * 4 * 2, dtype=jnp.float32).reshape(n, 4, 2)}
    write_run(tmp_path, {7: train_state({"layers": stacked}, step=7, opt=adam)})
    params = {f"layers_{i}": {"w": jnp.zeros((4, 2))} for i in range(n)}
    fresh = TrainState(step=jnp.asarray(0), params=params, collections={}, opt_state=None)
    loader = tg.PartialKauldronLoader(
        workdir=tmp_path,
        new_to_old={
            "params.layers_*": tg.unstack("params.layers", axis=0),
            "opt_state[0].mu.layers_*": tg.unstack("opt_state[0].mu.layers", axis=0),
            "opt_state[0].nu.layers_*": tg.unstack("opt_state[0].nu.layers", axis=0),
        },
    )
    state = loader.transform(fresh)
    for i in range(n):
        np.testing.assert_array_equal(state.params[f"layers_{i}"]["w"], stacked["w"][i])
    state = state.replace(opt_state=adam.init(state.params))
    state = loader.transform_after_optimizer(state)
    saved = train_state({"layers": stacked}, step=7, opt=adam).opt_state
    for i in range(n):
        np.testing.assert_array_equal(state.opt_state[0].mu[f"layers_{i}"]["w"],
                                      saved[0].mu["layers"]["w"][i])
        np.testing.assert_array_equal(state.opt_state[0].nu[f"layers_{i}"]["w"],
                                      saved[0].nu["layers"]["w"][i])
    assert int(state.opt_state[0].count) == 0  # not mapped: kept


# ----------------------------------------------------------------------------
# Results own their buffers (docs/design.md section 12), from memory and checkpoints.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("from_checkpoint", [False, True], ids=["memory", "checkpoint"])
def test_operation_results_own_their_buffers_and_can_be_donated(tmp_path, from_checkpoint):
    stacked = {"w": np.arange(3 * 8, dtype=np.float32).reshape(3, 8)}
    source = (
        tg.OrbaxCheckpoint(write_item(tmp_path / "item", stacked)) if from_checkpoint else stacked
    )
    replicated = jax.sharding.NamedSharding(mesh(), jax.sharding.PartitionSpec())
    like = {f"l{i}": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=replicated) for i in range(3)}
    like["t"] = np.zeros((8, 3), np.float32)
    mapping = {"l*": tg.unstack("w", axis=0), "t": tg.transpose("w", (1, 0))}
    new = tg.graft(like, source, mapping)
    pointers = [p for i in range(3) for p in buffer_pointers(new[f"l{i}"])]
    assert len(set(pointers)) == len(pointers) == 3 * 8  # every shard of every leaf its own
    assert not np.shares_memory(new["t"], stacked["w"])
    donated = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(
        {k: new[k] for k in ("l0", "l1", "l2")}
    )
    np.testing.assert_array_equal(np.asarray(donated["l1"]), stacked["w"][1] + 1)
    np.testing.assert_array_equal(stacked["w"][1], np.arange(8, 16))  # the source is intact


def test_unstack_reads_only_its_layer_from_per_layer_chunks(tmp_path):
    """A stacked array saved with one chunk per layer: one layer costs one layer's bytes."""
    import orbax.checkpoint as ocp

    n, shape = 8, (64, 128)
    stacked = np.random.default_rng(1).standard_normal((n, *shape)).astype(np.float32)
    layer_bytes = stacked[0].nbytes
    path = tmp_path / "item"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"layers": {"w": stacked}},
                   save_args={"layers": {"w": ocp.SaveArgs(chunk_byte_size=layer_bytes,
                                                           shard_axes=(0,))}})
        ckptr.wait_until_finished()
    src = tg.OrbaxCheckpoint(path)
    like = {"layer_5": {"w": jax.ShapeDtypeStruct(shape, jnp.float32,
                                                  sharding=jax.sharding.SingleDeviceSharding(
                                                      jax.devices()[0]))}}
    p = tg.plan(like, src, {"layer_*": tg.unstack("layers", axis=0)})
    assert p.nbytes == layer_bytes  # the plan counts the chunks the layer lives in
    with open("/proc/self/io") as f:
        before = int(next(line for line in f if line.startswith("rchar")).split()[1])
    new = tg.execute(p)
    with open("/proc/self/io") as f:
        read = int(next(line for line in f if line.startswith("rchar")).split()[1]) - before
    np.testing.assert_array_equal(np.asarray(new["layer_5"]["w"]), stacked[5])
    assert read <= 1.1 * layer_bytes + 64 * 1024, read  # index pages aside: one layer
