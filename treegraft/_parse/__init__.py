"""The parse step: paths, glob patterns, rule operations, and a mapping as rules.

    paths.py     `Path`: the path grammar, canonical text, key paths
    patterns.py  `Pattern`: globs over paths, with captures; non-backtracking
    ops.py       rule operations (`stack`, `cast`, ...) and their steps
    rules.py     a `{new: old}` mapping and ignore lists as validated `Rule`s
"""
