"""The layout a convert writes when no `like` is given: derived from the mapping alone.

docs/design.md section 15: every target leaf a rule produces, named by the
rule's new side with its captures bound from the source leaves it matches,
shaped by the plan's spec arithmetic over the rule's tree. The plan's own
machinery finds them (`treegraft._plan.targets.produced_leaves`: the same
captures, the same most specific rule, the same specs); this module only
refuses what cannot be derived and builds the abstract tree of
`jax.ShapeDtypeStruct`s that the normal plan then checks as a graft target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from treegraft._errors import MappingError
from treegraft._parse.rules import Rule
from treegraft._plan.targets import leaf_spec, nest, produced_leaves
from treegraft._tree.index import TreeIndex

__all__ = ["derive_like", "abstract_of", "is_identity"]


def abstract_of(leaf: Any) -> jax.ShapeDtypeStruct:
    """A leaf's shape and dtype as a `jax.ShapeDtypeStruct` (a Python scalar as a 0-d array)."""
    return jax.ShapeDtypeStruct(*leaf_spec(leaf))


def is_identity(rules: Sequence[Rule]) -> bool:
    """Whether the mapping copies the whole source as it is (`{"": ""}`, what `save` uses)."""
    return (
        len(rules) == 1
        and rules[0].gather == "copy"
        and not rules[0].steps
        and rules[0].old is not None
        and rules[0].new.text == ""
        and rules[0].old.text == ""
    )


def derive_like(rules: Sequence[Rule], source: TreeIndex) -> Any:
    """The abstract target tree the rules make of the source's leaves.

    Raises:
      MappingError: a keep rule (nothing to keep without `like`), or the
        rules produce no leaf at all.
      GraftError: a rule cannot make a leaf it produces (an operation that
        does not fit the source's shape or dtype, a stack that is no full
        grid, a reference the source lacks), every one listed; a
        `MappingError` where rules make a leaf and a subtree at one path.
    """
    keeps = [rule for rule in rules if rule.old is None]
    if keeps:
        names = ", ".join(repr(rule.new.text) for rule in keeps)
        raise MappingError(
            f"the keep rule(s) {names} keep a value of `like`, and no `like` was given: "
            "remove them, or pass like= (the tree whose values they keep)"
        )
    found = produced_leaves(rules, source)
    if not found:
        raise MappingError(
            "the mapping produces no leaf from this source: no rule's source side matches "
            "a source path (look at the source's paths with tg.flatten, or pass like=)"
        )
    return nest({parts: jax.ShapeDtypeStruct(*spec) for parts, spec in found.items()})
