"""The safetensors writer: files safetensors itself reads bit for bit, shards and their index,
plan-time refusals, the memory budget, write errors, and gs:// and s3://.

The writer is called directly, as `tg.convert` calls it, with a fetch over
numpy arrays in memory that records every box it is asked for.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import hypothesis
import hypothesis.strategies as st
import jax
import ml_dtypes
import numpy as np
import pytest
import servers

import treegraft as tg
from treegraft._formats.safetensors.write import SafetensorsWriter, plan_files
from treegraft._storage.location import Location
from treegraft._write.interface import Budget, OutLeaf

safetensors = pytest.importorskip("safetensors")

# What safetensors' numpy API reads (0.7.0 fails on the F8 codes: it looks for
# np.float8_e4m3fn, which numpy does not have); the F8 ones are checked with
# safetensors' framework-free `deserialize`.
NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64, "C64": np.complex64,
}
F8_DTYPES = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_UNIQUE = itertools.count()


def random_bits(rng, shape, dtype):
    """An array of random bits (NaNs and infinities included), bools as 0 or 1."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def tree_of(rng, dtypes, *, shapes=((3, 5),)):
    """A model-like tree: one leaf per dtype and shape, under a list (int indices)."""
    leaves = {}
    for k, (code, dtype) in enumerate(dtypes.items()):
        for s, shape in enumerate(shapes):
            leaves[f"{code.lower()}_{s}"] = random_bits(rng, shape, dtype)
        if k % 2:
            leaves[f"{code.lower()}_scalar"] = random_bits(rng, (), dtype)
        else:
            leaves[f"{code.lower()}_empty"] = random_bits(rng, (0, 4), dtype)
    return {"model": {"layers": [leaves, {"w": random_bits(rng, (2, 2), np.float32)}],
                      "norm": random_bits(rng, (7,), ml_dtypes.bfloat16)}}


class Fetch:
    """Boxes of in-memory arrays, each a fresh copy; records what was asked for."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.boxes: list[tuple[int, tuple[slice, ...], int]] = []

    def __call__(self, i, box):
        out = np.array(self.arrays[i][box], copy=True)
        self.boxes.append((i, box, out.nbytes))
        return out


def flat(tree):
    """(OutLeaf list, arrays, names) of a tree, in its leaf order."""
    items = list(tg.flatten(tree).items())
    leaves = [OutLeaf(p.parts, a.shape, a.dtype) for p, a in items]
    names = [".".join(str(x) for x in p.parts) for p, _ in items]
    return leaves, [a for _, a in items], names


def write(tmp, tree, budget=None, dest=None):
    leaves, arrays, names = flat(tree)
    fetch = Fetch(arrays)
    SafetensorsWriter(dest).write(tmp, leaves, fetch, budget or Budget())
    return fetch, dict(zip(names, arrays, strict=True))


def as_bytes(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def deserialized(path):
    """{name: (dtype code, shape, bytes)} as safetensors' own parser reads the file."""
    with open(path, "rb") as f:
        return {n: (v["dtype"], tuple(v["shape"]), bytes(v["data"]))
                for n, v in safetensors.deserialize(f.read())}


def assert_reads_back(src, by_name):
    """Every tensor read by treegraft from src equals the written one, bit for bit."""
    meta = src.metadata()
    like = jax.tree.map(lambda info: np.zeros(info.shape, info.dtype), meta)
    got = tg.graft(like, src, {"": ""})
    read = {".".join(str(x) for x in p.parts): a for p, a in tg.flatten(got).items()}
    assert sorted(read) == sorted(by_name)
    for name, want in by_name.items():
        assert read[name].dtype == want.dtype and read[name].shape == want.shape, name
        assert as_bytes(read[name]) == as_bytes(want), name


# -- what safetensors reads ---------------------------------------------------------


