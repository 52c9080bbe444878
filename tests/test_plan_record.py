"""One plan record (architecture issue, item 3): a plan's byte counts are made once, by `plan`,
and the boxes of one block go to the source in one call.

- Looking at a plan (`str`, `repr`, `nbytes`, `entries`, `rule_counts`) does no
  I/O: it works with every read method of the source refused and its folder
  deleted.
- Executing a 32-layer stack from an orbax checkpoint or from safetensors asks
  the source for the layers' boxes in one `read_boxes` call, however many
  bytes they are, and the orbax reader opens one tensorstore reader for them.
- Memory stays bounded: the orbax reader streams the parts with a bounded
  window of reads in flight (cancelled when the consumer stops), the block
  being built keeps no part it has copied, and a kauldron step removed while
  its parts stream is still reported as removed.
- `execute` and the insert step take the plan's `PlanRecord`, nothing else of it.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._formats.orbax import arrays as orbax_arrays
from treegraft._read.source import BoxRequest

LAYERS = 32
SHAPE = (4, 8)


def _stacked() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((LAYERS, *SHAPE)).astype(np.float32)


def _save_orbax(path: str, tree: dict) -> str:
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
    finally:
        ckptr.close()
    return path


@pytest.fixture(scope="module")
def orbax_layers(tmp_path_factory):
    """32 layers saved twice: as one array per layer, and stacked with one chunk per layer."""
    stacked = _stacked()
    mesh = jax.make_mesh((8,), ("x",))
    tree = {
        "unscanned": {f"layers_{i}": {"w": stacked[i]} for i in range(LAYERS)},
        # Saved sharded by layer: orbax writes one chunk per shard (4 layers).
        "scanned": jax.device_put(jnp.asarray(stacked), NamedSharding(mesh, P("x"))),
    }
    return _save_orbax(str(tmp_path_factory.mktemp("layers") / "item"), tree), stacked


def _count_calls(monkeypatch, cls, name: str) -> list[int]:
    """Counts calls of cls.name (each call's number of requests), still calling it."""
    calls: list[int] = []
    original = getattr(cls, name)

    def counted(self, requests, *args, **kwargs):
        calls.append(len(requests))
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def _refuse(monkeypatch, cls, *names: str) -> None:
    def refused(*args, **kwargs):
        raise AssertionError("looking at a plan must not read the source")

    for name in names:
        monkeypatch.setattr(cls, name, refused)


# ----------------------------------------------------------------------------
# Looking at a plan does no I/O.
# ----------------------------------------------------------------------------


def test_looking_at_an_unstack_plan_reads_nothing(orbax_layers, monkeypatch, tmp_path):
    path, _ = orbax_layers
    copy = str(tmp_path / "item")
    shutil.copytree(path, copy)
    src = tg.OrbaxCheckpoint(copy)
    like = {f"layers_{i}": jax.ShapeDtypeStruct(SHAPE, jnp.float32) for i in range(LAYERS)}
    p = tg.plan(like, src, {"layers_*": tg.unstack("scanned", axis=0)})
    shutil.rmtree(copy)
    _refuse(monkeypatch, tg.OrbaxCheckpoint, "box_nbytes", "read", "read_boxes", "metadata",
            "prefetch")
    _refuse(monkeypatch, orbax_arrays.DirectReader, "open", "box_nbytes")
    # One chunk per 4 layers: each layer's read costs its chunk, 4 layers.
    chunk = 4 * int(np.prod(SHAPE)) * 4
    assert p.nbytes == LAYERS * chunk
    assert [e.nbytes for e in p.entries] == [chunk] * LAYERS
    assert p.rule_counts() == [(p.rules[0], LAYERS, LAYERS * chunk)]
    assert "32 of 32 target leaves" in str(p)
    assert repr(p).endswith(f"bytes={LAYERS * chunk})")


def test_looking_at_a_plan_reads_each_box_size_once_while_planning(orbax_layers, monkeypatch):
    path, _ = orbax_layers
    src = tg.OrbaxCheckpoint(path)
    asked = _count_calls(monkeypatch, tg.OrbaxCheckpoint, "box_nbytes")
    like = {f"layers_{i}": jax.ShapeDtypeStruct(SHAPE, jnp.float32) for i in range(LAYERS)}
    p = tg.plan(like, src, {"layers_*": tg.unstack("scanned", axis=0)})
    assert len(asked) == LAYERS  # one per layer, in plan
    for _ in range(3):
        str(p), p.nbytes, p.entries, repr(p)
    assert len(asked) == LAYERS  # none afterwards


def test_the_plan_holds_one_record_execute_runs_on(orbax_layers):
    from treegraft._plan import PlanRecord

    path, stacked = orbax_layers
    like = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.float32)}
    p = tg.plan(like, tg.OrbaxCheckpoint(path), {"w": "unscanned.layers_3.w"})
    assert isinstance(p._record, PlanRecord)
    assert p._record.nbytes == p.nbytes == stacked[3].nbytes
    assert not {"_rules", "_target", "_source", "_lazy", "_pairs"} & set(vars(p))
    np.testing.assert_array_equal(tg.execute(p)["w"], stacked[3])


