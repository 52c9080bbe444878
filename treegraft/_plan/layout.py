"""How the grafted target leaves are spread over devices, for the plan's summary.

A target built abstractly under a mesh can come out replicated on every device
without a word (flax NNX's `eval_shape` with eager sharding off, as tunix sets
it): each weight is then read whole into every device. The plan says so on one
line before anything is read (docs/design.md section 13).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treegraft._tree import leaves as _leaves
from treegraft._tree.leaves import format_bytes
from treegraft._tree.nnx import is_variable_type, value_of


def layout_line(leaves: Sequence[Any]) -> str | None:
    """One line on how `leaves` (the grafted target leaves) are placed; None on one device.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((len(jax.devices()),), ("x",))
      >>> rows = jax.ShapeDtypeStruct((8, 4), np.float32, sharding=NamedSharding(mesh, P("x")))
      >>> every = jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(mesh, P()))
      >>> layout_line([rows, every])  # doctest: +ELLIPSIS
      'target: 2 leaves on ... devices: 1 sharded, 1 replicated (16 B replicated)'
    """
    devices = sharded = replicated = replicated_bytes = 0
    for leaf in leaves:
        value = value_of(leaf) if is_variable_type(type(leaf)) else leaf
        sharding = getattr(value, "sharding", None)
        if sharding is None or sharding.num_devices <= 1:
            continue
        devices = max(devices, sharding.num_devices)
        if sharding.is_fully_replicated:
            replicated += 1
            replicated_bytes += _leaves.nbytes(_leaves.spec_of(value))
        else:
            sharded += 1
    if devices <= 1:
        return None
    return (
        f"target: {sharded + replicated} leaves on {devices} devices: {sharded} sharded, "
        f"{replicated} replicated ({format_bytes(replicated_bytes)} replicated)"
    )
