"""Peak RSS growth of tg.convert: safetensors (16 MiB tensors, random bits) to orbax, 64 MiB budget.

Not a test (no timing or memory assertion belongs in the suite): a script to
measure. `python tests/convert_rss.py N make` writes a source of N tensors of
16 MiB under /tmp; then `python tests/convert_rss.py N copy` (the same layout)
or `N stack` (stacked and transposed) converts it and prints the peak RSS
growth over the convert, its time and throughput.
"""
import os
import resource
import shutil
import sys
import time

import numpy as np
from safetensors.numpy import save_file


def main() -> None:
    n = int(sys.argv[1])  # tensors of 16 MiB
    mode = sys.argv[2]
    root = f"/tmp/treegraft-convert-rss-{n}"
    src = os.path.join(root, "model.safetensors")
    if mode == "make":
        os.makedirs(root, exist_ok=True)
        rng = np.random.default_rng(0)
        tensors = {f"model.layers.{i}.mlp.weight":
                   rng.integers(0, 2**32, (2048, 2048), dtype=np.uint32).view(np.float32)
                   for i in range(n)}
        save_file(tensors, src)
        del tensors
        print("wrote source", flush=True)
        sys.exit(0)
    import treegraft as tg

    shutil.rmtree(os.path.join(root, "out"), ignore_errors=True)
    source = tg.SafetensorsCheckpoint(src)
    source.metadata()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if mode == "stack":
        mapping = {"layers.w": tg.transpose(tg.stack("model.layers.*.mlp.weight"), (0, 2, 1))}
    else:
        mapping = {"": ""}
    tg.convert(source, os.path.join(root, "out"), mapping, max_host_bytes=64 * 2**20)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{mode} {n * 16} MiB: peak RSS growth {(peak - base) / 2**20:.0f} MiB, {dt:.1f} s, "
          f"{n * 16 / dt:.0f} MiB/s")


if __name__ == "__main__":
    main()
