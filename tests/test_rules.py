"""Mapping validation and ignore patterns (treegraft._parse.rules), directly and via `tg.plan`."""

from __future__ import annotations

import numpy as np
import pytest

import treegraft as tg
from treegraft._parse.rules import Rule, parse_ignore, parse_mapping

STATE = {"params": {"enc": {"w": np.zeros(2)}, "dec": {"w": np.zeros(2)}}}


# ----------------------------------------------------------------------------
# The mapping's type.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping, match",
    [
        pytest.param("params", r"got str: did you mean \{x: x\}\?", id="str"),
        pytest.param([("a", "b")], r"must be a dict \{new_path: old_path\}, got list", id="list"),
        pytest.param(None, r"must be a dict .*got NoneType", id="none"),
        pytest.param(3, r"must be a dict .*got int", id="int"),
        pytest.param({"a", "b"}, r"must be a dict .*got set", id="set"),
    ],
)
def test_mapping_must_be_a_mapping(mapping, match):
    with pytest.raises(tg.MappingError, match=match):
        parse_mapping(mapping)


def test_empty_mapping_is_an_error():
    with pytest.raises(tg.MappingError, match=r"the mapping is empty: nothing would be grafted"):
        parse_mapping({})


def test_mapping_error_is_a_graft_error_and_a_value_error():
    with pytest.raises(ValueError, match="the mapping is empty") as info:
        parse_mapping({})
    assert isinstance(info.value, tg.GraftError)
    assert type(info.value).__module__ == "treegraft"


# ----------------------------------------------------------------------------
# Keys and values.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping, match",
    [
        pytest.param({1: "a"}, r"entry 0 \(key 1\): the key is an int, not a path string",
                     id="int-key"),
        pytest.param({"a": 3}, r"entry 'a': the value 3 is an int; a value is a path string, "
                     r"None \(keep", id="int-value"),
        pytest.param({"a": b"b"}, r"entry 'a': the value b'b' is a bytes", id="bytes-value"),
        pytest.param({("a",): "a"}, r"entry 0 \(key \('a',\)\): the key is a tuple",
                     id="tuple-key"),
        pytest.param(
            {"ok": "ok", "a": 2.5}, r"entry 'a': the value 2\.5 is a float", id="second-entry"
        ),
    ],
)
def test_keys_and_values_must_be_strings(mapping, match):
    with pytest.raises(tg.MappingError, match=match):
        parse_mapping(mapping)


def test_a_bad_key_and_a_bad_value_of_one_entry_are_both_listed():
    with pytest.raises(tg.MappingError, match=r"\(2 problems\)") as info:
        parse_mapping({7: 8})
    message = str(info.value)
    assert "entry 0 (key 7): the key is an int" in message
    assert "the value 8 is an int" in message


def test_paths_and_patterns_are_accepted_as_keys_and_values():
    rules = parse_mapping(
        {
            tg.parse_path("params.dec"): tg.parse_path("params.enc"),
            tg.parse_pattern("layers_*"): "blocks_*",
        }
    )
    assert [str(r) for r in rules] == [
        "'params.dec' <- 'params.enc'",
        "'layers_*' <- 'blocks_*'",
    ]


def test_a_path_key_with_odd_parts_keeps_them_literal():
    # A str part that looks like a glob must not become a wildcard.
    [rule] = parse_mapping({tg.Path(("a", "x*")): tg.Path(("b", 0))})
    assert rule.new.is_literal and rule.old.is_literal
    assert rule.new.as_path() == tg.Path(("a", "x*"))
    assert rule.old.as_path() == tg.Path(("b", 0))


def test_rules_keep_mapping_order_and_index():
    rules = parse_mapping({"b": "y", "a": "x", "": ""})
    assert [r.index for r in rules] == [0, 1, 2]
    assert [str(r) for r in rules] == ["'b' <- 'y'", "'a' <- 'x'", "'' <- ''"]
    assert all(isinstance(r, Rule) for r in rules)


# ----------------------------------------------------------------------------
# Syntax.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        pytest.param("a..b", r"empty name", id="double-dot"),
        pytest.param("a.", r"expected a name after '\.'", id="trailing-dot"),
        pytest.param(".a", r"empty name", id="leading-dot"),
        pytest.param("a-b", r"unexpected '-'", id="dash"),
        pytest.param("a b", r"unexpected blank", id="blank"),
        pytest.param("a[b]", r"bare name 'b' in brackets; quote it", id="bare-bracket"),
        pytest.param("a[0", r"unclosed '\['", id="unclosed-bracket"),
        pytest.param("a['x]", r"unclosed quote", id="unclosed-quote"),
        pytest.param("a.***", r"'\*\*' must be a whole segment", id="triple-star"),
        pytest.param("a.x**", r"'\*\*' must be a whole segment", id="glob-double-star"),
    ],
)
@pytest.mark.parametrize("side", ["key", "value"])
def test_syntax_errors_name_the_entry_the_string_and_the_column(text, reason, side):
    mapping = {text: "ok"} if side == "key" else {"ok": text}
    name = text if side == "key" else "ok"
    with pytest.raises(tg.MappingError, match=reason) as info:
        parse_mapping(mapping)
    message = str(info.value)
    assert f"entry {name!r}" in message
    assert f"invalid path {text!r}" in message
    assert "at column" in message and "^" in message


