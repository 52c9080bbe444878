"""`treegraft convert`: a checkpoint rewritten in another layout or format.

docs/design.md section 15.

Exit status: 0 written; 1 refused or failed (the destination exists, the plan
fails, a write fails), with one line on stderr; 2 usage errors and unusable
inputs (handled by the caller, `treegraft._app.cli`).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_parser", "parse_size", "run"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """A byte count from text such as `1GiB`, `512MiB`, `2e9` or `1000000`.

    Example:
      >>> parse_size("1GiB"), parse_size("64 MiB"), parse_size("5GB")
      (1073741824, 67108864, 5000000000)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r}; write a number of bytes with an optional unit "
            "(KiB, MiB, GiB, TiB, or KB, MB, GB, TB), e.g. 1GiB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1 or value != value or value > 2**62:
        raise argparse.ArgumentTypeError(f"a size must be at least 1 byte; got {text!r}")
    return int(value)


def add_parser(sub: Any, step_arg: Callable[[str], int]) -> None:
    """Adds the `convert` command to the command line's subparsers."""
    convert = sub.add_parser(
        "convert",
        help="write a checkpoint in another layout or format (streamed, atomic)",
        description="Rewrite SRC at DEST through a mapping: what a graft of SRC with the "
        "mapping would hold, written chunk by chunk under a memory budget; DEST appears "
        "only when complete.",
    )
    convert.add_argument(
        "source", help="the checkpoint to read (workdir, item folder, safetensors)"
    )
    convert.add_argument("dest", help="where to write: a folder, a file.safetensors, gs:// or s3://")
    convert.add_argument(
        "--map", metavar="NEW=OLD", action="append", default=None,
        help="a rule (repeat it), as for `treegraft plan`; by default the whole tree (=)",
    )
    convert.add_argument(
        "--mapping", metavar="FILE",
        help="the rules from FILE.py:NAME or FILE.json; --map rules are added to them",
    )
    convert.add_argument(
        "--format", choices=("orbax", "kauldron", "safetensors"), default=None,
        help="the output format (default: safetensors for a DEST ending in .safetensors, "
        "else orbax)",
    )
    convert.add_argument("--step", type=step_arg, default=None,
                         help="step of the source workdir")
    convert.add_argument("--dest-step", type=step_arg, default=None,
                         help="write DEST as a checkpoint manager root (or a Kauldron "
                         "workdir with --format kauldron) at this step")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace DEST if it exists (only once the new one is complete)")
    convert.add_argument("--max-host-memory", type=parse_size, default=2**30, metavar="SIZE",
                         help="array data held in host memory at once (default 1GiB)")
    convert.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9,
                         metavar="SIZE", help="largest safetensors file (default 5GB)")
    convert.add_argument("--invert", action="store_true",
                         help="apply the inverse of the given mapping (tg.invert)")
    convert.add_argument("--non-strict", action="store_true",
                         help="leave out what the mapping does not cover instead of failing")
    convert.add_argument("--cast", action="store_true", help="allow dtype differences")


def run(args: argparse.Namespace, source: Any, mapping: Any, say: Callable[[str], None]) -> int:
    """Converts; returns the exit status (1 with one line on stderr when refused or failed)."""
    import treegraft as tg
    from treegraft._errors import GraftError

    try:
        if args.invert:
            mapping = tg.invert(mapping)
        written = tg.convert(
            source,
            args.dest,
            mapping,
            format=args.format,
            step=args.dest_step,
            overwrite=args.overwrite,
            max_host_bytes=args.max_host_memory,
            max_shard_bytes=args.max_shard_size,
            strict=not args.non_strict,
            cast=args.cast,
            progress=sys.stderr.isatty(),
        )
    except GraftError as e:
        say(f"treegraft convert: {_one_line(str(e))}")
        return 1
    say(f"treegraft convert: wrote {_describe(written, args.dest)}")
    return 0


# The API's option names, as this command's flags.
_FLAGS = (("overwrite=True", "--overwrite"), ("max_host_bytes", "--max-host-memory"),
          ("max_shard_bytes", "--max-shard-size"), ("strict=False", "--non-strict"))


def _one_line(text: str) -> str:
    """An error's first line, and how many more there are (the plan's full report is long)."""
    for option, flag in _FLAGS:
        text = text.replace(option, flag)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text.strip()
    return f"{lines[0]} (+{len(lines) - 1} more lines; `treegraft plan` shows them all)"


def _describe(written: Any, dest: str) -> str:
    """What convert returned, in a few words (its own str if it has one)."""
    text = str(written) if written is not None else ""
    return text if text and len(text) < 300 else dest
