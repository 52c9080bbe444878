"""Sphinx configuration for the treegraft documentation (Sphinx + MyST).

Build it with warnings as errors:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import inspect
import os
import re
import sys

# Document the checkout this file belongs to, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import treegraft  # noqa: E402

project = "treegraft"
author = "the treegraft authors"
copyright = "the treegraft authors"
release = treegraft.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

root_doc = "index"
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: anchors for headings (so that `page.md#section` links resolve) and
# `:::` fences for admonitions, and "term\n: definition" lists.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# Docstrings are Google style; `name` in a docstring links when it can.
default_role = "py:obj"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not duplicate attribute entries
# "Returns:" sections are prose ("The captures in order, or None when ...: ..."),
# not "type: description" pairs: render them as written.
napoleon_custom_sections = ["Returns"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# The theme of the jax, flax, optax and orbax docs (the `docs` extra installs it).
html_theme = "sphinx_book_theme"
html_title = f"treegraft {release}"
html_theme_options = {
    "show_toc_level": 2,  # a page's sections in its right-hand column
    "home_page_in_toc": True,
}


# Docstrings are written with Markdown habits: `Name`s needs an escaped space
# in reStructuredText, and `<workdir>/ckpt_<step>` an escaped '<'.
_INLINE = re.compile(r"``.+?``|`[^`\n]+`")


def _unglue(match: re.Match[str]) -> str:
    text = match.group()
    if not text.startswith("``") and text.endswith(">`") and "<" in text:
        # `ckpt_<step>` would be read as a link titled "ckpt_" to "step".
        i = text.rindex("<")
        text = text[:i] + "\\" + text[i:]
    after = match.string[match.end() : match.end() + 1]
    return text + ("\\ " if after.isalnum() else "")


def _unglue_backticks(app, what, name, obj, options, lines):
    if what == "property" and getattr(obj, "__doc__", None):
        # napoleon reads "Words: more words." on a property as "type: description";
        # these docstrings are plain sentences.
        lines[:] = inspect.cleandoc(obj.__doc__).splitlines()
    lines[:] = [_INLINE.sub(_unglue, line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _unglue_backticks)
