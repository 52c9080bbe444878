"""One error model: every GraftError lists `Problem`s, its message made from them."""

import pickle

import numpy as np
import pytest

import treegraft as tg
from treegraft._parse.rules import parse_ignore, parse_mapping


def _problem(kind, message="m"):
    return tg.Problem(kind, message)


@pytest.mark.parametrize(
    ("kinds", "cls"),
    [
        (["missing", "unmatched_rule"], tg.PathNotFoundError),
        (["shape", "dtype"], tg.MismatchError),
        (["tie"], tg.MappingError),
        (["mapping", "ignore"], tg.MappingError),
        (["insert"], tg.MismatchError),
        (["sharding"], tg.MismatchError),
        (["abstract"], tg.GraftError),
        (["missing", "shape"], tg.GraftError),
        (["no such kind"], tg.GraftError),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, list) else v.__name__,
)
def test_from_problems_picks_the_class_the_kinds_share(kinds, cls):
    problems = [_problem(k) for k in kinds]
    error = tg.GraftError.from_problems(problems, rules=2)
    assert type(error) is cls
    assert error.problems == tuple(problems)
    noun = "problem" if len(kinds) == 1 else "problems"
    assert str(error).startswith(f"cannot graft (2 rules): {len(kinds)} {noun}\n")


def test_from_problems_message_has_sections_and_remedies():
    problems = [
        tg.Problem("shape", "'w': float32[2] vs float32[3]", remedy="reshape it"),
        tg.Problem("missing", "'b' has no source", remedy="map it to None"),
        tg.Problem("missing", "'c' has no source", remedy="map it to None"),
    ]
    assert str(tg.GraftError.from_problems(problems, rules=1)) == (
        "cannot graft (1 rule): 3 problems\n"
        "missing in the source: target leaves covered by a rule with no source leaf: 2\n"
        "  'b' has no source\n"
        "  'c' has no source\n"
        "shape differs: 1\n"
        "  'w': float32[2] vs float32[3]\n"
        "to fix:\n"  # remedies in the order of the problems, each once
        "  - reshape it\n"
        "  - map it to None"
    )


def test_a_header_of_its_own_drops_the_heading_of_a_single_kind_only():
    one = tg.GraftError.from_problems([_problem("insert", "a"), _problem("insert", "b")],
                                      header="cannot insert:")
    assert str(one) == "cannot insert:\n  a\n  b"
    mixed = tg.GraftError.from_problems([_problem("mapping", "a"), _problem("tie", "b")],
                                        header="bad:")
    assert str(mixed) == (
        "bad:\ninvalid mapping entries: 1\n  a\n"
        "rules tied on the same leaf (make one more specific): 1\n  b"
    )
    assert type(mixed) is tg.MappingError


def test_long_sections_are_cut():
    error = tg.GraftError.from_problems([_problem("shape", f"p{i}") for i in range(25)], rules=1)
    lines = str(error).split("\n")
    assert lines[-1] == "  ... and 5 more"
    assert len(error.problems) == 25


@pytest.mark.parametrize(
    ("raise_it", "kind"),
    [
        (lambda: parse_mapping({"a..b": "c", 1: "x"}), "mapping"),
        (lambda: parse_ignore(["a..b", 3], name="ignore_model_keys"), "ignore"),
        (lambda: tg.insert({"a": np.zeros(2)}, "a", np.zeros(3)), "insert"),
        (
            lambda: tg.propagate_sharding({"w": np.zeros(2)}, {"w": np.zeros(3)}),
            "sharding",
        ),
    ],
    ids=["mapping", "ignore", "insert", "propagate_sharding"],
)
def test_every_listing_error_holds_problems(raise_it, kind):
    with pytest.raises(tg.GraftError) as info:
        raise_it()
    problems = info.value.problems
    assert problems and all(isinstance(p, tg.Problem) for p in problems)
    assert {p.kind for p in problems} == {kind}
    for p in problems:
        assert "  " + p.message.replace("\n", "\n    ") in str(info.value)


def test_a_syntax_error_in_a_mapping_keeps_its_caret_under_the_entry():
    with pytest.raises(tg.MappingError) as info:
        parse_mapping({"a..b": "c"})
    assert str(info.value) == (
        "invalid mapping (1 problem):\n"
        "  entry 'a..b': invalid path 'a..b': empty name (two dots in a row, or a leading dot) "
        "at column 3\n"
        "      a..b\n"
        "        ^"
    )


def test_with_prefix_copies_the_error_and_leaves_it_unchanged():
    error = tg.GraftError.from_problems([_problem("shape", "w")], rules=1)
    copy = error.with_prefix("step 'x': ")
    assert type(copy) is tg.MismatchError and copy is not error
    assert str(copy) == "step 'x': " + str(error) and copy.message == str(copy)
    assert copy.problems == error.problems
    assert not str(error).startswith("step")
    syntax = tg.PathSyntaxError("a..b", 2, "empty name")
    prefixed = syntax.with_prefix("p: ")
    assert (prefixed.text, prefixed.column, prefixed.reason) == ("a..b", 2, "empty name")
    assert str(prefixed) == "p: " + str(syntax)
    assert pickle.loads(pickle.dumps(syntax)).column == 2
    missing = tg.CheckpointNotFoundError("no workdir").with_prefix("p: ")
    assert isinstance(missing, FileNotFoundError) and str(missing) == "p: no workdir"


def test_pattern_as_path_of_a_glob_is_a_graft_error():
    with pytest.raises(tg.GraftError, match=r"^pattern 'a\.\*' has wildcards$"):
        tg.parse_pattern("a.*").as_path()


def test_every_problem_kind_has_one_heading_and_class():
    """The `Kind` literal and the `KINDS` table list the same kinds, each once."""
    import typing

    from treegraft._errors import KINDS, Kind

    kinds = typing.get_args(Kind)
    assert len(kinds) == len(set(kinds))
    assert set(kinds) == set(KINDS)
    assert all(issubclass(cls, tg.GraftError) for _, cls in KINDS.values())
