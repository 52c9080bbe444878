"""The `treegraft` command line: demo, inspect, plan, convert.

Exit status: 0 on success, 1 when a plan would fail (or the demo's checks
fail, or the output cannot be written), 2 for usage errors and unusable
inputs, 141 when the reader of the output closed it (as the shell reports a
Unix tool that SIGPIPE stopped). Errors go to stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import treegraft
from treegraft._app import convert_cmd
from treegraft._app.display import Style, leaf_rows, render_tree
from treegraft._app.map_text import parse_map
from treegraft._app.mapping_file import load_mapping
from treegraft._app.model_target import is_model_target, load_model_target
from treegraft._errors import CheckpointError, GraftError, suggest_path
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
# The arguments that name a checkpoint or folder.
_LOCATIONS = ("path", "source", "target", "keep", "dest")
# Arguments by the name a user sees.
_SHOWN_AS = {"path": "PATH", "source": "SOURCE", "dest": "DEST"}


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


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        _say(f"{self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(2)


def _step_arg(text: str) -> int:
    """A `--step` value: a step number, or -1 for the latest."""
    step = _int_arg(text)
    if step < -1:
        raise argparse.ArgumentTypeError(
            f"a step is a number >= 0, or -1 for the latest; got {text!r}"
        )
    return step


def _depth_arg(text: str) -> int:
    """A `--depth` value: levels shown, 0 or more."""
    depth = _int_arg(text)
    if depth < 0:
        raise argparse.ArgumentTypeError(f"the levels to show are 0 or more; got {text!r}")
    return depth


def _int_arg(text: str) -> int:
    # ASCII digits only: int() also takes '1_000' and other scripts' digits
    # (and refuses more than 4300 digits with a ValueError of its own).
    if not re.fullmatch(r"\s*[+-]?[0-9]{1,4000}\s*", text):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        "--step", type=_step_arg, default=None,
        help="step of a workdir (default or -1: the latest)",
    )
    inspect.add_argument("--depth", type=_depth_arg, default=None, help="levels to show")
    inspect.add_argument("--filter", metavar="PATTERN", help="only leaves under this pattern")
    inspect.add_argument(
        "--expand", action="store_true",
        help="show every repeated layer (by default, 4 or more alike are folded: layers[0..47])",
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--plain", action="store_true", help="no colour or bold")

    dry = sub.add_parser("plan", help="dry-run a graft between two checkpoints")
    dry.add_argument(
        "source", help="the checkpoint to read from (workdir, step or item folder, safetensors)"
    )
    dry.add_argument(
        "--target",
        required=True,
        help="a checkpoint with the new state's structure, or module:function, a function "
        "(importable from the current folder) returning the new state, e.g. via jax.eval_shape",
    )
    dry.add_argument(
        "--mapping",
        metavar="FILE",
        help="the rules from FILE.py:NAME (a dict in a Python file) or FILE.json; "
        "--map rules are added to them",
    )
    dry.add_argument(
        "--map",
        metavar="NEW=OLD",
        action="append",
        default=None,
        help="a rule (repeat it); OLD may be None (keep) or an operation such as "
        "'stack(params.layers_*, axis=0)'; for a Kauldron workdir the default is "
        "params=params collections=collections",
    )
    dry.add_argument(
        "--suggest", action="store_true",
        help="print a suggested mapping as Python code, with its explanation",
    )
    dry.add_argument("--step", type=_step_arg, default=None, help="step of the source workdir")
    dry.add_argument(
        "--target-step", type=_step_arg, default=None, help="step of the target workdir"
    )
    dry.add_argument("--ignore-model-keys", nargs="+", default=[], metavar="PATTERN")
    dry.add_argument("--ignore-restored-keys", nargs="+", default=[], metavar="PATTERN")
    dry.add_argument("--non-strict", action="store_true", help="report instead of failing")
    dry.add_argument("--cast", action="store_true", help="allow dtype differences")
    dry.add_argument("--json", action="store_true", help="machine-readable output")
    dry.add_argument("--plain", action="store_true", help="no colour or bold")

    convert_cmd.add_parser(sub, _step_arg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `treegraft` command; returns its exit status.

    A usage error or unusable input exits 2 with one line on stderr (a path's
    syntax error adds the lines pointing at its column); output that cannot be
    written exits 1 (a full device, one line) or 141 (a reader that closed the
    pipe: quietly, as `cat` under `| head -1`).
    """
    args = _parser().parse_args(argv)
    command = args.command
    unusable = _not_utf8(args) or _empty_location(args)
    if unusable:
        _say(f"treegraft {command}: {unusable}")
        return 2
    for name in _LOCATIONS:  # '~' even when the shell left it
        value = getattr(args, name, None)
        if value:
            setattr(args, name, os.path.expanduser(value))
    style = Style(sys.stdout, plain=getattr(args, "plain", False))
    try:
        try:
            status = _run(args, style)
        except (GraftError, FileNotFoundError) as e:
            _say(f"treegraft {command}: {e}")
            status = 2
        _flush()
        return status
    except _OutputError as e:
        _drop_stdout()
        if isinstance(e.__cause__, BrokenPipeError):
            return 128 + signal.SIGPIPE
        _say(f"treegraft {command}: cannot write the output: {_reason(e.__cause__)}")
        return 1
    except KeyboardInterrupt:
        _drop_stdout()
        return 128 + signal.SIGINT


