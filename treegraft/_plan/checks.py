"""Checks of leaves: ties, stacks, target leaves without a source, and every pair's specs.

Each check is a pure function of a `Resolution` that returns its problems;
`planner` chains them. The pair checks read shapes and dtypes, so a lazy
source's metadata must be prefetched before they run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from treegraft._errors import LISTED, GraftError, Kind
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._plan.problems import Problem, _close_paths, _count, _keep_remedy
from treegraft._plan.record import Pair, source_indices
from treegraft._plan.resolution import Resolution
from treegraft._plan.specs import pair_inputs, tree_spec
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import TreeIndex, is_abstract, is_deleted

Parts = tuple[Part, ...]


def check_ties(res: Resolution) -> list[Problem]:
    """Two rules as specific as each other on one leaf: once per pair of rules."""
    rules, paths = res.inputs.rules, res.inputs.tgt.paths
    return [
        Problem(
            "tie",
            f"{rules[a]} and {rules[b]} both cover {render_parts(paths[i])!r} with a prefix "
            "of the same length and as many literal segments",
            target=Path(paths[i]),
            rule=str(rules[b]),
        )
        for a, b, i in res.ties
    ]


def check_stacks(res: Resolution) -> list[Problem]:
    """Stacks whose indices are not 0..N-1, and unstacks whose index is no integer."""
    rules = res.inputs.rules
    out = []
    for r, new_prefix, why in res.bad_stacks:
        rule = rules[r]
        out.append(
            Problem(
                "structure",
                f"{render_parts(new_prefix)!r}: the source subtrees matching "
                f"{rule.old.text if rule.old else ''!r} cannot be "
                f"{'stack' if rule.gather == 'join' else rule.gather}ed: {why} "
                f"[rule {rule}]",
                target=Path(new_prefix),
                rule=str(rule),
            )
        )
    for r, new_prefix, capture in res.bad_unstacks:
        rule = rules[r]
        out.append(
            Problem(
                "structure",
                f"{render_parts(new_prefix)!r}: the last '*' of {rule.new.text!r} captured "
                f"{capture!r}, not an integer index to unstack [rule {rule}]",
                target=Path(new_prefix),
                rule=str(rule),
            )
        )
    return out


def check_missing(res: Resolution) -> list[Problem]:
    """Target leaves a rule covers whose source is absent, or a leaf/subtree mismatch.

    A rule instance whose source is absent is one problem; so is a subtree
    the source stops before, with its leaf count; not one line per leaf.
    """
    inputs = res.inputs
    tgt, src, rules = inputs.tgt, inputs.src, inputs.rules
    out: list[Problem] = []
    reported: set[tuple[int, Parts]] = set()
    stacked: set[int] | None = None  # the stack rules that found subtrees somewhere
    seen: set[tuple[Parts, Parts]] = set()
    # (rule, target subtree) -> [leaf count, index in out, source subtree, first paths]
    groups: dict[tuple[int, Parts], list[Any]] = {}
    for u in res.unpaired:
        parts = tgt.paths[u.target]
        rule = rules[u.rule]
        if u.why == "prefix":
            key = (u.rule, parts[: u.prefix_len])
            if not u.ignored and key not in reported:
                reported.add(key)
                if stacked is None:
                    stacked = {r for r, _, _ in res.stack_instances}
                out.append(_missing_prefix(res, u.rule, parts[: u.prefix_len], u.rule in stacked))
            continue
        assert u.old_prefix is not None
        sparts = u.old_prefix + parts[u.prefix_len :]
        if u.why == "subtree":
            below = src.under(sparts)
            out.append(
                Problem(
                    "structure",
                    f"{render_parts(parts)!r} is a leaf in the state "
                    f"({_leaves.describe(_leaves.spec_of(tgt.leaves[u.target]))}) but "
                    f"{render_parts(sparts)!r} is a subtree in the source "
                    f"({_count(len(below), 'leaf', 'leaves')}) [rule {rule}]",
                    target=Path(parts),
                    source=Path(sparts),
                    rule=str(rule),
                )
            )
            continue
        if u.ignored:
            continue
        if u.why == "leaf_above":
            # A leaf in the source where the state has a subtree: once per subtree.
            tsub = parts[: u.prefix_len + u.above - len(u.old_prefix)]
            if (tsub, sparts[: u.above]) in seen:
                continue
            seen.add((tsub, sparts[: u.above]))
            out.append(
                Problem(
                    "structure",
                    f"{render_parts(tsub)!r} is a subtree in the state but "
                    f"{render_parts(sparts[: u.above])!r} is a leaf in the source "
                    f"({_leaves.describe(_leaves.spec_of(src.leaves[u.source_leaf]))}) "
                    f"[rule {rule}]",
                    target=Path(tsub),
                    source=Path(sparts[: u.above]),
                    rule=str(rule),
                )
            )
            continue
        # Where the source stops: the subtree it lacks, counted.
        k = len(u.old_prefix) + 1
        while k < len(sparts) and src.node_exists(sparts[:k]):
            k += 1
        troot = parts[: u.prefix_len + k - len(u.old_prefix)]
        group = groups.get((u.rule, troot))
        if group is not None:
            group[0] += 1
            continue
        groups[(u.rule, troot)] = [1, len(out), sparts[:k], parts, sparts]
        out.append(Problem("missing", ""))  # written below, once its leaves are counted
    for (r, troot), (count, at, sroot, parts, sparts) in groups.items():
        if count == 1:  # one leaf: name it
            target, source = Path(parts), Path(sparts)
            message = f"{render_parts(parts)!r} <- {render_parts(sparts)!r}: "
        else:
            target, source = Path(troot), Path(sroot)
            message = f"{render_parts(troot)!r} ({count} leaves) <- {render_parts(sroot)!r}: "
        out[at] = Problem(
            "missing",
            message + f"{src.why_missing(source.parts)} [rule {rules[r]}]",
            target=target,
            source=source,
            rule=str(rules[r]),
            remedy=_keep_remedy(target.parts),
        )
    return out


def _missing_prefix(res: Resolution, r: int, new_prefix: Parts, stacked: bool) -> Problem:
    """One rule instance whose source is absent; `stacked`: the rule, a stack, found others."""
    inputs = res.inputs
    rule = inputs.rules[r]
    old = inputs.old_of(r, new_prefix)
    stack = rule.old if rule.gather == "stack" else None
    if stack is not None and stacked:
        # The pattern is right (other instances found theirs): no typo to suggest.
        why = (
            f"no subtree of {inputs.src.what} matches {stack.text!r} "
            f"with the captures of {render_parts(new_prefix)!r}"
        )
    elif stack is not None:
        why = f"no subtree of {inputs.src.what} matches {stack.text!r}" + _close_paths(
            stack.text, inputs.src
        )
    else:
        why = inputs.src.why_missing(old)
    literal = rule.old is not None and rule.old.is_literal
    # A close name for a literal rule's source, or for a stack's pattern that
    # matches nothing anywhere, means a typo: fix it, as ignoring would only
    # hide it. A glob rule found its other instances.
    if "did you mean" in why and (literal or stack is not None):
        remedy = ""
    elif literal:
        remedy = "check the rule's source path or, " + _keep_remedy(new_prefix)
    else:
        remedy = _keep_remedy(new_prefix)
    return Problem(
        "missing",
        f"{render_parts(new_prefix)!r} has no source: {why} [rule {rule}]",
        target=Path(new_prefix),
        source=Path(old),
        rule=str(rule),
        remedy=remedy,
    )


def check_copies(res: Resolution) -> list[Problem]:
    """Each plain copy's source leaf has the target's shape, and a dtype it may take."""
    inputs = res.inputs
    tleaves, sleaves, rules = inputs.tgt.leaves, inputs.src.leaves, inputs.rules
    copy = [rule.is_copy for rule in rules]  # a property: asked once per rule, not per pair
    out = []
    for pair in res.pairs:
        if not copy[pair.rule]:
            continue
        rule = rules[pair.rule]
        tleaf, sleaf = tleaves[pair.target], sleaves[pair.source]
        # Fast path for arrays: plain attribute compares, no spec objects.
        try:
            if tleaf.shape == sleaf.shape and tleaf.dtype == sleaf.dtype:
                continue
        except (AttributeError, TypeError):
            pass
        # Every dtype difference goes through the casting policy (docs/design.md section 10).
        tspec, sspec = _leaves.spec_of(tleaf), _leaves.spec_of(sleaf)
        why = _leaves.mismatch(tspec, sspec, cast=inputs.cast)
        value = ""
        if why is None and type(sleaf) in _PY_SCALARS and tspec[0] == ():
            # A Python scalar in memory: its value must fit (docs/design.md
            # section 4); one from a checkpoint is checked once read.
            why = _leaves.scalar_mismatch(sleaf, tspec[1], cast=inputs.cast)
            value = f" = {_short(sleaf)}"
        if why is None:
            continue
        kind = _kind_of(why)
        tp, sp = inputs.tgt.paths[pair.target], inputs.src.paths[pair.source]
        out.append(
            Problem(
                kind,
                f"{render_parts(tp)!r} in the state is {_leaves.describe(tspec)}, "
                f"{render_parts(sp)!r} in the source is {_leaves.describe(sspec)}{value}",
                target=Path(tp),
                source=Path(sp),
                rule=str(rule),
                # The cast option that would allow it, once per pair of dtypes.
                remedy=why.detail if kind == "dtype" else "",
            )
        )
    return out


_PY_SCALARS = (bool, int, float, complex)


def _short(value: Any) -> str:
    """A Python scalar's value for a message; a very long int by its first digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}... ({len(text.lstrip('-'))} digits)"


