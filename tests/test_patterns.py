"""Patterns: `**`, `*`, globs, captures, prefixes, substitution, correspondence."""

from __future__ import annotations

import re
import time

import pytest
import trees
from hypothesis import given
from hypothesis import strategies as st

from treegraft import MappingError, Path, PathSyntaxError, Pattern, parse_path, parse_pattern


def P(text: str) -> Path:
    return parse_path(text)


# ----------------------------------------------------------------------------
# match: the whole path, returning the captures or None.
# ----------------------------------------------------------------------------

MATCHES = [
    # `**`: zero or more whole segments; captures a tuple of parts.
    ("params.**.bias", "params.bias", ((),)),
    ("params.**.bias", "params.enc.bias", (("enc",),)),
    ("params.**.bias", "params.enc[0].bias", (("enc", 0),)),
    ("params.**.bias", "params.enc.dense.kernel", None),
    ("params.**.bias", "other.enc.bias", None),
    ("**", "", ((),)),
    ("**", "a[0].b", (("a", 0, "b"),)),
    ("**.bias", "bias", ((),)),
    ("a.**", "a", ((),)),
    ("a.**", "b", None),
    ("**.x.**", "a.x.b.x.c", (("a",), ("b", "x", "c"))),  # the first `**` takes the fewest
    ("[**]", "a.b", (("a", "b"),)),
    # `*`: exactly one segment, whatever its key type.
    ("params.*.kernel", "params.dense.kernel", ("dense",)),
    ("params.*.kernel", "params[3].kernel", (3,)),
    ("params.*.kernel", "params['0'].kernel", ("0",)),
    ("params.*.kernel", "params.kernel", None),
    ("params.*.kernel", "params.a.b.kernel", None),
    ("*", "[None]", (None,)),
    ("*", "[True]", (True,)),
    ("*", "", None),
    ("*.*", "a[1.5]", ("a", 1.5)),
    ("a[*]", "a.b", ("b",)),
    # Globs: `*` inside a segment matches a run of characters in that segment.
    ("layers_*", "layers_0", ("0",)),
    ("layers_*", "layers_12", ("12",)),
    ("layers_*", "layers_", ("",)),
    ("layers_*", "layer_1", None),
    ("layers_*", "layers_1.w", None),
    ("layers_*", "[0]", None),
    ("layers_*", "[None]", None),
    ("dec.layers_*.attn", "dec.layers_3.attn", ("3",)),
    ("*_*", "enc_layer_3", ("enc", "layer_3")),
    ("*a*", "banana", ("b", "nana")),
    ("x*y*z", "x1y2z", ("1", "2")),
    ("x*y*z", "xyz", ("", "")),
    ("*0", "[10]", ("1",)),  # an int key is matched by its digits
    ("*0", "[True]", None),
    ("a.layers_*.*", "a.layers_1[2]", ("1", 2)),
    # Literal segments.
    ("a.0", "a[0]", ()),
    ("a.0", "a['0']", ()),  # an int part finds the string key '0' (orbax)
    ("a[-1]", "a['-1']", ()),
    ("a['0']", "a[0]", None),  # but a string part never finds an int key
    ("a[1]", "a[True]", None),
    ("a[True]", "a[1]", None),
    ("a[1]", "a[1.0]", None),
    ("a.b", "a", None),
    ("a.b", "a.b.c", None),
    ("", "", ()),
    ("a['x.y'].*", "a['x.y'].z", ("z",)),
    ("a['x*']", "a['x*']", ()),
    ("a['x*']", "a.xy", None),  # a quoted star is a literal character
]


@pytest.mark.parametrize(
    ("pattern", "path", "captures"),
    MATCHES,
    ids=[f"{pat}~{path or 'root'}" for pat, path, _ in MATCHES],
)
def test_match(pattern, path, captures):
    pat = parse_pattern(pattern)
    got = pat.match(P(path))
    assert got == captures
    if captures is not None:  # types too: 3 stays an int, '3' a str
        assert [type(c) for c in got] == [type(c) for c in captures]
    # A plain tuple of parts works the same.
    assert pat.match(P(path).parts) == captures


# ----------------------------------------------------------------------------
# match_prefix: the shortest prefix that the pattern matches whole.
# ----------------------------------------------------------------------------

