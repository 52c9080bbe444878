"""Planning keeps the interpreter's full collections out, and gives the settings back."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import treegraft as tg
from treegraft._tree.gc import young_collections_only


def test_a_plan_runs_young_collections_only_and_restores_the_thresholds():
    before = gc.get_threshold()
    seen = []

    class Spy:
        """A custom pytree node; flattening it records the collector's settings."""

    import jax

    jax.tree_util.register_pytree_node(
        Spy, lambda s: (seen.append(gc.get_threshold()) or (np.zeros(2),), None),
        lambda _, kids: Spy(),
    )
    tg.plan({"a": Spy()}, {"a": Spy()}, {"a": "a"})
    assert seen and all(t[0] == before[0] and t[1:] != before[1:] for t in seen)
    assert gc.get_threshold() == before
    with pytest.raises(tg.MismatchError):
        tg.plan({"a": np.zeros(2)}, {"a": np.zeros(3)}, {"a": "a"})
    assert gc.get_threshold() == before


def test_nested_and_concurrent_blocks_restore_the_thresholds():
    before = gc.get_threshold()
    inside = threading.Barrier(4)

    def work():
        with young_collections_only():
            inside.wait()  # all four inside at once
            with young_collections_only():
                assert gc.get_threshold()[1:] != before[1:]

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.get_threshold() == before
    with pytest.raises(ValueError), young_collections_only():
        raise ValueError("boom")
    assert gc.get_threshold() == before


def test_cyclic_garbage_made_meanwhile_is_still_collected():
    import weakref

    class Node:
        pass

    with young_collections_only():
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        kept = [[] for _ in range(5 * gc.get_threshold()[0])]  # young collections run
        assert ref() is None
        del kept