def check_operations(res: Resolution) -> list[Problem]:
    """What each rule operation makes of its source leaves fits its target exactly."""
    rules = res.inputs.rules
    if all(rule.is_copy for rule in rules):
        return []  # only copies: check_copies checks them all
    out = []
    for pair in res.pairs:
        if not rules[pair.rule].is_copy:
            problem = _operation_problem(res, pair)
            if problem is not None:
                out.append(problem)
    return out


def _tree_names(rule: Any) -> list[str]:
    """The operations of a rule's tree, by name, innermost first."""
    names: list[str] = []
    todo = [rule.tree] if rule.tree is not None else []
    while todo:
        node = todo.pop()
        if node.kind == "step":
            names.append(node.step.kind)
        elif node.kind != "source":
            names.append({"stack_list": "stack"}.get(node.kind, node.kind))
        todo.extend(node.children)
    return names[::-1]


def _operation_problem(res: Resolution, pair: Pair) -> Problem | None:
    inputs = res.inputs
    tgt, src = inputs.tgt, inputs.src
    rule = inputs.rules[pair.rule]
    refs = pair_inputs(pair)
    tspec = _leaves.spec_of(tgt.leaves[pair.target])
    tp = render_parts(tgt.paths[pair.target])
    sp = render_parts(src.paths[pair.source])

    def problem(kind: Kind, message: str, remedy: str = "") -> Problem:
        return Problem(
            kind,
            message,
            target=Path(tgt.paths[pair.target]),
            source=Path(src.paths[pair.source]),
            rule=str(rule),
            remedy=remedy,
        )

    firsts = []
    for _, leaves in refs:
        specs = [_leaves.spec_of(src.leaves[si]) for si in leaves]
        if any(spec != specs[0] for spec in specs[1:]):
            differ = [
                f"{render_parts(src.paths[si])!r} is {_leaves.describe(spec)}"
                for si, spec in zip(leaves, specs, strict=True)
                if spec != specs[0]
            ]
            first = render_parts(src.paths[leaves[0]])
            return problem(
                "shape",
                f"{tp!r}: the {len(specs)} source leaves to stack differ: {first!r} is "
                f"{_leaves.describe(specs[0])} but {', '.join(differ[:3])} [rule {rule}]",
            )
        firsts.append(specs[0])
    keys = [k for k, spec in enumerate(firsts) if _leaves.is_key_dtype(spec[1])]
    if keys:
        # jax refuses numpy's view of a key array, which every operation
        # needs: refuse here, naming the leaf, not in execute (docs/design.md section 13).
        key_path = render_parts(src.paths[refs[keys[0]][1][0]])
        return problem(
            "dtype",
            f"{tp!r} <- {key_path!r} ({_leaves.describe(firsts[keys[0]])}): typed PRNG keys "
            f"cannot go through {' and '.join(dict.fromkeys(_tree_names(rule)))} [rule {rule}]",
            "typed PRNG keys (jax.random.key) graft only as plain copies: map them with a "
            "path, not an operation, or graft their jax.random.key_data and wrap it with "
            "jax.random.wrap_key_data afterwards",
        )
    made = tree_spec(rule, firsts, [grid for grid, _ in refs], pair.layer)
    if made.spec is None:
        return problem(
            "dtype" if made.kind == "dtype" else "shape",
            f"{tp!r} <- {sp!r} ({_leaves.describe(firsts[0])}): {made.why} [rule {rule}]",
        )
    differs = _leaves.mismatch(tspec, made.spec, cast=inputs.cast)
    if differs is None:
        return None
    kind = _kind_of(differs)
    return problem(
        kind,
        f"{tp!r} in the state is {_leaves.describe(tspec)}, {rule.shown} makes "
        f"{_leaves.describe(made.spec)} of {sp!r} ({_leaves.describe(firsts[0])})",
        differs.detail if kind == "dtype" else "",
    )


