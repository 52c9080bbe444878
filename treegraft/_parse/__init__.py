"""The parse step: paths, glob patterns, rule operations, and a mapping as rules.

    scan.py      the path grammar's scanner: text to segments, wildcards if asked
    paths.py     `Path`: canonical text, key paths, `parse_path`
    keys.py      int path parts and their digits as keys (`0` finds `'0'`)
    patterns.py  `Pattern`: globs over paths, with captures; non-backtracking
    ops.py       rule operations (`stack`, `cast`, ...) and their steps
    rules.py     a `{new: old}` mapping and ignore lists as validated `Rule`s
"""
