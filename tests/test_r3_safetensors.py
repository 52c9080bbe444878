"""Round-3 reliability of the safetensors reader, and buffer ownership of grafted leaves.

Proves that:
- a header naming one tensor twice is refused (safetensors refuses it; a plain
  JSON parser keeps the last entry), and so is an index naming one twice;
- BOOL bytes other than 0 and 1 are refused at read time with a typed error
  naming the tensor, the file and the first bad byte's offset, on every read
  path (numpy, one device, sharded, `read_boxes`);
- headers and indexes with fields of the wrong JSON type, integers no offset
  can be, 5000-digit integers and deep nesting are typed `CheckpointError`s;
- a tensor name of 1200 dot segments leaves the file's other tensors usable;
- every shard of every grafted leaf owns its buffer (docs/design.md section
  12), for in-memory numpy (at several alignments) and jax sources (on the
  target's sharding, or resharded onto it), orbax checkpoints and safetensors
  files, replicated, half-replicated and fully sharded.

The hostile files are written by hand: 8-byte length, JSON bytes, data.
"""

from __future__ import annotations

import itertools
import json
import math
import struct

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_same_values, buffer_pointers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._formats.safetensors.header import INDEX_NAME
from treegraft._formats.safetensors.source import SafetensorsCheckpoint
from treegraft._read.source import BoxRequest


def write_bytes(path, text: bytes, data: bytes = b"") -> str:
    """A safetensors file whose header is exactly text."""
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def write(path, header: dict, data: bytes = b"") -> str:
    return write_bytes(path, json.dumps(header).encode(), data)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DATA_2 = np.array([1.5, -2.0], np.float32).tobytes()


# -- item 4: duplicate names --------------------------------------------------------


def test_a_header_naming_a_tensor_twice_is_refused(tmp_path):
    first = json.dumps(F32_2)
    second = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [8, 12]})
    text = f'{{"w": {first}, "w": {second}}}'.encode()
    path = write_bytes(tmp_path / "dup.safetensors", text, DATA_2 + DATA_2)
    message = r"the header of .*dup.safetensors names 'w' twice in one JSON object"
    with pytest.raises(tg.CheckpointError, match=message):
        SafetensorsCheckpoint(path).metadata()
    with pytest.raises(tg.CheckpointError, match=message):
        tg.graft({"x": np.zeros(1, np.float32)}, SafetensorsCheckpoint(path), {"x": "w"})


def test_an_index_naming_a_tensor_twice_is_refused(tmp_path):
    write(tmp_path / "a.safetensors", {"w": F32_2}, DATA_2)
    write(tmp_path / "b.safetensors", {"w": F32_2}, DATA_2)
    text = b'{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}'
    (tmp_path / INDEX_NAME).write_bytes(text)
    with pytest.raises(tg.CheckpointError, match=rf"{INDEX_NAME} names 'w' twice"):
        SafetensorsCheckpoint(str(tmp_path)).metadata()


# -- item 4: BOOL bytes -------------------------------------------------------------

BOOL_BYTES = bytes([0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1, 2, 0, 3])  # 2 at element 13
BOOL_HEADER = {
    "pad": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    "m": {"dtype": "BOOL", "shape": [4, 4], "data_offsets": [4, 20]},
}


def bool_file(tmp_path, data: bytes = BOOL_BYTES) -> str:
    return write(tmp_path / "bools.safetensors", BOOL_HEADER, bytes(4) + data)


def mesh():
    return jax.make_mesh((2, 4), ("a", "b"))


BOOL_LIKES = {
    "numpy": lambda: np.zeros((4, 4), bool),
    "one-device": lambda: jax.ShapeDtypeStruct((4, 4), bool),
    "replicated": lambda: jax.ShapeDtypeStruct((4, 4), bool, sharding=NamedSharding(mesh(), P())),
    "sharded": lambda: jax.ShapeDtypeStruct(
        (4, 4), bool, sharding=NamedSharding(mesh(), P("a", "b"))
    ),
}


