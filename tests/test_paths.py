"""Paths: the kontext grammar, canonical rendering, errors, Path semantics."""

from __future__ import annotations

import collections
import pickle
import re
import warnings

import jax
import optree
import pytest
import trees
from hypothesis import given
from hypothesis import strategies as st
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

import treegraft as tg
from treegraft import GraftError, Path, PathSyntaxError, parse_path, parse_pattern

# ----------------------------------------------------------------------------
# The grammar (docs/design.md section 3), one row per form.
# ----------------------------------------------------------------------------

GRAMMAR = [
    ("params.decoder.layers_0", ("params", "decoder", "layers_0")),
    ("a[0].b", ("a", 0, "b")),
    ("a.0.b", ("a", 0, "b")),
    ("a['x.y'].z", ("a", "x.y", "z")),
    ('a["x.y"].z', ("a", "x.y", "z")),
    ("a[-1]", ("a", -1)),
    ("a[None]", ("a", None)),
    ("a[True]", ("a", True)),
    ("a[False]", ("a", False)),
    ("", ()),
    ("   ", ()),
    # Further forms the grammar implies.
    ("0", (0,)),
    ("[0]", (0,)),
    ("[0][1]", (0, 1)),
    ("a[0][1]", ("a", 0, 1)),
    ("a.10", ("a", 10)),
    ("a['0']", ("a", "0")),
    ("a[1.5]", ("a", 1.5)),
    ("a[-2.5e3]", ("a", -2500.0)),
    ("a[1e3]", ("a", 1000.0)),
    ("a['']", ("a", "")),
    ("a['b c']", ("a", "b c")),
    ('a["it\'s"]', ("a", "it's")),
    ("a['it\\'s']", ("a", "it's")),
    ("a['\\u00e9\\n']", ("a", "é\n")),
    ("a[ 0 ]", ("a", 0)),
    ("  a.b  ", ("a", "b")),
    ("_x.y_1", ("_x", "y_1")),
    ("ünï.b", ("ünï", "b")),
    ("a.None", ("a", "None")),  # a dotted word is always a string
    ("a['None']", ("a", "None")),
    ("['a'].b", ("a", "b")),
]


@pytest.mark.parametrize(("text", "parts"), GRAMMAR, ids=[repr(t) for t, _ in GRAMMAR])
def test_parse_path_grammar(text, parts):
    path = parse_path(text)
    assert isinstance(path, Path)
    assert path.parts == parts
    # Types matter: 0 is not '0', True is not 1, 1.0 is not 1.
    assert [type(p) for p in path.parts] == [type(p) for p in parts]


def test_documented_example_parts():
    assert parse_path("a[0]['x.y'].z").parts == ("a", 0, "x.y", "z")


# ----------------------------------------------------------------------------
# Canonical rendering: `.name` for identifiers, `[repr]` for everything else.
# ----------------------------------------------------------------------------

RENDERING = [
    ("a.0['b c']", "a[0]['b c']"),
    ("a.0.b", "a[0].b"),
    ('a["x.y"].z', "a['x.y'].z"),
    ("a['b']", "a.b"),
    ("['a']", "a"),
    ("0", "[0]"),
    ("a[ -1 ]", "a[-1]"),
    ("a[1e3]", "a[1000.0]"),
    ("a[None]", "a[None]"),
    ("a['None']", "a['None']"),
    ("a[True]", "a[True]"),
    ("a['True']", "a['True']"),
    ("a['0']", "a['0']"),
    ("a['']", "a['']"),
    ('["it\'s"]', '["it\'s"]'),
    ("a['tab\\t']", "a['tab\\t']"),
    ("ünï", "ünï"),
    ("  a  ", "a"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "rendered"), RENDERING, ids=[repr(t) for t, _ in RENDERING])
def test_canonical_rendering(text, rendered):
    path = parse_path(text)
    assert str(path) == rendered
    assert repr(path) == f"Path({rendered!r})"
    assert parse_path(rendered) == path


