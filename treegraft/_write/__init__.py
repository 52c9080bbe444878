"""The write step: convert, save and invert (docs/design.md section 15).

`interface` is the contract between the format-independent part (planning the
output, streaming boxes under the memory budget, the atomic commit) and each
format's writer (`treegraft/_formats/<format>/write.py`).
"""
