"""Problems of a plan, their kinds and sections, remedies, and the one error that lists them.

Every check returns `Problem`s; this module turns them into a `GraftError`,
typed by their kinds, whose message groups them by kind and ends with the
remedies chosen by their causes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from treegraft._errors import GraftError, MappingError, MismatchError, PathNotFoundError, suggest
from treegraft._parse.paths import Part, Path, render_parts

Parts = tuple[Part, ...]


_LISTED = 20  # problems listed per kind in a message before "... and N more"

# Problem kinds and what each one means for the user.
_KEY_KINDS = ("missing", "unexpected", "unmatched_rule", "unmatched_ignore")
_MISMATCH_KINDS = ("shape", "dtype", "structure")
_SECTIONS = {
    "unmatched_rule": "rules that match nothing",
    "unmatched_ignore": "ignore patterns that match nothing",
    "missing": "missing in the source: target leaves covered by a rule with no source leaf",
    "unexpected": "unexpected in the source: source leaves under a rule with no target leaf",
    "structure": "structure differs",
    "shape": "shape differs",
    "dtype": "dtype differs (casting is never implicit)",
    "tie": "rules tied on the same leaf (make one more specific)",
    "abstract": "source leaves without values",
}



@dataclass(frozen=True)
class Problem:
    """One thing wrong with a graft.

    Attributes:
      kind: "missing", "unexpected", "unmatched_rule", "unmatched_ignore",
        "shape", "dtype", "structure" or "tie".
      message: one line that names the paths and shows both sides.
      target: the path in the state, where there is one.
      source: the path in the source, where there is one.
      rule: the rule involved, as "'new' <- 'old'", where there is one.
      pattern: the ignore pattern involved, where there is one.
      remedy: the fix that fits this problem's cause, or "" when the message
        says it (a close name) or there is no generic fix.
    """

    kind: str
    message: str
    target: Path | None = None
    source: Path | None = None
    rule: str | None = None
    pattern: str | None = None
    remedy: str = ""


Problem.__module__ = "treegraft"


def _keep_remedy(target: Parts) -> str:
    return (
        f"to keep the state's values where the source has none, map them to None "
        f"({{{render_parts(target)!r}: None}}) or add them to ignore_model_keys"
    )


def _count(n: int, one: str, many: str | None = None) -> str:
    """'1 problem', '2 problems': a count with its noun in the right number."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def _ranges(indices: list[int]) -> str:
    """'0, 2, 3' or, past ten, '0, 1, 2, ..., 31' (indices ascending)."""
    if not indices:
        return "none"
    if len(indices) <= 10:
        return ", ".join(map(str, indices))
    return ", ".join(map(str, indices[:3])) + f", ..., {indices[-1]}"


def _close_paths(text: str, paths: Sequence[Parts]) -> str:
    return _close_names(text, sorted({render_parts(p) for p in paths[:20000]}))


def _close_names(text: str, names: Sequence[str]) -> str:
    # Whole paths differ in more places than single keys: a lower cutoff.
    return suggest(text, names, cutoff=0.5)


def raise_problems(problems: Sequence[Problem], n_rules: int) -> None:
    """Raises one error listing every problem, typed by their kinds."""
    raise _error(problems, n_rules)


def _error(problems: Sequence[Problem], n_rules: int) -> GraftError:
    kinds = {p.kind for p in problems}
    lines = [f"cannot graft ({_count(n_rules, 'rule')}): {_count(len(problems), 'problem')}"]
    for kind, title in _SECTIONS.items():
        group = [p for p in problems if p.kind == kind]
        if not group:
            continue
        lines.append(f"{title}: {len(group)}")
        lines += ["  " + p.message for p in group[:_LISTED]]
        if len(group) > _LISTED:
            lines.append(f"  ... and {len(group) - _LISTED} more")
    remedies = list(dict.fromkeys(p.remedy for p in problems if p.remedy))
    if remedies:
        lines.append("to fix:")
        lines += [f"  - {remedy}" for remedy in remedies[:_LISTED]]
    message = "\n".join(lines)
    cls: type[GraftError]
    if kinds <= set(_KEY_KINDS):
        cls = PathNotFoundError
    elif kinds <= set(_MISMATCH_KINDS):
        cls = MismatchError
    elif kinds == {"tie"}:
        cls = MappingError
    else:
        cls = GraftError
    return cls(message, problems=problems)