# ----------------------------------------------------------------------------
# Wildcard correspondence.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "new, old",
    [
        pytest.param("params.decoder.layers_*", "params.encoder.layers_*", id="glob-glob"),
        pytest.param("a.*", "b.*", id="star-star"),
        pytest.param("a.*", "b.l_*", id="star-glob"),
        pytest.param("a.**.kernel", "b.**.w", id="dstar"),
        pytest.param("a.l_*_*", "b.x_*.y_*", id="two-captures"),
        pytest.param("a.**.*", "b.**.c.*", id="dstar-then-star"),
        pytest.param("a", "b", id="literal"),
    ],
)
def test_corresponding_wildcards_are_accepted(new, old):
    [rule] = parse_mapping({new: old})
    assert rule.new.wildcards() == rule.old.wildcards()


@pytest.mark.parametrize(
    "new, old, match",
    [
        pytest.param(
            "x.*", "y", r"'x\.\*' \(\*\) and 'y' \(none\) do not correspond", id="star-none"
        ),
        pytest.param("y", "x.*", r"'y' \(none\) and 'x\.\*' \(\*\)", id="none-star"),
        pytest.param(
            "dec.layers_*",
            "enc",
            r"'dec\.layers_\*' \(\*\) and 'enc' \(none\)",
            id="glob-from-one-subtree",
        ),
        pytest.param("**.z", "*.z", r"'\*\*\.z' \(\*\*\) and '\*\.z' \(\*\)", id="dstar-star"),
        pytest.param("a.*.b.*", "c.*", r"\(\* \*\) and 'c\.\*' \(\*\)", id="two-one"),
        pytest.param("a.**.*", "b.*.**", r"\(\*\* \*\) and 'b\.\*\.\*\*' \(\* \*\*\)", id="order"),
        pytest.param("a.l_*_*", "b.l_*", r"\(\* \*\) and 'b\.l_\*' \(\*\)", id="glob-count"),
    ],
)
def test_wildcards_must_correspond(new, old, match):
    with pytest.raises(tg.MappingError, match=match) as info:
        parse_mapping({new: old})
    assert "both sides of a rule need the same '*' and '**' in the same order" in str(info.value)
    assert f"entry {new!r}" in str(info.value)


def test_all_problems_are_listed_at_once():
    mapping = {
        "good": "good",
        1: "a",
        "b": 7,
        "a..b": "c",
        "x.*": "y",
        "**.z": "*.z",
        "p": "q[a]",
    }
    with pytest.raises(tg.MappingError, match=r"invalid mapping \(6 problems\)") as info:
        parse_mapping(mapping)
    message = str(info.value)
    for needle in [
        "entry 1 (key 1): the key is an int",
        "entry 'b': the value 7 is an int",
        "entry 'a..b': invalid path 'a..b'",
        "entry 'x.*': the wildcards of 'x.*'",
        "entry '**.z': the wildcards of '**.z'",
        "entry 'p': invalid path 'q[a]'",
    ]:
        assert needle in message
    assert "entry 'good'" not in message
    assert len(info.value.problems) == 6


def test_plan_validates_the_mapping_before_looking_at_the_trees():
    # The state and source are not even pytrees of arrays: the mapping error wins.
    with pytest.raises(tg.MappingError, match=r"invalid mapping \(1 problem\)"):
        tg.plan(object(), object(), {"a.*": "b"})
    with pytest.raises(tg.MappingError, match="the mapping is empty"):
        tg.graft(STATE, STATE, {})


# ----------------------------------------------------------------------------
# Ignore patterns.
# ----------------------------------------------------------------------------


def test_a_bare_string_is_one_pattern_not_characters():
    assert parse_ignore("**.bias", name="ignore_model_keys") == [tg.parse_pattern("**.bias")]
    assert parse_ignore("ab", name="ignore_model_keys") == [tg.parse_pattern("ab")]


@pytest.mark.parametrize(
    "patterns, expected",
    [
        pytest.param(None, [], id="none"),
        pytest.param((), [], id="empty-tuple"),
        pytest.param(["a", "b.*"], ["a", "b.*"], id="list"),
        pytest.param(("**.b",), ["**.b"], id="tuple"),
        pytest.param([tg.parse_path("a[0]")], ["a[0]"], id="path-object"),
        pytest.param(tg.parse_pattern("x.**"), ["x.**"], id="bare-pattern-object"),
        pytest.param((p for p in ["a", "b"]), ["a", "b"], id="generator"),
    ],
)
def test_ignore_patterns_accepted_forms(patterns, expected):
    got = parse_ignore(patterns, name="ignore_model_keys")
    assert [str(p) for p in got] == expected


def test_ignore_patterns_of_the_wrong_type():
    with pytest.raises(tg.MappingError, match=r"ignore_restored_keys must be a sequence .*got int"):
        parse_ignore(3, name="ignore_restored_keys")


def test_ignore_pattern_problems_are_listed_at_once():
    with pytest.raises(
        tg.MappingError, match=r"invalid ignore_model_keys \(3 problems\)"
    ) as info:
        parse_ignore(["ok", "a..b", 3, None], name="ignore_model_keys")
    message = str(info.value)
    assert "invalid path 'a..b': empty name" in message
    assert "3 is an int, not a pattern string" in message
    assert "None is a NoneType, not a pattern string" in message


def test_plan_rejects_bad_ignore_patterns_by_name():
    with pytest.raises(tg.MappingError, match=r"(?s)invalid ignore_restored_keys .*'x\[y\]'"):
        tg.plan(STATE, STATE, {"params": "params"}, ignore_restored_keys=["x[y]"])


def test_graft_takes_a_bare_string_ignore_pattern():
    source = {"params": {"enc": {"w": np.ones(2)}}}
    out = tg.graft(STATE, source, {"params": "params"}, ignore_model_keys="dec")
    np.testing.assert_array_equal(out["params"]["enc"]["w"], np.ones(2))
    assert out["params"]["dec"]["w"] is STATE["params"]["dec"]["w"]
