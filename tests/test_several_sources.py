"""Several sources as one (docs/design.md section 17): a dict of checkpoints and pytrees.

`{"vision": tg.SafetensorsCheckpoint(a), "llm": tg.OrbaxCheckpoint(b), "extra":
pytree}` in one `tg.plan` / `tg.graft`:

- values bit-identical to grafting from each source alone, placed on an
  8-device target's shardings, a stack and an unstack rule across sub-sources;
- one strictness report for the whole target, every message naming the
  sub-source (its file or checkpoint), did-you-mean within that sub-source;
- each sub-source read lazily, only for what is mapped: one nothing maps to is
  never opened (a checkpoint that does not exist works);
- pytree sub-sources copied, never aliased; abstract and deleted leaves refused;
- a dict of arrays stays a plain pytree; `tg.Sources` closes what it holds;
  errors typed; nothing mutated.
"""

from __future__ import annotations

import json
import os
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_owns_buffers
from hypothesis import HealthCheck, assume, event, given, settings
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_fuzz import random_grafts

import treegraft as tg

st_numpy = pytest.importorskip("safetensors.numpy")

LAYERS = 4
RNG = np.random.default_rng(17)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# The vision tower, in Hugging Face's layout: names with dots, two shards and an index.
VISION = {
    "vision_model.embeddings.patch.weight": _f32(8, 16),
    "vision_model.post_layernorm.weight": _f32(8),
    **{f"vision_model.encoder.layers.{i}.mlp.fc1.weight": _f32(16, 8) for i in range(LAYERS)},
    **{f"vision_model.encoder.layers.{i}.mlp.fc1.bias": _f32(16) for i in range(LAYERS)},
}
# The language model, an orbax checkpoint with its layers scanned, and a part nothing maps.
LLM = {
    "params": {"embed": _f32(32, 8), "scanned_w": _f32(LAYERS, 8, 8), "final_norm": _f32(8)},
    "opt_state": {"mu": _f32(64, 64)},
}

MAPPING = {
    "img.patch": "vision.vision_model.embeddings.patch.weight",
    "img.layers": tg.stack("vision.vision_model.encoder.layers.*.mlp.fc1"),
    "img.norm": "vision.vision_model.post_layernorm.weight",
    "lm.embed": "llm.params.embed",
    "lm.layers_*.w": tg.unstack("llm.params.scanned_w"),
    "lm.norm": "llm.params.final_norm",
    "proj": "extra.proj",
    "step": "extra.step",
}


