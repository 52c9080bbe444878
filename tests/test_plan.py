"""`tg.plan`: rule resolution, every check, the report, and `GraftPlan` inspection."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import block, f32

import treegraft as tg


def model_state():
    return {
        "step": 0,
        "params": {
            "encoder": block(),
            "decoder": {"layers_0": block(), "layers_1": block(), "layers_2": block()},
        },
        "collections": {},
    }


def pretrained():
    return {
        "step": 100,
        "params": {
            "encoder": block(1.0),
            "decoder": {"layers_0": block(2.0), "layers_1": block(3.0), "layers_2": block(4.0)},
        },
        "collections": {},
    }


def pairs(p: tg.GraftPlan) -> dict[str, str]:
    """target -> source, as canonical strings."""
    return {str(e.target): str(e.source) for e in p.entries}


def rules_of(p: tg.GraftPlan) -> dict[str, str]:
    """target -> rule text."""
    return {str(e.target): e.rule for e in p.entries}


BLOCK_SUFFIXES = ["attn.q.bias", "attn.q.kernel", "norm.scale"]


# ----------------------------------------------------------------------------
# Rules work on prefixes.
# ----------------------------------------------------------------------------


def test_a_rule_maps_new_prefix_plus_suffix_to_old_prefix_plus_suffix():
    p = tg.plan(model_state(), pretrained(), {"params.decoder.layers_0": "params.encoder"})
    assert pairs(p) == {
        f"params.decoder.layers_0.{s}": f"params.encoder.{s}" for s in BLOCK_SUFFIXES
    }
    assert set(rules_of(p).values()) == {"'params.decoder.layers_0' <- 'params.encoder'"}


def test_a_rule_on_a_single_leaf():
    p = tg.plan(
        model_state(), pretrained(), {"params.encoder.norm.scale": "params.encoder.norm.scale"}
    )
    assert pairs(p) == {"params.encoder.norm.scale": "params.encoder.norm.scale"}


def test_glob_captures_carry_across():
    p = tg.plan(model_state(), pretrained(), {"params.decoder.layers_*": "params.decoder.layers_*"})
    assert pairs(p) == {
        f"params.decoder.layers_{i}.{s}": f"params.decoder.layers_{i}.{s}"
        for i in range(3)
        for s in BLOCK_SUFFIXES
    }


def test_glob_captures_are_substituted_into_a_different_old_pattern():
    state = {"dec": {"layers_0": f32(1), "layers_7": f32(1)}}
    source = {"enc": {"block0": f32(1, value=1), "block7": f32(1, value=2), "block3": f32(1)}}
    p = tg.plan(state, source, {"dec.layers_*": "enc.block*"}, strict=False)
    assert pairs(p) == {"dec.layers_0": "enc.block0", "dec.layers_7": "enc.block7"}
    assert [str(u) for u in p.unused] == ["enc.block3"]


@pytest.mark.parametrize(
    "state, source, mapping, expected",
    [
        pytest.param(
            {"dec": [f32(1), f32(1)]},
            {"enc": {"layers_0": f32(1), "layers_1": f32(1)}},
            {"dec.*": "enc.layers_*"},
            {"dec[0]": "enc.layers_0", "dec[1]": "enc.layers_1"},
            id="list-index-into-glob",
        ),
        pytest.param(
            {"dec": {"layers_0": f32(1), "layers_1": f32(1)}},
            {"enc": [f32(1), f32(1)]},
            {"dec.layers_*": "enc[*]"},
            {"dec.layers_0": "enc[0]", "dec.layers_1": "enc[1]"},
            id="glob-into-list-index",
        ),
        pytest.param(
            {"dec": [f32(1), f32(1)]},
            {"enc": {"0": f32(1), "1": f32(1)}},
            {"dec.*": "enc.*"},
            {"dec[0]": "enc['0']", "dec[1]": "enc['1']"},
            id="list-into-orbax-digit-keys",
        ),
    ],
)
def test_captures_cross_between_lists_and_named_keys(state, source, mapping, expected):
    assert pairs(tg.plan(state, source, mapping)) == expected


def test_double_star_captures_several_segments():
    state = {"new": {"a": {"b": {"kernel": f32(2)}}, "c": {"kernel": f32(2)}}}
    source = {"old": {"a": {"b": {"w": f32(2)}}, "c": {"w": f32(2)}}}
    p = tg.plan(state, source, {"new.**.kernel": "old.**.w"})
    assert pairs(p) == {"new.a.b.kernel": "old.a.b.w", "new.c.kernel": "old.c.w"}


def test_one_source_subtree_feeds_several_targets():
    p = tg.plan(
        model_state(),
        pretrained(),
        {"params.decoder.layers_0": "params.encoder", "params.decoder.layers_2": "params.encoder"},
    )
    assert len(p.entries) == 6
    assert {e.source for e in p.entries} == {
        tg.parse_path(f"params.encoder.{s}") for s in BLOCK_SUFFIXES
    }
    # Each source leaf is counted once in the bytes to read.
    per_leaf = sum(e.nbytes for e in p.entries if "layers_0" in str(e.target))
    assert p.nbytes == per_leaf == (8 + 2 + 4) * 4


def test_root_rule_maps_everything():
    p = tg.plan(model_state(), pretrained(), {"": ""})
    assert len(p.entries) == 13
    assert p.untouched == [] and p.unused == []


def test_int_part_finds_orbax_string_key():
    # Orbax saves list items and int dict keys as string keys '0', '1'.
    state = {"layers": [f32(2), f32(3)]}
    source = {"layers": {"0": f32(2, value=1), "1": f32(3, value=2)}}
    p = tg.plan(state, source, {"layers": "layers"})
    assert pairs(p) == {"layers[0]": "layers['0']", "layers[1]": "layers['1']"}
    p = tg.plan(state, source, {"layers[1]": "layers.1"})
    assert pairs(p) == {"layers[1]": "layers['1']"}


def test_quoted_keys_in_rules():
    state = {"a": {"x.y": {"b c": f32(1)}}}
    source = {"old": {"x.y": {"b c": f32(1)}}}
    p = tg.plan(state, source, {"a['x.y']": 'old["x.y"]'})
    assert pairs(p) == {"a['x.y']['b c']": "old['x.y']['b c']"}


# ----------------------------------------------------------------------------
# The most specific rule wins.
# ----------------------------------------------------------------------------


def _orders(mapping: dict[str, str]):
    return [
        pytest.param(dict(order), id="|".join(k for k, _ in order))
        for order in itertools.permutations(mapping.items())
    ]


@pytest.mark.parametrize(
    "mapping",
    _orders({"params.decoder": "params.decoder", "params.decoder.layers_0": "params.encoder"}),
)
def test_longest_matched_prefix_wins(mapping):
    p = tg.plan(model_state(), pretrained(), mapping)
    got = pairs(p)
    for s in BLOCK_SUFFIXES:
        assert got[f"params.decoder.layers_0.{s}"] == f"params.encoder.{s}"
        assert got[f"params.decoder.layers_1.{s}"] == f"params.decoder.layers_1.{s}"
    assert rules_of(p)["params.decoder.layers_0.norm.scale"] == (
        "'params.decoder.layers_0' <- 'params.encoder'"
    )
    assert rules_of(p)["params.decoder.layers_2.norm.scale"] == (
        "'params.decoder' <- 'params.decoder'"
    )


@pytest.mark.parametrize(
    "mapping",
    _orders(
        {
            "params.decoder.layers_*": "params.decoder.layers_*",
            "params.decoder.layers_0": "params.encoder",
        }
    ),
)
def test_more_literal_segments_win_at_equal_length(mapping):
    p = tg.plan(model_state(), pretrained(), mapping)
    got = pairs(p)
    assert got["params.decoder.layers_0.norm.scale"] == "params.encoder.norm.scale"
    assert got["params.decoder.layers_1.norm.scale"] == "params.decoder.layers_1.norm.scale"
    assert got["params.decoder.layers_2.attn.q.bias"] == "params.decoder.layers_2.attn.q.bias"


@pytest.mark.parametrize(
    "mapping",
    _orders(
        {"params.**.layers_0": "params.**.layers_0", "params.decoder.layers_0": "params.encoder"}
    ),
)
def test_double_star_counts_as_non_literal_segments(mapping):
    p = tg.plan(model_state(), pretrained(), mapping)
    assert pairs(p)["params.decoder.layers_0.norm.scale"] == "params.encoder.norm.scale"
    assert rules_of(p)["params.decoder.layers_0.norm.scale"] == (
        "'params.decoder.layers_0' <- 'params.encoder'"
    )


@pytest.mark.parametrize(
    "mapping", _orders({"**.q": "**.q", "params.decoder.layers_0": "params.encoder"})
)
def test_prefix_length_counts_before_literals(mapping):
    # '**.q' matches 5 segments of params.decoder.layers_0.attn.q: longer, so it wins there.
    p = tg.plan(model_state(), pretrained(), mapping, strict=False)
    got = rules_of(p)
    assert got["params.decoder.layers_0.attn.q.kernel"] == "'**.q' <- '**.q'"
    assert got["params.decoder.layers_0.norm.scale"] == (
        "'params.decoder.layers_0' <- 'params.encoder'"
    )


@pytest.mark.parametrize(
    "mapping",
    _orders(
        {
            "params.decoder.*": "params.decoder.*",
            "params.decoder.layers_*": "params.decoder.layers_*",
        }
    ),
)
def test_equal_rules_tie_and_the_error_names_both_and_a_leaf(mapping):
    with pytest.raises(tg.MappingError, match=r"rules tied on the same leaf") as info:
        tg.plan(model_state(), pretrained(), mapping)
    message = str(info.value)
    assert "'params.decoder.*' <- 'params.decoder.*'" in message
    assert "'params.decoder.layers_*' <- 'params.decoder.layers_*'" in message
    assert "both cover 'params.decoder.layers_0.attn.q.bias'" in message
    # One problem per pair of rules, not one per leaf.
    assert [p.kind for p in info.value.problems] == ["tie"]


@pytest.mark.parametrize(
    "mapping",
    _orders({"a.*": "a.*", "a.x*": "a.x*", "a.x0": "b"}),
)
def test_a_tie_settled_by_a_more_specific_rule_is_not_an_error(mapping):
    state = {"a": {"x0": {"w": f32(1)}}}
    source = {"a": {"x0": {"w": f32(1)}}, "b": {"w": f32(1, value=5)}}
    p = tg.plan(state, source, mapping)
    assert pairs(p) == {"a.x0.w": "b.w"}


@pytest.mark.parametrize(
    "mapping",
    _orders(
        {
            "params.decoder.*": "params.decoder.*",
            "params.decoder.layers_*": "params.decoder.layers_*",
            "params.decoder.layers_0": "params.encoder",
        }
    ),
)
def test_a_tie_left_on_other_leaves_is_still_an_error(mapping):
    with pytest.raises(tg.MappingError, match=r"both cover 'params\.decoder\.layers_1\."):
        tg.plan(model_state(), pretrained(), mapping)


# ----------------------------------------------------------------------------
# Missing, unexpected, unmatched: one error, with suggestions.
# ----------------------------------------------------------------------------


def test_missing_source_leaf_names_both_paths_and_suggests():
    state = {"dec": {"kernel": f32(2), "bias": f32(1)}}
    source = {"enc": {"kernal": f32(2), "bias": f32(1)}}
    with pytest.raises(tg.PathNotFoundError, match=r"missing in the source.*: 1") as info:
        tg.plan(state, source, {"dec": "enc"}, ignore_restored_keys="kernal")
    message = str(info.value)
    assert "'dec.kernel' <- 'enc.kernel'" in message
    assert "'enc' has no key 'kernel' (did you mean 'kernal'?)" in message
    assert "[rule 'dec' <- 'enc']" in message
    assert "add them to ignore_model_keys" in message
    assert isinstance(info.value, KeyError)


def test_missing_old_prefix_is_reported_once_per_rule_instance():
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(model_state(), pretrained(), {"params.decoder.layers_0": "params.encodr"})
    message = str(info.value)
    assert "'params.decoder.layers_0' has no source" in message
    assert "'params' has no key 'encodr' (did you mean 'encoder'" in message
    assert len(info.value.problems) == 1


def test_unexpected_source_leaf():
    source = pretrained()
    source["params"]["encoder"]["extra"] = {"w": f32(3)}
    with pytest.raises(tg.PathNotFoundError, match=r"unexpected in the source.*: 1") as info:
        tg.plan(model_state(), source, {"params.decoder.layers_0": "params.encoder"})
    message = str(info.value)
    assert (
        "'params.encoder.extra.w' in the source has no target: the state has no "
        "'params.decoder.layers_0.extra.w'" in message
    )
    assert "add them to ignore_restored_keys" in message


def test_source_leaves_taken_by_a_more_specific_rule_are_not_unexpected():
    state = {"dec": {"l0": {"w": f32(1)}, "l1": {"w": f32(1)}}}
    source = {"enc": {"l0": {"w": f32(1)}, "l1": {"w": f32(1)}}, "other": {"w": f32(1)}}
    p = tg.plan(state, source, {"dec": "enc", "dec.l0": "other"})
    assert pairs(p) == {"dec.l0.w": "other.w", "dec.l1.w": "enc.l1.w"}
    assert [str(u) for u in p.unused] == ["enc.l0.w"]


@pytest.mark.parametrize(
    "mapping",
    _orders({"dec": "encc", "dec.l0": "enc"}),
)
def test_a_typo_in_a_rule_whose_leaves_all_go_to_more_specific_rules_is_caught(mapping):
    state = {"dec": {"l0": {"w": f32(1)}}}
    source = {"enc": {"w": f32(1)}}
    with pytest.raises(tg.PathNotFoundError, match=r"rules that match nothing: 1") as info:
        tg.plan(state, source, mapping)
    message = str(info.value)
    assert "rule 'dec' <- 'encc': path 'encc' not found in the source" in message
    assert "(did you mean 'enc'?)" in message
    assert "more specific rules take all its target leaves" in message


@pytest.mark.parametrize("mapping", _orders({"dec": "old", "dec.l0": "enc"}))
def test_unexpected_leaves_under_an_outranked_rule_are_reported(mapping):
    state = {"dec": {"l0": {"w": f32(1)}}}
    source = {"enc": {"w": f32(1)}, "old": {"l0": {"w": f32(1)}, "x": f32(1)}}
    with pytest.raises(tg.PathNotFoundError, match=r"unexpected in the source.*: 1") as info:
        tg.plan(state, source, mapping)
    assert "'old.x' in the source has no target: the state has no 'dec.x'" in str(info.value)
    p = tg.plan(state, source, mapping, ignore_restored_keys="x")
    assert pairs(p) == {"dec.l0.w": "enc.w"}


def test_a_glob_rule_overridden_where_its_source_is_absent_is_fine():
    # enc has no layers_0: the literal rule supplies it, the glob does the rest.
    state = {"dec": {"layers_0": f32(1), "layers_1": f32(1)}}
    source = {"enc": {"layers_1": f32(1)}, "other": f32(1)}
    p = tg.plan(state, source, {"dec.layers_*": "enc.layers_*", "dec.layers_0": "other"})
    assert pairs(p) == {"dec.layers_0": "other", "dec.layers_1": "enc.layers_1"}


@pytest.mark.parametrize(
    "mapping, needle",
    [
        pytest.param(
            {"params.decodr": "params.decoder"},
            "rule 'params.decodr' <- 'params.decoder': path 'params.decodr' not found in the "
            "state: 'params' has no key 'decodr' (did you mean 'decoder'",
            id="literal-new",
        ),
        pytest.param(
            {"params.decoder.blocks_*": "params.encoder.blocks_*"},
            "'params.decoder.blocks_*' matches nothing in the state (did you mean "
            "'params.decoder.layers_",
            id="glob-new",
        ),
    ],
)
def test_a_rule_matching_nothing_is_an_error_with_suggestions(mapping, needle):
    with pytest.raises(tg.PathNotFoundError, match=r"rules that match nothing: 1") as info:
        tg.plan(model_state(), pretrained(), mapping)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "option, pattern, needle",
    [
        pytest.param(
            "ignore_model_keys",
            "norm.scal",
            "ignore_model_keys pattern 'norm.scal' matches no key of the state, relative to "
            "a rule's prefix ('params.decoder.layers_0') or from the root "
            "(did you mean 'norm.scale'",
            id="model-relative",
        ),
        pytest.param(
            "ignore_restored_keys",
            "params.encoder.atn",
            "ignore_restored_keys pattern 'params.encoder.atn' matches no key of the source, "
            "relative to a rule's prefix ('params.encoder') or from the root (did you mean",
            id="restored-absolute",
        ),
    ],
)
def test_an_ignore_pattern_matching_nothing_is_an_error_with_suggestions(option, pattern, needle):
    with pytest.raises(
        tg.PathNotFoundError, match=r"ignore patterns that match nothing: 1"
    ) as info:
        tg.plan(
            model_state(),
            pretrained(),
            {"params.decoder.layers_0": "params.encoder"},
            **{option: [pattern]},
        )
    assert needle in str(info.value)
    [problem] = info.value.problems
    assert problem.kind == "unmatched_ignore" and problem.pattern == pattern


def test_all_key_problems_are_listed_in_one_error():
    state = model_state()
    del state["params"]["encoder"]["norm"]  # nothing else changes in the state
    source = pretrained()
    del source["params"]["encoder"]["attn"]["q"]["bias"]  # -> missing
    source["params"]["encoder"]["norm"]["extra"] = f32(1)  # -> unexpected
    mapping = {"params.decoder.layers_0": "params.encoder", "params.decodr": "params.decoder"}
    with pytest.raises(
        tg.PathNotFoundError, match=r"cannot graft \(2 rules\): 4 problem"
    ) as info:
        tg.plan(state, source, mapping, ignore_model_keys=["nrom"])
    message = str(info.value)
    for section in [
        "rules that match nothing: 1",
        "ignore patterns that match nothing: 1",
        "missing in the source",
        "unexpected in the source",
    ]:
        assert section in message
    assert {p.kind for p in info.value.problems} == {
        "unmatched_rule",
        "unmatched_ignore",
        "missing",
        "unexpected",
    }
    assert "'params.decoder.layers_0.attn.q.bias' <- 'params.encoder.attn.q.bias'" in message
    assert "'params.encoder.norm.extra' in the source has no target" in message


def test_long_problem_lists_are_cut_but_every_problem_is_kept():
    state = {"dec": {f"k{i:02d}": f32(1) for i in range(25)}}
    source = {"enc": {}}
    with pytest.raises(tg.PathNotFoundError, match=r"missing in the source.*: 25") as info:
        tg.plan(state, source, {"dec": "enc"})
    message = str(info.value)
    assert "... and 5 more" in message
    assert "'dec.k19'" in message and "'dec.k20'" not in message
    assert len(info.value.problems) == 25


# ----------------------------------------------------------------------------
# Ignore patterns.
# ----------------------------------------------------------------------------


def _without_norm():
    source = pretrained()
    del source["params"]["encoder"]["norm"]
    return source


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("norm", id="relative-subtree"),
        pytest.param("norm.scale", id="relative-leaf"),
        pytest.param("norm.*", id="relative-star"),
        pytest.param("*.scale", id="star-leaf"),
        pytest.param("**.scale", id="dstar-leaf"),
        pytest.param("**.norm", id="dstar-subtree"),
        pytest.param("params.decoder.layers_0.norm", id="absolute-subtree"),
        pytest.param("params.decoder.*.norm.scale", id="absolute-star"),
    ],
)
def test_ignore_model_keys_keep_missing_leaves(pattern):
    state = model_state()
    p = tg.plan(
        state,
        _without_norm(),
        {"params.decoder.layers_0": "params.encoder"},
        ignore_model_keys=[pattern],
    )
    assert set(pairs(p)) == {
        "params.decoder.layers_0.attn.q.bias",
        "params.decoder.layers_0.attn.q.kernel",
    }
    assert tg.parse_path("params.decoder.layers_0.norm.scale") in p.untouched
    assert p.report == ()


def test_ignore_model_keys_that_do_not_cover_the_missing_leaf_do_not_excuse_it():
    with pytest.raises(tg.PathNotFoundError, match=r"'params\.decoder\.layers_0\.norm\.scale'"):
        tg.plan(
            model_state(),
            _without_norm(),
            {"params.decoder.layers_0": "params.encoder"},
            # Exists (so is not "unmatched"), but is not the missing leaf.
            ignore_model_keys=["attn"],
        )


def _with_extra():
    source = pretrained()
    source["params"]["encoder"]["extra"] = {"w": f32(3), "b": f32(1)}
    return source


@pytest.mark.parametrize(
    "patterns",
    [
        pytest.param(["extra"], id="relative-subtree"),
        pytest.param(["extra.w", "extra.b"], id="relative-leaves"),
        pytest.param(["extra.*"], id="relative-star"),
        pytest.param(["**.extra"], id="dstar"),
        pytest.param(["params.encoder.extra"], id="absolute"),
        pytest.param("extra", id="bare-string"),
    ],
)
def test_ignore_restored_keys_skip_unexpected_leaves(patterns):
    p = tg.plan(
        model_state(),
        _with_extra(),
        {"params.decoder.layers_0": "params.encoder"},
        ignore_restored_keys=patterns,
    )
    assert len(p.entries) == 3
    assert {"params.encoder.extra.w", "params.encoder.extra.b"} <= {str(u) for u in p.unused}


def test_ignored_keys_need_no_other_rule():
    # A relative ignore pattern applies under every rule's prefix.
    state = {"a": {"w": f32(1), "b": f32(1)}, "c": {"w": f32(1), "b": f32(1)}}
    source = {"x": {"w": f32(1)}, "y": {"w": f32(1)}}
    p = tg.plan(state, source, {"a": "x", "c": "y"}, ignore_model_keys="b")
    assert pairs(p) == {"a.w": "x.w", "c.w": "y.w"}


# ----------------------------------------------------------------------------
# strict=False.
# ----------------------------------------------------------------------------


def test_strict_false_turns_key_problems_into_report_entries():
    state = {"dec": {"w": f32(2), "b": f32(1)}}
    source = {"enc": {"w": f32(2), "x": f32(1)}}
    p = tg.plan(
        state,
        source,
        {"dec": "enc", "nope": "enc"},
        ignore_restored_keys=["zzz"],
        strict=False,
    )
    kinds = sorted(problem.kind for problem in p.report)
    assert kinds == ["missing", "unexpected", "unmatched_ignore", "unmatched_rule"]
    assert pairs(p) == {"dec.w": "enc.w"}
    assert p.untouched == [tg.parse_path("dec.b")]
    by_kind = {problem.kind: problem for problem in p.report}
    assert by_kind["missing"].target == tg.parse_path("dec.b")
    assert by_kind["missing"].source == tg.parse_path("enc.b")
    assert by_kind["unexpected"].source == tg.parse_path("enc.x")
    assert by_kind["unmatched_rule"].rule == "'nope' <- 'enc'"
    text = str(p)
    assert "report (strict=False): 4 problems" in text
    assert "'enc.x' in the source has no target" in text


def test_strict_false_keeps_shape_and_dtype_mismatches_as_errors():
    state = {"dec": {"w": f32(2), "i": np.zeros(2, np.int32), "b": f32(1)}}
    source = {"enc": {"w": f32(3), "i": np.zeros(2, np.int64), "x": f32(1)}}
    with pytest.raises(tg.MismatchError, match=r"cannot graft \(1 rule\): 2 problem") as info:
        tg.plan(state, source, {"dec": "enc"}, strict=False)
    message = str(info.value)
    assert "shape differs: 1" in message and "dtype differs" in message
    # The key problems are not listed: strict=False made them report entries.
    assert "missing in the source" not in message and "unexpected" not in message


# ----------------------------------------------------------------------------
# Shapes, dtypes and structure.
# ----------------------------------------------------------------------------


def test_every_shape_and_dtype_mismatch_is_listed_with_both_sides():
    state = {"dec": {"a": f32(2), "b": f32(2, 3), "c": np.zeros(4, np.int32), "ok": f32(1)}}
    source = {
        "enc": {
            "a": f32(3),
            "b": f32(3, 2),
            "c": np.zeros(4, np.float32),
            "ok": f32(1),
        }
    }
    with pytest.raises(tg.MismatchError, match=r"3 problems") as info:
        tg.plan(state, source, {"dec": "enc"})
    message = str(info.value)
    assert "shape differs: 2" in message
    assert "'dec.a' in the state is float32[2], 'enc.a' in the source is float32[3]" in message
    assert (
        "'dec.b' in the state is float32[2, 3], 'enc.b' in the source is float32[3, 2]" in message
    )
    assert "dtype differs (casting is never implicit): 1" in message
    assert "pass cast='unsafe'" in message  # float32 -> int32 can drop fractions
    assert "'dec.c' in the state is int32[4], 'enc.c' in the source is float32[4]" in message
    kinds = sorted((pr.kind, str(pr.target), str(pr.source)) for pr in info.value.problems)
    assert kinds == [
        ("dtype", "dec.c", "enc.c"),
        ("shape", "dec.a", "enc.a"),
        ("shape", "dec.b", "enc.b"),
    ]


def test_cast_allows_dtype_but_not_shape_differences():
    state = {"a": np.zeros(2, np.int32), "b": f32(2)}
    source = {"a": np.zeros(2, np.float64), "b": f32(2)}
    # float64 -> int32 can change values: cast=True refuses it, "unsafe" allows it.
    with pytest.raises(tg.MismatchError, match=r"float64 -> int32 can change values"):
        tg.plan(state, source, {"": ""}, cast=True)
    p = tg.plan(state, source, {"": ""}, cast="unsafe")
    assert len(p.entries) == 2
    with pytest.raises(
        tg.MismatchError,
        match=r"'b' in the state is float32\[2\], 'b' in the source is float32\[3\]",
    ):
        tg.plan(state, {"a": np.zeros(2, np.float64), "b": f32(3)}, {"": ""}, cast="unsafe")


@pytest.mark.parametrize(
    "target, source",
    [
        pytest.param(3, np.int32(4), id="py-int<-np-int32"),
        pytest.param(3, np.array(4, np.uint8), id="py-int<-uint8-0d"),
        pytest.param(2.5, np.float32(1.0), id="py-float<-np-float32"),
        pytest.param(2.5, 1.0, id="py-float<-py-float"),
        pytest.param(True, np.bool_(False), id="py-bool<-np-bool"),
    ],
)
def test_python_scalar_targets_accept_scalars_of_the_same_kind(target, source):
    p = tg.plan({"s": target}, {"s": source}, {"s": "s"})
    assert pairs(p) == {"s": "s"}


@pytest.mark.parametrize(
    "target, source, match",
    [
        pytest.param(
            3,
            np.float32(1.0),
            r"'s' in the state is int \(python\)\[\], 's' in the source is float32\[\]",
            id="int<-float",
        ),
        pytest.param(
            3,
            np.zeros(2, np.int32),
            r"'s' in the state is int \(python\)\[\], 's' in the source is int32\[2\]",
            id="int<-array",
        ),
        pytest.param(1.0, True, r"float \(python\)\[\].*bool \(python\)\[\]", id="float<-bool"),
    ],
)
def test_python_scalar_targets_reject_other_kinds_and_shapes(target, source, match):
    with pytest.raises(tg.MismatchError, match=match):
        tg.plan({"s": target}, {"s": source}, {"s": "s"})


def test_a_leaf_where_the_source_has_a_subtree_is_a_structure_problem():
    state = {"enc": {"w": f32(2)}}
    source = {"enc": {"w": {"q": f32(2), "r": f32(2)}}}
    with pytest.raises(tg.MismatchError, match=r"structure differs: 1") as info:
        tg.plan(state, source, {"enc": "enc"})
    assert (
        "'enc.w' is a leaf in the state (float32[2]) but 'enc.w' is a subtree in the source "
        "(2 leaves)" in str(info.value)
    )
    assert [p.kind for p in info.value.problems] == ["structure"]


@pytest.mark.parametrize(
    "state, source, mapping, where",
    [
        pytest.param(
            {"enc": {"x": f32(1), "y": f32(1)}},
            {"enc": f32(3)},
            {"enc": "enc"},
            "'enc' is a subtree in the state but 'enc' is a leaf in the source (float32[3])",
            id="at-prefix",
        ),
        pytest.param(
            {"dec": {"a": {"x": f32(1), "y": f32(1), "z": {"deep": f32(1)}}}},
            {"enc": {"a": f32(3)}},
            {"dec": "enc"},
            "'dec.a' is a subtree in the state but 'enc.a' is a leaf in the source (float32[3])",
            id="below-prefix",
        ),
    ],
)
def test_a_subtree_where_the_source_has_a_leaf_is_one_structure_problem(
    state, source, mapping, where
):
    with pytest.raises(tg.MismatchError, match=r"structure differs: 1") as info:
        tg.plan(state, source, mapping)
    assert where in str(info.value)
    # Reported once, not once per target leaf; the source leaf is not also "unexpected".
    assert [p.kind for p in info.value.problems] == ["structure"]


# ----------------------------------------------------------------------------
# Empty subtrees.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty_new, empty_old",
    [
        pytest.param({}, {}, id="dict-dict"),
        pytest.param(None, None, id="none-none"),
        pytest.param([], (), id="list-tuple"),
        pytest.param({}, None, id="dict-none"),
    ],
)
def test_a_rule_between_existing_empty_subtrees_is_valid_and_grafts_nothing(empty_new, empty_old):
    state = {"collections": empty_new, "params": {"w": f32(2)}}
    source = {"collections": empty_old, "params": {"w": f32(2, value=1)}}
    p = tg.plan(state, source, {"params": "params", "collections": "collections"})
    assert pairs(p) == {"params.w": "params.w"}
    assert p.rule_counts() == [
        ("'params' <- 'params'", 1, 8),
        ("'collections' <- 'collections'", 0, 0),
    ]


def test_an_empty_new_subtree_with_a_missing_old_is_an_error():
    with pytest.raises(
        tg.PathNotFoundError,
        match=r"rule 'collections' <- 'collections': path 'collections' not found in the source",
    ):
        tg.plan({"collections": {}}, {"params": {}}, {"collections": "collections"})


def test_source_leaves_under_a_rule_whose_target_subtree_is_empty_are_unexpected():
    state = {"collections": {}, "params": {"w": f32(2)}}
    source = {"collections": {"batch_stats": {"mean": f32(3)}}, "params": {"w": f32(2)}}
    mapping = {"params": "params", "collections": "collections"}
    with pytest.raises(
        tg.PathNotFoundError, match=r"'collections\.batch_stats\.mean' in the source has no target"
    ):
        tg.plan(state, source, mapping)
    # ...unless ignored, relative to the rule's old prefix.
    p = tg.plan(state, source, mapping, ignore_restored_keys=["batch_stats"])
    assert pairs(p) == {"params.w": "params.w"}


# ----------------------------------------------------------------------------
# Metadata only.
# ----------------------------------------------------------------------------


def _init():
    return {"params": {"enc": {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}, "head": jnp.zeros(3)}}


def test_plan_works_on_abstract_state_and_abstract_source():
    state = jax.eval_shape(_init)
    source = {"encoder": jax.eval_shape(lambda: _init()["params"]["enc"])}
    # The head stays abstract on purpose: a keep rule says so (strict mode refuses
    # an abstract leaf no rule fills).
    p = tg.plan(state, source, {"params.enc": "encoder", "params.head": None})
    assert pairs(p) == {"params.enc.b": "encoder.b", "params.enc.w": "encoder.w"}
    assert p.nbytes == (8 * 4 + 4) * 4
    assert p.abstract == [tg.parse_path("params.head")]
    assert p.untouched == [tg.parse_path("params.head")]


def test_plan_checks_abstract_shapes_and_dtypes():
    state = jax.eval_shape(_init)
    source = {
        "encoder": {
            "w": jax.ShapeDtypeStruct((4, 8), jnp.float32),
            "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16),
        }
    }
    with pytest.raises(tg.MismatchError) as info:
        tg.plan(state, source, {"params.enc": "encoder", "params.head": None})
    message = str(info.value)
    assert (
        "'params.enc.w' in the state is float32[8, 4], 'encoder.w' in the source is float32[4, 8]"
        in message
    )
    assert (
        "'params.enc.b' in the state is float32[4], 'encoder.b' in the source is bfloat16[4]"
        in message
    )


def test_plan_does_not_modify_its_inputs():
    state, source = model_state(), pretrained()
    before = (jax.tree.structure(state), jax.tree.structure(source))
    mapping = {"params.decoder.layers_0": "params.encoder"}
    tg.plan(state, source, mapping)
    assert (jax.tree.structure(state), jax.tree.structure(source)) == before
    assert mapping == {"params.decoder.layers_0": "params.encoder"}
    assert np.all(state["params"]["decoder"]["layers_0"]["norm"]["scale"] == 0)


# ----------------------------------------------------------------------------
# GraftPlan inspection.
# ----------------------------------------------------------------------------


def test_entries_carry_target_source_rule_shape_dtype_bytes():
    p = tg.plan(model_state(), pretrained(), {"params.decoder.layers_1": "params.encoder"})
    entry = next(e for e in p.entries if str(e.target).endswith("kernel"))
    assert isinstance(entry, tg.Entry)
    assert entry.target == tg.parse_path("params.decoder.layers_1.attn.q.kernel")
    assert entry.source == tg.parse_path("params.encoder.attn.q.kernel")
    assert entry.rule == "'params.decoder.layers_1' <- 'params.encoder'"
    assert entry.shape == (4, 2)
    assert entry.dtype == np.float32
    assert entry.nbytes == 32


def test_untouched_and_unused():
    p = tg.plan(model_state(), pretrained(), {"params.decoder.layers_1": "params.encoder"})
    untouched = {str(u) for u in p.untouched}
    assert "step" in untouched
    assert "params.decoder.layers_0.norm.scale" in untouched
    assert "params.decoder.layers_1.norm.scale" not in untouched
    assert len(untouched) == 13 - 3
    unused = {str(u) for u in p.unused}
    assert "params.encoder.norm.scale" not in unused
    assert {"step", "params.decoder.layers_1.norm.scale"} <= unused
    assert len(unused) == 13 - 3
    assert p.abstract == []


def test_str_is_a_readable_table_with_the_paths():
    p = tg.plan(
        model_state(),
        pretrained(),
        {"params.decoder.layers_1": "params.encoder", "collections": "collections"},
    )
    text = str(p)
    lines = text.splitlines()
    assert lines[0] == (
        "GraftPlan: 3 of 13 target leaves from the source; 3 source leaves to read (56 B)"
    )
    assert "'params.decoder.layers_1' <- 'params.encoder'  3       56 B" in text
    assert "'collections' <- 'collections'" in text
    row = next(line for line in lines if line.startswith("params.decoder.layers_1.attn.q.kernel"))
    assert row.split() == [
        "params.decoder.layers_1.attn.q.kernel",
        "params.encoder.attn.q.kernel",
        "float32[4,",
        "2]",
    ]
    assert "untouched target leaves: 10" in text
    assert "unused source leaves: 10" in text
    assert text == p.summary()
    assert repr(p) == "GraftPlan(rules=2, grafted=3, target_leaves=13, bytes=56)"


def test_summary_cuts_long_tables():
    p = tg.plan(model_state(), pretrained(), {"": ""})
    text = p.summary(max_rows=4)
    assert "... and 9 more" in text


def test_summary_says_how_many_leaves_stay_abstract():
    p = tg.plan(
        jax.eval_shape(_init),
        {"head": np.ones(3, np.float32)},
        {"params.head": "head", "params.enc": None},
    )
    assert "untouched target leaves: 2 (2 stay abstract)" in str(p)


# ----------------------------------------------------------------------------
# Glob rules: instances only the source has.
# ----------------------------------------------------------------------------


def _layers(n, *, prefix="layers"):
    return {f"{prefix}_{i}": {"w": f32(2), "b": f32(1)} for i in range(n)}


def test_source_instances_of_a_glob_rule_without_a_target_are_unexpected():
    state = {"dec": _layers(2)}
    source = {"enc": _layers(4)}
    mapping = {"dec.layers_*": "enc.layers_*"}
    with pytest.raises(tg.PathNotFoundError, match=r"unexpected in the source.*: 4") as info:
        tg.plan(state, source, mapping)
    message = str(info.value)
    assert "'enc.layers_3.w' in the source has no target: the state has no " \
           "'dec.layers_3.w'" in message
    assert "enc.layers_1" not in message
    # Ignored relative to the rule's old prefix, or by strict=False.
    p = tg.plan(state, source, mapping, ignore_restored_keys=["w", "b"])
    assert len(p.entries) == 4
    loose = tg.plan(state, source, mapping, strict=False)
    assert sorted(str(u.source) for u in loose.report) == [
        "enc.layers_2.b", "enc.layers_2.w", "enc.layers_3.b", "enc.layers_3.w"]


def test_a_glob_rule_source_instance_whose_target_is_empty_is_unexpected_with_a_hint():
    state = {"dec": {"layers_0": {"w": f32(2), "b": f32(1)}, "layers_1": {}}}
    source = {"enc": _layers(2)}
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, source, {"dec.layers_*": "enc.layers_*"})
    assert "(\'dec.layers_1\' is an empty dict in the state)" in str(info.value)


def test_a_source_instance_taken_by_a_more_specific_rule_is_not_unexpected():
    state = {"dec": _layers(2)}
    source = {"enc": _layers(2), "extra": {"w": f32(2), "b": f32(1)}}
    p = tg.plan(state, source, {"dec.layers_*": "enc.layers_*", "dec.layers_1": "extra"})
    assert pairs(p)["dec.layers_1.w"] == "extra.w"
    assert [str(u) for u in p.unused] == ["enc.layers_1.b", "enc.layers_1.w"]


def test_double_star_globs_find_source_only_instances_too():
    state = {"dec": {"a": {"w": f32(2)}}}
    source = {"enc": {"a": {"w": f32(2)}, "b": {"c": {"w": f32(2)}}}}
    with pytest.raises(tg.PathNotFoundError, match=r"'enc\.b\.c\.w' in the source has no target"):
        tg.plan(state, source, {"dec.**.w": "enc.**.w"})


def test_a_structure_problem_with_int_keys_is_reported_once():
    # A checkpoint gives int keys back as strings: the state's leaf a[0] against the
    # source's subtree a['0'] is one structure problem, with no spurious unexpected leaf.
    state = {"a": [np.zeros(2, np.float32)]}
    source = {"a": {"0": {"x": np.zeros(2, np.float32)}}}
    with pytest.raises(tg.MismatchError) as info:
        tg.plan(state, source, {"a": "a"})
    assert [p.kind for p in info.value.problems] == ["structure"]
    assert "'a[0]' is a leaf in the state (float32[2]) but 'a[0]' is a subtree in the source " \
           "(1 leaf)" in str(info.value)


def test_a_missing_subtree_is_one_problem_with_its_leaf_count():
    state = {"dec": {"l0": {"attn": {k: np.zeros(2) for k in "abcdefgh"},
                            "mlp": {"w": np.zeros(2)}}}}
    source = {"enc": {"mlp": {"w": np.zeros(2)}}}
    with pytest.raises(tg.PathNotFoundError) as info:
        tg.plan(state, source, {"dec.l0": "enc"})
    message = str(info.value)
    assert len(info.value.problems) == 1
    assert "'dec.l0.attn' (8 leaves) <- 'enc.attn': path 'enc.attn' not found in the source" \
        in message
    assert "(s)" not in message
    assert "map them to None ({'dec.l0.attn': None})" in message
