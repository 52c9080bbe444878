"""The plan step: a mapping resolved against a state and a source, every check on metadata.

    planner.py   `plan`: inputs -> resolve -> prefetch -> a chain of checks -> plan
    context.py   `Inputs`: one run's rules, trees and options, and pure look-ups
    resolve.py   `resolve`: the most specific rule per target leaf, and pairing
    instances.py rule instances from both sides; source leaves none mirrors
    resolution.py `Resolution`: what resolve found, immutable, for the checks
    checks.py    checks of the paired leaves: ties, stacks, missing, specs, unfilled, deleted
    coverage.py  checks of unexpected source leaves, rules and ignores that match nothing
    specs.py     what an operation makes of its source's shape and dtype
    problems.py  `Problem`, sections, remedies, and the error listing them all
    record.py    `PlanRecord`: what execute runs on (trees, `Pair`s, byte counts), made once
    result.py    `GraftPlan` (holding one `PlanRecord`) and `Entry`
    targets.py   the target leaves a mapping produces from a source (a layout without `like`)
"""

from treegraft._plan.planner import plan as plan
from treegraft._plan.problems import Problem as Problem
from treegraft._plan.problems import raise_problems as raise_problems
from treegraft._plan.record import Pair as Pair
from treegraft._plan.record import PlanRecord as PlanRecord
from treegraft._plan.result import Entry as Entry
from treegraft._plan.result import GraftPlan as GraftPlan
from treegraft._plan.specs import gathered_spec as gathered_spec
from treegraft._plan.specs import index_box as index_box
from treegraft._plan.specs import output_spec as output_spec

__all__ = ["plan", "GraftPlan", "Entry", "Problem"]
