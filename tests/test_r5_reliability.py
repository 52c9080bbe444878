"""Reliability round 5: abstract targets whose sharding cannot split their shape, and jit.

Before, such a `jax.ShapeDtypeStruct` passed `plan` and `graft` failed after
its reads with jax's raw `IndivisibleError` naming only the first leaf.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._plan.divisible import uneven_split


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _abstract(shape, mesh, spec):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))


def test_every_uneven_target_is_named_in_one_mismatch_error_before_any_read(mesh):
    state = {
        "layers": [{"w": _abstract((6, 3), mesh, P("model"))} for _ in range(4)],
        "b": _abstract((5,), mesh, P("data")),
        "ok": _abstract((8, 6), mesh, P("model", "data")),
    }
    source = {
        "layers": [{"w": np.ones((6, 3), np.float32)} for _ in range(4)],
        "b": np.ones(5, np.float32),
        "ok": np.ones((8, 6), np.float32),
    }
    with pytest.raises(tg.MismatchError) as err:
        tg.plan(state, source, {"*": "*"})
    text = str(err.value)
    assert "target shardings that do not divide their leaf's shape: 5" in text
    assert "'b' in the state is float32[5] with sharding P('data',) over a mesh of " \
        "data=2, model=4: axis 0 of size 5 cannot be split 2 ways evenly" in text
    assert "axis 0 of size 6 cannot be split 4 ways evenly" in text
    assert "'layers[0..3].w' in the state is float32[6, 3]" in text  # grouped across layers
    assert "(x4)" in text
    assert "'ok'" not in text
    assert "or None to replicate that axis" in text
    kinds = {p.kind for p in err.value.problems}
    assert kinds == {"indivisible"}
    assert sorted(str(p.target) for p in err.value.problems) == [
        "b", "layers[0].w", "layers[1].w", "layers[2].w", "layers[3].w"]


def test_a_checkpoint_source_is_refused_in_plan_and_graft_leaves_the_state(mesh, tmp_path):
    src = {"w": np.arange(15, dtype=np.float32).reshape(5, 3)}
    tg.save(src, str(tmp_path / "ck"))
    state = {"w": _abstract((5, 3), mesh, P(("data", "model")))}
    ckpt = tg.OrbaxCheckpoint(str(tmp_path / "ck"))
    with pytest.raises(tg.MismatchError, match=r"axis 0 of size 5 cannot be split 8 ways evenly"):
        tg.plan(state, ckpt, {"w": "w"})
    with pytest.raises(tg.MismatchError, match=r"axis 0 of size 5 cannot be split 8 ways evenly"):
        tg.graft(state, ckpt, {"w": "w"})
    assert isinstance(state["w"], jax.ShapeDtypeStruct)


def test_convert_with_such_a_like_writes_nothing(mesh, tmp_path):
    like = {"w": _abstract((5, 3), mesh, P("model"))}
    dest = tmp_path / "out"
    with pytest.raises(tg.MismatchError, match=r"cannot be split 4 ways evenly"):
        tg.convert({"w": np.ones((5, 3), np.float32)}, str(dest), {"w": "w"}, like=like)
    assert not os.path.exists(dest)
    assert os.listdir(tmp_path) == []


def test_targets_that_divide_are_grafted_with_their_sharding(mesh):
    """Uneven axes that no mesh axis splits are fine; so are concrete targets."""
    state = {
        "a": _abstract((8, 5), mesh, P("model")),
        "b": _abstract((7, 4), mesh, P(None, "model")),
        "c": jnp.zeros((5,)),
    }
    source = {k: np.arange(np.prod(v.shape), dtype=np.float32).reshape(v.shape)
              for k, v in state.items()}
    out = tg.graft(state, source, {"*": "*"})
    for k in state:
        np.testing.assert_array_equal(np.asarray(out[k]), source[k])
    assert out["a"].sharding == state["a"].sharding
    assert out["b"].sharding == state["b"].sharding


def test_uneven_split_names_each_axis_and_fits_otherwise(mesh):
    assert uneven_split((8, 4), NamedSharding(mesh, P("model", "data"))) is None
    assert uneven_split((6, 3), NamedSharding(mesh, P("data", "model"))) == (
        "axis 1 of size 3 cannot be split 4 ways evenly")
    assert uneven_split((3, 3), NamedSharding(mesh, P("data", "model"))) == (
        "axis 0 of size 3 cannot be split 2 ways evenly; "
        "axis 1 of size 3 cannot be split 4 ways evenly")


def test_the_array_type_is_jaxs_even_when_first_asked_under_jit():
    """array_type() is cached per process: asked first in a trace, it kept the tracer type."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from treegraft._tree.leaves import array_type\n"
        "seen = []\n"
        "jax.jit(lambda x: seen.append(array_type()) or x)(jnp.ones(3))\n"
        "assert seen[0] is type(jnp.ones(3)), seen\n"
        "import treegraft as tg\n"
        "try:\n"
        "    jax.jit(lambda x: tg.graft({'w': x}, {'w': x}, {'w': 'w'}))(jnp.ones(3))\n"
        "except tg.GraftError as e:\n"
        "    print('typed:', type(e).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert "typed:" in done.stdout, done.stdout


def test_a_reshard_through_the_host_never_hands_out_the_sources_host_copy():
    """jax caches a resharded source's host copy on it and may adopt aligned row blocks of it."""
    devices = np.array(jax.devices()[:8])
    have = NamedSharding(Mesh(devices.reshape(2, 4), ("data", "model")), P("data", "model"))
    want = NamedSharding(Mesh(devices, ("fsdp",)), P("fsdp", None))
    like = {"w": jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=want)}
    seen = 0
    for t in range(30):  # whether jax adopts a block depends on where its copy landed
        values = np.arange(16 * 32, dtype=np.float32).reshape(16, 32) + t
        src = jax.device_put(values, have)
        out = tg.graft(like, {"w": src}, {"w": "w"})["w"]
        np.testing.assert_array_equal(np.asarray(out), values)
        assert out.sharding == want
        host = getattr(src, "_npy_value", None)
        if host is None:
            continue
        seen += 1
        lo, hi = host.ctypes.data, host.ctypes.data + host.nbytes
        inside = [s.device for s in out.addressable_shards
                  if lo <= s.data.unsafe_buffer_pointer() < hi]
        assert not inside, f"round {t}: shards on {inside} are the source's host copy"
        theirs = {s.data.unsafe_buffer_pointer() for s in src.addressable_shards}
        assert not theirs & {s.data.unsafe_buffer_pointer() for s in out.addressable_shards}
    assert seen, "jax kept no host copy: the case this test guards did not happen"
