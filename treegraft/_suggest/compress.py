"""Compression: matched units written as few rules, globs and operations included.

The third step of `suggest` (docs/design.md section 18). A matched pair of
units is one rule whose sides are the units' templates (`layers_*` and
`model.layers.*`, captures carried across), wrapped in `stack`, `unstack`,
`transpose` or `cast` as the pair needs; plain copies whose siblings all go
the same way merge into their parents' rule (`params.encoder ←
params.encoder`), and the state leaves left alone become keep rules, merged
the same way. The number of rules follows the kinds of leaves, never the
number of layers. A rule is written as a glob only when the glob covers
exactly the leaves it was made for, on both sides; otherwise the unit's
leaves get one rule each, so a rule never reaches a leaf it was not meant for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from treegraft._parse.ops import Operation, cast, stack, transpose, unstack
from treegraft._parse.paths import Part, render_parts
from treegraft._parse.patterns import parse_pattern
from treegraft._suggest.match import Pair, Unit
from treegraft._suggest.names import Wild

__all__ = ["Rule", "Leaves", "render", "rules_for_pairs", "keep_rules", "merge"]

Parts = tuple[Part, ...]


@dataclass
class Rule:
    """One rule of the suggested mapping, with the leaves it covers and why."""

    new: tuple[Any, ...]  # template parts (Wild for a capture)
    old: tuple[Any, ...] | None  # None for a keep rule
    pairs: list[Pair] = field(default_factory=list)
    new_leaves: frozenset[Parts] = frozenset()
    old_leaves: frozenset[Parts] = frozenset()

    @property
    def signature(self) -> tuple[str, bool, str] | None:
        """How every pair of the rule goes (relation, transposed, cast), or None if not alike.

        Rules alike in this merge into their parents' rule: an operation
        applies to each leaf under its rule, with the same suffix.
        """
        signs = {(p.relation, p.transposed, str(p.cast)) for p in self.pairs}
        return signs.pop() if len(signs) == 1 else None

    @property
    def plain(self) -> bool:
        """A copy with no operation: it may merge into its parents' rule."""
        return self.old is not None and all(
            p.relation == "equal" and not p.transposed and p.cast is None for p in self.pairs)

    def value(self) -> str | Operation | None:
        """The mapping value: a path or pattern string, an operation, or None (keep)."""
        if self.old is None:
            return None
        old = render(self.old)
        if self.plain:
            return old
        pair = self.pairs[0]
        value: str | Operation = old
        if pair.relation == "stack":
            value = stack(old, axis=0)
        elif pair.relation == "unstack":
            value = unstack(old, axis=0)
        if pair.transposed:
            value = transpose(value, (0, 2, 1) if pair.relation == "stack" else (1, 0))
        if pair.cast is not None:
            value = cast(value, pair.cast)
        return value


class Leaves:
    """All leaf paths of one side, to check which a pattern prefix reaches."""

    def __init__(self, paths: Sequence[Parts]):
        self.paths = list(paths)
        # Leaves by their literal first parts (as text: a pattern's `3` also
        # finds a key '3'), so a check looks only at the leaves it may reach.
        self._by_prefix: dict[tuple[str, ...], list[Parts]] = defaultdict(list)
        for path in self.paths:
            for n in range(len(path) + 1):
                self._by_prefix[tuple(map(str, path[:n]))].append(path)

    def under(self, template: tuple[Any, ...]) -> frozenset[Parts]:
        """The leaves a rule whose side is `template` reaches (by prefix, as rules match)."""
        literal = []
        for part in template:
            if isinstance(part, Wild):
                break
            literal.append(str(part))
        matcher = parse_pattern(render(template)).prefix_matcher()
        near = self._by_prefix.get(tuple(literal), [])
        return frozenset(p for p in near if matcher(p) is not None)


def render(template: tuple[Any, ...]) -> str:
    """A template as pattern text: captures as `*` globs, other parts as paths render them."""
    out = []
    for i, part in enumerate(template):
        if isinstance(part, Wild):
            out.append(part.text if i == 0 else "." + part.text)
        else:
            out.append(render_parts((part,)) if i == 0 else render_parts(("x", part))[1:])
    return "".join(out)


def rules_for_pairs(pairs: Sequence[Pair], state: Leaves, source: Leaves) -> tuple[
        list[Rule], list[Pair]]:
    """One rule per pair where its globs are exact, else one per leaf; and the pairs dropped."""
    rules, dropped = [], []
    for pair in pairs:
        new_leaves = frozenset(leaf.parts for leaf in pair.state.leaves)
        old_leaves = frozenset(leaf.parts for leaf in pair.source.leaves)
        if state.under(pair.state.template) == new_leaves and \
                source.under(pair.source.template) == old_leaves:
            rules.append(Rule(pair.state.template, pair.source.template, [pair], new_leaves,
                              old_leaves))
        elif pair.relation == "equal":
            by_index = {leaf.indices: leaf.parts for leaf in pair.source.leaves}
            for leaf in pair.state.leaves:
                old = by_index[leaf.indices]
                rules.append(Rule(leaf.parts, old, [pair], frozenset({leaf.parts}),
                                  frozenset({old})))
        else:
            dropped.append(pair)  # a stack needs its glob: without an exact one, no rule
    return rules, dropped


def keep_rules(units: Sequence[Unit], state: Leaves) -> list[Rule]:
    """Keep rules (value None) for state units no source leaf feeds."""
    rules = []
    for unit in units:
        leaves = frozenset(leaf.parts for leaf in unit.leaves)
        if state.under(unit.template) == leaves:
            rules.append(Rule(unit.template, None, [], leaves))
        else:
            rules.extend(Rule(p, None, [], frozenset({p})) for p in sorted(leaves, key=str))
    return rules


def _wilds(template: tuple[Any, ...]) -> int:
    return sum(isinstance(p, Wild) for p in template)


def merge(rules: list[Rule], state: Leaves, source: Leaves) -> list[Rule]:
    """Rules whose siblings all go the same way, merged into their parents' rule, repeatedly."""
    while True:
        groups: dict[tuple[Any, ...], list[Rule]] = defaultdict(list)
        for rule in rules:
            if len(rule.new) < 2:
                continue
            if rule.old is None:
                groups[("keep", rule.new[:-1])].append(rule)
            # A last part that is the same capture on both sides merges too.
            elif rule.signature is not None and len(rule.old) >= 2 and \
                    rule.old[-1] == rule.new[-1] and \
                    _wilds(rule.new[:-1]) - _wilds(rule.old[:-1]) == \
                    _wilds(rule.new) - _wilds(rule.old):
                groups[("copy", rule.new[:-1], rule.old[:-1], rule.signature)].append(rule)
        merged: list[Rule] = []
        gone: set[int] = set()
        for key, group in groups.items():
            new_leaves = frozenset().union(*(r.new_leaves for r in group))
            if state.under(key[1]) != new_leaves:
                continue
            if key[0] == "keep":
                parent = Rule(key[1], None, [], new_leaves)
            else:
                old_leaves = frozenset().union(*(r.old_leaves for r in group))
                if source.under(key[2]) != old_leaves:
                    continue
                parent = Rule(key[1], key[2], [p for r in group for p in r.pairs], new_leaves,
                              old_leaves)
            merged.append(parent)
            gone.update(id(g) for g in group)
        if not merged:
            return rules
        rules = [r for r in rules if id(r) not in gone] + merged
