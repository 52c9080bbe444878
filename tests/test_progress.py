"""Progress of large checkpoint reads: batches, callbacks, logging, the bar."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from kauldron_run import write_item

import treegraft as tg
from treegraft import _graft
from treegraft._read.progress import ProgressBar


@pytest.fixture
def item(tmp_path):
    tree = {"params": {f"w{i}": np.full((256,), i, np.float32) for i in range(6)}}
    return write_item(tmp_path / "item", tree), tree


def test_progress_callback_sees_every_batch(item, monkeypatch):
    path, tree = item
    # Pretend 1 KiB reads are large, and batch them by 2 KiB (two leaves).
    monkeypatch.setattr(_graft, "_BATCHED_FROM", 1024)
    monkeypatch.setattr(_graft, "_BATCH", 2048)
    reads: list[int] = []
    source = tg.OrbaxCheckpoint(path)
    original = source.read
    monkeypatch.setattr(source, "read", lambda reqs: (reads.append(len(reqs)), original(reqs))[1])
    calls: list[tuple[int, int]] = []
    state = {"params": {f"w{i}": np.zeros((256,), np.float32) for i in range(6)}}
    out = tg.graft(state, source, {"params": "params"}, progress=lambda d, t: calls.append((d, t)))
    assert reads == [2, 2, 2]
    assert calls == [(2048, 6144), (4096, 6144), (6144, 6144)]
    for i in range(6):
        np.testing.assert_array_equal(out["params"][f"w{i}"], tree["params"][f"w{i}"])


def test_small_reads_are_one_batch_without_callbacks(item):
    path, _ = item
    calls: list[tuple[int, int]] = []
    state = {"params": {f"w{i}": np.zeros((256,), np.float32) for i in range(6)}}
    tg.graft(state, tg.OrbaxCheckpoint(path), {"params": "params"},
             progress=lambda d, t: calls.append((d, t)))
    assert calls == []  # under the 256 MiB threshold: a single read, nothing to report


def test_reads_are_logged(item, caplog):
    path, _ = item
    state = {"params": {"w0": np.zeros((256,), np.float32)}}
    with caplog.at_level(logging.INFO, logger="treegraft"):
        tg.graft(state, tg.OrbaxCheckpoint(path), {"params.w0": "params.w0"})
    assert any("reading 1 leaf, 1.0 KiB, from the checkpoint" in r.message
               for r in caplog.records)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only():
    tty = _Tty()
    bar = ProgressBar(tty)
    bar(512, 1024)
    bar(1024, 1024)
    text = tty.getvalue()
    assert "50.0%" in text and "100.0%" in text and text.endswith("\n")
    assert "1.0 KiB / 1.0 KiB" in text
    pipe = io.StringIO()
    ProgressBar(pipe)(1024, 1024)
    assert pipe.getvalue() == ""