def _run(args: argparse.Namespace, style: Style) -> int:
    if args.command == "demo":
        return _demo(args, style)
    if args.command == "inspect":
        return _inspect(args, style)
    if args.command == "convert":
        return _convert(args)
    return _plan(args, style)


def _convert(args: argparse.Namespace) -> int:
    # A malformed mapping and a missing source are usage errors (2); a refused
    # or failed conversion is 1 (`convert_cmd.run`).
    mapping = _given_mapping(args)
    if mapping is None:
        mapping = {"": ""}
    parse_mapping(mapping)
    source = open_checkpoint(args.source, args.step)
    source.metadata()
    return convert_cmd.run(args, source, mapping, _say)


def _not_utf8(args: argparse.Namespace) -> str | None:
    """What is wrong with the first argument that is not valid UTF-8, else None.

    A name of undecodable bytes reaches Python as surrogate escapes, which
    tensorstore cannot take (it raises a bare RuntimeError) and which no path
    in a checkpoint can match.
    """
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(text).decode("utf-8", "backslashreplace")
                flag = _SHOWN_AS.get(name, "--" + name.replace("_", "-"))
                fix = (
                    " (for a folder with such a name, rename it or pass a UTF-8 symlink to it)"
                    if name in _LOCATIONS
                    else ""
                )
                return f"{flag} '{shown}' is not valid UTF-8; treegraft takes UTF-8 names only{fix}"
    return None


def _empty_location(args: argparse.Namespace) -> str | None:
    """What is wrong with an empty checkpoint or folder argument, else None.

    An empty path would name the current folder, which was surely not meant.
    """
    for name in _LOCATIONS:
        if getattr(args, name, None) == "":
            flag = _SHOWN_AS.get(name, "--" + name)
            return f"{flag} is empty; give a folder (use '.' for the current one)"
    return None


class _OutputError(Exception):
    """Writing to stdout failed (its reader closed the pipe, or the device is full)."""


def _out(text: str = "") -> None:
    """Prints a line of the command's output to stdout."""
    try:
        try:
            print(text)
        except UnicodeEncodeError:  # an ASCII stdout (PYTHONIOENCODING): escape, not fail
            encoding = getattr(sys.stdout, "encoding", None) or "ascii"
            print(text.encode(encoding, "backslashreplace").decode(encoding))
    except OSError as e:
        raise _OutputError() from e


def _flush() -> None:
    try:
        sys.stdout.flush()
    except OSError as e:
        raise _OutputError() from e


def _drop_stdout() -> None:
    """Points stdout at /dev/null, so the flush at exit cannot fail again (and print)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a file (an in-process caller's buffer): nothing flushes it at exit


def _say(text: str) -> None:
    """Prints an error line to stderr; a stderr that cannot be written is left alone."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def _reason(error: BaseException | None) -> str:
    return getattr(error, "strerror", None) or str(error)


def _demo(args: argparse.Namespace, style: Style) -> int:
    from treegraft._app.demo import run_demo

    if args.keep:
        problem = _keep_problem(args.keep)
        if problem:
            _say(f"treegraft demo: --keep {args.keep!r} {problem}")
            return 2
    return run_demo(args.keep, print_fn=_out, style=style)