def _save_safetensors(folder: str, tensors: dict[str, np.ndarray]) -> str:
    """Two shards and `model.safetensors.index.json`, as Hugging Face writes them."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        st_numpy.save_file({n: tensors[n] for n in members}, os.path.join(folder, shard))
        weight_map.update({n: shard for n in members})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def _save_orbax(path: str, tree: dict) -> str:
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("several")
    return (
        _save_safetensors(str(root / "vision"), VISION),
        _save_orbax(str(root / "llm"), LLM),
    )


def _mesh():
    return jax.make_mesh((8,), ("x",))


def _extra() -> dict:
    """The in-memory part: a sharded jax array, a numpy array and a Python scalar."""
    kernel = jax.device_put(jnp.asarray(_f32(8, 8)), NamedSharding(_mesh(), P(None, "x")))
    return {"proj": {"kernel": kernel, "bias": _f32(8)}, "step": 3}


def _sds(shape, spec=None, dtype=jnp.float32):
    spec = P() if spec is None else spec
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(_mesh(), spec))


def _state() -> dict:
    """The target on 8 devices: some leaves split, some replicated, one Python scalar."""
    return {
        "img": {
            "patch": _sds((8, 16), P("x")),
            "layers": {"weight": _sds((LAYERS, 16, 8), P(None, "x")), "bias": _sds((LAYERS, 16))},
            "norm": _sds((8,)),
        },
        "lm": {
            "embed": _sds((32, 8), P("x")),
            **{f"layers_{i}": {"w": _sds((8, 8), P(None, "x"))} for i in range(LAYERS)},
            "norm": _sds((8,)),
        },
        "proj": {"kernel": _sds((8, 8), P(None, "x")), "bias": _sds((8,), P("x"))},
        "step": 0,
    }


def _sources(ckpts, extra=None) -> dict:
    vision, llm = ckpts
    return {
        "vision": tg.SafetensorsCheckpoint(vision),
        "llm": tg.OrbaxCheckpoint(llm),
        "extra": _extra() if extra is None else extra,
    }


def _assert_bit_identical(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
        if isinstance(a, jax.Array):
            assert a.sharding == b.sharding, (a.sharding, b.sharding)
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------
# Values: as each source alone would give them.
# ----------------------------------------------------------------------------


def test_one_graft_equals_grafting_from_each_source_alone(ckpts):
    vision, llm = ckpts
    extra = _extra()
    state = _state()
    new = tg.graft(state, _sources(ckpts, extra), MAPPING)

    img = tg.graft(state["img"], tg.SafetensorsCheckpoint(vision), {
        "patch": "vision_model.embeddings.patch.weight",
        "layers": tg.stack("vision_model.encoder.layers.*.mlp.fc1"),
        "norm": "vision_model.post_layernorm.weight",
    })
    lm = tg.graft(state["lm"], tg.OrbaxCheckpoint(llm), {
        "embed": "params.embed",
        "layers_*.w": tg.unstack("params.scanned_w"),
        "norm": "params.final_norm",
    })
    rest = tg.graft({"proj": state["proj"], "step": 0}, extra, {"proj": "proj", "step": "step"})
    _assert_bit_identical(new, {"img": img, "lm": lm, **rest})

    # And against the arrays that were saved (the peer libraries wrote them).
    stacked = np.stack([VISION[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"]
                        for i in range(LAYERS)])
    np.testing.assert_array_equal(np.asarray(new["img"]["layers"]["weight"]), stacked)
    for i in range(LAYERS):
        np.testing.assert_array_equal(
            np.asarray(new["lm"][f"layers_{i}"]["w"]), LLM["params"]["scanned_w"][i]
        )
    np.testing.assert_array_equal(
        np.asarray(new["proj"]["kernel"]), np.asarray(extra["proj"]["kernel"])
    )
    assert new["step"] == 3 and type(new["step"]) is int
    assert new["img"]["layers"]["weight"].sharding == state["img"]["layers"]["weight"].sharding


def test_a_pytree_sub_source_is_copied_never_aliased(ckpts):
    extra = _extra()
    kernel = np.asarray(extra["proj"]["kernel"]).copy()
    new = tg.graft(_state(), _sources(ckpts, extra), MAPPING)
    # Same sharding on both sides, yet every shard is a buffer of its own.
    assert new["proj"]["kernel"].sharding == extra["proj"]["kernel"].sharding
    assert_owns_buffers(new["proj"]["kernel"], extra["proj"]["kernel"])
    assert_owns_buffers(new["proj"]["bias"])
    # Donating the result leaves the caller's pytree alive.
    jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(new["proj"])
    assert not extra["proj"]["kernel"].is_deleted()
    np.testing.assert_array_equal(np.asarray(extra["proj"]["kernel"]), kernel)


def test_a_pytree_leaf_on_one_device_goes_to_a_target_on_eight(ckpts):
    one = jax.device_put(jnp.arange(16.0), jax.devices()[3])
    src = {"extra": {"w": one}, "gone": tg.OrbaxCheckpoint(ckpts[1] + "-not-there")}
    new = tg.graft({"w": _sds((16,), P("x"))}, src, {"w": "extra.w"})
    assert new["w"].sharding == NamedSharding(_mesh(), P("x"))
    np.testing.assert_array_equal(np.asarray(new["w"]), np.arange(16.0, dtype=np.float32))
    assert_owns_buffers(new["w"], one)


def test_a_stack_whose_layers_come_from_a_pytree_sub_source(ckpts):
    layers = {f"layers_{i}": {"w": jnp.full((8,), float(i))} for i in range(LAYERS)}
    src = {"llm": tg.OrbaxCheckpoint(ckpts[1]), "extra": layers}
    state = {"stacked": {"w": _sds((LAYERS, 8), P(None, "x"))}, "embed": _sds((32, 8), P("x"))}
    mapping = {"stacked": tg.stack("extra.layers_*"), "embed": "llm.params.embed"}
    new = tg.graft(state, src, mapping)
    alone = tg.graft({"stacked": state["stacked"]}, layers, {"stacked": tg.stack("layers_*")})
    _assert_bit_identical(new["stacked"], alone["stacked"])
    np.testing.assert_array_equal(
        np.asarray(new["stacked"]["w"]),
        np.repeat(np.arange(LAYERS, dtype=np.float32)[:, None], 8, axis=1),
    )
    assert_owns_buffers(new["stacked"]["w"], *[v["w"] for v in layers.values()])


def test_transforms_on_each_sub_source_equal_them_alone(ckpts):
    vision, llm = ckpts
    extra = {"flat": jnp.arange(64.0).reshape(64)}
    state = {
        "k": _sds((16, 8), P("x")),  # a [out, in] Linear weight as an [in, out] kernel
        "e": _sds((32, 8), P("x"), jnp.bfloat16),
        "r": _sds((8, 8), P(None, "x")),
    }
    rules = {
        "k": tg.transpose("vision.vision_model.embeddings.patch.weight", (1, 0)),
        "e": tg.cast("llm.params.embed", jnp.bfloat16),
        "r": tg.reshape("extra.flat", (8, 8)),
    }
    new = tg.graft(state, {"vision": tg.SafetensorsCheckpoint(vision),
                           "llm": tg.OrbaxCheckpoint(llm), "extra": extra}, rules)
    alone = {
        "k": tg.graft({"k": state["k"]}, tg.SafetensorsCheckpoint(vision),
                      {"k": tg.transpose("vision_model.embeddings.patch.weight", (1, 0))})["k"],
        "e": tg.graft({"e": state["e"]}, tg.OrbaxCheckpoint(llm),
                      {"e": tg.cast("params.embed", jnp.bfloat16)})["e"],
        "r": tg.graft({"r": state["r"]}, extra, {"r": tg.reshape("flat", (8, 8))})["r"],
    }
    _assert_bit_identical(new, alone)
    np.testing.assert_array_equal(np.asarray(new["k"]), VISION[
        "vision_model.embeddings.patch.weight"].T)
    assert_owns_buffers(new["r"], extra["flat"])


def test_a_stack_across_two_sub_sources_named_by_index(ckpts, monkeypatch):
    # Sub-sources named '0' and '1': the stack's last '*' takes one leaf from each,
    # the checkpoint's and the pytree's, boxes of both in one block.
    other = _f32(8)
    src = {"0": tg.OrbaxCheckpoint(ckpts[1]), "1": {"params": {"final_norm": other}}}
    calls = _spy(monkeypatch, tg.OrbaxCheckpoint, "read_boxes")
    new = tg.graft({"soup": _sds((2, 8), P(None, "x"))}, src,
                   {"soup": tg.stack("*.params.final_norm")})
    np.testing.assert_array_equal(np.asarray(new["soup"]),
                                  np.stack([LLM["params"]["final_norm"], other]))
    assert new["soup"].sharding == NamedSharding(_mesh(), P(None, "x"))
    assert calls and all(str(r.path) == "params.final_norm" for _, _, reqs in calls for r in reqs)


def test_an_ignore_pattern_names_a_sub_source_from_the_root(ckpts):
    state = _state()
    del state["proj"]["bias"]
    with pytest.raises(tg.PathNotFoundError, match="'extra.proj.bias' in the in-memory pytree"):
        tg.plan(state, _sources(ckpts), MAPPING)
    p = tg.plan(state, _sources(ckpts), MAPPING, ignore_restored_keys=["extra.proj.bias"])
    assert len(p.entries) == len(jax.tree.leaves(state))
    # One that matches nothing names the sub-source it names, with its close keys.
    with pytest.raises(tg.PathNotFoundError, match=r"'llm\.params\.embd' matches no key of "
                       r"the checkpoint .* \(source 'llm'\).*did you mean 'llm\.params\.embed'"):
        tg.plan(_state(), _sources(ckpts), MAPPING, ignore_restored_keys=["llm.params.embd"])


def test_a_kauldron_workdir_as_a_sub_source(ckpts, tmp_path):
    from kauldron_run import init_params, train_state, write_run

    params = init_params({"encoder": {"kernel": (4, 8)}}, seed=3)
    write_run(tmp_path / "run", {7: train_state(params, step=7)})
    run = tg.KauldronCheckpoint(str(tmp_path / "run"))
    state = {"enc": np.zeros((4, 8), np.float32), "norm": np.zeros(8, np.float32)}
    new = tg.graft(state, {"run": run, "llm": tg.OrbaxCheckpoint(ckpts[1])},
                   {"enc": "run.params.encoder.kernel", "norm": "llm.params.final_norm"})
    alone = tg.graft({"enc": state["enc"]}, tg.KauldronCheckpoint(str(tmp_path / "run")),
                     {"enc": "params.encoder.kernel"})
    _assert_bit_identical({"enc": new["enc"]}, alone)
    np.testing.assert_array_equal(new["enc"], np.asarray(params["encoder"]["kernel"]))
    np.testing.assert_array_equal(new["norm"], LLM["params"]["final_norm"])
    with pytest.raises(tg.PathNotFoundError, match=r"the checkpoint .*ckpt_7.* \(source 'run'\)"):
        tg.plan(state, {"run": run}, {"enc": "run.params.encoder.kernl"})


# ----------------------------------------------------------------------------
# One report, messages naming the sub-source, did-you-mean within it.
# ----------------------------------------------------------------------------


def test_one_strict_report_lists_every_sub_sources_problems(ckpts):
    vision, llm = ckpts
    state = _state()
    state["img"]["patch"] = _sds((8, 15))  # shape differs from vision's
    state["lm"]["head"] = _sds((8,))  # nothing in llm for it
    del state["proj"]["bias"]  # extra's bias has no target
    mapping = dict(MAPPING, **{"lm.head": "llm.params.head"})
    with pytest.raises(tg.GraftError) as info:
        tg.plan(state, _sources(ckpts), mapping)
    error = info.value
    kinds = sorted(p.kind for p in error.problems)
    assert kinds == ["missing", "shape", "unexpected"], str(error)
    by_kind = {p.kind: p.message for p in error.problems}
    assert f"the safetensors checkpoint {vision} (source 'vision')" in by_kind["shape"]
    assert f"not found in the checkpoint {llm} (source 'llm')" in by_kind["missing"]
    assert "the in-memory pytree (source 'extra')" in by_kind["unexpected"]
    assert "'extra.proj.bias'" in by_kind["unexpected"]
    # All three in the one message, each with the file or checkpoint it is about.
    for named in (vision, llm, "(source 'extra')"):
        assert named in str(error)


def test_strict_false_reports_them_as_one_plan(ckpts):
    state = _state()
    state["lm"]["head"] = _sds((8,))
    p = tg.plan(state, _sources(ckpts), dict(MAPPING, **{"lm.head": "llm.params.head"}),
                strict=False)
    assert [pr.kind for pr in p.report] == ["missing"]
    assert "(source 'llm')" in p.report[0].message


def test_a_stack_that_cannot_be_made_names_its_sub_source(tmp_path):
    z = np.zeros(2, np.float32)
    st_numpy.save_file({"layers.0.w": z, "layers.2.w": z}, str(tmp_path / "gap.safetensors"))
    src = {"vision": tg.SafetensorsCheckpoint(str(tmp_path / "gap.safetensors")),
           "extra": {"a": {"0": {"w": z}, "1": {"w": z}, "3": {"w": z}}}}
    state = {"img": {"w": np.zeros((2, 2), np.float32)}, "e": {"w": np.zeros((3, 2), np.float32)}}
    with pytest.raises(tg.MismatchError) as info:
        tg.plan(state, src, {"img": tg.stack("vision.layers.*"), "e": tg.stack("extra.a.*")})
    message = str(info.value)
    assert (f"'img': the subtrees of the safetensors checkpoint {tmp_path}/gap.safetensors "
            "(source 'vision') matching 'vision.layers.*' cannot be stacked: indices found 0, "
            "2, missing 1") in message, message
    assert ("'e': the subtrees of the in-memory pytree (source 'extra') matching 'extra.a.*' "
            "cannot be stacked") in message, message


def test_did_you_mean_stays_within_the_sub_source(tmp_path):
    z = np.zeros((2,), np.float32)
    st_numpy.save_file({f"encoder.blocks.{i}.mlp": z for i in range(2)},
                       str(tmp_path / "v.safetensors"))
    llm = _save_orbax(str(tmp_path / "llm"), {"layers": {str(i): {"mlp": z} for i in range(2)}})
    sources = {"vision": tg.SafetensorsCheckpoint(str(tmp_path / "v.safetensors")),
               "llm": tg.OrbaxCheckpoint(llm)}
    state = {"img": {"mlp": np.zeros((2, 2), np.float32)}}
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, sources, {"img": tg.stack("vision.layers.*")})
    message = str(info.value)
    assert "did you mean 'vision.encoder.blocks.*'" in message, message
    assert "llm." not in message.split("did you mean")[1]
    assert "(source 'vision')" in message and str(tmp_path / "v.safetensors") in message
    # The same names as one plain pytree: the closest name overall is llm's.
    plain = {"vision": {"encoder": {"blocks": {str(i): {"mlp": z} for i in range(2)}}},
             "llm": {"layers": {str(i): {"mlp": z} for i in range(2)}}}
    with pytest.raises(tg.PathNotFoundError, match=r"did you mean 'llm\.layers\.\*'"):
        tg.plan(state, plain, {"img": tg.stack("vision.layers.*")})
    # A literal path: the keys where it stops, in that sub-source.
    with pytest.raises(tg.PathNotFoundError, match=r"'vision\.encoder' has no key 'block' "
                       r"\(did you mean 'blocks'\?\)"):
        tg.plan({"w": z}, sources, {"w": "vision.encoder.block.0.mlp"})
    # A mistyped sub-source name: the names of the sub-sources.
    with pytest.raises(tg.PathNotFoundError, match=r"has no key 'visoin' \(did you mean 'vision'"):
        tg.plan({"w": z}, sources, {"w": "visoin.encoder.blocks.0.mlp"})


# ----------------------------------------------------------------------------
# Lazy: only what is mapped is read; a sub-source nothing maps to is never opened.
# ----------------------------------------------------------------------------


def _spy(monkeypatch, cls, *names: str) -> list[tuple[object, str, list]]:
    """Records each call of cls.<name> as (instance, name, requests), still calling it."""
    calls: list[tuple[object, str, list]] = []
    for name in names:
        original = getattr(cls, name)

        def spied(self, *args, _original=original, _name=name, **kwargs):
            calls.append((self, _name, args[0] if args else None))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spied)
    return calls


def test_a_sub_source_nothing_maps_to_is_never_opened(ckpts, tmp_path, monkeypatch):
    vision, llm = ckpts
    spare = tg.SafetensorsCheckpoint(vision)
    sources = dict(_sources(ckpts), spare=spare,
                   gone=tg.OrbaxCheckpoint(str(tmp_path / "no-such-checkpoint")))
    st_calls = _spy(monkeypatch, tg.SafetensorsCheckpoint,
                    "metadata", "prefetch", "read", "read_boxes", "box_nbytes")
    orbax_calls = _spy(monkeypatch, tg.OrbaxCheckpoint, "read", "read_boxes", "prefetch")
    p = tg.plan(_state(), sources, MAPPING)
    new = tg.execute(p)
    assert not [c for c in st_calls if c[0] is spare]
    assert [c for c in st_calls if c[0] is sources["vision"]]
    # Of llm, only the mapped leaves were asked for: never its optimizer state.
    assert not [c for c in orbax_calls if c[0] is sources["gone"]]
    # llm's headers: one batch, of the three leaves the plan pairs.
    prefetched = [arg for self, name, arg in orbax_calls if name == "prefetch"]
    assert [len(leaves) for leaves in prefetched] == [3], prefetched
    asked = {str(r.path) for _, name, reqs in orbax_calls if name != "prefetch" for r in reqs}
    assert asked == {"params.embed", "params.scanned_w", "params.final_norm"}, asked
    np.testing.assert_array_equal(np.asarray(new["lm"]["norm"]), LLM["params"]["final_norm"])
    # The bytes the plan reads: the mapped leaves (the unstacked layers as the orbax
    # reader measures their chunks), never llm's larger optimizer state.
    mapped = (sum(v.nbytes for v in VISION.values()) + LLM["params"]["embed"].nbytes
              + LLM["params"]["final_norm"].nbytes + 8 * 8 * 4 + 8 * 4)
    unstacked = sum(e.nbytes for e in p.entries if str(e.source) == "llm.params.scanned_w")
    assert p.nbytes == mapped + unstacked
    assert LLM["params"]["scanned_w"].nbytes <= unstacked < LLM["opt_state"]["mu"].nbytes


def test_an_unmapped_checkpoint_that_does_not_exist_is_fine(ckpts, tmp_path):
    gone = tg.OrbaxCheckpoint(str(tmp_path / "never-written"))
    src = {"llm": tg.OrbaxCheckpoint(ckpts[1]), "gone": gone}
    new = tg.graft({"e": np.zeros((32, 8), np.float32)}, src, {"e": "llm.params.embed"})
    np.testing.assert_array_equal(new["e"], LLM["params"]["embed"])
    # Mapped, the same checkpoint is a typed error naming it.
    with pytest.raises(tg.CheckpointNotFoundError, match="never-written"):
        tg.graft({"e": np.zeros((32, 8), np.float32)}, src, {"e": "gone.params.embed"})


# ----------------------------------------------------------------------------
# Pytree leaves without values; the rule for what counts as several sources.
# ----------------------------------------------------------------------------


def test_abstract_pytree_leaves_plan_but_do_not_execute(ckpts):
    extra = {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}
    src = {"llm": tg.OrbaxCheckpoint(ckpts[1]), "extra": extra}
    state = {"w": np.zeros(8, np.float32), "n": np.zeros(8, np.float32)}
    p = tg.plan(state, src, {"w": "extra.w", "n": "llm.params.final_norm"})
    assert [pr.kind for pr in p.report] == ["abstract"]
    assert "'extra.w' in the in-memory pytree (source 'extra')" in p.report[0].message
    with pytest.raises(tg.GraftError, match=r"source 'extra'.*no value"):
        tg.execute(p)


def test_deleted_pytree_leaves_are_refused_in_plan(ckpts):
    gone = jnp.ones(8)
    gone.delete()
    src = {"llm": tg.OrbaxCheckpoint(ckpts[1]), "extra": {"w": gone}}
    with pytest.raises(tg.GraftError, match=r"'extra\.w' in the in-memory pytree \(source "
                       r"'extra'\) \(float32\[8\]\) has been deleted"):
        tg.plan({"w": np.zeros(8, np.float32)}, src, {"w": "extra.w"})


def test_a_pytree_leaf_deleted_after_the_plan_is_refused_by_execute(ckpts):
    w = jnp.ones(8)
    src = {"llm": tg.OrbaxCheckpoint(ckpts[1]), "extra": {"w": w}}
    p = tg.plan({"w": np.zeros(8, np.float32), "n": np.zeros(8, np.float32)}, src,
                {"w": "extra.w", "n": "llm.params.final_norm"})
    w.delete()  # donated between plan and execute
    with pytest.raises(tg.GraftError, match=r"'extra\.w' in the in-memory pytree \(source "
                       r"'extra'\) \(float32\[8\]\) has been deleted"):
        tg.execute(p)


def test_a_dict_of_arrays_stays_a_plain_pytree():
    src = {"vision": {"w": np.ones(2)}, "llm": {"w": np.zeros(2)}}
    p = tg.plan({"w": np.zeros(2)}, src, {"w": "llm.w"})
    assert p._record.lazy is None  # no Source among the values: the pytree it always was
    assert "from the source;" in str(p)
    with pytest.raises(tg.PathNotFoundError, match="not found in the source:"):
        tg.plan({"w": np.zeros(2)}, src, {"w": "llm.v"})


def test_any_mapping_holding_a_source_is_several_sources(ckpts):
    # As tg.suggest reads it: a read-only mapping (or a FrozenDict) works as a dict does.
    src = MappingProxyType({"llm": tg.OrbaxCheckpoint(ckpts[1]), "extra": {"b": np.ones(8)}})
    new = tg.graft({"n": np.zeros(8, np.float32), "b": np.zeros(8)}, src,
                   {"n": "llm.params.final_norm", "b": "extra.b"})
    np.testing.assert_array_equal(new["n"], LLM["params"]["final_norm"])
    np.testing.assert_array_equal(new["b"], np.ones(8))


def test_sources_is_the_dict_made_explicit(ckpts):
    vision, llm = ckpts
    with tg.Sources(_sources(ckpts)) as src:
        assert src.names == ("vision", "llm", "extra")
        meta = src.metadata()
        assert sorted(meta) == ["extra", "llm", "vision"]
        assert meta["llm"]["params"]["embed"].shape == (32, 8)
        assert src.describe() == (
            f"the sources 'vision' (the safetensors checkpoint {vision}), 'llm' (the checkpoint "
            f"{llm}), 'extra' (the in-memory pytree)"
        )
        new = tg.graft(_state(), src, MAPPING)
        np.testing.assert_array_equal(np.asarray(new["lm"]["embed"]), LLM["params"]["embed"])
        safetensors = src._lazy["vision"]
    # Closed with it: the safetensors files are closed, later reads refused.
    with pytest.raises(tg.CheckpointError):
        tg.graft({"n": np.zeros(8, np.float32)}, safetensors,
                 {"n": "vision_model.post_layernorm.weight"})


class _Broken(tg.Source):
    """A source whose close fails: the others must still be closed."""

    def metadata(self):
        return {}

    def read(self, requests):
        return []

    def close(self):
        raise tg.CheckpointError("cannot close the broken source")


def test_close_closes_every_sub_source_then_raises_the_first_error(ckpts):
    vision = tg.SafetensorsCheckpoint(ckpts[0])
    vision.metadata()
    src = tg.Sources({"broken": _Broken(), "vision": vision})
    with pytest.raises(tg.CheckpointError, match="cannot close the broken source"):
        src.close()
    with pytest.raises(tg.CheckpointError):
        tg.graft({"n": np.zeros(8, np.float32)}, vision,
                 {"n": "vision_model.post_layernorm.weight"})


# ----------------------------------------------------------------------------
# Errors typed; nothing mutated.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sources, match",
    [
        ({}, r"at least one \{name: source\}"),
        ([("a", {})], "takes a dict"),
        ({1: {"w": np.ones(2)}}, r"the source name 1 is not a string \(int\)"),
        ({"a": "/models/vision", "b": {}}, r"source 'a' is the path '/models/vision'.*wrap it"),
    ],
    ids=["empty", "not-a-dict", "int-name", "a-path"],
)
def test_bad_sources_are_mapping_errors(sources, match):
    with pytest.raises(tg.MappingError, match=match):
        tg.Sources(sources)


def test_a_path_given_for_a_sub_source_in_a_plain_dict(ckpts):
    with pytest.raises(tg.MappingError, match=r"source 'vision' is the path"):
        tg.plan({"w": np.zeros(2)}, {"vision": ckpts[0], "llm": tg.OrbaxCheckpoint(ckpts[1])},
                {"w": "llm.params.final_norm"})


def test_reading_a_path_of_no_sub_source_is_a_path_error(ckpts):
    src = tg.Sources(_sources(ckpts))
    like = np.zeros(8, np.float32)
    with pytest.raises(tg.PathNotFoundError, match=r"'lm\.params\.x' names no source.*did you "
                       r"mean 'llm'"):
        src.read([tg.ReadRequest(tg.Path(("lm", "params", "x")), like, np.dtype(np.float32))])
    with pytest.raises(tg.PathNotFoundError, match=r"'extra\.nope' is not a leaf of the "
                       r"in-memory pytree \(source 'extra'\)"):
        src.read([tg.ReadRequest(tg.Path(("extra", "nope")), like, np.dtype(np.float32))])


def test_nothing_is_mutated_and_a_failed_plan_changes_nothing(ckpts):
    extra = _extra()
    sources = _sources(ckpts, extra)
    before = dict(sources)
    kernel = np.asarray(extra["proj"]["kernel"]).copy()
    state = _state()
    leaves = jax.tree.leaves(state)
    tg.graft(state, sources, MAPPING)
    with pytest.raises(tg.GraftError):
        tg.graft(state, sources, dict(MAPPING, **{"step": "extra.nope"}))
    assert sources == before and all(sources[k] is before[k] for k in before)
    assert sorted(extra) == ["proj", "step"] and extra["step"] == 3
    np.testing.assert_array_equal(np.asarray(extra["proj"]["kernel"]), kernel)
    assert jax.tree.structure(state) == jax.tree.structure(_state())
    assert all(a is b for a, b in zip(jax.tree.leaves(state), leaves, strict=True))


# ----------------------------------------------------------------------------
# Property: pytrees as sub-sources mean what the same dict means as one pytree.
# ----------------------------------------------------------------------------


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.filter_too_much])
@given(random_grafts())
def test_random_grafts_from_sources_equal_them_from_the_dict(case):
    state, source, mapping, options = case
    assume(isinstance(source, dict) and source and all(type(k) is str for k in source))
    try:
        want = tg.graft(state, source, mapping, **options)
    except tg.GraftError as e:
        event(f"both refuse: {type(e).__name__}")
        with pytest.raises(type(e)) as info:
            tg.graft(state, tg.Sources(source), mapping, **options)
        assert {p.kind for p in info.value.problems} == {p.kind for p in e.problems}, (
            str(e), str(info.value))
        return
    event("both graft")
    got = tg.graft(state, tg.Sources(source), mapping, **options)
    _assert_bit_identical(got, want)