PREFIXES = [
    ("dec.layers_*", "dec.layers_3.attn.q", (2, ("3",))),
    ("dec.layers_*", "dec.layers_3", (2, ("3",))),
    ("dec.layers_*", "dec", None),
    ("dec.layers_*", "enc.layers_3.attn", None),
    ("params.decoder.layers_0", "params.decoder.layers_0.attn", (3, ())),
    ("params.decoder.layers_0", "params.decoder.layers_01", None),
    ("**.bias", "a.bias.bias", (2, (("a",),))),
    ("**.bias", "bias.w", (1, ((),))),
    ("a.**", "a.b.c", (1, ((),))),
    ("**", "a.b", (0, ((),))),
    ("**", "", (0, ((),))),
    ("x.**.y", "x.a.y.b.y", (3, (("a",),))),
    ("x.**.y", "x.a.b", None),
    ("a.*", "b.c", None),
    ("a.*", "a", None),
    ("a.0", "a['0'].w", (2, ())),
    ("", "a.b", (0, ())),
]


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    PREFIXES,
    ids=[f"{pat or 'root'}~{path or 'root'}" for pat, path, _ in PREFIXES],
)
def test_match_prefix(pattern, path, expected):
    assert parse_pattern(pattern).match_prefix(P(path)) == expected


# ----------------------------------------------------------------------------
# substitute and check_corresponds: carrying captures across a mapping rule.
# ----------------------------------------------------------------------------


def test_substitute_design_example():
    # {"params.decoder.layers_*": "params.encoder.layers_*"}: layers_3 <- layers_3
    new = parse_pattern("params.decoder.layers_*")
    old = parse_pattern("params.encoder.layers_*")
    new.check_corresponds(old)
    caps = new.match(P("params.decoder.layers_3"))
    assert caps == ("3",)
    assert old.substitute(caps) == P("params.encoder.layers_3")


@pytest.mark.parametrize(
    ("new", "old", "path", "expected"),
    [
        ("new.**.w", "old.**.w", "new.a[0].w", "old.a[0].w"),
        ("new.**.w", "old.**.w", "new.w", "old.w"),
        ("a.*", "b.*", "a[3]", "b[3]"),  # a lone `*` carries the int as an int
        ("a.*", "b.*", "a['3']", "b['3']"),
        ("a.*", "b.*", "a[None]", "b[None]"),
        ("a.*", "b.layers_*", "a[3]", "b.layers_3"),
        ("a.layers_*", "b.*", "a.layers_3", "b['3']"),  # a glob capture is a string
        ("a.*_*", "b.*.*", "a.x_y", "b.x.y"),
        ("**.k_*", "**.q_*", "x.y.k_1", "x.y.q_1"),
        ("a.b", "c", "a.b", "c"),
    ],
    ids=[
        "dstar",
        "dstar-empty",
        "star-int",
        "star-digit-string",
        "star-None",
        "star-into-glob",
        "glob-into-star",
        "two-globs-into-two-stars",
        "dstar-and-glob",
        "literal",
    ],
)
def test_substitute_carries_captures(new, old, path, expected):
    new_pat, old_pat = parse_pattern(new), parse_pattern(old)
    new_pat.check_corresponds(old_pat)
    got = old_pat.substitute(new_pat.match(P(path)))
    assert got == P(expected)


@pytest.mark.parametrize(
    ("pattern", "captures", "message"),
    [
        ("a.*.*", ("x",), "pattern 'a.*.*' has more wildcards than the 1 capture(s) given"),
        ("a.*", ("x", "y"), "pattern 'a.*' has fewer wildcards than the 2 capture(s) given"),
        ("a", ("x",), "pattern 'a' has fewer wildcards than the 1 capture(s) given"),
        ("a.*", (("x", "y"),), "pattern 'a.*': '*' cannot take the '**' capture ('x', 'y')"),
        ("a_*", (("x",),), "pattern 'a_*': '*' cannot take the '**' capture ('x',)"),
        ("a.**", ("x",), "pattern 'a.**': '**' needs a '**' capture, got 'x'"),
    ],
    ids=[
        "too-few",
        "too-many",
        "literal-given-one",
        "dstar-into-star",
        "dstar-into-glob",
        "str-into-dstar",
    ],
)
def test_substitute_errors(pattern, captures, message):
    with pytest.raises(MappingError, match="^" + re.escape(message) + "$"):
        parse_pattern(pattern).substitute(captures)


