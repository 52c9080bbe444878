"""The documentation runs: every example executes, every public name is documented, Sphinx builds.

How pages (README.md and docs/**/*.md) are run, one test per page:

* ```python blocks run in order, in one fresh module namespace per page, in a
  temporary working directory. A block that needs a checkpoint writes one itself.
* A ```text output block right after a python block (only blank lines between)
  is the stdout that block must print; doctest's ELLIPSIS (`...`) and
  NORMALIZE_WHITESPACE apply.
* ```console blocks whose first command is `$ treegraft ...` are terminal
  sessions and run too: `$ ` lines are commands (run in-process with
  `treegraft._app.cli.main`), the lines below a command are its expected output
  (stdout and stderr, ELLIPSIS applies), `$ echo $?` prints the last exit
  status.
* `~` (`HOME`) is a temporary directory too, shown in outputs as `/home/you`.
* A page whose examples need an optional library says so in a comment,
  `<!-- requires: flax optax -->`: without one of them its test skips.
* Everything else is shown, not run: ```text, ```bash, ```console sessions of
  other programs, and ```{code-block} python (use it for Kauldron configs and
  multi-process code).
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import treegraft

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
SHOWN_HOME = "/home/you"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
# Directives whose body is code or raw text, not Markdown: not searched for examples.
_LITERAL_DIRECTIVES = {
    "code-block",
    "code",
    "sourcecode",
    "code-cell",
    "eval-rst",
    "literalinclude",
    "math",
    "raw",
    "csv-table",
    "mermaid",
    "graphviz",
}
_OPTION = re.compile(r"^\s*:[\w-]+:")
_REQUIRES = re.compile(r"<!--\s*requires:\s*([\w. -]+?)\s*-->")
_CHECKER = doctest.OutputChecker()
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# ----------------------------------------------------------------------------
# Finding the examples.
# ----------------------------------------------------------------------------


@dataclass
class Block:
    """One fenced block of a page."""

    lang: str  # first word of the info string: 'python', 'text', '{code-block}', ...
    info: tuple[str, ...]  # the info string's words
    code: str
    line: int  # 1-based line number of the block's first code line in the page
    after_previous: bool = False  # only blank lines since the previous block


def parse_blocks(text: str, first_line: int = 1) -> list[Block]:
    """The fenced blocks of a Markdown page, in order, directive bodies included."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    blank_since_block = False  # True while only blank lines follow the last block
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            if lines[i].strip():
                blank_since_block = False
            i += 1
            continue
        indent = len(m["indent"].expandtabs())
        fence = m["fence"]
        info = m["info"].split()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = re.match(r"^[ \t]*(`{3,}|~{3,})[ \t]*$", lines[j])
            if close and close[1][0] == fence[0] and len(close[1]) >= len(fence):
                break
            line = lines[j]
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[strip:])
            j += 1
        lang = info[0] if info else ""
        start = first_line + i + 1
        if lang.startswith("{") and lang.strip("{}") not in _LITERAL_DIRECTIVES:
            # An admonition or other container: its body is Markdown.
            k = 0
            while k < len(body) and _OPTION.match(body[k]):
                k += 1
            blocks.extend(parse_blocks("\n".join(body[k:]), start + k))
            blank_since_block = False
        else:
            code = "\n".join(body)
            if lang in ("{code-block}", "{code}", "{sourcecode}") and len(info) > 1:
                # Directive options are not code.
                kept = [b for b in body if not _OPTION.match(b)]
                code = "\n".join(kept)
            blocks.append(Block(lang, tuple(info), code + "\n", start, blank_since_block))
            blank_since_block = True
        i = j + 1
    return blocks


def _pages() -> list[Path]:
    pages = [ROOT / "README.md"]
    pages += sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)
    return [p for p in pages if p.exists()]


PAGES = _pages()


def _is_output(block: Block) -> bool:
    return block.lang == "text" and "output" in block.info[1:]


def _is_session(block: Block) -> bool:
    if block.lang != "console":
        return False
    first = next((ln for ln in block.code.splitlines() if ln.strip()), "")
    return first.startswith("$ treegraft")


# ----------------------------------------------------------------------------
# Running them.
# ----------------------------------------------------------------------------


def _check_output(where: str, want: str, got: str) -> None:
    if not _CHECKER.check_output(want, got, _FLAGS):
        pytest.fail(
            f"{where}: the output differs from the page.\n"
            f"--- on the page:\n{want}--- printed:\n{got}",
            pytrace=False,
        )


def _run_python(page: Path, block: Block, namespace: dict) -> str:
    # Pad so that line numbers in tracebacks are the page's own.
    source = "\n" * (block.line - 1) + block.code
    code = compile(source, str(page), "exec")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    return out.getvalue()