@pytest.mark.parametrize(
    ("parts", "rendered"),
    [
        (("params", "decoder", "layers_0"), "params.decoder.layers_0"),
        (("a", 0, "x.y"), "a[0]['x.y']"),
        ((0, "a"), "[0].a"),
        (("a", "0"), "a['0']"),
        (("a", 1.0), "a[1.0]"),
        (("a", True, None), "a[True][None]"),
        (("a", "b c", 'q"'), "a['b c']['q\"']"),
        (("class",), "class"),
        (("1a",), "['1a']"),
        (("a-b",), "['a-b']"),
        (("a*",), "['a*']"),
        ((), ""),
    ],
    ids=lambda v: repr(v) if isinstance(v, tuple) else None,
)
def test_render_from_parts(parts, rendered):
    assert str(Path(parts)) == rendered
    assert parse_path(rendered) == Path(parts)


# ----------------------------------------------------------------------------
# Syntax errors: the string, the reason, the column and a caret under it.
# ----------------------------------------------------------------------------


def syntax_message(text: str, column: int, reason: str) -> str:
    """The full message of a PathSyntaxError; column is 1-based."""
    return f"invalid path {text!r}: {reason} at column {column}\n  {text}\n{' ' * (column + 1)}^"


ERRORS = [
    ("a..b", 3, "empty name (two dots in a row, or a leading dot)"),
    ("a.", 3, "expected a name after '.'"),
    (".a", 1, "empty name (two dots in a row, or a leading dot)"),
    ("a-b", 2, "unexpected '-', expected '.' or '['"),
    ("a b", 2, "unexpected blank, expected '.' or '['"),
    ("a[b]", 3, "bare name 'b' in brackets; quote it: ['b']"),
    ("a[nan]", 3, "bare name 'nan' in brackets; quote it: ['nan']"),
    ("a[0", 2, "unclosed '['"),
    ("a['x'", 2, "unclosed '['"),
    ("a[", 2, "unclosed '['"),
    ("a['x", 3, "unclosed quote"),
    ('a["x]', 3, "unclosed quote"),
    ("a['x\\']", 3, "unclosed quote"),
    ("a[1.5.2]", 6, "unexpected '.', expected ']'"),
    ("a[]", 3, "empty brackets"),
    ("a[-]", 3, "unexpected '-', expected a key inside '[...]'"),
    ("a[0]b", 5, "unexpected 'b', expected '.' or '['"),
    ("a['x']]", 7, "unexpected ']', expected '.' or '['"),
    ("a.0b", 3, "'0b' is not a name (names start with a letter or '_')"),
    ("a.٣", 3, "'٣' is not a name (names start with a letter or '_')"),
    ("a[٣]", 3, "unexpected '٣', expected a key inside '[...]'"),
    ("a.*", 3, "wildcards are only allowed in patterns"),
    ("params.layers_*", 15, "wildcards are only allowed in patterns"),
    ("**.bias", 1, "wildcards are only allowed in patterns"),
    ("a[*]", 3, "wildcards are only allowed in patterns"),
    # A blank between two names (a blank inside a name) stays an error.
    ("a . b c", 6, "unexpected blank, expected '.' or '['"),
    ("a[0] b", 5, "unexpected blank, expected '.' or '['"),
    ("a . ", 4, "expected a name after '.'"),
    # inf does not render back to anything that parses.
    ("a[1e999]", 3, "number out of range (1e999 is not a finite float)"),
    ("a[ -1e999 ]", 4, "number out of range (-1e999 is not a finite float)"),
    ("a['\\d']", 3, "invalid string literal (invalid escape sequence '\\d'"),
]


@pytest.mark.parametrize(("text", "column", "reason"), ERRORS, ids=[repr(e[0]) for e in ERRORS])
def test_syntax_errors(text, column, reason):
    with pytest.raises(PathSyntaxError) as info:
        parse_path(text)
    err = info.value
    message = str(err)
    head, shown, caret = message.split("\n")
    assert head.startswith(f"invalid path {text!r}: {reason}")
    assert head.endswith(f" at column {column}")
    assert shown == f"  {text}"
    assert caret == " " * (column + 1) + "^"
    assert err.text == text
    assert err.column == column - 1
    assert isinstance(err, GraftError) and isinstance(err, ValueError)


