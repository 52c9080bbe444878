"""Reliability round 3, the command line (item 17): every failure is one line, never a traceback.

What this proves:
- a malformed `--map` operation (an `axis` that is a word, unbalanced
  parentheses, an unknown operation, too many or too few arguments, an axis
  that is not an ASCII integer, an unknown keyword) exits 2 with one line on
  stderr that quotes the entry and says what is wrong with it;
- a bad `--step`, `--target-step` or `--depth` (not a number, below -1, a
  negative depth) exits 2 with one line naming the option, as do a `--keep`
  that is a file and an argument that is not valid UTF-8;
- output into a closed pipe (`| head -1`) ends quietly with status 141, as a
  Unix tool stopped by SIGPIPE; output into a full device (`> /dev/full`)
  exits 1 with one line; an ASCII-only stdout gets escapes, not a crash;
- a damaged `_METADATA` of any shape is a `CheckpointError` that says what is
  wrong with the file, never an empty `AssertionError:` from orbax.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from kauldron_run import write_item

import treegraft as tg
from treegraft._app import cli

_BESIDE = os.path.join(os.path.dirname(sys.executable), "treegraft")
EXE = _BESIDE if os.path.exists(_BESIDE) else shutil.which("treegraft") or ""
CMD = [EXE] if EXE else [sys.executable, "-m", "treegraft._app.cli"]


def run(*args: str | bytes, **kwargs) -> subprocess.CompletedProcess[str]:
    """Runs the installed console script, as a user types it."""
    env = dict(os.environ, NO_COLOR="1", **kwargs.pop("env", {}))
    return subprocess.run(
        [*CMD, *args], capture_output=True, text=True, timeout=300, env=env, **kwargs
    )


def shell(script: str) -> subprocess.CompletedProcess[str]:
    """Runs a bash script in which `$TG` is the treegraft command."""
    env = dict(os.environ, NO_COLOR="1", TG=" ".join(CMD))
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=300, env=env
    )


def main_status(argv: list[str]) -> int:
    """`cli.main` in process; argparse's usage errors exit through SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def item(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small orbax item: a dict, a list and a scalar."""
    tree = {"a": [np.zeros(2, np.float32), np.ones(3, np.float32)], "b": {"c": np.zeros(1)},
            "n": 3}
    return write_item(tmp_path_factory.mktemp("r3cli") / "item", tree)


# ----------------------------------------------------------------------------
# --map: malformed operations.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("x=stack(y_*, axis)", "stack: the axis must be an integer, got 'axis'"),
        ("x=stack(y_*, axis=a)", "stack: the axis must be an integer, got 'a'"),
        ("x=stack(y_*, ١)", "stack: the axis must be an integer, got '١'"),
        ("x=stack(y_*, 0, 1)", "stack takes a source and one axis, got 2 axis values: 0, 1"),
        ("x=stack(y_*, axis=0, axis=1)", "stack: axis= is given twice"),
        ("x=stack(y_*, axisx=1)", "stack: unknown argument axisx=; it takes axis="),
        ("x=stack(y_*))", "unbalanced parentheses in 'stack(y_*))'"),
        ("x=y)", "unbalanced parentheses in 'y)'"),
        ("x=stack((y_*)", "stack(...) is missing its closing ')'"),
        ("x=stack(y_*)z", "unexpected 'z' after stack(...)"),
        ("x=stack()", "stack() needs a source path as its first argument"),
        ("x=stack(y_*,,0)", "stack(...) has an empty argument"),
        ("x=stack(None)", "stack: its source is a path or an operation, not None"),
        ("x=foo(y)", "unknown operation 'foo'; the operations are stack, unstack, cast"),
        ("x=a.b(c)", "'a.b(c)' is neither a path"),
        ("x=cast(y)", "cast needs a dtype: cast(path, dtype)"),
        ("x=cast(y, float32, 1)", "cast takes a source and one dtype, got 2 dtype values"),
        ("x=transpose(y)", "transpose needs the axes: transpose(path, 1, 0)"),
        ("x=transpose(y, a, b)", "transpose: the axes must be integers, got 'a'"),
        ("x=transpose(y, axes=1)", "transpose: unknown argument axes="),
        ("x=reshape(y, 4.5)", "reshape: the shape must be integers, got '4.5'"),
        ("x=reshape(y)", "reshape needs the shape"),
        ("x=cast(stack(y_*, q), float32)", "stack: the axis must be an integer, got 'q'"),
    ],
)
def test_a_malformed_map_operation_is_one_line_naming_the_entry(entry, reason, capsys):
    status = main_status(["plan", "/nonexistent/src", "--target", "/nonexistent/t", "--map",
                          entry])
    err = capsys.readouterr().err
    assert status == 2, err
    line = one_line(err)
    assert line.startswith(f"treegraft plan: --map {entry!r}: "), line
    assert reason in line


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("x=transpose(y, (1, 0))", tg.transpose("y", (1, 0))),
        ("x=transpose(y, 1, 0,)", tg.transpose("y", (1, 0))),
        ("x=reshape(y, ())", tg.reshape("y", ())),
        ("x=cast(y, jnp.bfloat16)", tg.cast("y", "bfloat16")),
        ("x=cast(y, dtype=float32)", tg.cast("y", np.float32)),
        ("x=unstack(a['k(,)'], axis=1)", tg.unstack("a['k(,)']", axis=1)),
        ("x=cast(stack(y_*, -1), int8)", tg.cast(tg.stack("y_*", axis=-1), np.int8)),
    ],
    ids=["tuple", "trailing-comma", "scalar-shape", "jnp-dtype", "dtype-keyword",
         "quoted-parens", "nested"],
)
def test_well_formed_operations_parse(entry, expected):
    # The stricter parser still takes what a user copies from a plan's output.
    from treegraft._app.map_text import parse_map

    assert parse_map([entry])["x"] == expected