def _session_commands(block: Block) -> list[tuple[str, str, int]]:
    """(command, expected output, line) for each `$ ` line of a console block."""
    commands: list[tuple[str, str, int]] = []
    lines = block.code.splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if not line.startswith("$ "):
            k += 1
            continue
        lineno = block.line + k
        cmd = line[2:]
        while cmd.endswith("\\") and k + 1 < len(lines):
            k += 1
            cmd = cmd[:-1] + " " + lines[k].strip()
        k += 1
        want = []
        while k < len(lines) and not lines[k].startswith("$ "):
            want.append(lines[k])
            k += 1
        while want and not want[-1].strip():
            want.pop()
        commands.append((cmd, "\n".join(want) + ("\n" if want else ""), lineno))
    return commands


def _run_session(page: Path, block: Block, home: Path) -> None:
    from treegraft._app.cli import main

    status = 0
    for cmd, want, lineno in _session_commands(block):
        where = f"{page.relative_to(ROOT)}:{lineno}: $ {cmd}"
        if cmd.strip() == "echo $?":
            got = f"{status}\n"
        else:
            argv = [os.path.expanduser(a) for a in shlex.split(cmd)]
            assert argv[0] == "treegraft", f"{where}: only treegraft commands can run"
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                try:
                    status = main(argv[1:])
                except SystemExit as e:  # argparse: --help, --version, usage errors
                    status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            got = buf.getvalue().replace(str(home), SHOWN_HOME)
        _check_output(where, want, got)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text(encoding="utf-8")
    for found in _REQUIRES.finditer(text):
        for module in found[1].split():
            pytest.importorskip(module)
    blocks = parse_blocks(text)
    runnable = [b for b in blocks if b.lang == "python" or _is_session(b)]
    if not runnable:
        pytest.skip("no python block or treegraft session on this page")
    work = tmp_path / "work"
    home = tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    name = "treegraft_docs_" + re.sub(r"\W", "_", str(page.relative_to(ROOT)))
    module = types.ModuleType(name)
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    previous: Block | None = None
    printed = ""
    for block in blocks:
        if block.lang == "python":
            printed = _run_python(page, block, module.__dict__)
        elif _is_output(block):
            where = f"{page.relative_to(ROOT)}:{block.line}"
            assert previous is not None and previous.lang == "python" and block.after_previous, (
                f"{where}: a ```text output block must directly follow a ```python block"
            )
            _check_output(where, block.code, printed.replace(str(home), SHOWN_HOME))
        elif _is_session(block):
            _run_session(page, block, home)
        previous = block


def test_block_finder() -> None:
    page = (
        "# T\n\n```python\nprint(1)\n```\n\n```text output\n1\n```\n\n"
        "::::{note}\n```python\nx = 2\n```\n::::\n\n"
        "````{note}\n:class: tip\n```python\ny = 3\n```\n````\n\n"
        "```{code-block} python\n:caption: config\nnot run\n```\n"
        "- item\n\n  ```python\n  z = 4\n  ```\n"
    )
    blocks = parse_blocks(page)
    assert [(b.lang, b.code, b.line) for b in blocks] == [
        ("python", "print(1)\n", 4),
        ("text", "1\n", 8),
        ("python", "x = 2\n", 13),
        ("python", "y = 3\n", 20),
        ("{code-block}", "not run\n", 25),
        ("python", "z = 4\n", 31),
    ]
    assert blocks[1].after_previous and _is_output(blocks[1])


# ----------------------------------------------------------------------------
# The API reference covers the public API.
# ----------------------------------------------------------------------------

_AUTODOC = re.compile(
    r"^\.\. auto(?:function|class|exception|data|attribute|method)::\s+treegraft\.(\w+)"
    r"(?:\(.*\))?\s*$",
    re.MULTILINE,
)


def test_every_public_name_is_in_the_api_reference() -> None:
    documented = _AUTODOC.findall(API_PAGE.read_text(encoding="utf-8"))
    missing = sorted(set(treegraft.__all__) - set(documented))
    stale = sorted(set(documented) - set(treegraft.__all__))
    twice = sorted({n for n in documented if documented.count(n) > 1})
    assert not missing, f"docs/api.md does not document: {', '.join(missing)}"
    assert not stale, f"docs/api.md documents names not in treegraft.__all__: {stale}"
    assert not twice, f"docs/api.md documents these twice: {twice}"


# ----------------------------------------------------------------------------
# The site builds, warnings as errors.
# ----------------------------------------------------------------------------


def test_sphinx_build(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path / "html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, f"sphinx -W failed:\n{result.stderr}\n{result.stdout}"
    api = (out / "api.html").read_text(encoding="utf-8")
    absent = [n for n in treegraft.__all__ if f'id="treegraft.{n}"' not in api]
    assert not absent, f"autodoc produced no entry for: {absent}"
