"""Coverage checks: unexpected source leaves, rules and ignore patterns that match nothing.

Each is a pure function of a `Resolution` that returns its problems. Run on
every rule instance resolution found, from both sides: a typo anywhere in a
mapping is an error, with close names suggested.
"""

from __future__ import annotations

from treegraft._errors import Names, PathNotFoundError, suggest_path
from treegraft._parse.paths import Part, Path, is_index, render_parts, render_pattern
from treegraft._parse.patterns import Pattern
from treegraft._plan.problems import Problem, _close_paths
from treegraft._plan.resolution import Resolution
from treegraft._tree.index import TreeIndex
from treegraft._tree.pytree import walk_path

Parts = tuple[Part, ...]


def check_outranked_rules(res: Resolution) -> list[Problem]:
    """Rules that win no leaf, outranked everywhere, and name nothing in the source."""
    inputs = res.inputs
    out = []
    for r, new_prefix in res.outranked_unfound.items():
        rule = inputs.rules[r]
        old = inputs.old_of(r, new_prefix)
        out.append(
            Problem(
                "unmatched_rule",
                f"rule {rule}: {inputs.src.why_missing(old)} (more specific rules "
                "take all its target leaves)",
                target=Path(new_prefix),
                source=Path(old),
                rule=str(rule),
            )
        )
    return out


def check_unmatched_rules(res: Resolution) -> list[Problem]:
    """Rules whose new side matches no target leaf must name empty nodes on both sides."""
    inputs = res.inputs
    out = []
    for r, nodes in res.unmatched:
        rule = inputs.rules[r]
        if not nodes:
            out.append(
                Problem(
                    "unmatched_rule",
                    f"rule {rule}: {_nothing_matches(rule.new, inputs.tgt)}",
                    rule=str(rule),
                )
            )
            continue
        for parts, old, exists in nodes:
            if exists:
                continue
            assert old is not None
            out.append(
                Problem(
                    "unmatched_rule",
                    f"rule {rule}: {inputs.src.why_missing(old)}",
                    target=Path(parts),
                    source=Path(old),
                    rule=str(rule),
                )
            )
    return out


def check_unexpected(res: Resolution) -> list[Problem]:
    """Source leaves under a rule's old prefix that mirror no target leaf, unless ignored."""
    inputs = res.inputs
    out = []
    hints: dict[Parts, str] = {}
    for stray in res.strays:
        if stray.ignored:
            continue
        sparts = inputs.src.paths[stray.source]
        new_prefix = stray.new_prefix
        if new_prefix not in hints:
            hints[new_prefix] = _empty_target_hint(inputs.tgt, new_prefix)
        hint = hints[new_prefix]
        rule = inputs.rules[stray.rule]
        target = new_prefix + sparts[stray.k :]
        out.append(
            Problem(
                "unexpected",
                f"{render_parts(sparts)!r} in the source has no target: the state "
                f"has no {render_parts(target)!r}{hint} [rule {rule}]",
                target=Path(target),
                source=Path(sparts),
                rule=str(rule),
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
    return out


def _empty_target_hint(tgt: TreeIndex, new_prefix: Parts) -> str:
    """' (X is None in the state)' when a rule's whole target is an empty node.

    The usual cause is a state built without that part, such as a TrainState
    whose `opt_state` is still None: saying so beats a list of every leaf.
    """
    if tgt.under(new_prefix):
        return ""
    try:
        _, node = walk_path(tgt.root, Path(new_prefix))
    except PathNotFoundError:
        return ""
    where = repr(render_parts(new_prefix)) if new_prefix else "the root"
    if node is None:
        return f" ({where} is None in the state)"
    return f" ({where} is an empty {type(node).__name__} in the state)"


def check_unmatched_ignores(res: Resolution) -> list[Problem]:
    """An ignore pattern must match some existing key, or it is likely a typo."""
    inputs = res.inputs
    used_model = {k for u in res.unpaired for k in u.ignored}
    used_restored = {k for s in res.strays for k in s.ignored}
    sides = (
        ("ignore_model_keys", inputs.ignore_model, used_model, inputs.tgt, True),
        ("ignore_restored_keys", inputs.ignore_restored, used_restored, inputs.src, False),
    )
    every = [(new, old) for (_, new), old in res.instances.items()]
    every += [(new, old) for _, new, old in res.stack_instances]
    out = []
    for name, patterns, used, index, is_new in sides:
        if not patterns:
            continue
        prefixes = [p for p in (new if is_new else old for new, old in every) if p is not None]
        names: dict[bool, Names] = {}  # built on the first miss, for every pattern
        relative: str | None = None
        lengths = sorted({len(p) for p in prefixes})
        for k, pat in enumerate(patterns):
            if k in used or _matches_any(pat, index, lengths):
                continue
            wild = "*" in pat.text
            if wild not in names:
                names[wild] = _key_names(index, prefixes, patterns=wild)
            if relative is None:
                shown = sorted({render_parts(p) for p in prefixes})
                where = ", ".join(map(repr, shown[:3])) + (", ..." if len(shown) > 3 else "")
                relative = f" relative to a rule's prefix ({where}) or" if shown else ""
            out.append(
                Problem(
                    "unmatched_ignore",
                    f"{name} pattern {pat.text!r} matches no key of {index.what},"
                    f"{relative} from the root{suggest_path(pat.text, names[wild])}",
                    pattern=pat.text,
                )
            )
    return out


def _key_names(index: TreeIndex, prefixes: list[Parts], *, patterns: bool) -> Names:
    """Keys as a user may have meant them: absolute, or relative to a rule's prefix.

    With `patterns`, indices are `*` and the keys deduplicated before they are
    rendered: an ignore pattern is answered with a pattern.
    """
    parts = list(index.paths) + [
        index.paths[i][len(p) :] for p in set(prefixes) for i in index.under(p)
    ]
    if patterns:
        kinds = {tuple(0 if is_index(q) else q for q in p) for p in parts}
        return Names(sorted({render_pattern(p) for p in kinds}))
    return Names(sorted({render_parts(p) for p in parts[:40000]}))


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


def _nothing_matches(pattern: Pattern, index: TreeIndex) -> str:
    if pattern.is_literal:
        return index.why_missing(pattern.as_path().parts)
    return f"{pattern.text!r} matches nothing in {index.what}" + _close_paths(pattern.text, index)
