"""The public signatures tell the truth to a type checker (mypy, as a typed caller runs it).

A mapping's values may be paths, `None` (keep) or operations, and `cast` is
False, True or "unsafe": code written that way type-checks, and a value of
another type is flagged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """
import jax.numpy as jnp
import treegraft as tg

state = {"w": jnp.zeros(2), "head": jnp.zeros(2)}
tg.graft(state, state, {"w": "w", "head": None})
tg.graft(state, state, {"w": tg.cast("w", jnp.float32)}, cast="unsafe")
tg.plan(state, state, {tg.parse_path("w"): "w"}, cast=True)
tg.PartialKauldronLoader(workdir="x", new_to_old={"params": "params", "params.head": None})
"""

BAD = """
import jax.numpy as jnp
import treegraft as tg

state = {"w": jnp.zeros(2)}
tg.graft(state, state, {"w": 3})
tg.graft(state, state, {"w": "w"}, cast="yes")
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One mypy cache for the module: the second run reuses the first one's analysis."""
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(code: str, tmp_path, cache) -> tuple[int, str]:
    path = tmp_path / "caller.py"
    path.write_text(textwrap.dedent(code))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir",
         str(cache), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MYPYPATH": ROOT},
    )
    return run.returncode, run.stdout + run.stderr


def test_keep_rules_operations_and_cast_options_type_check(tmp_path, cache):
    code, out = _mypy(GOOD, tmp_path, cache)
    assert code == 0, out


def test_values_of_other_types_are_flagged(tmp_path, cache):
    code, out = _mypy(BAD, tmp_path, cache)
    assert code == 1, out
    assert "caller.py:6: error" in out and "[dict-item]" in out
    assert "caller.py:7: error" in out and "Literal['yes']" in out
