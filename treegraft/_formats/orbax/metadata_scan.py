"""orbax's `_METADATA` in the exact form orbax writes it, read by a scan instead of `json`.

`json.loads` of the `_METADATA` of 100,000 leaves (23 MB) makes about ten
objects per entry and costs 0.2 s; a plan needs four strings of each. orbax
writes the file with `json.dumps` and its default separators, so the text of
every entry has one shape. `scan` checks that the whole tree part of the text
has that shape (one regular-expression match, in C), takes the four strings of
each entry (a second one), and leaves the rest of the file to `json`. Any
other text (escapes in a key, other spacing, other fields, a duplicate name)
returns None: the caller then parses it with `json` as before, so what the
scan accepts is read exactly as `json` reads it, and nothing else is read by it.
"""

from __future__ import annotations

import json
import operator
import re
from typing import Any

__all__ = ["Entry", "scan", "scan_keys"]

# A JSON string's body without escapes or control characters: its text is its value.
# Possessive: it is always followed by a '"' it cannot match, so giving back cannot help.
_STR = r'[^"\\\x00-\x1f]*+'
_INT = r"(?:0|[1-9][0-9]*)"
_KEY = r'\{"key": "' + _STR + r'", "key_type": [12]\}'


def _entry(groups: bool) -> str:
    """One tree entry as orbax writes it; with groups, capturing its four strings."""
    g = "(" if groups else "(?:"
    seq = "(1)" if groups else "1"
    return (
        '"' + g + _STR + r')": \{"key_metadata": \['
        + g + "(?:" + _KEY + r", )*)"
        + r'\{"key": "' + g + _STR + r')", "key_type": (?:' + seq + r"|2)\}\], "
        + r'"value_metadata": \{"value_type": "' + g + _STR + r')"'
        + r'(?:, "skip_deserialize": (?:true|false))?'
        + r"(?:, \"write_shape\": \[(?:" + _INT + r"(?:, " + _INT + r")*)?\])?\}\}"
    )


_PLAIN = _entry(False)
# Possessive: a failed match gives up at once instead of backtracking 100,000 entries.
_TREE = re.compile(r'\{"tree_metadata": \{(?:' + _PLAIN + r"(?:, " + _PLAIN + r")*+)?\}")
_ENTRY = re.compile(_entry(True))
_KEYS = re.compile(r'\{"key": "(' + _STR + r')", "key_type": (?:(1)|2)\}')


# One tree entry, as scanned: (name, parent, key, sequence, value_type). name:
# orbax's rendering of its keys; parent: the text of every key but the last
# (equal texts, one parent; `scan_keys` reads it); key: the last key as saved
# (a list index as its digits); sequence: "1" when the last key is a list
# index, "" for a dict key; value_type: "jax.Array", "scalar", "Dict", ...
Entry = tuple[str, str, str, str, str]


def scan(text: bytes) -> tuple[dict[str, Any], list[Entry]] | None:
    """The fields of `_METADATA` but its tree, and the tree's entries; None if not orbax's text.

    The fields dict holds `tree_metadata` as an empty dict; the entries come
    in the file's order. None means: parse the text with `json` instead.

    Example:
      >>> text = (b'{"tree_metadata": {"(\\'a\\',)": {"key_metadata": [{"key": "a", '
      ...         b'"key_type": 2}], "value_metadata": {"value_type": "scalar", '
      ...         b'"skip_deserialize": false}}}, "use_ocdbt": true}')
      >>> fields, entries = scan(text)
      >>> fields, entries
      ({'tree_metadata': {}, 'use_ocdbt': True}, [("('a',)", '', 'a', '', 'scalar')])
      >>> scan(b'{"use_ocdbt": true, "tree_metadata": {}}') is None  # another order
      True
    """
    try:
        body = text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    whole = _TREE.match(body)
    if whole is None:
        return None
    end = whole.end()
    rest = body[end:]
    if '"tree_metadata"' in rest:
        return None  # a second tree_metadata: json keeps the last one
    try:
        fields = json.loads('{"tree_metadata": {}' + rest)
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("tree_metadata") != {}:
        return None
    entries: list[Entry] = _ENTRY.findall(body, 0, end)
    if len(set(map(_NAME, entries))) != len(entries):
        return None  # a name twice: json keeps the last entry of that name
    return fields, entries


_NAME = operator.itemgetter(0)


def scan_keys(parent: str) -> list[tuple[str, str]]:
    """The (key, sequence) pairs of an `Entry.parent` text, outer first.

    Example:
      >>> scan_keys('{"key": "layers", "key_type": 2}, {"key": "0", "key_type": 1}, ')
      [('layers', ''), ('0', '1')]
    """
    return _KEYS.findall(parent)
