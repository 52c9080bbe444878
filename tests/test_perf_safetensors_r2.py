"""Issue #25 row 1, second round: the work of a safetensors graft spread over threads.

The tunix case's main thread did three times the copy worker's work: every
read, every leaf under 4 MiB, the Python. Now a byte range of 2 MiB or more
is read by this thread and a reader thread, half each (`preads.read_range`),
and leaves from 1 MiB are copied by two threads (`copies.SHARED_FROM`). The
worker puts under the caller's `enable_x64`, allowed whatever guard is set. Each test
checks the values against `safetensors.safe_open`, that every shard owns its
buffer, and that the fast path is taken where it should be and not elsewhere.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from helpers import assert_owns_buffers, buffer_pointers, mesh_2x4, rchar
from helpers import safetensors_oracle as oracle
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import treegraft as tg
from treegraft._formats.safetensors import preads
from treegraft._insert import copies, transform

pytest.importorskip("safetensors")
save_file = pytest.importorskip("safetensors.numpy").save_file

BLOB = 5 * 2**20 + 12345  # bytes of the raw file read_range is tested on


@pytest.fixture
def shared_calls(monkeypatch):
    """How many pieces each `preads._shared` call (two threads) was given; it still runs."""
    calls: list[int] = []
    real = preads._shared

    def shared(tasks):
        calls.append(len(tasks))
        return real(tasks)

    monkeypatch.setattr(preads, "_shared", shared)
    return calls


@pytest.fixture
def spied_reads(monkeypatch):
    """The name of the thread each `preads._read` ran on, and its byte count (real reads)."""
    seen: list[tuple[str, int]] = []
    real = preads._read

    def read(fd, view, *rest):
        seen.append((threading.current_thread().name, len(view)))
        return real(fd, view, *rest)

    monkeypatch.setattr(preads, "_read", read)
    return seen


@pytest.fixture
def layer(tmp_path):
    """A large Linear weight (8 MiB), an attention-sized one (1 MiB) and a small one."""
    rng = np.random.default_rng(5)
    tensors = {
        "up.weight": rng.standard_normal((2048, 1024)).astype(np.float32),
        "k.weight": rng.standard_normal((512, 512)).astype(np.float32),
        "norm.weight": rng.standard_normal((256, 64)).astype(np.float32),
    }
    path = str(tmp_path / "layer.safetensors")
    save_file(tensors, path)
    return path, tensors


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    """A raw file of random bytes, and its bytes."""
    data = np.random.default_rng(9).integers(0, 256, BLOB, dtype=np.uint8).tobytes()
    path = str(tmp_path_factory.mktemp("blob") / "blob.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path, data


# -- preads.read_range: a large range read by two threads -----------------------------------


def test_a_large_tensor_is_read_in_shared_pieces_once_and_is_the_oracle(
    layer, spied_reads, shared_calls
):
    path, tensors = layer
    sharding = NamedSharding(mesh_2x4(), P("a", "b"))
    like = jax.ShapeDtypeStruct((1024, 2048), np.float32, sharding=sharding)
    mapping = {"up": tg.transpose("up.weight", (1, 0))}
    plan = tg.plan({"up": like}, tg.SafetensorsCheckpoint(path), mapping)
    before = rchar()
    got = tg.execute(plan)["up"]
    read = rchar() - before
    np.testing.assert_array_equal(np.asarray(got), oracle(path, "up.weight").T)
    assert got.sharding == like.sharding
    assert_owns_buffers(got)
    # Each 2 MiB row range is offered to both threads, in 1 MiB pieces.
    assert shared_calls == [2] * 4
    assert all(n == 2**20 for _, n in spied_reads if n)  # (0: the checks of kept rows)
    # Every byte of the tensor read once (plus the header checks).
    nbytes = tensors["up.weight"].nbytes
    assert sum(n for _, n in spied_reads) == nbytes
    assert nbytes <= read < nbytes + 64 * 2**10


def test_ranges_under_the_threshold_are_read_by_this_thread_alone(
    layer, spied_reads, shared_calls
):
    path, tensors = layer
    mesh = mesh_2x4()
    state = {
        "k": jax.ShapeDtypeStruct((512, 512), np.float32,
                                  sharding=NamedSharding(mesh, P("a", "b"))),
        "norm": jax.ShapeDtypeStruct((64, 256), np.float32, sharding=NamedSharding(mesh, P())),
    }
    mapping = {"k": tg.transpose("k.weight", (1, 0)), "norm": tg.transpose("norm.weight", (1, 0))}
    out = tg.graft(state, tg.SafetensorsCheckpoint(path), mapping)
    np.testing.assert_array_equal(np.asarray(out["k"]), oracle(path, "k.weight").T)
    np.testing.assert_array_equal(np.asarray(out["norm"]), oracle(path, "norm.weight").T)
    assert spied_reads and all(n < preads.SPLIT_FROM for _, n in spied_reads)
    assert {name for name, _ in spied_reads} == {threading.current_thread().name}
    assert shared_calls == []


# -- preads._shared: pieces taken in turn by two threads ------------------------------------


def test_shared_pieces_run_on_this_thread_and_the_reader():
    """Two pieces that each wait for the other: they finish only if two threads run them."""
    meet = threading.Barrier(2, timeout=20)
    ran: list[str] = []

    def piece():
        meet.wait()
        ran.append(threading.current_thread().name)

    preads._shared([piece, piece])
    assert sorted(name.startswith("treegraft-read") for name in ran) == [False, True]


def test_a_failed_piece_stops_new_pieces_and_raises_after_the_one_in_flight():
    meet = threading.Barrier(2, timeout=20)
    finished = threading.Event()
    later: list[int] = []

    def fails():
        meet.wait()
        raise tg.CheckpointError("this piece fails")

    def slow():
        meet.wait()
        time.sleep(0.2)
        finished.set()

    with pytest.raises(tg.CheckpointError, match="this piece fails"):
        preads._shared([fails, slow] + [lambda k=k: later.append(k) for k in range(50)])
    assert finished.is_set()  # the other thread's piece was done before the raise
    assert later == []  # neither thread started a piece once the failure was recorded


@given(
    begin=st.integers(0, BLOB),
    length=st.one_of(
        st.integers(0, 2 * preads.SPLIT_FROM), st.just(preads.SPLIT_FROM), st.integers(0, BLOB)
    ),
)
def test_read_range_gives_the_files_bytes_for_any_range(blob, begin, length):
    path, data = blob
    length = min(length, BLOB - begin)
    buffer = np.full(length, 7, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        preads.read_range(fd, buffer.data, begin, "the blob", path, BLOB)
    finally:
        os.close(fd)
    assert buffer.tobytes() == data[begin : begin + length]


@pytest.mark.parametrize("short_by", [1, 3 * 2**20], ids=["reader-half", "both-halves"])
def test_a_file_shorter_than_a_split_range_is_a_checkpoint_error(blob, short_by):
    """The reader's half or both halves find the file's end: one typed error, named whole."""
    path, _ = blob
    buffer = np.zeros(BLOB, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(tg.CheckpointError, match=(
            rf"blob\.bin is truncated or damaged: reading the blob needs {BLOB + short_by} bytes "
            rf"but the file has {BLOB}"
        )):
            preads.read_range(fd, buffer.data, short_by, "the blob", path, BLOB)
        # The reader is free again at once: nothing of the failed call is still reading.
        again = np.zeros(BLOB, np.uint8)
        preads.read_range(fd, again.data, 0, "the blob", path, BLOB)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert again.tobytes() == f.read()


def test_a_read_of_a_closed_file_is_a_checkpoint_error_from_either_half(blob):
    path, _ = blob
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(tg.CheckpointError, match=r"cannot read the blob from .*blob\.bin: OSError"):
        preads.read_range(fd, np.zeros(BLOB, np.uint8).data, 0, "the blob", path, BLOB)


# jax warns at every fork once it runs; the child here uses no jax.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_forked_child_reads_with_a_reader_of_its_own(blob):
    """The parent's reader thread is not in a forked child: the child makes its own."""
    path, data = blob
    fd = os.open(path, os.O_RDONLY)
    try:
        first = np.zeros(BLOB, np.uint8)
        preads.read_range(fd, first.data, 0, "the blob", path, BLOB)  # the parent's reader
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if a split read gives the file's bytes
            ok = False
            try:
                got = np.zeros(BLOB, np.uint8)
                preads.read_range(fd, got.data, 0, "the blob", path, BLOB)
                ok = got.tobytes() == data
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child's split read did not finish in 60 s")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        os.close(fd)


