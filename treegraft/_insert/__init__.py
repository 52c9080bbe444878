"""The insert step: values placed like the leaves they replace.

    sharding.py   `place`, `propagate_sharding`: owned buffers, the target's
                  sharding, dtype and container kind
    transform.py  leaves a rule operation makes, built shard by shard
    placement.py  `array_from_blocks`: a sharded array from host blocks, every
                  shard in a buffer of its own; the default sharding; shardings
                  on an AbstractMesh put on the mesh in context
"""
