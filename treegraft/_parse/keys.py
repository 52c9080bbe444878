"""Int path parts and their digits as keys: the one place `0` meets `'0'`.

orbax saves int dict keys as strings (`{0: x}` comes back as `{'0': x}`), so
a path part `0` also finds the key `'0'`: a child (`finds_digits`), a pattern
segment, and every look-up by path (`loose`) go through here
(docs/design.md section 3).
"""

from __future__ import annotations

from treegraft._parse.paths import Part

__all__ = ["loose", "loose_part", "finds_digits", "could_loosen"]

Parts = tuple[Part, ...]


def loose_part(part: Part) -> Part:
    """A part as loose look-ups compare it: an int as its digits, anything else as it is."""
    return str(part) if type(part) is int else part


def loose(parts: Parts) -> Parts:
    """Parts with int keys as strings: orbax saves int dict keys as '0'."""
    # loose_part inlined: this runs once per leaf when an index is built.
    return tuple(str(p) if type(p) is int else p for p in parts)


def finds_digits(wanted: Part, key: Part) -> bool:
    """Whether an int path part finds a string key of its digits (`0` finds `'0'`).

    Only that way round: the exact key is always looked for first, and a
    string part `'0'` is a string key.
    """
    return type(wanted) is int and type(key) is str and key == str(wanted)


def could_loosen(parts: Parts) -> bool:
    """Whether loose() could make parts equal to another path: an int, or digits, in them."""
    for p in parts:
        if type(p) is int or (type(p) is str and p.lstrip("-").isdigit()):
            return True
    return False
