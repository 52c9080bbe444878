"""One placement primitive, one key looseness, one did-you-mean for paths (issue #22 item 2).

Proves that `treegraft._insert.placement` builds a sharded array from host
blocks with every shard in a buffer of its own (replicas copied, a block
read once per box, a block object reused for two boxes copied), repairs an
array whose shards share a buffer, and gives the default sharding and the
concrete mesh of an AbstractMesh target; that no other module builds arrays
from per-device buffers, makes the default sharding, compares an int part
with its digits, or formats a did-you-mean itself; and that the helpers
they now call give the same answers and messages as before.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_owns_buffers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._errors import PATH_CUTOFF, GraftError, suggest, suggest_path
from treegraft._insert import placement
from treegraft._parse import keys

ROOT = pathlib.Path(tg.__file__).parent


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((4, 2), ("a", "b"))


def _aligned(shape: tuple[int, ...], fill: float) -> np.ndarray:
    """A float32 array at a 64-byte aligned address: jax's CPU client adopts such memory."""
    n = int(np.prod(shape)) * 4
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + n].view(np.float32).reshape(shape)
    out[...] = fill
    return out


@pytest.mark.parametrize("spec", [P(), P("a"), P(None, "b"), P("a", "b")])
def test_array_from_blocks_gives_every_shard_its_own_buffer(spec):
    shape = (8, 4)
    whole = np.arange(32, dtype=np.float32).reshape(shape)
    sharding = NamedSharding(_mesh(), spec)
    asked = []

    def block_of(box):
        asked.append(box)
        out = _aligned(tuple(b - a for a, b in box), 0)
        out[...] = whole[tuple(slice(a, b) for a, b in box)]
        return out

    got = placement.array_from_blocks(shape, sharding, block_of)
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), whole)
    assert_owns_buffers(got)
    # One read per distinct block, however many devices hold it.
    assert len(asked) == len(set(asked)) == len(placement.devices_by_box(sharding, shape))


def test_array_from_blocks_copies_a_block_returned_for_two_boxes():
    sharding = NamedSharding(_mesh(), P("a"))
    same = _aligned((2, 4), 1.0)
    got = placement.array_from_blocks((8, 4), sharding, lambda box: same)
    np.testing.assert_array_equal(np.asarray(got), np.ones((8, 4), np.float32))
    assert_owns_buffers(got)


def test_put_block_gives_each_device_its_own_buffer():
    devices = jax.devices()[:4]
    host = _aligned((16,), 2.0)
    for adopt in (True, False):
        got = placement.put_block(host, devices, adopt=adopt)
        pointers = [x.unsafe_buffer_pointer() for x in got]
        assert len(set(pointers)) == 4
        assert [x.devices() for x in got] == [{d} for d in devices]


def test_own_buffers_copies_shards_that_share_a_buffer():
    devices = jax.devices()[:2]
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharding = NamedSharding(mesh, P())
    host = _aligned((1024,), 3.0)
    # The same aligned host memory adopted by two devices: one buffer, two shards.
    shards = [jax.device_put(host, d) for d in devices]
    shared = jax.make_array_from_single_device_arrays((1024,), sharding, shards)
    if not placement.shares_buffers(shared):
        pytest.skip("this jax copies aligned host memory: no shared buffer to repair")
    fixed = placement.own_buffers(shared)
    assert not placement.shares_buffers(fixed)
    np.testing.assert_array_equal(np.asarray(fixed), np.full(1024, 3.0, np.float32))


def test_default_sharding_is_this_process_first_device():
    assert placement.default_sharding() == jax.sharding.SingleDeviceSharding(
        jax.local_devices()[0]
    )
    like = jax.ShapeDtypeStruct((2,), jnp.float32)
    assert placement.sharding_of(like) == placement.default_sharding()
    sharding = NamedSharding(_mesh(), P("a"))
    assert placement.sharding_of(jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)) is (
        sharding
    )