@pytest.mark.parametrize(
    ("new", "old"),
    [
        ("params.decoder.layers_*", "params.encoder.layers_*"),
        ("**.x", "y.**"),
        ("a.*", "b.c_*"),
        ("a.*_*", "b.*.*"),
        ("a.b", "c"),
    ],
    ids=["globs", "dstars", "star-and-glob", "two-stars", "literals"],
)
def test_check_corresponds_accepts_same_wildcards(new, old):
    assert parse_pattern(new).check_corresponds(parse_pattern(old)) is None


@pytest.mark.parametrize(
    ("new", "old", "mine", "theirs"),
    [
        ("a.*", "b.**", "*", "**"),
        ("a.layers_*", "b", "*", "none"),
        ("a", "b.*", "none", "*"),
        ("**.*", "*.**", "** *", "* **"),
        ("a.*_*", "b.*", "* *", "*"),
    ],
    ids=["star-vs-dstar", "glob-vs-literal", "literal-vs-star", "order", "count"],
)
def test_check_corresponds_rejects(new, old, mine, theirs):
    message = (
        f"the wildcards of {new!r} ({mine}) and {old!r} ({theirs}) do not correspond: "
        "both sides of a rule need the same '*' and '**' in the same order"
    )
    with pytest.raises(MappingError, match="^" + re.escape(message) + "$"):
        parse_pattern(new).check_corresponds(parse_pattern(old))


# ----------------------------------------------------------------------------
# Introspection, rendering, equality.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "is_literal", "literal_count", "wildcards"),
    [
        ("params.decoder.layers_0", True, 3, ()),
        ("params.decoder.layers_*", False, 2, ("*",)),
        ("params.**.bias", False, 2, ("**",)),
        ("*.x_*_*.**", False, 0, ("*", "*", "*", "**")),
        ("", True, 0, ()),
    ],
    ids=["literal", "glob", "dstar", "mixed", "root"],
)
def test_introspection(text, is_literal, literal_count, wildcards):
    pat = parse_pattern(text)
    assert pat.is_literal is is_literal
    assert pat.literal_count == literal_count
    assert pat.wildcards() == wildcards


def test_as_path():
    assert parse_pattern("a.0['b c']").as_path() == P("a[0]['b c']")
    with pytest.raises(ValueError, match=r"^pattern 'a\.\*' has wildcards$"):
        parse_pattern("a.*").as_path()


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("params.**.bias", "params.**.bias"),
        ("a.0.*", "a[0].*"),
        ("[*]", "*"),
        ("a[**].b", "a.**.b"),
        ("a['b c'].layers_*", "a['b c'].layers_*"),
        ("[0].x_*", "[0].x_*"),
        ("  a.b  ", "a.b"),
    ],
    ids=lambda v: repr(v),
)
def test_str_and_repr(text, rendered):
    pat = parse_pattern(text)
    assert str(pat) == rendered
    assert repr(pat) == f"Pattern({rendered!r})"
    assert parse_pattern(rendered) == pat


def test_equality_and_hash():
    a, b = parse_pattern("a.0.*"), parse_pattern("a[0][*]")
    assert a == b and hash(a) == hash(b)
    assert parse_pattern("a.0") != parse_pattern("a['0']")
    assert a != "a[0].*"
    assert Pattern.__module__ == "treegraft"


def test_parse_pattern_from_path_is_literal():
    # A Path part that looks like a glob is still a literal key.
    pat = parse_pattern(Path(("a", "x*")))
    assert pat.is_literal
    assert str(pat) == "a['x*']"
    assert pat.match(Path(("a", "x*"))) == ()
    assert pat.match(P("a.xy")) is None
    same = parse_pattern("a.b")
    assert parse_pattern(same) is same


PATTERN_ERRORS = [
    ("***", 1, "'**' must be a whole segment"),
    ("a**", 2, "'**' must be a whole segment"),
    ("a.b**c", 4, "'**' must be a whole segment"),
    ("a[***]", 3, "too many '*' in a row"),
    ("a[*x]", 4, "unexpected 'x', expected ']'"),
    ("a..*", 3, "empty name (two dots in a row, or a leading dot)"),
    ("a.*-b", 4, "unexpected '-', expected '.' or '['"),
]


@pytest.mark.parametrize(
    ("text", "column", "reason"), PATTERN_ERRORS, ids=[repr(e[0]) for e in PATTERN_ERRORS]
)
def test_pattern_syntax_errors(text, column, reason):
    message = f"invalid path {text!r}: {reason} at column {column}\n  {text}\n{' ' * (column + 1)}^"
    with pytest.raises(PathSyntaxError, match="^" + re.escape(message) + "$"):
        parse_pattern(text)


# ----------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------