def test_syntax_error_full_message():
    with pytest.raises(
        PathSyntaxError,
        match="^"
        + re.escape(syntax_message("a..b", 3, "empty name (two dots in a row, or a leading dot)"))
        + "$",
    ):
        parse_path("a..b")
    with pytest.raises(PathSyntaxError) as info:
        parse_path("params.decoder layers_0")
    assert str(info.value) == (
        "invalid path 'params.decoder layers_0': unexpected blank, expected '.' or '[' "
        "at column 15\n"
        "  params.decoder layers_0\n"
        "                ^"
    )


def test_syntax_error_number_too_long():
    text = "a." + "9" * 5000
    with pytest.raises(PathSyntaxError, match=r"number too long \(5000 characters\) at column 3\n"):
        parse_path(text)
    with pytest.raises(PathSyntaxError, match=r"number too long \(5000 characters\) at column 3\n"):
        parse_path("a[" + "9" * 5000 + "]")


def test_invalid_escape_is_an_error_under_any_warning_filter():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PathSyntaxError, match=r"invalid escape sequence '\\d'"):
            parse_path("a['\\d']")


def test_parse_path_rejects_non_strings():
    with pytest.raises(TypeError, match=r"a path must be a str, got int: 3"):
        parse_path(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a path must be a str, got tuple: \('a',\)"):
        parse_path(("a",))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 3, 1.5, b"a.b", ["a"]], ids=repr)
def test_a_non_string_path_is_a_graft_error_and_a_type_error(bad):
    # docs/design.md section 2: every bad-input error is a GraftError; old code caught TypeError.
    for parse in (parse_path, parse_pattern):
        with pytest.raises(tg.PathTypeError, match=r"^a path must be a str, got ") as info:
            parse(bad)
        assert isinstance(info.value, GraftError) and isinstance(info.value, TypeError)
    with pytest.raises(GraftError, match=rf"got {type(bad).__name__}"):
        parse_path(bad)


BLANKS = [
    (" a . b ", ("a", "b")),
    ("a [ 0 ]", ("a", 0)),
    ("a.\tb", ("a", "b")),
    ("a\n.b", ("a", "b")),
    ("a [ 'x y' ] . c", ("a", "x y", "c")),
    ("a . 0 . b", ("a", 0, "b")),
    ("a[0] [1]", ("a", 0, 1)),
    ("\ta\t", ("a",)),
]


@pytest.mark.parametrize(("text", "parts"), BLANKS, ids=[repr(t) for t, _ in BLANKS])
def test_blanks_around_tokens_are_ignored(text, parts):
    # docs/design.md section 3: as kontext does.
    assert parse_path(text).parts == parts


def test_blanks_around_pattern_tokens_are_ignored():
    assert parse_pattern(" ** . bias ") == parse_pattern("**.bias")
    assert parse_pattern("params . layers_* [ * ]") == parse_pattern("params.layers_*[*]")


@given(st.from_regex(r"\A-?[0-9]{1,4}(\.[0-9]{1,3})?([eE][-+]?[0-9]{1,4})?\Z"))
def test_bracketed_numbers_parse_and_round_trip_or_are_rejected(number):
    text = f"a[{number}]"
    try:
        path = parse_path(text)
    except PathSyntaxError as e:
        assert "is not a finite float" in e.reason and e.column == 2
    else:
        assert parse_path(str(path)) == path
        assert str(parse_path(str(path))) == str(path)


def test_parse_path_returns_a_path_as_is():
    p = Path(("a", 0))
    assert parse_path(p) is p


# ----------------------------------------------------------------------------
# Path semantics.
# ----------------------------------------------------------------------------


def test_path_is_immutable():
    p = parse_path("a.b")
    with pytest.raises(AttributeError, match="Path is immutable"):
        p.parts = ("c",)  # type: ignore[misc]
    with pytest.raises(AttributeError, match="Path is immutable"):
        del p.parts
    with pytest.raises(AttributeError, match="Path is immutable"):
        p.other = 1  # type: ignore[attr-defined]
    assert p.parts == ("a", "b")


