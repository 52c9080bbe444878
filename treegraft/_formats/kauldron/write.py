"""The Kauldron writer: a step of a Kauldron workdir (docs/design.md section 15).

Kauldron saves with orbax's `CheckpointManager` under
`<workdir>/checkpoints/ckpt_<step>`, the state as the item `default`. The
writer is the orbax one writing a step folder; the convert step names the
folder `checkpoints/ckpt_<step>` below the destination.
"""

from __future__ import annotations

from treegraft._formats.orbax.write import CHUNK_BYTES, OrbaxWriter

__all__ = ["KauldronWriter"]


class KauldronWriter(OrbaxWriter):
    """Writes a Kauldron step folder: the state as the orbax item `default`."""

    format = "kauldron"

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, ocdbt: bool = True):
        super().__init__(item="default", chunk_bytes=chunk_bytes, ocdbt=ocdbt)
