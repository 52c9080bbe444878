"""Checkpoint formats: one folder per format, holding its reader and, to come, its writer.

    orbax/        orbax pytree checkpoints (OCDBT, zarr v2 and v3)
    kauldron/     Kauldron workdirs, on top of the orbax reader
    safetensors/  Hugging Face safetensors files and sharded folders

Each format's source implements `treegraft._read.source.Source` and reaches
storage only through `treegraft._storage` (docs/design.md sections 1, 11, 14,
15).
"""