def test_path_equality_and_hash():
    a, b = parse_path("a.0['b c']"), parse_path("a[0]['b c']")
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: 1}[b] == 1
    assert a != ("a", 0, "b c")  # a Path is not a tuple
    assert Path() == parse_path("")


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ((0,), ("0",)),
        ((1,), (True,)),
        ((0,), (False,)),
        ((1,), (1.0,)),
        ((None,), ("None",)),
        (("a", 0), ("a", "0")),
    ],
    ids=["0-vs-'0'", "1-vs-True", "0-vs-False", "1-vs-1.0", "None-vs-'None'", "a[0]-vs-a['0']"],
)
def test_paths_of_different_part_types_are_distinct(left, right):
    a, b = Path(left), Path(right)
    assert a != b
    assert len({a, b}) == 2
    assert str(a) != str(b)  # the rendering tells them apart too
    assert not a.startswith(b) and not b.startswith(a)


def test_ordering_of_mixed_types_never_raises():
    paths = [
        Path(("a", 0)),
        Path(("0",)),
        Path((1,)),
        Path((0.5,)),
        Path((True,)),
        Path((None,)),
        Path(("a",)),
        Path(()),
        Path((False,)),
        Path((-1,)),
    ]
    assert sorted(paths) == [
        Path(()),
        Path((None,)),
        Path((False,)),
        Path((True,)),
        Path((-1,)),
        Path((0.5,)),
        Path((1,)),
        Path(("0",)),
        Path(("a",)),
        Path(("a", 0)),
    ]
    assert Path((None,)) < Path(("a",)) <= Path(("a",)) < Path(("a", 0))
    assert Path((1,)) > Path((True,)) and Path((1,)) >= Path((0,))


def test_path_operations():
    p = parse_path("a[0].b")
    assert len(p) == 3
    assert list(p) == ["a", 0, "b"]
    assert p[1] == 0 and p[-1] == "b"
    assert p[:2] == parse_path("a[0]") and isinstance(p[:2], Path)
    assert p / "c" == parse_path("a[0].b.c")
    assert p / 3 == parse_path("a[0].b[3]")
    assert p / parse_path("c['d e']") == parse_path("a[0].b.c['d e']")
    assert p.startswith(Path())
    assert p.startswith(parse_path("a[0]"))
    assert not p.startswith(parse_path("a['0']"))
    assert not parse_path("a").startswith(p)


def test_path_pickles():
    p = parse_path("a[0]['x.y'][None][True][1.5]")
    q = pickle.loads(pickle.dumps(p))
    assert q == p and hash(q) == hash(p) and str(q) == str(p)


def test_path_module_is_public():
    assert Path.__module__ == "treegraft"
    assert tg.Path is Path


# ----------------------------------------------------------------------------
# From jax key paths and optree accessors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keypath", "rendered", "parts"),
    [
        ((DictKey("a"), DictKey(0), DictKey("0")), "a[0]['0']", ("a", 0, "0")),
        ((GetAttrKey("b"), DictKey("b")), "b.b", ("b", "b")),
        ((SequenceKey(0), FlattenedIndexKey(1)), "[0][1]", (0, 1)),
        ((DictKey(True), DictKey(None), DictKey(1.5)), "[True][None][1.5]", (True, None, 1.5)),
        ((DictKey("x.y"), GetAttrKey("z")), "['x.y'].z", ("x.y", "z")),
        (("a", 0), "a[0]", ("a", 0)),  # plain keys pass through
        ((), "", ()),
    ],
    ids=[
        "dict-keys",
        "getattr-key",
        "sequence-and-flattened",
        "odd-dict-keys",
        "quoted",
        "plain",
        "root",
    ],
)
def test_from_jax_keypath(keypath, rendered, parts):
    p = Path.from_keypath(keypath)
    assert p.parts == parts
    assert [type(x) for x in p.parts] == [type(x) for x in parts]
    assert str(p) == rendered