_PATTERNS = [
    parse_pattern(t)
    for t in [
        "**",
        "*",
        "a.**",
        "**.a",
        "**.*.**",
        "*.*",
        "a.*.b",
        "layers_*",
        "*_*.**",
        "x*y",
        "*0",
        "a.0",
        "[None].**",
        "['']",
        "a['x.y'][1.5]",
    ]
]


def _check_captures(pat: Pattern, caps: tuple) -> None:
    assert len(caps) == len(pat.wildcards())
    for kind, cap in zip(pat.wildcards(), caps, strict=True):
        if kind == "**":
            assert isinstance(cap, tuple)
        else:
            assert not isinstance(cap, tuple)


@given(trees.paths(max_size=6))
def test_match_never_raises_and_captures_every_wildcard(path):
    for pat in _PATTERNS:
        caps = pat.match(path)
        assert caps is None or isinstance(caps, tuple)
        if caps is not None:
            _check_captures(pat, caps)


@given(trees.paths(max_size=6))
def test_match_prefix_is_the_shortest_matching_prefix(path):
    for pat in _PATTERNS:
        got = pat.match_prefix(path)
        matching = [n for n in range(len(path) + 1) if pat.match(path[:n]) is not None]
        if got is None:
            assert matching == []
        else:
            n, caps = got
            assert n == matching[0]
            assert caps == pat.match(path[:n])


@given(trees.paths(max_size=6))
def test_a_path_as_pattern_matches_itself(path):
    assert parse_pattern(path).match(path) == ()
    assert parse_pattern(path).match_prefix(path / "x") == (len(path), ())
    assert parse_pattern("**").match(path) == (path.parts,)


_LONE = [parse_pattern(t) for t in ["**", "*.**", "**.*", "*.*.**", "**.*.**", "*.**.*"]]


@given(trees.paths(max_size=6))
def test_substitute_inverts_match_for_lone_wildcards(path):
    for pat in _LONE:
        caps = pat.match(path)
        if caps is not None:
            assert pat.substitute(caps) == path


@given(st.lists(st.sampled_from(["a", "0", "layers_1", "x.y"]), max_size=4))
def test_glob_captures_substitute_back(names):
    # Every string part matched by `*` (whole) or `layers_*`-like globs comes back.
    path = Path(names)
    pat = parse_pattern(".".join(["*"] * len(names)))
    caps = pat.match(path)
    assert caps == tuple(names)
    assert pat.substitute(caps) == path


# ----------------------------------------------------------------------------
# No backtracking (reliability round 2, item 7).
# ----------------------------------------------------------------------------


def _regex_captures(glob: str, text: str):
    """The captures the old regex `p0(.*?)p1...` gave: the reference semantics."""
    pieces = glob.split("*")
    m = re.fullmatch("(.*?)".join(re.escape(p) for p in pieces), text, re.DOTALL)
    return None if m is None else m.groups()


@given(
    st.text("ab*", min_size=1, max_size=6).filter(lambda g: "*" in g and "**" not in g),
    st.text("ab\n", max_size=8),
)
def test_glob_captures_are_the_shortest_runs_as_the_regex_gave(glob, text):
    pat = parse_pattern(glob)
    assert pat.match([text]) == _regex_captures(str(pat), text)


@pytest.mark.parametrize(
    "pattern, path",
    [
        pytest.param("*a*a*a*a*b", ["a" * 200], id="glob-200-chars"),
        pytest.param("*a*a*a*a*b", ["a" * 199 + "b" + "a"], id="glob-200-chars-b-inside"),
        pytest.param("**.**.**.*a*a*a*a*b", ["a" * 20] * 40, id="dstar-glob-depth-40"),
        pytest.param("**.**.**.**.**.**.x", ["a"] * 60, id="six-dstars-depth-60"),
    ],
)
def test_pathological_patterns_do_not_hang(pattern, path):
    # A "does not hang" guard, not a speed figure: these took 7 s to over a
    # minute with backtracking; now well under a millisecond.
    pat = parse_pattern(pattern)
    start = time.perf_counter()
    assert pat.match(path) is None
    assert pat.match_prefix(path) is None
    assert time.perf_counter() - start < 2.0


def test_several_dstars_take_the_fewest_segments_first():
    pat = parse_pattern("**.a.**.a.**")
    assert pat.match(P("a.a.a.a")) == ((), (), ("a", "a"))
    assert pat.match_prefix(P("x.a.y.a.z")) == (4, (("x",), ("y",), ()))
