"""The insert step: values placed like the leaves they replace.

    sharding.py   `place`, `propagate_sharding`: owned buffers, the target's
                  sharding, dtype and container kind
    transform.py  leaves a rule operation makes, built shard by shard
"""
