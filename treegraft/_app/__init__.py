"""Outside the core path: the `treegraft` command, its terminal display, the demo.

    cli.py      `treegraft inspect | plan | demo`
    display.py  trees of leaves with sizes, styled for a terminal
    demo.py     a pretrained run, a new model, a checked graft, a verification
"""
