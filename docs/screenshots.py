"""Screenshots of every docs page at a laptop's size, in headless Chromium, and a sideways check.

    python docs/screenshots.py [--html DIR] [--out DIR] [--width 1366] [--height 768]

Builds the docs (`sphinx -W`) unless `--html` names a built copy, then for
each page of docs/ (one per `.md` file) writes `<out>/<page>.png`, the first
screen of the page as a reader sees it, and asks the browser which of the
page's code blocks are wider than their box (they scroll sideways) and
whether the page itself is wider than the window. Prints one line per page
and exits 1 when a page scrolls sideways as a whole or a code block of the
landing page does (the first thing a reader sees); other pages' wide blocks
are listed, as a guide.

Needs `chromium` (or `chromium-browser`, `google-chrome`) on PATH.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Pages whose wide code blocks fail the check (the rest are reported only).
STRICT_PAGES = ("index",)
_TIMEOUT = 120  # seconds for one browser run: a stuck browser is an error, not a hang

# Runs in the page once it is laid out; the result goes into the DOM, which
# the browser then prints (--dump-dom), so no driver is needed.
_PROBE = """
<script>
window.addEventListener("load", () => {
  const wide = [];
  document.querySelectorAll("div.highlight pre").forEach((pre) => {
    if (pre.scrollWidth > pre.clientWidth + 1) {
      const lines = pre.textContent.split("\\n");
      const first = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
      wide.push({over: pre.scrollWidth - pre.clientWidth, line: first.slice(0, 80)});
    }
  });
  const page = document.documentElement.scrollWidth - window.innerWidth;
  const out = document.createElement("pre");
  out.id = "treegraft-probe";
  out.textContent = JSON.stringify({wide: wide, page_over: page});
  document.body.appendChild(out);
});
</script>
"""
_RESULT = re.compile(r"<pre id=\"treegraft-probe\"[^>]*>(.*?)</pre>", re.S)


@dataclass
class Page:
    """What the browser saw of one page."""

    name: str  # the page's source path without `.md`, e.g. `howto/nnx`
    png: Path
    wide: list[dict]  # code blocks that scroll sideways: {"over": px, "line": text}
    page_over: int  # px by which the page is wider than the window (<= 0: it fits)

    @property
    def failed(self) -> bool:
        return self.page_over > 0 or (self.name in STRICT_PAGES and bool(self.wide))


def find_browser() -> str | None:
    """The path of a Chromium-like browser on PATH, else None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def page_names(docs: Path = DOCS) -> list[str]:
    """The docs pages, one per `.md` source, as paths without the suffix."""
    skip = {"_build"}
    names = []
    for md in sorted(docs.rglob("*.md")):
        rel = md.relative_to(docs)
        if not skip & set(rel.parts):
            names.append(rel.with_suffix("").as_posix())
    return names


def build(out: Path) -> Path:
    """Builds the HTML docs with warnings as errors; returns the folder."""
    subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        check=True,
        timeout=600,
    )
    return out / "html"


def _browser(browser: str, width: int, height: int, *args: str) -> str:
    """Runs headless Chromium once; its stdout."""
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-dev-shm-usage", f"--window-size={width},{height}",
        "--virtual-time-budget=3000", *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(browser).name} failed ({result.returncode}): "
                           f"{result.stderr.strip()[-400:]}")
    return result.stdout


def shoot(browser: str, html: Path, name: str, out: Path, width: int, height: int) -> Page:
    """One page's screenshot and what its code blocks do at this width."""
    source = html / f"{name}.html"
    png = out / f"{name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    _browser(browser, width, height, f"--screenshot={png}", source.as_uri())
    # A copy with the probe, beside the page so that its relative links resolve.
    probe = source.with_name(f".probe-{source.name}")
    text = source.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    try:
        dom = _browser(browser, width, height, "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    match = _RESULT.search(dom)
    if match is None:
        raise RuntimeError(f"{name}: the probe did not run (no result in the page)")
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&")
                        .replace("&lt;", "<").replace("&gt;", ">"))
    return Page(name, png, result["wide"], result["page_over"])


def run(html: Path, out: Path, *, width: int = 1366, height: int = 768,
        browser: str | None = None, names: list[str] | None = None) -> list[Page]:
    """Shoots every page; returns what was seen."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError(f"no browser found: install one of {', '.join(BROWSERS)}")
    return [shoot(browser, html, name, out, width, height) for name in (names or page_names())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, help="built HTML docs (default: build them)")
    parser.add_argument("--out", type=Path, default=DOCS / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1366)
    parser.add_argument("--height", type=int, default=768)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        html = args.html or build(Path(tmp))
        pages = run(html, args.out, width=args.width, height=args.height)
    for page in pages:
        state = "FAIL" if page.failed else "ok  "
        note = f"; page {page.page_over}px too wide" if page.page_over > 0 else ""
        print(f"{state} {page.name}: {len(page.wide)} code blocks scroll sideways{note}")
        for block in page.wide:
            print(f"       +{block['over']}px  {block['line']}")
    print(f"screenshots in {args.out}")
    return 1 if any(p.failed for p in pages) else 0


if __name__ == "__main__":
    sys.exit(main())