# ----------------------------------------------------------------------------
# The boxes of one block go to the source in one call.
# ----------------------------------------------------------------------------


def _stack_like(sharding=None) -> dict:
    return {"w": jax.ShapeDtypeStruct((LAYERS, *SHAPE), jnp.float32, sharding=sharding)}


def test_a_32_layer_stack_from_orbax_is_one_box_read(orbax_layers, monkeypatch):
    path, stacked = orbax_layers
    src = tg.OrbaxCheckpoint(path)
    calls = _count_calls(monkeypatch, tg.OrbaxCheckpoint, "read_boxes")
    readers: list[int] = []
    init = orbax_arrays.DirectReader.__init__

    def counted_init(self, *args, **kwargs):
        readers.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(orbax_arrays.DirectReader, "__init__", counted_init)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = tg.graft(_stack_like(one), src, {"w": tg.stack("unscanned.layers_*.w")})
    np.testing.assert_array_equal(np.asarray(got["w"]), stacked)
    assert calls == [LAYERS]
    assert len(readers) == 1


def test_a_stack_sharded_on_its_layers_is_one_box_read_per_device(orbax_layers, monkeypatch):
    path, stacked = orbax_layers
    calls = _count_calls(monkeypatch, tg.OrbaxCheckpoint, "read_boxes")
    sharding = NamedSharding(jax.make_mesh((8,), ("x",)), P("x"))
    got = tg.graft(_stack_like(sharding), tg.OrbaxCheckpoint(path),
                   {"w": tg.stack("unscanned.layers_*.w")})
    np.testing.assert_array_equal(np.asarray(got["w"]), stacked)
    assert calls == [LAYERS // 8] * 8


def test_a_32_layer_stack_from_safetensors_is_one_box_read(tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.numpy")
    stacked = _stacked()
    half = LAYERS // 2
    # Two files: the layers of each go to the source in the one call.
    weight_map = {}
    for k, layers in enumerate((range(half), range(half, LAYERS))):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        st.save_file({f"layers_{i}.w": stacked[i] for i in layers}, str(tmp_path / name))
        weight_map.update({f"layers_{i}.w": name for i in layers})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    src = tg.SafetensorsCheckpoint(tmp_path)
    calls = _count_calls(monkeypatch, tg.SafetensorsCheckpoint, "read_boxes")
    got = tg.graft(_stack_like(), src, {"w": tg.stack("layers_*.w")})
    np.testing.assert_array_equal(np.asarray(got["w"]), stacked)
    assert calls == [LAYERS]


def _read_one(read_boxes, src, request) -> np.ndarray:
    (part,) = read_boxes(src, [request])
    return part


def _watch_reads(monkeypatch) -> dict[str, int]:
    """Counts the orbax reader's box reads: started, cancelled, most in flight at once."""
    seen = {"started": 0, "given": 0, "most": 0, "cancelled": 0}
    stream = orbax_arrays.DirectReader._stream
    start = orbax_arrays._BoxRead.start

    class Future:
        def __init__(self, future):
            self.future = future

        def __getattr__(self, name):
            return getattr(self.future, name)

        def cancel(self):
            seen["cancelled"] += 1
            return self.future.cancel()

    def started(self, pending):
        future = start(self, pending)
        if future is None:
            return None
        seen["started"] += 1
        seen["most"] = max(seen["most"], seen["started"] - seen["given"])
        return Future(future)

    def watched(self, reads):
        for part in stream(self, reads):
            seen["given"] += 1
            yield part
            del part

    monkeypatch.setattr(orbax_arrays._BoxRead, "start", started)
    monkeypatch.setattr(orbax_arrays.DirectReader, "_stream", watched)
    return seen


def test_a_large_block_is_one_call_with_a_bounded_window(monkeypatch, orbax_layers):
    """32 layers are one call however many bytes; the reader keeps 2 layers in flight."""
    layer = int(np.prod(SHAPE)) * 4
    monkeypatch.setattr(orbax_arrays, "_BOX_WINDOW_BYTES", 2 * layer)
    window = _watch_reads(monkeypatch)
    path, stacked = orbax_layers
    calls = _count_calls(monkeypatch, tg.OrbaxCheckpoint, "read_boxes")
    got = tg.graft(_stack_like(), tg.OrbaxCheckpoint(path), {"w": tg.stack("unscanned.layers_*.w")})
    np.testing.assert_array_equal(np.asarray(got["w"]), stacked)
    assert calls == [LAYERS]
    assert window["started"] == LAYERS
    assert window["most"] == 2  # streamed: never more than the window, nor one at a time


def test_a_block_keeps_no_part_it_has_copied(monkeypatch, orbax_layers):
    """A source that streams its parts: when part k is made, parts 0..k-1 are all freed."""
    path, stacked = orbax_layers
    original = tg.OrbaxCheckpoint.read_boxes
    calls: list[int] = []
    kept: list[int] = []

    def streamed(self, requests):
        calls.append(len(requests))
        refs: list[weakref.ref] = []

        def made(part):
            kept.append(sum(ref() is not None for ref in refs))
            refs.append(weakref.ref(part))
            return part

        for request in requests:
            # A source that ignores the block's slots (`BoxRequest.out`) and gives
            # fresh parts: no name here keeps a part once it is handed over.
            fresh = BoxRequest(request.path, request.box)
            yield made(_read_one(original, self, fresh))

    monkeypatch.setattr(tg.OrbaxCheckpoint, "read_boxes", streamed)
    got = tg.graft(_stack_like(), tg.OrbaxCheckpoint(path), {"w": tg.stack("unscanned.layers_*.w")})
    np.testing.assert_array_equal(np.asarray(got["w"]), stacked)
    assert calls == [LAYERS]
    assert kept == [0] * LAYERS


def test_a_consumer_that_stops_cancels_the_reads_in_flight(monkeypatch, orbax_layers):
    from treegraft._read.source import BoxRequest

    layer = int(np.prod(SHAPE)) * 4
    monkeypatch.setattr(orbax_arrays, "_BOX_WINDOW_BYTES", 4 * layer)
    window = _watch_reads(monkeypatch)
    path, stacked = orbax_layers
    src = tg.OrbaxCheckpoint(path)
    requests = [BoxRequest(tg.parse_path(f"unscanned.layers_{i}.w"), (slice(0, 4), slice(0, 8)))
                for i in range(LAYERS)]
    parts = iter(src.read_boxes(requests))
    np.testing.assert_array_equal(next(parts), stacked[0])
    assert window["started"] == 4
    parts.close()  # type: ignore[attr-defined]
    assert window["started"] == 4
    assert window["cancelled"] == 3  # the reads after the part handed over


def test_a_step_removed_while_its_boxes_stream_is_named_so(tmp_path):
    """The kauldron source's parts stream too, and a read that fails on a step
    deleted meanwhile still says the step was removed."""
    import optax
    from kauldron_run import init_params, train_state, write_run

    from treegraft._read.source import BoxRequest

    workdir = tmp_path / "run"
    write_run(workdir, {5: train_state(init_params({"dense": {"kernel": (4, 8)}}, seed=5),
                                       step=5, opt=optax.adam(1e-3))})
    src = tg.KauldronCheckpoint(str(workdir))
    request = BoxRequest(tg.parse_path("params.dense.kernel"), (slice(0, 2), slice(0, 8)))
    parts = src.read_boxes([request])  # paths and boxes checked, arrays opened: no read yet
    shutil.rmtree(workdir / "checkpoints" / "ckpt_5")
    with pytest.raises(tg.CheckpointNotFoundError,
                       match=r"step 5 of '.*run' was removed after it was chosen"):
        list(parts)
