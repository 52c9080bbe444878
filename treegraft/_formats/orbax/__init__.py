"""orbax pytree checkpoints: an item directory of `_METADATA`, an OCDBT store and zarr arrays.

    source.py       `OrbaxCheckpoint`, the lazy source: metadata, prefetch, reads
    metadata.py     the tree from `_METADATA` alone, leaves lazy (`LazyLeaf`)
    headers.py      `OrbaxStore` (how to open each array) and its `LazyLeaf`s;
                    array headers read in one batch
    ocdbt_index.py  small values of the OCDBT store from one walk of its B-tree
    arrays.py       array bytes straight from tensorstore, each shard its slice
    restore.py      orbax's own restore, the fallback for what the rest does not know

The writer (docs/design.md section 15) goes here as `write.py`.
"""