def test_one_file_of_every_dtype_reads_bit_identical_with_safetensors(tmp_path):
    tree = tree_of(np.random.default_rng(0), NUMPY_DTYPES | F8_DTYPES)
    fetch, by_name = write(tmp_path / "out", tree)
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    path = str(tmp_path / "out" / "model.safetensors")
    codes = {np.dtype(d): c for c, d in (NUMPY_DTYPES | F8_DTYPES).items()}
    stored = deserialized(path)
    assert sorted(stored) == sorted(by_name)
    for name, want in by_name.items():
        assert stored[name] == (codes[want.dtype], want.shape, as_bytes(want)), name
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(by_name)
        for name, want in by_name.items():
            if want.dtype in map(np.dtype, F8_DTYPES.values()):
                assert f.get_slice(name).get_dtype() == codes[want.dtype]
                continue
            got = f.get_tensor(name)
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert as_bytes(got) == as_bytes(want), name
    # Every tensor starts at a multiple of its item size (the header is padded to 8).
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert n % 8 == 0
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % by_name[name].dtype.itemsize == 0, name
    assert len(fetch.boxes) >= len(by_name)


def test_safetensors_numpy_load_file_reads_every_tensor(tmp_path):
    tree = tree_of(np.random.default_rng(1), NUMPY_DTYPES, shapes=((4, 3, 2), (1,)))
    _, by_name = write(tmp_path / "w.safetensors", tree, dest="w.safetensors")
    got = pytest.importorskip("safetensors.numpy").load_file(str(tmp_path / "w.safetensors"))
    assert sorted(got) == sorted(by_name)
    for name, want in by_name.items():
        assert (got[name].dtype, got[name].shape) == (want.dtype, want.shape), name
        assert as_bytes(got[name]) == as_bytes(want), name