def check_concrete(res: Resolution) -> list[Problem]:
    """In-memory source leaves to graft must hold values, not only shapes.

    Not fatal in `plan` (a plan on shapes alone is fine to look at); `execute`
    refuses it.
    """
    inputs = res.inputs
    if inputs.lazy is not None:
        return []
    src = inputs.src
    abstract = sorted(
        {
            si
            for pair in res.pairs
            for si in (pair.sources or (pair.source,))
            if is_abstract(src.leaves[si])
        }
    )
    if not abstract:
        return []
    names = ", ".join(repr(render_parts(src.paths[si])) for si in abstract[:10])
    more = f", ... ({len(abstract)} in all)" if len(abstract) > 10 else ""
    one = len(abstract) == 1
    return [
        Problem(
            "abstract",
            f"{_count(len(abstract), 'source leaf', 'source leaves')} "
            f"{'is' if one else 'are'} abstract (jax.ShapeDtypeStruct) "
            f"and {'has' if one else 'have'} no value to graft: {names}{more}",
            source=Path(src.paths[abstract[0]]),
        )
    ]


def check_deleted(res: Resolution) -> list[Problem]:
    """In-memory source leaves to graft must still hold their buffers."""
    if res.inputs.lazy is not None:
        return []
    return deleted_sources(res.inputs.src, res.pairs)


