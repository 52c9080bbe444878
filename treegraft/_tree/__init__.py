"""Pytrees as the other steps see them: flattened to paths, indexed, leaves described.

    pytree.py  `flatten`, `extract`, `insert`: pure operations on any pytree
    flat.py    flattening to leaf paths: a fast walk, jax for other node types
    nodes.py   one node's children by key, checked (repeated keys, unsortable dicts)
    index.py   `TreeIndex`: one tree's leaves by path and by prefix
    leaves.py  what is known about a leaf without reading it: spec, mismatch
    nnx.py     Flax NNX states as plain trees of values
    gc.py      keeping Python's collector out of the way of large flattens
"""