def test_concrete_likes_puts_abstract_meshes_on_the_mesh_in_context():
    mesh = _mesh()
    abstract = NamedSharding(mesh.abstract_mesh, P("a"))
    leaves = [jax.ShapeDtypeStruct((8,), jnp.float32, sharding=abstract), np.zeros(2)]
    paths = [("w",), ("b",)]
    with pytest.raises(GraftError, match=r"sharded on an AbstractMesh .*'w'"):
        placement.concrete_likes([0, 1], leaves, paths)
    with jax.set_mesh(mesh):
        got = placement.concrete_likes([0, 1], leaves, paths)
    assert got[0].sharding == NamedSharding(mesh, P("a"))
    assert got[1] is leaves[1]


def test_graft_replicated_targets_own_their_buffers():
    mesh = _mesh()
    sharding = NamedSharding(mesh, P())
    state = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=sharding)}
    source = {"v": np.arange(16, dtype=np.float32).reshape(4, 4)}
    out = tg.graft(state, source, {"w": tg.transpose("v", (1, 0))})
    np.testing.assert_array_equal(np.asarray(out["w"]), source["v"].T)
    assert_owns_buffers(out["w"])


def _source_files():
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path.read_text()


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        # Arrays from per-device buffers or host blocks.
        (
            r"make_array_from_single_device_arrays\(|make_array_from_callback\(",
            "_insert/placement.py",
        ),
        # The default sharding of a device target without one.
        (r"SingleDeviceSharding\(jax\.local_devices\(\)", "_insert/placement.py"),
        # Shardings on an AbstractMesh put on the mesh in context.
        (r"jax\.sharding\.get_mesh\(\)", "_insert/placement.py"),
        # An int part compared with its digits.
        (r"str\((p|part|v)\) if type\(|== str\((part|v|wanted)\)", "_parse/keys.py"),
        # A did-you-mean phrase formatted by hand.
        (r"\(did you mean \" \+", "_errors.py"),
    ],
)
def test_one_home_for_each_primitive(pattern, home):
    found = sorted(
        name for name, text in _source_files() if re.search(pattern, text) and name != home
    )
    assert found == [], f"{pattern!r} outside {home}: {found}"


def test_keys_helpers_answer_as_before():
    assert keys.loose((0, "a", "1", -2)) == ("0", "a", "1", "-2")
    assert keys.loose_part(3) == "3" and keys.loose_part("x") == "x"
    assert keys.finds_digits(0, "0")
    assert not keys.finds_digits("0", 0)
    assert not keys.finds_digits(True, "True")
    assert not keys.finds_digits(1, "01")
    assert keys.could_loosen(("a", 0)) and keys.could_loosen(("a", "-1"))
    assert not keys.could_loosen(("a", "b"))


def test_int_part_finds_the_digits_key_through_keys():
    tree = {"layers": {"0": np.ones(2), "1": np.zeros(2)}}
    assert tg.extract(tree, "layers[0]") is not None
    out = tg.graft({"w": np.zeros(2)}, tree, {"w": "layers.1"})
    np.testing.assert_array_equal(out["w"], np.zeros(2))


def test_suggest_path_is_suggest_at_the_path_cutoff():
    names = ["encoder.layers.*.mlp", "encoder.layers.*.attn", "decoder.layers.*.mlp"]
    for text in ["encoder.layer.*.mlp", "decoder.layers.*.mlp", "zzz"]:
        assert suggest_path(text, names) == suggest(text, names, cutoff=PATH_CUTOFF)
    # not_itself: the text is never offered, and still up to three others are.
    got = suggest_path("decoder.layers.*.mlp", names, not_itself=True)
    assert "'decoder.layers.*.mlp'" not in got
    assert got.startswith(" (did you mean 'encoder.layers.*.mlp'")
    many = [f"a.b{i}" for i in range(6)]
    assert suggest_path("a.b1", many, not_itself=True).count("' or '") == 2