# -- preads.copy_in_two: the boxes cut out of a range read whole -----------------------------


@pytest.fixture
def spied_copies(monkeypatch):
    """The thread each `preads._copy` ran on, and the bytes it copied (real copies)."""
    seen: list[tuple[str, int]] = []
    real = preads._copy

    def copy(pairs):
        seen.append((threading.current_thread().name, sum(d.nbytes for d, _ in pairs)))
        return real(pairs)

    monkeypatch.setattr(preads, "_copy", copy)
    return seen


def test_the_boxes_of_a_plain_leaf_are_cut_in_shared_pieces_and_are_the_oracle(
    layer, spied_copies, shared_calls
):
    """Column boxes of a row range (a sharded embedding): cut in two threads, owned."""
    path, tensors = layer
    like = jax.ShapeDtypeStruct((2048, 1024), np.float32,
                                sharding=NamedSharding(mesh_2x4(), P("b", "a")))
    got = tg.graft({"up": like}, tg.SafetensorsCheckpoint(path), {"up": "up.weight"})["up"]
    np.testing.assert_array_equal(np.asarray(got), oracle(path, "up.weight"))
    assert got.sharding == like.sharding
    assert_owns_buffers(got)
    # Each 2 MiB row range is read, then its two 1 MiB boxes are cut, in 1 MiB pieces.
    assert shared_calls == [2, 2] * 4
    assert sum(n for _, n in spied_copies) == tensors["up.weight"].nbytes


