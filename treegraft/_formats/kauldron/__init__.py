"""Kauldron workdirs: `<workdir>/checkpoints/ckpt_<step>/default`, read with the orbax reader.

    source.py  `KauldronCheckpoint` (steps, the latest complete one, a step that
               vanished), `list_steps`, `is_workdir`

The writer of a Kauldron step (docs/design.md section 15) goes here, on top of
the orbax writer.
"""
