"""Fast paths of planning and in-memory grafts give what the slow ones gave.

Proves, on behaviour only (the timings are in `benchmarks/run.py` and
`benchmarks/planscale.py`):
- the grouping of repeated problems finds the same indices inside quoted paths as
  a scan of every quoted string (the algorithm it replaced, kept here as the oracle),
  and never one outside quotes (a shape such as float32[2]);
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from treegraft._errors import _slots

_QUOTED = re.compile(r"(?<!\w)(?:'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\")")
_INDEX = re.compile(r"\[(-?\d+)\]")


def _slots_by_quote(text: str) -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    """The oracle: every quoted string searched for indices on its own."""
    pieces, firsts, values = [], [], []
    last = 0
    for quoted in _QUOTED.finditer(text):
        for m in _INDEX.finditer(text, quoted.start() + 1, quoted.end() - 1):
            pieces.append(text[last : m.start()])
            firsts.append(m.start() == quoted.start() + 1)
            values.append(int(m.group(1)))
            last = m.end()
    pieces.append(text[last:])
    return tuple(pieces), tuple(firsts), tuple(values)


# Texts made of the characters that matter: quotes, escapes, brackets, digits, letters.
_TEXTS = st.lists(
    st.sampled_from(["'", '"', "\\", "[", "]", "-", "0", "7", "12", "a", "w", ".", " ", "\n", "*"]),
    max_size=40,
).map("".join)


@given(_TEXTS)
def test_slots_match_a_scan_of_every_quoted_string(text):
    assert _slots(text) == _slots_by_quote(text)


def test_slots_take_indices_in_quotes_only():
    text = "'dec.l[3].w' in the state is float32[1], 'enc[0].w' in the source is float32[2]"
    pieces, firsts, values = _slots(text)
    assert values == (3, 0)
    assert firsts == (False, False)
    assert "float32[1]" in pieces[1] and pieces[-1].endswith("float32[2]")
    assert _slots("no index here: float32[2]") == (("no index here: float32[2]",), (), ())