def deleted_sources(src: TreeIndex, pairs: Iterable[Pair]) -> list[Problem]:
    """One problem per source leaf the pairs read whose jax array was deleted.

    A donated argument (`jax.jit(..., donate_argnums=...)`) or an explicit
    `.delete()` leaves an array with its shape and dtype but no values: `plan`
    refuses it, and `execute` checks again, as it may be deleted in between.
    """
    read = set(source_indices(list(pairs)))
    gone = sorted(si for si in read if is_deleted(src.leaves[si]))
    return [
        Problem(
            "deleted",
            f"{render_parts(src.paths[si])!r} in the source "
            f"({_leaves.describe(_leaves.spec_of(src.leaves[si]))}) has been deleted: "
            "its buffer is gone",
            source=Path(src.paths[si]),
            remedy="a source array was deleted, usually donated to a jitted function "
            "(donate_argnums) or freed with .delete(): graft from a live copy, e.g. before "
            "the call that donates it",
        )
        for si in gone
    ]


def check_unfilled(res: Resolution) -> list[Problem]:
    """Abstract target leaves that no rule covers: they would stay shapes without values.

    A keep rule (`{path: None}`) or an ignored missing leaf keeps one abstract
    on purpose; a leaf no rule names is most likely a forgotten rule, which
    would otherwise surface later as an opaque failure in the model
    (docs/design.md section 5). One problem per leaf; the remedy names the
    largest subtree of such leaves, with the rule that would fill it.
    """
    tgt = res.inputs.tgt
    if -1 not in res.winner:
        return []  # every leaf has a rule
    unfilled = [
        i for i, leaf in enumerate(tgt.leaves) if res.winner[i] < 0 and is_abstract(leaf)
    ]
    if not unfilled:
        return []
    lonely = set(unfilled)
    whole: dict[Parts, bool] = {}  # prefix -> every leaf under it is unfilled

    def all_unfilled(prefix: Parts) -> bool:
        if prefix not in whole:
            whole[prefix] = all(i in lonely for i in tgt.under(prefix))
        return whole[prefix]

    remedies: dict[Parts, str] = {}
    shown: dict[Any, str] = {}  # spec -> its description: many leaves share one
    out = []
    for i in unfilled:
        parts = tgt.paths[i]
        top = parts
        # Up to the largest subtree holding only such leaves (never the root:
        # a rule '' would be too wide a suggestion).
        for k in range(len(parts) - 1, 0, -1):
            if not all_unfilled(parts[:k]):
                break
            top = parts[:k]
        if top not in remedies:
            # A message lists LISTED remedies: past them, one line for the rest.
            detailed = len(remedies) < LISTED
            remedies[top] = _unfilled_remedy(res, top) if detailed else _OTHER_UNFILLED
        spec = _leaves.spec_of(tgt.leaves[i])
        if spec not in shown:
            shown[spec] = _leaves.describe(spec)
        out.append(
            Problem(
                "unfilled",
                f"{render_parts(parts)!r} in the state is abstract ({shown[spec]}) and no rule "
                "fills it",
                target=Path(parts),
                remedy=remedies[top],
            )
        )
    return out