@pytest.mark.parametrize("like", list(BOOL_LIKES))
def test_bool_bytes_other_than_0_or_1_are_refused(tmp_path, like):
    path = bool_file(tmp_path)
    src = SafetensorsCheckpoint(path)
    # The header is 8 + len(text) bytes; element 13 of 'm' is 4 + 13 bytes into the data.
    offset = 8 + len(json.dumps(BOOL_HEADER).encode()) + 4 + 13
    message = (
        rf"BOOL tensor 'm' in .*bools.safetensors holds the byte 2 at file offset {offset} "
        r"\(element \[3, 1\]\); a BOOL byte must be 0 or 1"
    )
    with pytest.raises(tg.CheckpointError, match=message):
        tg.graft({"x": BOOL_LIKES[like]()}, src, {"x": "m"})


def test_bool_bytes_are_checked_by_read_boxes(tmp_path):
    src = SafetensorsCheckpoint(bool_file(tmp_path))
    box = BoxRequest(tg.Path(("m",)), (slice(2, 4), slice(0, 4)))
    with pytest.raises(tg.CheckpointError, match=r"holds the byte 2 at file offset \d+ "):
        src.read_boxes([box])
    # Rows without a bad byte read as they are.
    good = BoxRequest(tg.Path(("m",)), (slice(0, 2), slice(0, 4)))
    (got,) = src.read_boxes([good])
    np.testing.assert_array_equal(got, np.frombuffer(BOOL_BYTES[:8], np.uint8).reshape(2, 4) == 1)


def test_a_scalar_bool_byte_other_than_0_or_1_is_refused(tmp_path):
    header = {"flag": {"dtype": "BOOL", "shape": [], "data_offsets": [0, 1]}}
    path = write(tmp_path / "flag.safetensors", header, bytes([255]))
    with pytest.raises(tg.CheckpointError, match=r"BOOL tensor 'flag' .* holds the byte 255 at "):
        tg.graft({"x": np.zeros((), bool)}, SafetensorsCheckpoint(path), {"x": "flag"})


@pytest.mark.parametrize("like", list(BOOL_LIKES))
def test_bool_bytes_of_0_and_1_read_as_they_are(tmp_path, like):
    data = bytes(b % 2 for b in BOOL_BYTES)
    src = SafetensorsCheckpoint(bool_file(tmp_path, data))
    got = tg.graft({"x": BOOL_LIKES[like]()}, src, {"x": "m"})["x"]
    want = np.frombuffer(data, np.uint8).reshape(4, 4) == 1
    np.testing.assert_array_equal(np.asarray(got), want)
    assert int(np.asarray(got).sum()) == int(want.sum())


# -- item 13: wrong JSON types, huge integers, deep nesting ------------------------

DEEP = 100_000


def entry(**fields) -> str:
    """A tensor entry's JSON with some fields replaced by raw JSON text."""
    base = {"dtype": '"F32"', "shape": "[1]", "data_offsets": "[0, 4]", **fields}
    return "{" + ", ".join(f'"{k}": {v}' for k, v in base.items()) + "}"