def test_small_boxes_are_cut_by_this_thread_alone(layer, spied_copies, shared_calls):
    path, tensors = layer
    like = jax.ShapeDtypeStruct((256, 64), np.float32,
                                sharding=NamedSharding(mesh_2x4(), P("b", "a")))
    got = tg.graft({"n": like}, tg.SafetensorsCheckpoint(path), {"n": "norm.weight"})["n"]
    np.testing.assert_array_equal(np.asarray(got), tensors["norm.weight"])
    assert_owns_buffers(got)
    assert {name for name, _ in spied_copies} == {threading.current_thread().name}
    assert shared_calls == []


DTYPES = [np.dtype(np.float32), np.dtype(">f4"), np.dtype(np.bool_), np.dtype(np.int8),
          np.dtype(jax.numpy.bfloat16), np.dtype(np.complex64)]


@given(
    rows=st.lists(st.integers(1, 1200), min_size=1, max_size=4),
    cols=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    step=st.integers(1, 3),
)
def test_copy_in_two_copies_every_pair_exactly(rows, cols, dtype, step):
    rng = np.random.default_rng(len(rows) * 1000 + cols)
    pairs, wants = [], []
    for r in rows:
        whole = rng.integers(0, 2, (r, cols * step)) if dtype == np.bool_ else (
            rng.standard_normal((r, cols * step)) * 100)
        src = whole.astype(dtype)[:, ::step]  # strided, as a box cut out of rows
        pairs.append((np.full(src.shape, 0, dtype), src))
        wants.append(src.copy())
    preads.copy_in_two(pairs)
    for (dst, _), want in zip(pairs, wants, strict=True):
        assert dst.tobytes() == want.tobytes()


# -- RowArena: an arena a few bytes short of a later tensor's wants is not left unused --------


@pytest.fixture
def same_size(tmp_path):
    """Three tensors of one size (64 KiB), and their file."""
    rng = np.random.default_rng(4)
    tensors = {f"t{k}": rng.standard_normal((128, 128)).astype(np.float32) for k in range(3)}
    path = str(tmp_path / "same.safetensors")
    save_file(tensors, path)
    return path, tensors


