"""`--mapping FILE`: a mapping kept in a Python file (`file.py:NAME`) or a JSON file.

A Python file runs as a script (as `python file.py` would, with `__name__`
not `'__main__'`) and `NAME` is one of its module-level variables: a dict
whose values are paths, `None` or `tg.stack(...)`-style operations. A JSON
file is one object `{"new": "old", ...}` whose values are written as `--map`
writes them (a path, `null` for a keep rule, or an operation such as
`"stack(params.layers_*, axis=0)"`).
"""

from __future__ import annotations

import json
import os
import runpy
from collections.abc import Mapping
from typing import Any

from treegraft._app.map_text import parse_rule_value
from treegraft._errors import KEY_CUTOFF, MappingError, suggest

__all__ = ["load_mapping"]


def load_mapping(spec: str) -> dict[Any, Any]:
    """The mapping that `--mapping SPEC` names: `file.py:NAME` or `file.json`.

    Raises:
      MappingError: the file is missing or unreadable, is not valid JSON, fails
        to run, lacks NAME, or NAME is not a mapping.
    """
    if spec.endswith(".json"):
        return _from_json(os.path.expanduser(spec))
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name:
        raise MappingError(
            f"--mapping {spec!r}: give a Python file and the name of its mapping, "
            f"FILE.py:NAME (e.g. mapping.py:MAPPING), or a JSON file, FILE.json"
        )
    return _from_python(os.path.expanduser(path), name, spec)


def _from_json(path: str) -> dict[Any, Any]:
    """The rules of a JSON object whose values are `--map` texts or null."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise MappingError(f"--mapping {path!r}: cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MappingError(f"--mapping {path!r}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MappingError(
            f"--mapping {path!r}: the JSON must be one object {{\"new.path\": \"old.path\", ...}}, "
            f"got {type(data).__name__}"
        )
    mapping: dict[Any, Any] = {}
    for new, old in data.items():
        where = f"--mapping {path!r}, key {new!r}"
        if old is None:
            mapping[new] = None
        elif isinstance(old, str):
            mapping[new] = parse_rule_value(old, where=where)
        else:
            raise MappingError(
                f"{where}: a value is a path or operation as text, or null (keep); "
                f"got {json.dumps(old)}"
            )
    return mapping


def _from_python(path: str, name: str, spec: str) -> dict[Any, Any]:
    """NAME of the Python file at path, run as a script."""
    if not os.path.isfile(path):
        raise MappingError(f"--mapping {spec!r}: no file {path!r}")
    try:
        names = runpy.run_path(path, run_name="treegraft_mapping")
    except BaseException as e:  # the user's code: any failure is reported, not a traceback
        if isinstance(e, KeyboardInterrupt):
            raise
        raise MappingError(
            f"--mapping {spec!r}: running {path!r} raised {type(e).__name__}: {e}"
        ) from None
    if name not in names:
        public = [n for n in names if not n.startswith("_")]
        raise MappingError(
            f"--mapping {spec!r}: {path!r} defines no {name!r}"
            + suggest(name, public, cutoff=KEY_CUTOFF)
        )
    value = names[name]
    if not isinstance(value, Mapping):
        raise MappingError(
            f"--mapping {spec!r}: {name} is a {type(value).__name__}, not a mapping; "
            f"it must be a dict {{'new.path': 'old.path', ...}}"
        )
    return dict(value)
