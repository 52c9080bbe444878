"""The `treegraft` command line."""

from __future__ import annotations

import argparse
import sys

import treegraft


def main(argv: list[str] | None = None) -> int:
    """Runs the `treegraft` command; returns its exit status."""
    parser = argparse.ArgumentParser(prog="treegraft", description=treegraft.__doc__)
    parser.add_argument("--version", action="version", version=treegraft.__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="graft a pretrained encoder from an example checkpoint")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(f"treegraft {treegraft.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
