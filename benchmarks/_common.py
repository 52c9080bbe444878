"""Sizes and data layout shared by the benchmark driver, builder and worker.

Nothing here imports jax: the driver (`run.py`) stays light, and each measured
command runs in a fresh process (`_worker.py`) that sets up jax itself.
"""

from __future__ import annotations

import os

# Sizes per mode. "full" is what docs/benchmarks.md reports; "quick" is a smoke
# test for CI (small data, one repeat, no timing claims).
SIZES = {
    "full": {
        # Kauldron checkpoint: n_arrays float32 arrays of side x side under params.
        "side": 2048,  # 2048 * 2048 * 4 B = 16 MiB per array
        "n_arrays": 64,  # 64 * 16 MiB = 1 GiB
        "small_arrays": 8,  # a 128 MiB checkpoint for the size-independence row
        # In-memory graft: blocks x per leaves of shape (leaf,) float32.
        "mem_blocks": 1000,
        "mem_per": 50,  # 50,000 leaves
        "mem_leaf": 4,
        # Planning checkpoint: blocks x per numpy leaves of shape (leaf,) float32.
        "many_blocks": 1000,
        "many_per": 100,  # 100,000 leaves
        "many_leaf": 256,  # 1 KiB each: stored in OCDBT data files, not inlined
        "repeats": 5,
        "inner": 5,
    },
    "quick": {
        "side": 128,  # 64 KiB per array
        "n_arrays": 64,  # 4 MiB
        "small_arrays": 8,
        "mem_blocks": 40,
        "mem_per": 50,  # 2,000 leaves
        "mem_leaf": 4,
        "many_blocks": 20,
        "many_per": 100,  # 2,000 leaves
        "many_leaf": 256,
        "repeats": 1,
        "inner": 2,
    },
}

STEP = 10  # the step every benchmark checkpoint is saved at
FANOUT = 4  # case 2: targets fed by one source subtree
MIB = 2**20


def layer(i: int) -> str:
    """Name of the i-th array's subtree under params: `layer_07`."""
    return f"layer_{i:02d}"


def block(i: int) -> str:
    return f"block_{i:04d}"


def leaf(j: int) -> str:
    return f"w_{j:02d}"


def item_dir(workdir: str, step: int = STEP) -> str:
    """The orbax item holding the train state of a Kauldron workdir."""
    return os.path.join(workdir, "checkpoints", f"ckpt_{step}", "default")


def latest_item_dir(workdir: str) -> str:
    """What a user would write to find the newest step folder of a Kauldron run."""
    root = os.path.join(workdir, "checkpoints")
    steps = [
        int(name[5:])
        for name in os.listdir(root)
        if name.startswith("ckpt_") and name[5:].isdigit()
    ]
    return os.path.join(root, f"ckpt_{max(steps)}", "default")