# ----------------------------------------------------------------------------
# Options and arguments.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "X", "--step", "abc"], "treegraft inspect: argument --step: not a whole "
         "number: 'abc'"),
        (["inspect", "X", "--step", "1.5"], "argument --step: not a whole number: '1.5'"),
        (["inspect", "X", "--step", "-2"], "argument --step: a step is a number >= 0, or -1 "
         "for the latest; got '-2'"),
        (["inspect", "X", "--depth", "-1"], "argument --depth: the levels to show are 0 or "
         "more; got '-1'"),
        (["plan", "X", "--target", "Y", "--target-step", "x"], "treegraft plan: argument "
         "--target-step: not a whole number: 'x'"),
        (["plan", "X"], "the following arguments are required: --target"),
        ([], "treegraft: the following arguments are required: COMMAND"),
        (["inspect", ""], "treegraft inspect: PATH is empty; give a folder (use '.' for the "
         "current one)"),
        (["plan", "/x", "--target", ""], "treegraft plan: --target is empty"),
    ],
    ids=["step-word", "step-float", "step-below-minus-1", "depth-negative", "target-step",
         "no-target", "no-command", "empty-path", "empty-target"],
)
def test_a_bad_option_is_one_line_naming_it(argv, message, capsys):
    status = main_status(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in one_line(err)


def test_demo_keep_that_is_a_file_exits_2(tmp_path, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    assert main_status(["demo", "--keep", str(mine)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line == (f"treegraft demo: --keep {str(mine)!r} exists and is not a folder; give a "
                    "folder that is empty or absent")
    assert main_status(["demo", "--keep", str(mine / "sub")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot be created or listed: Not a directory" in line
    assert mine.read_text() == "keep me"


def test_an_argument_that_is_not_utf8_exits_2(item, tmp_path):
    # A real checkpoint under a name of undecodable bytes: tensorstore cannot
    # take it (a bare RuntimeError before).
    folder = os.fsencode(str(tmp_path)) + b"/ckpt\xff"
    shutil.copytree(os.fsencode(item), folder)
    result = run("inspect", folder)
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == (
        f"treegraft inspect: PATH '{tmp_path}/ckpt\\xff' is not valid UTF-8; treegraft takes "
        "UTF-8 names only (for a folder with such a name, rename it or pass a UTF-8 symlink "
        "to it)"
    )
    result = run("inspect", item, "--filter", b"a\xfe")
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        "treegraft inspect: --filter 'a\\xfe' is not valid UTF-8; treegraft takes UTF-8 names only"
    )


def test_ctrl_c_ends_quietly_with_130(monkeypatch, capsys):
    def interrupted(args, style):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["inspect", "X"]) == 130
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------
# Output that cannot be written.
# ----------------------------------------------------------------------------


def test_a_closed_pipe_ends_quietly(item, tmp_path):
    # Output larger than a pipe's buffer: `head -1` exits while inspect writes.
    big = write_item(tmp_path / "big", {"w": {f"k{i:04d}": np.zeros(1, np.float32)
                                              for i in range(1500)}})
    result = shell(f'set -o pipefail; $TG inspect {big} --json 2>"{tmp_path}/err" | head -1; '
                   f'echo "status $?"')
    assert result.stdout == "{\nstatus 141\n", result.stdout + result.stderr
    assert (tmp_path / "err").read_text() == ""
    # A reader that is gone before the first write.
    result = shell(f'$TG inspect {item} 2>"{tmp_path}/err" | true; '
                   'echo "status ${PIPESTATUS[0]}"')
    assert result.stdout == "status 141\n"
    assert (tmp_path / "err").read_text() == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("command", ["inspect", "plan"])
def test_a_full_device_is_one_line_and_status_1(item, command):
    args = [item] if command == "inspect" else [item, "--target", item, "--map", "a=a"]
    with open("/dev/full", "w") as full:
        result = subprocess.run([*CMD, command, *args], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=300, env=dict(os.environ, NO_COLOR="1"))
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"treegraft {command}: cannot write the output: No space left on device"
    )


def test_an_ascii_stdout_gets_escapes_not_a_crash(item):
    result = run("inspect", item, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "\\u251c\\u2500\\u2500 a" in result.stdout  # '├── a'


# ----------------------------------------------------------------------------
# A damaged _METADATA.
# ----------------------------------------------------------------------------


def _damaged(item: str, tmp_path, text: str) -> str:
    folder = str(tmp_path / "damaged")
    shutil.copytree(item, folder)
    with open(os.path.join(folder, "_METADATA"), "w") as f:
        f.write(text)
    return folder


def _with_entries(item: str, **entries: list[tuple[str, int]]) -> dict:
    """The item's `_METADATA` with its tree replaced by scalar leaves at these keys."""
    with open(os.path.join(item, "_METADATA")) as f:
        meta = json.load(f)
    value = {"value_type": "scalar", "skip_deserialize": False}
    meta["tree_metadata"] = {
        name: {"key_metadata": [{"key": k, "key_type": t} for k, t in keys],
               "value_metadata": value}
        for name, keys in entries.items()
    }
    return meta


_LIST, _DICT = 1, 2


@pytest.mark.parametrize(
    "layout", ["ocdbt", "plain"], ids=["ocdbt", "not-ocdbt"]
)
@pytest.mark.parametrize(
    "entries, reason",
    [
        # orbax: an AssertionError with no message
        ({"e": [("a", _DICT), ("5", _LIST)]}, "the list 'a' has no index 0 (its indices: 5)"),
        ({"e": [("2", _LIST)], "f": [("0", _LIST)]}, "the root list has no index 1 (its "
         "indices: 0, 2)"),
        ({"e": [("p", _DICT)], "f": [("p", _DICT), ("x", _DICT)]}, "'p' is both a leaf and a "
         "node with children"),
        ({"f": [("p", _DICT), ("x", _DICT)], "e": [("p", _DICT)]}, "'p' is both a leaf and a "
         "node with children"),
        # orbax: TypeError: '<' not supported between instances of 'str' and 'int'
        ({"e": [("0", _LIST)], "f": [("x", _DICT)]}, "one node has both list indices and dict "
         "keys (the key 'x')"),
    ],
    ids=["list-gap", "root-list-gap", "leaf-then-node", "node-then-leaf", "mixed-keys"],
)
def test_a_damaged_tree_in_metadata_says_what_is_wrong(item, tmp_path, entries, reason, layout):
    meta = _with_entries(item, **entries)
    if layout == "plain":
        meta["use_ocdbt"] = False  # read by orbax's reader, after treegraft's checks
    folder = _damaged(item, tmp_path, json.dumps(meta))
    with pytest.raises(tg.CheckpointError) as info:
        tg.OrbaxCheckpoint(folder).metadata()
    message = str(info.value)
    assert message == (
        f"cannot read the metadata of {folder} (is _METADATA corrupt?): {reason}; restore the "
        "checkpoint from a good copy, or read another step"
    )


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[]", "it holds a JSON array, not an object with tree_metadata"),
        ("null", "it holds a JSON null, not an object with tree_metadata"),
        ('{"tree_metadata": []}', "its tree_metadata is a JSON array, not an object"),
        ('{"tree_metadata": null}', "its tree_metadata is a JSON null, not an object"),
        ('{"tree_metadata": {"a": 1}}', "its tree_metadata entry 'a' is not an object with a "
         "key_metadata list"),
        ('{"tree_metadata": {"a": {"key_metadata": "k"}}}', "its tree_metadata entry 'a' is "
         "not an object with a key_metadata list"),
    ],
    ids=["array", "null", "tree-array", "tree-null", "entry-number",
         "key-metadata-string"],
)
def test_metadata_of_the_wrong_shape_says_what_is_wrong(item, tmp_path, text, reason):
    folder = _damaged(item, tmp_path, text)
    with pytest.raises(tg.CheckpointError, match=r"\(is _METADATA corrupt\?\): ") as info:
        tg.OrbaxCheckpoint(folder).metadata()
    assert f"(is _METADATA corrupt?): {reason}; restore the checkpoint" in str(info.value)


def test_the_cli_shows_a_damaged_metadata_in_one_line(item, tmp_path):
    meta = _with_entries(item, e=[("a", _DICT), ("3", _LIST)])
    folder = _damaged(item, tmp_path, json.dumps(meta))
    result = run("inspect", folder)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith(f"treegraft inspect: cannot read the metadata of {folder} ")
    assert "the list 'a' has no index 0" in line and "AssertionError" not in line


def test_an_orbax_assert_without_message_is_named(item, tmp_path, monkeypatch):
    # Whatever else in orbax's reader fails an assert, the message says so
    # instead of ending on an empty 'AssertionError: '.
    import orbax.checkpoint as ocp

    from treegraft._formats.orbax import restore as orbax_restore

    def failing(self, directory):
        raise AssertionError

    monkeypatch.setattr(orbax_restore, "lazy_metadata", lambda directory: None)
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "metadata", failing)
    with pytest.raises(tg.CheckpointError) as info:
        tg.OrbaxCheckpoint(item).metadata()
    assert str(info.value).endswith(
        "(is _METADATA corrupt?): AssertionError: orbax's reader failed one of its own checks "
        "on it"
    )