HOSTILE = {
    "dtype-list": (
        '{"w": ' + entry(dtype='["F32"]') + "}",
        r"tensor 'w' in the header of .*: dtype must be a string such as 'F32', got \['F32'\]",
    ),
    "dtype-object": (
        '{"w": ' + entry(dtype='{"a": 1}') + "}",
        r"tensor 'w' .*: dtype must be a string such as 'F32', got \{'a': 1\}",
    ),
    "offsets-beyond-2**64": (
        '{"w": ' + entry(data_offsets=f"[{2**64}, {2**64 + 4}]") + "}",
        r"tensor 'w' .*: data_offsets \[18446744073709551616, 18446744073709551620\] end "
        r"beyond the largest offset a file can have",
    ),
    "offsets-just-below-2**64": (
        '{"w": ' + entry(data_offsets=f"[{2**64 - 5}, {2**64 - 1}]") + "}",
        r"tensor 'w' .*: data_offsets .* end beyond the largest offset a file can have",
    ),
    "5000-digit-integer": (
        '{"w": ' + entry(data_offsets="[0, " + "4" * 5000 + "]") + "}",
        r"the header of .* holds an integer of 5000 digits; a size or offset has at most 20",
    ),
    "axis-beyond-2**63": (
        '{"w": ' + entry(shape=f"[0, {2**63}]", data_offsets="[0, 0]") + "}",
        r"tensor 'w' .*: shape must be a list of non-negative ints",
    ),
    "elements-beyond-2**63": (
        '{"w": ' + entry(shape=f"[0, {2**40}, {2**40}]", data_offsets="[0, 0]") + "}",
        r"tensor 'w' .*: shape \[0, 1099511627776, 1099511627776\] has more elements than",
    ),
    "65-axes": (
        '{"w": ' + entry(shape="[" + ", ".join(["1"] * 65) + "]") + "}",
        r"tensor 'w' .*: shape has 65 axes; numpy and jax hold at most 64",
    ),
    "deep-header": (
        "[" * DEEP + "]" * DEEP,
        r"the header of .* nests JSON arrays or objects too deeply to parse",
    ),
    "deep-field": (
        '{"w": ' + entry(extra="[" * DEEP + "]" * DEEP) + "}",
        r"the header of .* nests JSON arrays or objects too deeply to parse",
    ),
    "deep-entry": (
        '{"w": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
        r"the header of .* nests JSON arrays or objects too deeply to parse",
    ),
    "metadata-not-strings": (
        '{"__metadata__": {"format": ["pt"]}, "w": ' + entry() + "}",
        r"the __metadata__ of .* is not a JSON object of strings: got \{'format': \['pt'\]\}",
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_headers_are_checkpoint_errors(tmp_path, kind):
    text, message = HOSTILE[kind]
    path = write_bytes(tmp_path / "hostile.safetensors", text.encode(), bytes(4))
    with pytest.raises(tg.CheckpointError, match=message):
        SafetensorsCheckpoint(path).metadata()
    with pytest.raises(tg.CheckpointError, match=message):
        tg.plan({"x": np.zeros(1, np.float32)}, SafetensorsCheckpoint(path), {"x": "w"})


HOSTILE_INDEX = {
    "deep": "[" * DEEP + "]" * DEEP,
    "deep-weight-map": '{"weight_map": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    "5000-digit-integer": '{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}',
}
HOSTILE_INDEX_MESSAGES = {
    "deep": "nests JSON arrays or objects too deeply to parse",
    "deep-weight-map": "nests JSON arrays or objects too deeply to parse",
    "5000-digit-integer": "holds an integer of 5000 digits",
}


@pytest.mark.parametrize("kind", list(HOSTILE_INDEX))
def test_hostile_indexes_are_checkpoint_errors(tmp_path, kind):
    write(tmp_path / "a.safetensors", {"w": F32_2}, DATA_2)
    (tmp_path / INDEX_NAME).write_text(HOSTILE_INDEX[kind])
    with pytest.raises(tg.CheckpointError, match=rf"{INDEX_NAME} {HOSTILE_INDEX_MESSAGES[kind]}"):
        SafetensorsCheckpoint(str(tmp_path)).metadata()


def test_a_name_of_1200_segments_leaves_the_other_tensors_usable(tmp_path):
    long = ".".join(["a"] * 1200)
    header = {
        "w": F32_2,
        long: {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    path = write(tmp_path / "long.safetensors", header, DATA_2 + bytes(4))
    assert 2400 < len(json.dumps(header)) < 2600  # a 2.5 KB header
    src = SafetensorsCheckpoint(path)
    assert set(src.metadata()) == {"w"}
    got = tg.graft({"x": np.zeros(2, np.float32)}, src, {"x": "w"})
    np.testing.assert_array_equal(got["x"], np.frombuffer(DATA_2, np.float32))
    # Asked for by its path, it says why it is not there.
    request = BoxRequest(tg.Path(("a",) * 1200), (slice(0, 1),))
    with pytest.raises(
        tg.CheckpointError,
        match=r"tensor 'a\.a\.a.*'\.\.\. of .*long.safetensors has 1200 path parts; treegraft "
        r"reads names of at most 100",
    ):
        src.read_boxes([request])


# -- item 9: every shard of every grafted leaf owns its buffer ---------------------

SHARDINGS = {
    "replicated": P(),
    "half-replicated": P("a"),
    "fully-sharded": P("a", "b"),
}
# Offsets (bytes) into one host buffer at which the numpy leaves start: several
# alignments, so that some land where jax's CPU client adopts host memory.
OFFSETS = (0, 4, 8, 12, 16, 24, 32, 48, 64, 68, 128)


def source_arrays() -> dict[str, np.ndarray]:
    """float32 leaves of two shapes, each at its own offset into one bytes buffer."""
    shapes = [(8, 8), (32, 16)]
    raw = np.zeros(len(OFFSETS) * len(shapes) * 2304, np.uint8)
    out = {}
    for k, (offset, shape) in enumerate(itertools.product(OFFSETS, shapes)):
        start = k * 2304 + offset
        size = 4 * math.prod(shape)
        view = raw[start : start + size].view(np.float32).reshape(shape)
        view[...] = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) + 1000 * k
        out[f"w{k}"] = view
    return out


def write_safetensors(path, arrays: dict[str, np.ndarray]) -> str:
    header, data = {}, b""
    for name, array in arrays.items():
        # A 4-byte pad before each tensor: tensors at several alignments in the file.
        pad = [len(data), len(data) + 4]
        header[f"pad_{name}"] = {"dtype": "U8", "shape": [4], "data_offsets": pad}
        data += bytes(4)
        raw = array.tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return write(path, header, data)


def make_source(kind: str, tmp_path, arrays, sharding):
    """The source of that kind holding arrays, and the buffers it holds (to stay clear of)."""
    if kind == "numpy":
        return arrays, [a.ctypes.data for a in arrays.values()]
    if kind == "jax":
        placed = {k: jax.device_put(v, sharding) for k, v in arrays.items()}
        return placed, [p for v in placed.values() for p in buffer_pointers(v)]
    if kind == "jax-resharded":
        # On another sharding: the graft reshards them onto the target's.
        other = NamedSharding(mesh(), P("b"))
        placed = {k: jax.device_put(v, other) for k, v in arrays.items()}
        return placed, [p for v in placed.values() for p in buffer_pointers(v)]
    if kind == "orbax":
        path = tmp_path / "orbax"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, {k: np.array(v) for k, v in arrays.items()})
            ckptr.wait_until_finished()
        return tg.OrbaxCheckpoint(str(path)), []
    if kind == "safetensors":
        return SafetensorsCheckpoint(write_safetensors(tmp_path / "w.safetensors", arrays)), []
    raise AssertionError(kind)


@pytest.mark.parametrize("spec", list(SHARDINGS))
@pytest.mark.parametrize("kind", ["numpy", "jax", "jax-resharded", "orbax", "safetensors"])
def test_every_shard_of_every_grafted_leaf_owns_its_buffer(tmp_path, kind, spec):
    sharding = NamedSharding(mesh(), SHARDINGS[spec])
    arrays = source_arrays()
    source, source_buffers = make_source(kind, tmp_path, arrays, sharding)
    state = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in arrays.items()
    }
    got = tg.graft(state, source, {k: k for k in arrays})
    assert_same_values({k: np.asarray(v) for k, v in got.items()}, arrays)
    pointers = [p for leaf in got.values() for p in buffer_pointers(leaf)]
    assert len(pointers) == 8 * len(arrays)
    shared = len(pointers) - len(set(pointers))
    assert shared == 0, f"{shared} shard buffers shared between shards of grafted leaves"
    assert not set(pointers) & set(source_buffers)


def test_many_replicated_numpy_leaves_own_their_buffers():
    # 300 leaves alike: the copies of shared buffers go by compiled chunks of 256
    # and one batch for the rest.
    sharding = NamedSharding(mesh(), P())
    source = {f"w{k}": np.full((8, 16), k, np.float32) for k in range(300)}
    state = {k: jax.ShapeDtypeStruct((8, 16), np.float32, sharding=sharding) for k in source}
    got = tg.graft(state, source, {"*": "*"})
    assert_same_values({k: np.asarray(v) for k, v in got.items()}, source)
    pointers = [p for leaf in got.values() for p in buffer_pointers(leaf)]
    assert len(set(pointers)) == len(pointers) == 8 * 300
    assert not set(pointers) & {a.ctypes.data for a in source.values()}