_OTHER_UNFILLED = (
    "the other abstract leaves: graft each from a source path, or keep it abstract on "
    "purpose ({path: None}, or strict=False)"
)


def _unfilled_remedy(res: Resolution, top: Parts) -> str:
    """The rule that would fill the abstract subtree top, or how else to settle it."""
    tgt, src = res.inputs.tgt, res.inputs.src
    under = tgt.under(top)
    name = render_parts(top)
    what = f"{name!r}" + (f" ({len(under)} abstract leaves)" if len(under) > 1 else "")
    keep = f"keep it abstract on purpose ({{{name!r}: None}}, or strict=False)"
    if not src.node_exists(top):
        return (
            f"{what}: the source has no {name!r}: map it from another source path, build it "
            f"concretely before grafting, or {keep}"
        )
    misfit = _misfit(tgt, src, under[:_FIT_SAMPLE])
    if misfit is None:
        return f"{what}: graft it from the source ({{{name!r}: {name!r}}}), or {keep}"
    return (
        f"{what}: the source's {name!r} does not fit it ({misfit}): build it concretely "
        f"before grafting, or {keep}"
    )


# The leaves of a subtree whose source specs a remedy compares: a checkpoint's
# specs not prefetched cost a header read each, so a sample, not every leaf.
_FIT_SAMPLE = 8


def _misfit(tgt: TreeIndex, src: TreeIndex, targets: list[int]) -> str | None:
    """How the source's leaves at the same paths differ from targets, or None if they fit.

    A suggestion only: a source spec that cannot be read counts as fitting.
    """
    for i in targets:
        parts = tgt.paths[i]
        si = src.find(parts)
        tspec = _leaves.spec_of(tgt.leaves[i])
        if si is None:
            return f"it has no {render_parts(parts)!r}"
        try:
            sspec = _leaves.spec_of(src.leaves[si])
        except GraftError:  # an unreadable header: the read will say so
            continue
        if sspec != tspec:
            return (
                f"{render_parts(parts)!r} is {_leaves.describe(sspec)} in the source, "
                f"{_leaves.describe(tspec)} in the state"
            )
    return None


def _kind_of(mismatch: Any) -> Kind:
    """The problem kind of a `_tree.leaves` mismatch: "shape", "dtype", or else "structure"."""
    if mismatch == "shape":
        return "shape"
    if mismatch == "dtype":
        return "dtype"
    return "structure"