def test_names_are_hugging_face_names(tmp_path):
    rng = np.random.default_rng(2)
    tree = {"model": {"layers": [{"mlp": {"up_proj": {"weight": random_bits(rng, (2,), np.int8)}}}],
                      "embed_tokens": {"weight": random_bits(rng, (3,), np.int8)}}}
    write(tmp_path / "out", tree)
    assert sorted(deserialized(tmp_path / "out" / "model.safetensors")) == [
        "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]


@pytest.mark.parametrize("dest", ["folder", "model.safetensors"])
def test_treegraft_reads_back_what_it_wrote(tmp_path, dest):
    tree = tree_of(np.random.default_rng(3), NUMPY_DTYPES | F8_DTYPES)
    target = tmp_path / dest
    _, by_name = write(target, tree, dest=str(target))
    assert_reads_back(tg.SafetensorsCheckpoint(target), by_name)


# -- shards and the index -------------------------------------------------------------


def sized_tree(sizes, dtype=np.float32):
    rng = np.random.default_rng(4)
    itemsize = np.dtype(dtype).itemsize
    return {"m": {"layers": [{"w": random_bits(rng, (n // itemsize,), dtype)} for n in sizes]}}


def test_shards_past_max_shard_bytes_with_the_index_transformers_writes(tmp_path):
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    sizes = [400, 400, 400, 800, 200, 200, 0, 600]
    tree = sized_tree(sizes)
    budget = Budget(max_shard_bytes=1000)
    _, by_name = write(tmp_path / "out", tree, budget)
    files = sorted(os.listdir(tmp_path / "out"))
    n = len(files) - 1
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] + [
        "model.safetensors.index.json"]
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        text = f.read()
    index = json.loads(text)
    # huggingface_hub's own split (transformers' save_pretrained uses it) as the oracle.
    split = split_state_dict_into_shards_factory(
        by_name, get_storage_size=lambda a: a.nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=budget.max_shard_bytes)
    assert index == {
        "metadata": {"total_size": sum(sizes), "total_parameters": sum(sizes) // 4},
        "weight_map": split.tensor_to_filename,
    }
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for file, names in split.filename_to_tensors.items():
        stored = deserialized(tmp_path / "out" / file)
        assert sorted(stored) == sorted(names)
        assert sum(len(v[2]) for v in stored.values()) <= budget.max_shard_bytes
        for name in names:
            assert stored[name][2] == as_bytes(by_name[name])
    assert_reads_back(tg.SafetensorsCheckpoint(tmp_path / "out"), by_name)


def test_a_tensor_larger_than_a_shard_has_one_of_its_own_in_leaf_order(tmp_path):
    tree = sized_tree([400, 2400, 400, 400])
    _, by_name = write(tmp_path / "out", tree, Budget(max_shard_bytes=1000))
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert [weight_map[f"m.layers.{i}.w"] for i in range(4)] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert_reads_back(tg.SafetensorsCheckpoint(tmp_path / "out"), by_name)


def test_data_that_fits_is_one_model_safetensors_without_an_index(tmp_path):
    write(tmp_path / "out", sized_tree([400, 600]), Budget(max_shard_bytes=1000))
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]


def test_no_leaves_is_one_empty_file_safetensors_opens(tmp_path):
    SafetensorsWriter().write(tmp_path / "out", [], Fetch([]), Budget())
    with safetensors.safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
        assert (list(f.keys()), f.metadata()) == ([], {"format": "pt"})


# -- the memory budget ------------------------------------------------------------


@pytest.mark.parametrize("max_host", [1, 24, 100, 10_000])
def test_boxes_stay_under_the_budget_and_cover_each_tensor_in_order(tmp_path, max_host):
    rng = np.random.default_rng(5)
    tree = {"a": random_bits(rng, (6, 5, 4), np.float32), "b": random_bits(rng, (3, 7), np.int8),
            "c": random_bits(rng, (), np.float64), "d": random_bits(rng, (0, 3), np.float16),
            "e": random_bits(rng, (33,), ml_dtypes.bfloat16)}
    fetch, by_name = write(tmp_path / "out", tree, Budget(max_host_bytes=max_host))
    leaves, arrays, _ = flat(tree)
    largest_item = max(a.dtype.itemsize for a in arrays)
    assert max(nbytes for _, _, nbytes in fetch.boxes) <= max(max_host, largest_item)
    for i, array in enumerate(arrays):
        pieces = [array[box] for j, box, _ in fetch.boxes if j == i]
        assert b"".join(as_bytes(p) for p in pieces) == as_bytes(array), leaves[i].path
    assert_reads_back(tg.SafetensorsCheckpoint(tmp_path / "out"), by_name)


def test_within_a_file_the_largest_items_come_first():
    leaves = [OutLeaf(("a",), (3,), np.dtype(np.int8)), OutLeaf(("b",), (2,), np.dtype(np.float64)),
              OutLeaf(("c",), (1,), np.dtype(ml_dtypes.bfloat16)),
              OutLeaf(("d",), (1,), np.dtype(np.float64))]
    (plan,) = plan_files(leaves, single_file=False, cap=10**9)
    assert plan.leaves == (1, 3, 2, 0)


# -- refusals ------------------------------------------------------------------------


def leaf(*path, dtype=np.float32, shape=(2,)):
    return OutLeaf(tuple(path), shape, np.dtype(dtype))


REFUSED = [
    ([leaf("a", "b.c")], r"^\"a\['b.c'\]\" has the key 'b.c', which holds a '\.': its safetensors "
     r"name 'a\.b\.c' would read back as other keys; give it another name with a mapping rule "
     r"\(\{'<new name>': '<its source path>'\}\)$"),
    ([leaf("a", "")], r"^\"a\[''\]\" has an empty key: its safetensors name would drop it; give"),
    ([leaf()], r"^the root leaf has no name: safetensors names tensors by their paths; give"),
    ([leaf("a", None)], r"^'a\[None\]' has the key None \(NoneType\): safetensors names are "
     r"strings of str keys and int indices"),
    ([leaf("a", 1.5)], r"has the key 1\.5 \(float\)"),
    ([leaf("a", True)], r"has the key True \(bool\)"),
    ([leaf("a", 0), leaf("a", "0")], r"^'a\[0\]' and \"a\['0'\]\" would both be named 'a\.0'; "
     r"rename one with a mapping rule$"),
    ([leaf("a", "01")], r"would be named 'a\.01', which reads back as 'a\[1\]'; give"),
    ([leaf("a", "x[0]")], r"would be named 'a\.x\[0\]', which reads back as 'a\.x\[0\]'"),
    ([leaf("__metadata__")], r"^'__metadata__' is named '__metadata__', which safetensors keeps"),
    ([leaf("a", 0), leaf("a", "0", "b")], r"^\"a\['0'\]\.b\" would be named 'a\.0\.b', under the "
     r"tensor 'a\.0' of 'a\[0\]'; a name cannot be both a tensor and a prefix of others"),
    ([leaf("w", dtype=np.complex128)], r"^'w' is complex128, which safetensors cannot hold: cast "
     r"it in the mapping \(tg\.cast\(\.\.\., np\.complex64\)\) to complex64 \(C64\)$"),
    ([leaf("w", dtype=ml_dtypes.int4)], r"^'w' is int4, which safetensors cannot hold: cast it in "
     r"the mapping \(tg\.cast\(\.\.\.\)\) to a dtype safetensors holds \(BOOL, U8, I8, .*F8_E4M3"),
    ([leaf("w", dtype=ml_dtypes.float8_e4m3fnuz)], r"^'w' is float8_e4m3fnuz, which safetensors "
     r"cannot hold"),
    ([leaf("w", dtype=">f4")], r"^'w' is big-endian \(>f4\); safetensors is little-endian: cast "
     r"it to float32"),
    ([leaf("w", dtype=object)], r"^'w' is object \(Python objects\), which safetensors cannot "
     r"hold: it holds numeric arrays only; leave it out of the mapping"),
    ([leaf("w", dtype="<U3")], r"^'w' is <U3 \(strings\)"),
    ([leaf("w", dtype="datetime64[s]")], r"^'w' is datetime64\[s\] \(datetimes\)"),
]


@pytest.mark.parametrize(("leaves", "message"), REFUSED,
                         ids=[m[:40] for _, m in REFUSED])
def test_what_cannot_be_written_is_refused_before_anything_is_fetched(tmp_path, leaves, message):
    found = SafetensorsWriter().problems(leaves)
    assert len(found) == 1, found
    assert re.search(message, found[0]), found[0]
    fetch = Fetch([None] * len(leaves))
    with pytest.raises(tg.CheckpointError, match=r"cannot write .*out as safetensors: 1 problem"):
        SafetensorsWriter().write(tmp_path / "out", leaves, fetch, Budget())
    assert fetch.boxes == []
    assert not (tmp_path / "out").exists()


def test_a_typed_prng_key_is_refused_with_what_to_store_instead():
    key = jax.random.key(0)
    (problem,) = SafetensorsWriter().problems([OutLeaf(("rng",), (), key.dtype)])
    assert problem == (
        "'rng' is a typed PRNG key (key<fry>), which safetensors cannot hold: put "
        "jax.random.key_data(key) (uint32) in the tree instead, or leave it out of the mapping")


def test_every_leaf_refused_is_one_message_naming_it():
    leaves = [leaf("ok"), leaf("a", "b.c"), leaf("x", dtype=np.complex128), leaf("a", ""),
              leaf("y", dtype=object)]
    found = SafetensorsWriter().problems(leaves)
    assert [line.split(" ", 1)[0] for line in found] == [
        "\"a['b.c']\"", "\"a['']\"", "'x'", "'y'"]


def test_a_single_file_larger_than_max_shard_bytes_is_refused_at_plan_time(tmp_path):
    leaves = [leaf("a", shape=(200,)), leaf("b", shape=(100,))]
    budget = Budget(max_shard_bytes=1000)
    dest = tmp_path / "model.safetensors"
    (problem,) = SafetensorsWriter(dest, budget=budget).problems(leaves)
    assert problem == (
        "the leaves take 1200 bytes, more than max_shard_bytes=1000 that one file may hold: write "
        "to a folder (then shards and model.safetensors.index.json are written), or raise "
        "max_shard_bytes")
    assert SafetensorsWriter(tmp_path / "folder", budget=budget).problems(leaves) == []
    assert SafetensorsWriter(dest).problems(leaves) == []  # no budget: names and dtypes only
    fetch = Fetch([None, None])
    with pytest.raises(tg.CheckpointError, match=r"the leaves take 1200 bytes, more than"):
        SafetensorsWriter(dest).write(dest, leaves, fetch, budget)
    assert fetch.boxes == [] and not dest.exists()


def test_the_fetch_giving_the_wrong_box_is_an_error_not_a_corrupt_file(tmp_path):
    leaves = [leaf("w", shape=(4,))]
    with pytest.raises(tg.CheckpointError, match=r"the box \[0:4\] of 'w' came as float64\[4\], "
                       r"not float32\[4\] \(a bug in the caller of the writer"):
        SafetensorsWriter().write(tmp_path / "out", leaves,
                                  lambda i, box: np.zeros(4, np.float64), Budget())


# -- write errors ----------------------------------------------------------------------

_IN_MOUNT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import treegraft as tg
    from treegraft._formats.safetensors.write import SafetensorsWriter
    from treegraft._write.interface import Budget, OutLeaf
    a = np.arange(64 * 1024, dtype=np.float32)
    try:
        SafetensorsWriter().write(sys.argv[1], [OutLeaf(("w",), a.shape, a.dtype)],
                                  lambda i, box: a[box].copy(), Budget())
        out = {"ok": True}
    except BaseException as e:
        out = {"type": type(e).__name__, "checkpoint_error": isinstance(e, tg.CheckpointError),
               "message": str(e)}
    print(json.dumps(out))
""")


def in_small_mount(tmp_path, options):
    """Runs the writer into a tmpfs mounted with options, in a mount namespace of its own."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = (f"mount -t tmpfs -o {options} tmpfs {mount} && "
              f"exec {sys.executable} -c \"$0\" {mount}/out")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script, _IN_MOUNT],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.skip(f"no tmpfs in a mount namespace here: {proc.stderr.strip()[-300:]}")
    return mount, json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_read_only_folder_is_a_checkpoint_error_naming_the_file(tmp_path):
    mount, out = in_small_mount(tmp_path, "ro,size=1m")
    assert out["checkpoint_error"], out
    assert out["message"] == (f"writing {mount}/out failed: Read-only file system; the file "
                              "system is read-only: write elsewhere")


def test_a_full_disk_is_a_checkpoint_error_naming_the_file(tmp_path):
    mount, out = in_small_mount(tmp_path, "size=64k")
    assert out["checkpoint_error"], out
    assert out["message"] == (f"writing {mount}/out/model.safetensors failed: No space left on "
                              "device; the disk is full: free space, or write elsewhere")


def test_an_existing_file_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"keep")
    with pytest.raises(tg.CheckpointError, match=r"writing .*out/model.safetensors failed: File "
                       r"exists; a file is already there: the temporary destination must be empty"):
        write(tmp_path / "out", {"w": np.zeros(2, np.float32)})
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"keep"


# -- gs:// and s3:// ---------------------------------------------------------------------


@pytest.fixture(params=["gcs", "s3"])
def bucket(request):
    request.getfixturevalue(f"{request.param}_server")
    scheme = "gs" if request.param == "gcs" else "s3"
    return f"{scheme}://treegraft/wsafe-{os.getpid()}-{next(_UNIQUE)}"


def test_remote_sharded_folder_reads_back(bucket):
    tree = tree_of(np.random.default_rng(6), NUMPY_DTYPES | F8_DTYPES, shapes=((16, 8),))
    budget = Budget(max_host_bytes=3072)
    fetch, by_name = write(f"{bucket}/out", tree, budget)
    src = tg.SafetensorsCheckpoint(f"{bucket}/out")
    assert_reads_back(src, by_name)
    # Each shard is built in memory: at most a third of the budget of data, boxes no larger.
    infos = tg.flatten(src.metadata()).values()
    per_file: dict[str, int] = {}
    for info in infos:
        per_file[info.file] = per_file.get(info.file, 0) + info.nbytes
    assert len(per_file) > 1 and max(per_file.values()) <= 1024, per_file
    assert max(nbytes for _, _, nbytes in fetch.boxes) <= 1024


def test_remote_single_file_reads_back(bucket):
    tree = tree_of(np.random.default_rng(7), NUMPY_DTYPES)
    url = f"{bucket}/model.safetensors"
    _, by_name = write(url, tree, dest=url)
    assert_reads_back(tg.SafetensorsCheckpoint(url), by_name)


def test_remote_tensor_larger_than_a_third_of_the_budget_is_refused_before_any_fetch(bucket):
    leaves = [leaf("small", shape=(10,)), leaf("big", shape=(200,))]
    budget = Budget(max_host_bytes=1000)
    scheme = bucket.split(":")[0]
    (problem,) = SafetensorsWriter(f"{bucket}/out", budget=budget).problems(leaves)
    assert problem.startswith(
        f"'big' takes 800 bytes; on {scheme}:// a file is built in host memory and sent in one "
        "request, so it holds at most 333 bytes of data (min(max_shard_bytes, max_host_bytes // 3)")
    assert problem.endswith("raise max_host_bytes, or write to a local folder and upload it")
    fetch = Fetch([None, None])
    with pytest.raises(tg.CheckpointError, match=r"'big' takes 800 bytes"):
        SafetensorsWriter().write(f"{bucket}/out", leaves, fetch, budget)
    assert fetch.boxes == []


def test_a_remote_write_the_storage_refuses_is_an_error_naming_the_file(bucket):
    scheme = bucket.split(":")[0]
    url = f"{scheme}://no-such-bucket-wsafe/out"
    with pytest.raises(tg.CheckpointError, match=(
            rf"^writing {url}/model\.safetensors failed: the bucket 'no-such-bucket-wsafe' does "
            r"not exist")):
        write(url, {"w": np.zeros(4, np.float32)})


@pytest.fixture
def silent_endpoint(s3_server):
    """An S3 endpoint that accepts connections and never answers."""
    with servers.silent_endpoint() as url:
        yield url


def test_a_stalled_server_is_an_error_within_the_storage_timeout(silent_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_endpoint)
    tmp = Location.parse(f"s3://treegraft/wsafe-{os.getpid()}-{next(_UNIQUE)}/out", timeout=1)
    start = time.monotonic()
    with pytest.raises(tg.CheckpointError, match=r"^writing s3://treegraft/.*/out/model\."
                       r"safetensors took more than 1 s: check the network, the endpoint "):
        write(tmp, {"w": np.zeros(4, np.float32)})
    assert time.monotonic() - start < 5


@hypothesis.given(
    sizes=st.lists(st.integers(0, 50), max_size=12), cap=st.integers(1, 60))
def test_shards_are_huggingface_hubs_when_no_tensor_exceeds_a_shard(sizes, cap):
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    leaves = [OutLeaf(("t", i), (n,), np.dtype(np.uint8)) for i, n in enumerate(sizes)]
    plans = plan_files(leaves, single_file=False, cap=cap)
    # In leaf order, every leaf once, never past the cap unless alone.
    assert [i for p in plans for i in sorted(p.leaves)] == list(range(len(sizes)))
    assert all(p.data_bytes <= cap or len(p.leaves) == 1 for p in plans)
    if all(n <= cap for n in sizes):
        split = split_state_dict_into_shards_factory(
            {f"t.{i}": n for i, n in enumerate(sizes)}, get_storage_size=lambda n: n,
            filename_pattern="model{suffix}.safetensors", max_shard_size=cap)
        mine = {f"t.{i}": p.name for p in plans for i in p.leaves}
        assert mine == (split.tensor_to_filename or dict.fromkeys(mine, "model.safetensors"))


def test_an_error_of_the_fetch_passes_through_as_it_is(tmp_path):
    def fetch(i, box):
        raise tg.CheckpointError("reading the source failed: it is gone")

    with pytest.raises(tg.CheckpointError, match=r"^reading the source failed: it is gone$"):
        SafetensorsWriter().write(tmp_path / "out", [leaf("w")], fetch, Budget())