def lend_row_blocks(src, name, parts):
    """The tensor lent as `parts` blocks of rows (each take of the arena is aligned)."""
    step = 128 // parts
    views = src.lend_boxes([SimpleNamespace(path=name, box=(slice(r, r + step), slice(0, 128)))
                            for r in range(0, 128, step)])
    return np.concatenate(views, axis=0)


def test_tensors_of_one_size_read_in_more_pieces_reuse_the_arena(same_size):
    """Four takes want 192 bytes more alignment room than two: the arena still serves."""
    path, tensors = same_size
    src = tg.SafetensorsCheckpoint(path)
    np.testing.assert_array_equal(lend_row_blocks(src, "t0", 2), tensors["t0"])
    np.testing.assert_array_equal(lend_row_blocks(src, "t1", 4), tensors["t1"])
    np.testing.assert_array_equal(lend_row_blocks(src, "t2", 4), tensors["t2"])
    np.testing.assert_array_equal(lend_row_blocks(src, "t0", 2), tensors["t0"])
    # The first tensor sizes the arena (its rows are new memory); t2 and t0 again
    # are read into the one arena t1 was, though they want a few bytes more.
    assert src._arena.reused == 2
    assert len(src._arena._roots) == 1
    assert src._arena._roots[0].nbytes == 2 * 2**20


# -- copies: leaves from 1 MiB shared, under the caller's settings ---------------------------


def test_an_attention_sized_leaf_takes_the_shared_path_and_is_the_oracle(layer, monkeypatch):
    path, tensors = layer
    assert tensors["k.weight"].nbytes == copies.SHARED_FROM
    shared = []
    real = transform.place_shared

    def place_shared(shape, sharding, block_of):
        shared.append(shape)
        return real(shape, sharding, block_of)

    monkeypatch.setattr(transform, "place_shared", place_shared)
    mesh = mesh_2x4()
    state = {
        "k": jax.ShapeDtypeStruct((512, 512), np.float32,
                                  sharding=NamedSharding(mesh, P("a", "b"))),
        "norm": jax.ShapeDtypeStruct((64, 256), np.float32, sharding=NamedSharding(mesh, P("b"))),
    }
    mapping = {"k": tg.transpose("k.weight", (1, 0)), "norm": tg.transpose("norm.weight", (1, 0))}
    out = tg.graft(state, tg.SafetensorsCheckpoint(path), mapping)
    assert shared == [(512, 512)]  # the 64 KiB leaf stays on this thread
    np.testing.assert_array_equal(np.asarray(out["k"]), tensors["k.weight"].T)
    np.testing.assert_array_equal(np.asarray(out["norm"]), tensors["norm.weight"].T)
    assert_owns_buffers(out["k"], out["norm"])


def test_the_copy_worker_puts_under_the_x64_setting_it_is_given_whatever_its_guard():
    block = np.arange(64.0).reshape(8, 8).T  # float64
    block.flags.writeable = False
    device = jax.devices()[1]
    jax.config.update("jax_transfer_guard", "disallow_explicit")  # the worker's thread too
    try:
        wide = copies._worker().submit(copies._put, block, device, True).result()
        narrow = copies._worker().submit(copies._put, block, device, False).result()
    finally:
        jax.config.update("jax_transfer_guard", "allow")
    assert wide.dtype == np.float64 and narrow.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(wide), block)


def test_a_shared_leaf_is_placed_under_a_disallowing_guard_the_caller_set():
    """The puts are the ones graft was asked for (docs/design.md section 12), in either thread."""
    w = np.random.default_rng(3).standard_normal((1024, 1024)).astype(np.float32)
    view = w.T
    view.flags.writeable = False
    sharding = NamedSharding(mesh_2x4(), P("a", "b"))

    def block_of(box):
        return view[tuple(slice(a, b) for a, b in box)]

    with jax.transfer_guard_host_to_device("disallow_explicit"):
        got = copies.place_shared((1024, 1024), sharding, block_of)
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.device_put(w, jax.devices()[0])  # the caller's own transfers stay guarded
    np.testing.assert_array_equal(np.asarray(got), w.T)
    assert_owns_buffers(got)
    assert not any(w.ctypes.data <= p < w.ctypes.data + w.nbytes for p in buffer_pointers(got))
