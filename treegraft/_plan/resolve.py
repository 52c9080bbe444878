"""Rule resolution: which rule covers each target leaf, and which source leaves feed it.

DESIGN section 4: the longest matched new prefix wins, then the rule with
more literal segments; still equal is a tie. Each winner's leaf is paired
with its source leaf (for a stack, its source leaves; for an unstack, one
index of one leaf), and every pair's specs are checked.
"""

from __future__ import annotations

from typing import Any

from treegraft._parse.paths import Part, Path, render_parts
from treegraft._plan.leaves import LeafChecks
from treegraft._plan.problems import Problem
from treegraft._plan.result import Pair

Parts = tuple[Part, ...]


class Resolve(LeafChecks):
    """Rule resolution: the most specific rule per target leaf, then its source leaves."""

    def _assign_rules(self) -> tuple[list[int], list[int], list[int]]:
        """Finds, per target leaf, the most specific rule covering it."""
        n = len(self.tgt)
        winner = [-1] * n
        prefix_len = [0] * n
        rank: list[tuple[int, int]] = [(-1, -1)] * n
        hits = [0] * len(self.rules)
        # Per leaf, the rules tied with its current winner; a more specific rule
        # found later clears them, so the result does not depend on rule order.
        tied: dict[int, list[int]] = {}
        paths = self.tgt.paths
        everything = range(n)
        # The winning rule's captures, so that pairing need not match again.
        captures = self._captures = [()] * n
        for r, rule in enumerate(self.rules):
            match = rule.new.prefix_matcher()
            literals = rule.new.literal_count
            # Only the leaves under a rule's literal prefix can match it: with
            # one rule per subtree, planning stays linear in rules + leaves.
            head = rule.new.literal_prefix()
            for i in self.tgt.under(head) if head else everything:
                parts = paths[i]
                m = match(parts)
                if m is None:
                    continue
                hits[r] += 1
                key = (m[0], literals)
                if key > rank[i]:
                    if winner[i] >= 0:
                        self._outranked.append((winner[i], i, prefix_len[i]))
                    rank[i], winner[i], prefix_len[i] = key, r, m[0]
                    captures[i] = m[1]
                    tied.pop(i, None)
                elif key == rank[i]:
                    tied.setdefault(i, []).append(r)
                else:
                    self._outranked.append((r, i, m[0]))
        ties: dict[tuple[int, int], int] = {}
        for i, others in tied.items():
            for b in others:
                ties.setdefault((winner[i], b), i)
        for (a, b), i in ties.items():
            self.problems.append(
                Problem(
                    "tie",
                    f"{self.rules[a]} and {self.rules[b]} both cover "
                    f"{render_parts(paths[i])!r} with a prefix of the same length and as "
                    "many literal segments",
                    target=Path(paths[i]),
                    rule=str(self.rules[b]),
                )
            )
        return winner, prefix_len, hits

    def _pair_leaves(
        self, winner: list[int], prefix_len: list[int]
    ) -> tuple[dict[tuple[int, Parts], Parts | None], list[Pair]]:
        """Pairs each covered target leaf with its source leaves; checks specs."""
        tgt, src = self.tgt, self.src
        # (rule, new prefix) -> old prefix, or None when it is not in the source.
        instances: dict[tuple[int, Parts], Parts | None] = {}
        # (rule, new prefix) -> {index: old prefix} of a stack rule.
        members: dict[tuple[int, Parts], dict[int, Parts] | None] = {}
        # (rule, new prefix) -> the index an unstack rule takes.
        taken: dict[tuple[int, Parts], int | None] = {}
        pairs: list[Pair] = []
        reported: set[tuple[int, Parts]] = set()
        rules = self.rules
        for i, r in enumerate(winner):
            if r < 0:
                continue
            rule = rules[r]
            if rule.old is None:
                continue  # a keep rule: the leaf keeps its value
            parts = tgt.paths[i]
            n = prefix_len[i]
            new_prefix = parts[:n]
            key = (r, new_prefix)
            if rule.gather == "stack":
                if key not in members:
                    members[key] = self._stack_members(r, new_prefix)
                group = members[key]
                if not group:
                    instances.setdefault(key, None)
                    if group is None and not self._ignored_model(parts, n) and key not in reported:
                        reported.add(key)
                        self._missing_prefix(r, new_prefix)
                    continue
                found = [src.find(op + parts[n:]) for op in group.values()]
                if any(si is None for si in found):
                    for op, si in zip(group.values(), found, strict=True):
                        if si is None:
                            self._missing_leaf(i, r, n, op)
                            break
                    continue
                pairs.append(Pair(i, found[0], r, tuple(found)))  # type: ignore[arg-type]
                continue
            if key in instances:
                old_prefix = instances[key]
            else:
                old_prefix = self._old_prefix(r, new_prefix, self._captures[i])
                instances[key] = old_prefix
                if rule.gather == "unstack":
                    taken[key] = self._unstack_index(r, new_prefix)
            if old_prefix is None:
                if not self._ignored_model(parts, n) and key not in reported:
                    reported.add(key)
                    self._missing_prefix(r, new_prefix)
                continue
            si = src.find(parts if old_prefix == new_prefix else old_prefix + parts[n:])
            if si is None:
                self._missing_leaf(i, r, n, old_prefix)
                continue
            if rule.gather == "unstack":
                index = taken[key]
                if index is None:
                    continue  # reported by _unstack_index
                pairs.append(Pair(i, si, r, (), index))
            else:
                pairs.append(Pair(i, si, r))
        for key, group in members.items():
            for op in (group or {}).values():
                self._stack_instances.append((key[0], key[1], op))
            if group:
                instances[key] = next(iter(group.values()))
        tleaves, sleaves = tgt.leaves, src.leaves
        if self.lazy is not None and pairs:
            # One batch for the metadata of every paired source leaf.
            needed: list[Any] = []
            for pair in pairs:
                needed.extend(sleaves[si] for si in (pair.sources or (pair.source,)))
            self.lazy.prefetch(needed)
        agreed = []
        for pair in pairs:
            rule = rules[pair.rule]
            if rule.gather == "copy" and not rule.steps:
                if self._specs_agree(tleaves[pair.target], sleaves[pair.source]):
                    agreed.append(pair)
                else:
                    self._mismatch(pair.target, pair.source, pair.rule)
            elif self._op_agrees(pair):
                agreed.append(pair)
        return instances, agreed
