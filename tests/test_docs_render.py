"""The docs as a reader sees them: every page in headless Chromium at a laptop's 1366x768.

What this proves, by running docs/screenshots.py on a `sphinx -W` build:
- every page renders, and its first screen is saved as a 1366x768 PNG;
- no page is wider than the window (no sideways scroll of the whole page);
- no code block of the landing page scrolls sideways;
- the site uses the ecosystem's theme (sphinx-book-theme, as jax, flax, optax
  and orbax do).

Skips, with the reason, when no Chromium is installed (install it with
`apt-get install chromium`) or the docs extra (`pip install .[docs]`) is not.
"""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _screenshots():
    spec = importlib.util.spec_from_file_location("docs_screenshots", DOCS / "screenshots.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple[int, int]:
    """The width and height in a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("sphinx_book_theme", reason="the docs extra: pip install .[docs]")
    out = tmp_path_factory.mktemp("docs")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, f"sphinx -W failed:\n{result.stderr}"
    return out / "html"


def test_the_docs_use_the_ecosystems_theme(built: Path) -> None:
    index = (built / "index.html").read_text(encoding="utf-8")
    assert "sphinx-book-theme" in index or "sphinx_book_theme" in index


def test_every_page_at_a_laptops_width(built: Path, tmp_path: Path) -> None:
    shots = _screenshots()
    if shots.find_browser() is None:
        pytest.skip(f"no Chromium on PATH ({', '.join(shots.BROWSERS)}): "
                    "apt-get install chromium to run this test")
    names = shots.page_names()
    pages = shots.run(built, tmp_path, width=1366, height=768, names=names)
    assert [p.name for p in pages] == names and "index" in names
    for page in pages:
        assert _png_size(page.png) == (1366, 768), page.name
    too_wide = {p.name: p.page_over for p in pages if p.page_over > 0}
    assert not too_wide, f"pages wider than a 1366 px window (px over): {too_wide}"
    landing = next(p for p in pages if p.name == "index")
    assert not landing.wide, f"code blocks of the landing page scroll sideways: {landing.wide}"
