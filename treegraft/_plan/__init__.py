"""The plan step: a mapping resolved against a state and a source, every check on metadata.

    planner.py   `plan`: parse the mapping, index both trees, run the steps
    state.py     the tables one run shares, and its look-ups
    resolve.py   the most specific rule per target leaf; pairing
    leaves.py    checks of each pair and of target leaves without a source
    coverage.py  unexpected source leaves; rules and ignores that match nothing
    specs.py     what an operation makes of its source's shape and dtype
    problems.py  `Problem`, sections, remedies, and the error listing them all
    result.py    `GraftPlan`, `Entry`, `Pair`
"""

from treegraft._plan.planner import plan as plan
from treegraft._plan.problems import Problem as Problem
from treegraft._plan.problems import raise_problems as raise_problems
from treegraft._plan.result import Entry as Entry
from treegraft._plan.result import GraftPlan as GraftPlan
from treegraft._plan.result import Pair as Pair
from treegraft._plan.specs import gathered_spec as gathered_spec
from treegraft._plan.specs import index_box as index_box
from treegraft._plan.specs import output_spec as output_spec

__all__ = ["plan", "GraftPlan", "Entry", "Problem", "Pair"]
