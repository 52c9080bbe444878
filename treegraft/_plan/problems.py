"""Problems of a plan: their remedies, and the one error that lists them.

Every check returns `Problem`s (defined with the errors, in `treegraft._errors`,
and re-exported here); `raise_problems` turns them into one `GraftError`,
typed by their kinds, whose message groups them by kind and ends with the
remedies chosen by their causes (`GraftError.from_problems`).
"""

from __future__ import annotations

from collections.abc import Sequence

from treegraft._errors import GraftError, Problem, suggest_path
from treegraft._errors import count as _count  # noqa: F401 (the planner's modules use it)
from treegraft._parse.paths import Part, render_parts
from treegraft._tree.index import TreeIndex

__all__ = ["Problem", "raise_problems"]

Parts = tuple[Part, ...]

# The kinds of problem about paths that `strict=False` lets through (an
# abstract target leaf no rule fills then stays abstract: docs/design.md section 5).
_KEY_KINDS = ("missing", "unexpected", "unmatched_rule", "unmatched_ignore", "unfilled")


def _keep_remedy(target: Parts) -> str:
    return (
        f"to keep the state's values where the source has none, map them to None "
        f"({{{render_parts(target)!r}: None}}) or add them to ignore_model_keys"
    )


def _ranges(indices: list[int]) -> str:
    """'0, 2, 3' or, past ten, '0, 1, 2, ..., 31' (indices ascending)."""
    if not indices:
        return "none"
    if len(indices) <= 10:
        return ", ".join(map(str, indices))
    return ", ".join(map(str, indices[:3])) + f", ..., {indices[-1]}"


def _close_paths(text: str, index: TreeIndex) -> str:
    """Close node paths of index for a path or pattern text; a pattern gets patterns.

    The text itself is never suggested: a pattern that names leaves elsewhere
    is not a typo.
    """
    return suggest_path(text, index.names_near(text), not_itself=True)


def raise_problems(problems: Sequence[Problem], n_rules: int) -> None:
    """Raises one error listing every problem, typed by their kinds."""
    raise GraftError.from_problems(problems, rules=n_rules)
