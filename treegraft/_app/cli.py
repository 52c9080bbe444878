"""The `treegraft` command line: demo, inspect, plan.

Exit status: 0 on success, 1 when a plan would fail (or the demo's checks
fail), 2 for usage errors and unusable inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import treegraft
from treegraft._app.display import Style, leaf_rows, render_tree
from treegraft._errors import (
    PATH_CUTOFF,
    CheckpointError,
    GraftError,
    MappingError,
    PathSyntaxError,
    suggest,
)
from treegraft._formats.kauldron.source import KauldronCheckpoint, is_workdir, list_steps
from treegraft._formats.orbax.source import OrbaxCheckpoint
from treegraft._formats.safetensors.source import SafetensorsCheckpoint
from treegraft._parse.paths import render_parts
from treegraft._parse.patterns import parse_pattern
from treegraft._parse.rules import parse_ignore, parse_mapping
from treegraft._plan import plan
from treegraft._read.source import Source
from treegraft._storage.location import Location
from treegraft._tree.leaves import format_bytes
from treegraft._tree.pytree import flatten_parts

__all__ = ["main"]

_DEFAULT_MAP = ("params=params", "collections=collections")


def open_checkpoint(path: str, step: int | None, *, flag: str = "--step") -> Source:
    """A Kauldron workdir (it has `checkpoints/`), an orbax checkpoint folder, or safetensors.

    Args:
      path: the folder; `~` is expanded.
      step: the step of a workdir (None: the latest).
      flag: the option that gave step, for messages.

    Raises:
      CheckpointError: a step was given for a folder that is not a workdir
        (a step folder or an orbax item folder has no steps to choose from).
    """
    path = os.path.expanduser(path)
    if is_workdir(path):
        return KauldronCheckpoint(path, step=-1 if step is None else step)
    if step is not None:
        raise CheckpointError(
            f"{flag} {step}: {path!r} is not a Kauldron workdir (it has no checkpoints/ "
            f"folder), so it has no steps to choose from; pass the workdir with {flag}, "
            f"or this folder without {flag}"
        )
    if _is_safetensors(path):
        return SafetensorsCheckpoint(path)
    return OrbaxCheckpoint(path)


def _is_safetensors(path: str) -> bool:
    """A `.safetensors` file, or a folder of Hugging Face weights (an index or shards)."""
    if path.endswith(".safetensors"):
        return True
    location = Location.parse(path)
    if location.kind() != "dir":
        return False
    names = location.listdir()
    if "_METADATA" in names:
        return False
    return "model.safetensors.index.json" in names or any(
        n.endswith(".safetensors") for n in names
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treegraft",
        description="Initialise part of a JAX state from another checkpoint, checked.",
    )
    parser.add_argument("--version", action="version", version=treegraft.__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="write an example pretrained run and graft it into a new model"
    )
    demo.add_argument("--keep", metavar="DIR", help="write the example run to DIR and keep it")
    demo.add_argument("--plain", action="store_true", help="no colour or bold")

    inspect = sub.add_parser("inspect", help="show a checkpoint's tree (metadata only)")
    inspect.add_argument(
        "path",
        help="a Kauldron workdir, a step folder, an orbax item folder, or safetensors weights",
    )
    inspect.add_argument(
        "--step", type=int, default=None, help="step of a workdir (default or -1: the latest)"
    )
    inspect.add_argument("--depth", type=int, default=None, help="levels to show")
    inspect.add_argument("--filter", metavar="PATTERN", help="only leaves under this pattern")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--plain", action="store_true", help="no colour or bold")

    dry = sub.add_parser("plan", help="dry-run a graft between two checkpoints")
    dry.add_argument(
        "source", help="the checkpoint to read from (workdir, step or item folder, safetensors)"
    )
    dry.add_argument("--target", required=True, help="a checkpoint with the new state's structure")
    dry.add_argument(
        "--map",
        metavar="NEW=OLD",
        action="append",
        default=None,
        help="a rule (repeat it); OLD may be None (keep) or an operation such as "
        "'stack(params.layers_*, axis=0)'; default: params=params collections=collections",
    )
    dry.add_argument("--step", type=int, default=None, help="step of the source workdir")
    dry.add_argument("--target-step", type=int, default=None, help="step of the target workdir")
    dry.add_argument("--ignore-model-keys", nargs="+", default=[], metavar="PATTERN")
    dry.add_argument("--ignore-restored-keys", nargs="+", default=[], metavar="PATTERN")
    dry.add_argument("--non-strict", action="store_true", help="report instead of failing")
    dry.add_argument("--cast", action="store_true", help="allow dtype differences")
    dry.add_argument("--json", action="store_true", help="machine-readable output")
    dry.add_argument("--plain", action="store_true", help="no colour or bold")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `treegraft` command; returns its exit status."""
    args = _parser().parse_args(argv)
    for name in ("path", "source", "target", "keep"):  # '~' even when the shell left it
        value = getattr(args, name, None)
        if value:
            setattr(args, name, os.path.expanduser(value))
    style = Style(sys.stdout, plain=getattr(args, "plain", False))
    try:
        if args.command == "demo":
            return _demo(args, style)
        if args.command == "inspect":
            return _inspect(args, style)
        return _plan(args, style)
    except (CheckpointError, PathSyntaxError, MappingError, FileNotFoundError) as e:
        print(f"treegraft {args.command}: {e}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace, style: Style) -> int:
    from treegraft._app.demo import run_demo

    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        if os.listdir(args.keep):
            print(f"treegraft demo: --keep {args.keep!r} is not empty", file=sys.stderr)
            return 2
    return run_demo(args.keep, style=style)


def _inspect(args: argparse.Namespace, style: Style) -> int:
    source = open_checkpoint(args.path, args.step)
    meta = source.metadata()
    paths, leaves, _ = flatten_parts(meta)
    items = list(zip(paths, leaves, strict=True))
    if args.filter:
        pattern = parse_pattern(args.filter)
        matched = [(p, leaf) for p, leaf in items if pattern.match_prefix(p) is not None]
        if not matched:
            print(
                f"treegraft inspect: --filter {args.filter!r} matches no leaf of "
                f"{source.describe()}{_close_names(pattern, paths)}",
                file=sys.stderr,
            )
            return 1
        items = matched
    # Every shape shown is needed: read them in one batch, not one array at a time.
    source.prefetch([leaf for _, leaf in items])
    steps = list_steps(args.path) if isinstance(source, KauldronCheckpoint) else None
    where = source.step_dir if isinstance(source, KauldronCheckpoint) else str(source.path)  # type: ignore[attr-defined]
    if args.json:
        rows = leaf_rows(items)
        print(
            json.dumps(
                {
                    "path": where,
                    "steps": steps,
                    "step": (
                        source.resolved_step if isinstance(source, KauldronCheckpoint) else None
                    ),
                    "leaves": rows,
                    "total_bytes": sum(r["nbytes"] for r in rows),
                },
                indent=2,
            )
        )
        return 0
    if steps is not None:
        print(f"steps: {', '.join(map(str, steps))} (showing {source.resolved_step})")  # type: ignore[attr-defined]
    for line in render_tree(items, title=where, depth=args.depth, style=style):
        print(line)
    return 0


def _close_names(pattern: Any, paths: Sequence[tuple[Any, ...]]) -> str:
    """` (did you mean 'x'?)`: node paths as deep as the pattern's named part."""
    text = str(pattern)
    while text.endswith(".**"):
        text = text[: -len(".**")]
    depth = max(pattern._min_len, 1)  # the segments other than '**'
    names = {render_parts(p[:depth]) for p in paths if len(p) >= depth}
    return suggest(text, names, cutoff=PATH_CUTOFF) if text and text != "**" else ""


def _parse_map(entries: Sequence[str]) -> dict[str, Any]:
    """`NEW=OLD` entries; OLD may be `None` (keep) or a rule operation.

    Operations are written as in Python, with unquoted paths:
    `stack(params.layers_*, axis=0)`, `unstack(params.layers, 1)`,
    `cast(params.enc, bfloat16)`, `transpose(w, 1, 0)`, `reshape(q, 4, -1)`.
    """
    mapping: dict[str, Any] = {}
    for entry in entries:
        new, sep, old = entry.partition("=")
        if not sep or not new.strip():
            raise MappingError(f"--map takes NEW=OLD, got {entry!r}")
        mapping[new.strip()] = _parse_value(old.strip(), entry)
    return mapping


_OPS = ("stack", "unstack", "cast", "transpose", "reshape")


def _parse_value(text: str, entry: str) -> Any:
    if text == "None":
        return None
    name, paren, rest = text.partition("(")
    name = name.strip()
    if not paren or name not in _OPS:
        return text
    if not rest.endswith(")"):
        raise MappingError(f"--map {entry!r}: {name}(...) is missing its closing ')'")
    args = _split_args(rest[:-1])
    if not args:
        raise MappingError(f"--map {entry!r}: {name}() needs a source path")
    value: Any = _parse_value(args[0], entry)
    extra = args[1:]
    try:
        if name in ("stack", "unstack"):
            axis = 0
            for arg in extra:
                axis = int(arg.split("=", 1)[1] if arg.startswith("axis") else arg)
            return getattr(treegraft, name)(value, axis=axis)
        if name == "cast":
            if len(extra) != 1:
                raise ValueError("cast takes a value and a dtype")
            import jax.numpy as jnp

            dtype = extra[0].split("=", 1)[-1].strip()
            return treegraft.cast(value, getattr(jnp, dtype, dtype))
        numbers = tuple(int(a) for a in extra)
        return getattr(treegraft, name)(value, numbers)
    except ValueError as e:
        raise MappingError(f"--map {entry!r}: {e}") from None


def _split_args(text: str) -> list[str]:
    """Splits at the commas outside parentheses."""
    out: list[str] = []
    depth, current = 0, ""
    for c in text:
        if c == "," and depth == 0:
            out.append(current.strip())
            current = ""
            continue
        depth += (c == "(") - (c == ")")
        current += c
    if current.strip():
        out.append(current.strip())
    return out


def _plan(args: argparse.Namespace, style: Style) -> int:
    mapping = _parse_map(args.map if args.map is not None else _DEFAULT_MAP)
    # A malformed mapping or pattern is a usage error (2), not a failing graft (1).
    parse_mapping(mapping)
    parse_ignore(args.ignore_model_keys, name="--ignore-model-keys")
    parse_ignore(args.ignore_restored_keys, name="--ignore-restored-keys")
    source = open_checkpoint(args.source, args.step)
    target_source = open_checkpoint(args.target, args.target_step, flag="--target-step")
    # A missing or unreadable checkpoint (or step) is unusable input (2), not a
    # failing graft (1): open both before planning.
    source.metadata()
    target = target_source.metadata()
    # The plan checks the target's shapes: read them in one batch up front.
    target_source.prefetch(flatten_parts(target)[1])
    try:
        p = plan(
            target,
            source,
            mapping,
            ignore_model_keys=args.ignore_model_keys,
            ignore_restored_keys=args.ignore_restored_keys,
            strict=not args.non_strict,
            cast=args.cast,
        )
    except GraftError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e), "problems": _problems(e.problems)},
                             indent=2))
        else:
            print(style.bad("the graft would fail:"))
            print(str(e))
        return 1
    if args.json:
        print(json.dumps(_plan_json(p), indent=2))
        return 0
    print(style.good("the graft would succeed:"))
    print(str(p))
    return 0


def _problems(problems: Sequence[treegraft.Problem]) -> list[dict[str, Any]]:
    return [
        {
            "kind": pr.kind,
            "message": pr.message,
            "target": None if pr.target is None else str(pr.target),
            "source": None if pr.source is None else str(pr.source),
            "rule": pr.rule,
        }
        for pr in problems
    ]


def _plan_json(p: treegraft.GraftPlan) -> dict[str, Any]:
    return {
        "ok": True,
        "rules": [
            {"rule": text, "leaves": n, "bytes": b, "size": format_bytes(b)}
            for text, n, b in p.rule_counts()
        ],
        "entries": [
            {
                "target": str(e.target),
                "source": str(e.source),
                "rule": e.rule,
                "shape": list(e.shape) if e.shape is not None else None,
                "dtype": str(e.dtype),
                "nbytes": e.nbytes,
            }
            for e in p.entries
        ],
        "untouched": [str(x) for x in p.untouched],
        "unused": len(p.unused),
        "bytes": p.nbytes,
        "report": _problems(p.report),
    }


if __name__ == "__main__":
    sys.exit(main())
