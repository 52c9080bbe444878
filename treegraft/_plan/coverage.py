"""Coverage checks: unexpected source leaves, rules and ignore patterns that match nothing.

Run after resolution, on its instances (each rule's matched new prefix and
the old prefix it points to): a typo anywhere in a mapping is an error, with
close names suggested.
"""

from __future__ import annotations

from treegraft._errors import GraftError, PathNotFoundError
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._parse.patterns import Pattern
from treegraft._plan.problems import Problem, _close_names, _close_paths
from treegraft._plan.resolve import Resolve
from treegraft._plan.result import Pair
from treegraft._plan.state import _source_prefixes
from treegraft._tree.index import TreeIndex, loose
from treegraft._tree.pytree import resolve

Parts = tuple[Part, ...]


class Coverage(Resolve):
    """Checks that every rule, source leaf and ignore pattern is accounted for."""

    def _check_unexpected(
        self,
        instances: dict[tuple[int, Parts], Parts | None],
        pairs: list[Pair],
    ) -> None:
        """Source leaves under a rule's old prefix that mirror no target leaf."""
        paired: set[int] = set()
        for pair in pairs:
            paired.update(pair.sources or (pair.source,))
        # Compared loosely: a structure problem names the source path with the
        # state's int keys, where a checkpoint holds their strings.
        accounted = {
            loose(p.source.parts)
            for p in self.problems
            if p.kind in ("structure", "shape", "dtype") and p.source
        }
        every = [(r, new, old) for (r, new), old in instances.items()] + self._stack_instances
        for r, new_prefix, old_prefix in dict.fromkeys(every):
            if old_prefix is None or self.rules[r].old is None:
                continue
            k = len(old_prefix)
            hint: str | None = None
            for si in self.src.under(old_prefix):
                if si in paired:
                    continue
                sparts = self.src.paths[si]
                if self.tgt.find(new_prefix + sparts[k:]) is not None:
                    continue  # taken by a more specific rule, or reported already
                if accounted and any(
                    loose(sparts[:j]) in accounted for j in range(1, len(sparts) + 1)
                ):
                    continue
                if self._ignored_restored(sparts, k):
                    continue
                if hint is None:
                    hint = self._empty_target_hint(new_prefix)
                self.problems.append(
                    Problem(
                        "unexpected",
                        f"{render_parts(sparts)!r} in the source has no target: the state "
                        f"has no {render_parts(new_prefix + sparts[k:])!r}{hint} "
                        f"[rule {self.rules[r]}]",
                        target=Path(new_prefix + sparts[k:]),
                        source=Path(sparts),
                        rule=str(self.rules[r]),
                        remedy=(
                            "a rule's target is an empty node of the state: graft it once it "
                            "is built (a Kauldron loader grafts opt_state entries in "
                            "transform_after_optimizer), or drop the rule"
                            if hint
                            else "to skip source leaves the state has no place for, add them "
                            "to ignore_restored_keys"
                        ),
                    )
                )

    def _empty_target_hint(self, new_prefix: Parts) -> str:
        """' (X is None in the state)' when a rule's whole target is an empty node.

        The usual cause is a state built without that part, such as a TrainState
        whose `opt_state` is still None: saying so beats a list of every leaf.
        """
        if self.tgt.under(new_prefix):
            return ""
        try:
            _, node = resolve(self.tgt.root, Path(new_prefix))
        except PathNotFoundError:
            return ""
        where = repr(render_parts(new_prefix)) if new_prefix else "the root"
        if node is None:
            return f" ({where} is None in the state)"
        return f" ({where} is an empty {type(node).__name__} in the state)"

    def _check_outranked_rules(self, instances: dict[tuple[int, Parts], Parts | None]) -> None:
        """Rule instances whose every leaf a more specific rule took.

        Their source subtree still counts for the unexpected check; and a rule
        that wins no leaf at all must still name something in the source, or a
        typo in it would pass silently.
        """
        if not self._outranked:
            return
        won = {r for r, _ in instances}
        missing: dict[int, Parts] = {}
        for r, i, n in self._outranked:
            new_prefix = self.tgt.paths[i][:n]
            if (r, new_prefix) in instances or self.rules[r].old is None:
                continue
            old_prefix = self._old_prefix(r, new_prefix)
            instances[(r, new_prefix)] = old_prefix
            if old_prefix is None and r not in won:
                missing.setdefault(r, new_prefix)
        found = {r for (r, _), old in instances.items() if old is not None}
        for r, new_prefix in missing.items():
            if r in found:
                continue
            rule = self.rules[r]
            old = self._old_of(r, new_prefix)
            self.problems.append(
                Problem(
                    "unmatched_rule",
                    f"rule {rule}: {self.src.why_missing(old)} (more specific rules "
                    "take all its target leaves)",
                    target=Path(new_prefix),
                    source=Path(old),
                    rule=str(rule),
                )
            )

    def _add_source_instances(self, instances: dict[tuple[int, Parts], Parts | None]) -> None:
        """Instances of glob rules that only the source has, for the unexpected check.

        A glob rule's instances come from the target leaves it covers. Where
        the source has one more (`enc.layers_5` for `dec.layers_* <- enc.layers_*`
        and a state without `dec.layers_5`), its leaves mirror no target leaf.
        """
        by_rule: dict[int, set[Parts]] = {}
        for (k, _), known_old in instances.items():
            if known_old is not None:
                by_rule.setdefault(k, set()).add(known_old)
        for r, rule in enumerate(self.rules):
            if rule.old is None or rule.old.is_literal or rule.gather == "unstack":
                # A keep rule reads nothing; an unstack takes the layers it is
                # asked for; a literal rule's one instance is known when it matched.
                continue
            known = by_rule.get(r, set())
            for old_prefix, caps in _source_prefixes(rule.old, self.src, known).items():
                try:
                    new_prefix = rule.new.substitute_parts(
                        caps[:-1] if rule.gather == "stack" else caps
                    )
                except GraftError:  # a capture the new side cannot take
                    continue
                if rule.gather == "stack":
                    if (r, new_prefix) not in instances:
                        self._stack_instances.append((r, new_prefix, old_prefix))
                else:
                    instances.setdefault((r, new_prefix), old_prefix)

    def _check_unmatched_rules(
        self, hits: list[int], instances: dict[tuple[int, Parts], Parts | None]
    ) -> None:
        """Rules whose new side matches no target leaf must name empty nodes.

        Such a rule grafts nothing, but the source leaves under its old side
        still have no target: its instances are added for the unexpected check.
        """
        for r, rule in enumerate(self.rules):
            if hits[r]:
                continue
            new_nodes = _matching_nodes(rule.new, self.tgt)
            if not new_nodes:
                self.problems.append(
                    Problem(
                        "unmatched_rule",
                        f"rule {rule}: {_nothing_matches(rule.new, self.tgt)}",
                        rule=str(rule),
                    )
                )
                continue
            if rule.old is None or rule.gather == "stack":
                continue  # a keep rule needs no source; a stack finds its members
            for parts in new_nodes:
                old = self._old_of(r, parts)
                if self.src.node_exists(old):
                    instances.setdefault((r, parts), old)
                else:
                    self.problems.append(
                        Problem(
                            "unmatched_rule",
                            f"rule {rule}: {self.src.why_missing(old)}",
                            target=Path(parts),
                            source=Path(old),
                            rule=str(rule),
                        )
                    )

    def _check_unmatched_ignores(self, instances: dict[tuple[int, Parts], Parts | None]) -> None:
        """An ignore pattern must match some existing key, or it is likely a typo."""
        sides = (
            ("ignore_model_keys", self.ignore_model, self.used_model, self.tgt, True),
            ("ignore_restored_keys", self.ignore_restored, self.used_restored, self.src, False),
        )
        for name, patterns, used, index, is_new in sides:
            prefixes = []
            every = [(new, old) for (_, new), old in instances.items()]
            every += [(new, old) for _, new, old in self._stack_instances]
            for new_prefix, old_prefix in every:
                p = new_prefix if is_new else old_prefix
                if p is not None:
                    prefixes.append(p)
            names: list[str] | None = None
            lengths = sorted({len(p) for p in prefixes})
            for pat, was_used in zip(patterns, used, strict=True):
                if was_used or _matches_any(pat, index, lengths):
                    continue
                if names is None:
                    # Keys as the user may have meant them: absolute, or relative
                    # to a rule's prefix; rendered once for every pattern.
                    parts = list(index.paths) + [
                        index.paths[i][len(p) :] for p in set(prefixes) for i in index.under(p)
                    ]
                    names = sorted({render_parts(p) for p in parts[:40000]})
                shown = sorted({render_parts(p) for p in prefixes})
                where = ", ".join(repr(s) for s in shown[:3]) + (", ..." if len(shown) > 3 else "")
                relative = f" relative to a rule's prefix ({where}) or" if shown else ""
                self.problems.append(
                    Problem(
                        "unmatched_ignore",
                        f"{name} pattern {pat.text!r} matches no key of {index.what},"
                        f"{relative} from the root{_close_names(pat.text, names)}",
                        pattern=pat.text,
                    )
                )


def _matches_any(pat: Pattern, index: TreeIndex, lengths: list[int]) -> bool:
    """Whether pat matches a prefix of some path, from the root or after n parts.

    Only paths holding the pattern's literal head where it would start are
    matched, so a pattern costs about the size of the subtree it names.
    """
    head = pat.literal_prefix()
    paths = index.paths
    for i in index.under(head) if head else range(len(paths)):
        if pat.match_prefix(paths[i]) is not None:
            return True
    for n in lengths:
        for i in index.under_at(n, head) if head else range(len(paths)):
            parts = paths[i]
            if n <= len(parts) and pat.match_prefix(parts[n:]) is not None:
                return True
    return False


def _matching_nodes(pattern: Pattern, index: TreeIndex) -> list[Parts]:
    if pattern.is_literal:
        parts = pattern.as_path().parts
        return [parts] if index.node_exists(parts) else []
    return [p for p in index.node_paths() if pattern.match(p) is not None]


def _nothing_matches(pattern: Pattern, index: TreeIndex) -> str:
    if pattern.is_literal:
        return index.why_missing(pattern.as_path().parts)
    return f"{pattern.text!r} matches nothing in {index.what}" + _close_paths(
        pattern.text, index.node_paths()
    )