def _keep_problem(folder: str) -> str | None:
    """Why folder cannot take the demo's run (it is created if absent), else None."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        return "exists and is not a folder; give a folder that is empty or absent"
    try:
        os.makedirs(folder, exist_ok=True)
        if os.listdir(folder):
            return "is not empty"
    except OSError as e:
        return f"cannot be created or listed: {_reason(e)}"
    return None


def _inspect(args: argparse.Namespace, style: Style) -> int:
    source = open_checkpoint(args.path, args.step)
    meta = source.metadata()
    paths, leaves, _ = flatten_parts(meta)
    items = list(zip(paths, leaves, strict=True))
    if args.filter:
        pattern = parse_pattern(args.filter)
        matched = [(p, leaf) for p, leaf in items if pattern.match_prefix(p) is not None]
        if not matched:
            _say(
                f"treegraft inspect: --filter {args.filter!r} matches no leaf of "
                f"{source.describe()}{_close_names(pattern, paths)}"
            )
            return 1
        items = matched
    # Every shape shown is needed: read them in one batch, not one array at a time.
    source.prefetch([leaf for _, leaf in items])
    steps = list_steps(args.path) if isinstance(source, KauldronCheckpoint) else None
    where = source.step_dir if isinstance(source, KauldronCheckpoint) else str(source.path)  # type: ignore[attr-defined]
    if args.json:
        rows = leaf_rows(items)
        _out(
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
        _out(f"steps: {', '.join(map(str, steps))} (showing {source.resolved_step})")  # type: ignore[attr-defined]
    lines = render_tree(items, title=where, depth=args.depth, style=style, fold=not args.expand)
    for line in lines:
        _out(line)
    return 0


def _close_names(pattern: Any, paths: Sequence[tuple[Any, ...]]) -> str:
    """` (did you mean 'x'?)`: node paths as deep as the pattern's named part."""
    text = str(pattern)
    while text.endswith(".**"):
        text = text[: -len(".**")]
    depth = max(pattern._min_len, 1)  # the segments other than '**'
    names = {render_parts(p[:depth]) for p in paths if len(p) >= depth}
    return suggest_path(text, names) if text and text != "**" else ""


def _given_mapping(args: argparse.Namespace) -> dict[Any, Any] | None:
    """The rules of --mapping, then --map (which add to or replace them); None if neither."""
    if args.mapping is None and args.map is None:
        return None
    mapping = load_mapping(args.mapping) if args.mapping is not None else {}
    mapping.update(parse_map(args.map or ()))
    return mapping


def _is_kauldron(path: str, source: Source) -> bool:
    """A Kauldron workdir, or a step folder inside one (`<workdir>/checkpoints/ckpt_N`)."""
    if isinstance(source, KauldronCheckpoint):
        return True
    parent = os.path.dirname(os.path.normpath(path))
    return os.path.basename(parent) == "checkpoints" and is_workdir(os.path.dirname(parent))


def _no_mapping(source: Source) -> str:
    """Why plan needs a mapping for this source, and the ways to give one."""
    ways = ("--map NEW=OLD (repeat it), --mapping FILE.py:NAME or --mapping FILE.json, "
            "or --suggest for a suggested one")
    return (
        f"{source.describe()} is not a Kauldron workdir, so there is no default mapping "
        f"(params=params, collections=collections are Kauldron's); give one: {ways}"
    )


def _open_target(args: argparse.Namespace) -> Any:
    """The target state: a function's state (`module:function`) or a checkpoint's metadata."""
    if is_model_target(args.target):
        if args.target_step is not None:
            raise CheckpointError(
                f"--target-step {args.target_step}: --target {args.target!r} is a function, "
                f"not a Kauldron workdir, so it has no steps"
            )
        return load_model_target(args.target)
    target_source = open_checkpoint(args.target, args.target_step, flag="--target-step")
    target = target_source.metadata()
    # The plan checks the target's shapes: read them in one batch up front.
    target_source.prefetch(flatten_parts(target)[1])
    return target


def _plan(args: argparse.Namespace, style: Style) -> int:
    mapping = _given_mapping(args)
    # A malformed mapping or pattern is a usage error (2), not a failing graft (1).
    if mapping is not None:
        parse_mapping(mapping)
    parse_ignore(args.ignore_model_keys, name="--ignore-model-keys")
    parse_ignore(args.ignore_restored_keys, name="--ignore-restored-keys")
    source = open_checkpoint(args.source, args.step)
    # A missing or unreadable checkpoint (or step) is unusable input (2), not a
    # failing graft (1): open both before planning.
    source.metadata()
    target = _open_target(args)
    if getattr(args, "suggest", False):
        return _suggest(target, source, args, style)
    if mapping is None:
        if not _is_kauldron(args.source, source):
            _say(f"treegraft plan: {_no_mapping(source)}")
            return 2
        mapping = parse_map(_DEFAULT_MAP)
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
            _out(json.dumps({"ok": False, "error": str(e), "problems": _problems(e.problems)},
                            indent=2))
        else:
            _out(style.bad("the graft would fail:"))
            _out(str(e))
        return 1
    if args.json:
        _out(json.dumps(_plan_json(p), indent=2))
        return 0
    _out(style.good("the graft would succeed:"))
    _out(str(p))
    return 0


def _suggest(target: Any, source: Source, args: argparse.Namespace, style: Style) -> int:
    """Prints `tg.suggest`'s mapping as Python code to paste, then its explanation."""
    suggestion = treegraft.suggest(target, source)
    if args.json:
        _out(
            json.dumps(
                {"code": suggestion.as_code(), "explanation": suggestion.explain()}, indent=2
            )
        )
        return 0
    _out(suggestion.as_code().rstrip("\n"))
    _out()
    _out(suggestion.explain().rstrip("\n"))
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