def test_from_keypath_agrees_with_jax_flatten():
    tree = {
        "s": {"a": [1, (2, {"x.y": 3})], "n": trees.Pair(4, 5), "d": trees.Dense(6, 7)},
        "i": {0: 8, 1: 9},
    }
    keyed = jax.tree_util.tree_flatten_with_path(tree)[0]
    got = [str(Path.from_keypath(kp)) for kp, _ in keyed]
    assert got == [
        "i[0]",
        "i[1]",
        "s.a[0]",
        "s.a[1][0]",
        "s.a[1][1]['x.y']",
        "s.d.w",
        "s.d.b",
        "s.n.first",
        "s.n.second",
    ]


def test_from_optree_accessors_match_jax_paths():
    # optree knows dicts, lists, tuples, namedtuples and None natively.
    tree = {"a": [1, (2, {"x.y": 3})], "n": trees.Pair(4, [5]), "i": {0: 6, 10: 7}, "z": None}
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree, none_is_leaf=False)
    from_optree = [Path.from_keypath(acc) for acc in accessors]
    assert from_optree == list(tg.flatten(tree))
    assert [str(p) for p in from_optree] == [
        "a[0]",
        "a[1][0]",
        "a[1][1]['x.y']",
        "i[0]",
        "i[10]",
        "n.first",
        "n.second[0]",
    ]
    assert leaves == jax.tree_util.tree_leaves(tree)


def test_from_optree_entries_one_by_one():
    Point = collections.namedtuple("Point", "x y")
    (acc_nt,), _, _ = optree.tree_flatten_with_accessor(Point(1, None))
    assert Path.from_keypath(acc_nt) == parse_path("x")  # the field name, not index 0

    @optree.dataclasses.dataclass(namespace="treegraft-tests")
    class Cell:
        w: int

    (acc_dc,), _, _ = optree.tree_flatten_with_accessor(Cell(1), namespace="treegraft-tests")
    assert Path.from_keypath(acc_dc) == parse_path("w")

    (acc_seq,), _, _ = optree.tree_flatten_with_accessor([[1]])
    assert Path.from_keypath(acc_seq) == parse_path("[0][0]")


def test_from_optree_tree_paths():
    tree = {"a": [1, {"b": 2}], "c": {3: 4}}
    assert [Path.from_keypath(kp) for kp in optree.tree_paths(tree)] == list(tg.flatten(tree))


# ----------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------


@given(trees.paths())
def test_round_trip_of_generated_paths(path):
    text = str(path)
    again = parse_path(text)
    assert again == path
    assert str(again) == text


@given(trees.pytrees())
def test_round_trip_of_every_flattened_path(tree):
    for path in tg.flatten(tree):
        assert parse_path(str(path)) == path


_TEXT = trees.path_texts()
_PART_TYPES = (str, int, float, bool, type(None))


def _check_syntax_error(e: PathSyntaxError, text: str) -> None:
    message = str(e)
    assert isinstance(e, GraftError) and isinstance(e, ValueError)
    assert message.startswith(f"invalid path {text!r}: {e.reason} at column {e.column + 1}")
    assert 0 <= e.column <= len(text)
    # The caret line ends the message and points at the column under the text.
    assert message.endswith("\n" + " " * (e.column + 2) + "^")


@given(_TEXT)
def test_parse_path_raises_only_path_syntax_error(text):
    try:
        path = parse_path(text)
    except PathSyntaxError as e:
        _check_syntax_error(e, text)
    else:
        assert all(type(p) in _PART_TYPES for p in path.parts)
        assert parse_path(str(path)) == path
        assert str(parse_path(str(path))) == str(path)


@given(_TEXT)
def test_parse_pattern_raises_only_path_syntax_error(text):
    try:
        pattern = parse_pattern(text)
    except PathSyntaxError as e:
        _check_syntax_error(e, text)
    else:
        again = parse_pattern(str(pattern))
        assert again == pattern
        assert str(again) == str(pattern)
        assert again.wildcards() == pattern.wildcards()
        # A pattern without wildcards is a path, and both read the text alike.
        if pattern.is_literal:
            assert pattern.as_path() == parse_path(text)
