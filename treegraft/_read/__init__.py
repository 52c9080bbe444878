"""The read step: what a source is, and how a read is shown.

    source.py    `Source`, the interface every lazy source implements: a tree of
                 shapes and dtypes (`metadata`), one batch of header reads
                 (`prefetch`), reads of whole leaves and of boxes, one lifecycle
    progress.py  the terminal progress bar of a long read
    several.py   several sources as one: a dict of checkpoints and pytrees (`Sources`)

The sources themselves are formats, each in its folder under `treegraft/_formats`
with its reader (and, to come, its writer); where they read from is
`treegraft/_storage` (docs/design.md sections 1 and 11).
"""
