"""Shared test corpus: named example trees and leaves, plus hypothesis strategies.

`TREES` holds `Case`s: a readable id, a tree, and the canonical rendering of each
leaf path in jax's leaf order. `LEAVES` holds named leaves of varied shapes and
dtypes. Use them with readable ids:

    @pytest.mark.parametrize("case", TREES, ids=case_id)

flax is optional (not a dependency of treegraft): its cases are added only when
it imports, and `HAS_FLAX` says whether it did.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax import tree_util

from treegraft import Path

try:  # flax is optional: tests still run without it.
    import flax.struct
    from flax.core import FrozenDict

    HAS_FLAX = True
except ImportError:  # pragma: no cover - flax is installed in the dev venv
    flax = None  # type: ignore[assignment]
    FrozenDict = None  # type: ignore[assignment,misc]
    HAS_FLAX = False

BF16 = jnp.bfloat16

# ----------------------------------------------------------------------------
# Container types.
# ----------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", ["first", "second"])


@functools.partial(tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=["name"])
@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """A dataclass registered with `jax.tree_util.register_dataclass`."""

    w: Any
    b: Any
    name: str = "dense"


@tree_util.register_pytree_with_keys_class
class Box:
    """A custom node with keys: its child renders as `.value`."""

    def __init__(self, value: Any, label: str = "box"):
        self.value = value
        self.label = label

    def tree_flatten_with_keys(self):
        return ((tree_util.GetAttrKey("value"), self.value),), self.label

    def tree_flatten(self):
        return (self.value,), self.label

    @classmethod
    def tree_unflatten(cls, label, children):
        return cls(children[0], label)

    def __repr__(self) -> str:
        return f"Box({self.value!r}, {self.label!r})"


class Unkeyed:
    """A custom node registered without keys: children are `[0]`, `[1]`."""

    def __init__(self, a: Any, b: Any):
        self.a = a
        self.b = b

    def __repr__(self) -> str:
        return f"Unkeyed({self.a!r}, {self.b!r})"


tree_util.register_pytree_node(
    Unkeyed, lambda n: ((n.a, n.b), None), lambda _, children: Unkeyed(*children)
)

if HAS_FLAX:

    @flax.struct.dataclass
    class Struct:
        """A flax struct with a static field (not a child)."""

        params: Any
        step: Any
        tag: str = flax.struct.field(pytree_node=False, default="s")

else:  # pragma: no cover
    Struct = None  # type: ignore[assignment,misc]


# ----------------------------------------------------------------------------
# Leaves.
# ----------------------------------------------------------------------------


def _arange(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Small values (0..4), so that `renew` never overflows any dtype."""
    size = int(np.prod(shape, dtype=np.int64))
    values = np.arange(size) % 5
    if np.dtype(dtype) == np.bool_:
        values = values % 2
    return values.astype(dtype).reshape(shape)


LEAVES: dict[str, Any] = {
    "f32[2,3]": _arange((2, 3), np.float32),
    "i8[4]": _arange((4,), np.int8),
    "bool[2]": _arange((2,), np.bool_),
    "f64[]": np.array(1.5),
    "u8[0]": np.zeros((0,), np.uint8),
    "f16[1,1,2]": _arange((1, 1, 2), np.float16),
    "c64[2]": _arange((2,), np.complex64),
    "np-bf16[2]": _arange((2,), BF16),
    "jax-bf16[3]": jnp.arange(3, dtype=BF16),
    "jax-i32[2,2]": jnp.arange(4, dtype=jnp.int32).reshape(2, 2),
    "jax-f32[]": jnp.float32(0.5),
    "np-f32-scalar": np.float32(0.25),
    "abstract-f32[4]": jax.ShapeDtypeStruct((4,), jnp.float32),
    "py-int": 3,
    "py-float": 2.5,
    "py-bool": True,
}


def leaf(name: str) -> Any:
    """A fresh copy of the named leaf (arrays are copied, so tests may own them)."""
    value = LEAVES[name]
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


# ----------------------------------------------------------------------------
# The corpus.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A named tree and the canonical paths of its leaves, in jax's leaf order."""

    id: str
    tree: Any
    paths: tuple[str, ...]


def case_id(case: Case) -> str:
    return case.id


def _corpus() -> list[Case]:
    L = leaf
    cases = [
        Case("leaf-array", L("f32[2,3]"), ("",)),
        Case("leaf-python-int", L("py-int"), ("",)),
        Case("python-scalars", {"i": 3, "f": 2.5, "b": True}, ("b", "f", "i")),
        Case(
            "nested-dict",
            {
                "params": {
                    "encoder": {"kernel": L("f32[2,3]"), "bias": L("i8[4]")},
                    "decoder": {"layers_0": {"kernel": L("f32[2,3]")}},
                }
            },
            ("params.decoder.layers_0.kernel", "params.encoder.bias", "params.encoder.kernel"),
        ),
        Case(
            "list-and-tuple",
            {"layers": [L("f64[]"), (L("i8[4]"), L("bool[2]"))]},
            ("layers[0]", "layers[1][0]", "layers[1][1]"),
        ),
        Case(
            "namedtuple",
            Pair(first=L("f32[2,3]"), second=[L("py-int"), L("py-float")]),
            ("first", "second[0]", "second[1]"),
        ),
        Case(
            "register-dataclass",
            {"dense": Dense(w=L("f32[2,3]"), b=L("np-bf16[2]"))},
            ("dense.w", "dense.b"),
        ),
        Case("keys-class", Box({"x": L("u8[0]")}), ("value.x",)),
        Case("custom-node-no-keys", Unkeyed(L("f64[]"), L("c64[2]")), ("[0]", "[1]")),
        Case(
            "none-and-empty",
            {"a": None, "b": {}, "c": [], "d": (), "e": L("f16[1,1,2]"), "f": [None, L("py-bool")]},
            ("e", "f[1]"),
        ),
        Case("only-empty", {"a": None, "b": {}, "c": [[], ()]}, ()),
        Case("none-root", None, ()),
        Case(
            "int-keys",
            {0: L("py-int"), 1: L("py-float"), 10: L("f64[]")},
            ("[0]", "[1]", "[10]"),
        ),
        Case(
            "odd-string-keys",
            {
                "x.y": 1,
                "b c": 2,
                "it's": 3,
                'say "hi"': 4,
                "": 5,
                "None": 6,
                "0": 7,
                "ok": 8,
                "tab\there": 9,
                "ünï": 10,
            },
            (
                "['']",
                "['0']",
                "['None']",
                "['b c']",
                '["it\'s"]',
                "ok",
                "['say \"hi\"']",
                "['tab\\there']",
                "['x.y']",
                "ünï",
            ),
        ),
        Case(
            "ordered-and-default-dicts",
            {
                "od": collections.OrderedDict([("z", L("py-int")), ("a", L("i8[4]"))]),
                "dd": collections.defaultdict(list, {"y": [L("f64[]")], "x": L("py-float")}),
            },
            ("dd.x", "dd.y[0]", "od.z", "od.a"),  # an OrderedDict keeps its own order
        ),
        Case(
            "orbax-digit-keys",
            {"layers": {"0": L("f32[2,3]"), "1": L("f32[2,3]")}, "list": [L("i8[4]")]},
            ("layers['0']", "layers['1']", "list[0]"),
        ),
        Case(
            "jax-arrays",
            {"w": L("jax-bf16[3]"), "m": L("jax-i32[2,2]"), "s": L("jax-f32[]")},
            ("m", "s", "w"),
        ),
        Case(
            "abstract-leaves",
            {"w": L("abstract-f32[4]"), "b": L("np-f32-scalar")},
            ("b", "w"),
        ),
        Case(
            "optimizer-like",
            {
                "step": L("py-int"),
                "opt_state": (
                    Pair(first=L("jax-i32[2,2]"), second={"w": L("f32[2,3]")}),
                    None,
                    (),
                ),
            },
            ("opt_state[0].first", "opt_state[0].second.w", "step"),
        ),
    ]
    if HAS_FLAX:
        cases += [
            Case(
                "flax-struct",
                Struct(params={"w": L("f32[2,3]")}, step=L("py-int")),
                ("params.w", "step"),
            ),
            Case(
                "frozendict",
                FrozenDict({"params": {"w": L("jax-bf16[3]"), "b": L("i8[4]")}}),
                ("params.b", "params.w"),
            ),
        ]
    return cases


TREES: list[Case] = _corpus()


# ----------------------------------------------------------------------------
# Helpers over trees.
# ----------------------------------------------------------------------------


def _is_empty_node(x: Any) -> bool:
    return x is None or (isinstance(x, dict | list | tuple | Mapping) and len(x) == 0)


def node_paths(tree: Any) -> list[Path]:
    """Every node's path: leaves, inner nodes, `None` and empty containers.

    Computed with jax alone (not with treegraft), so that tests can use it as
    an independent reference.
    """
    out: set[Path] = {Path()}
    keyed = tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty_node)[0]
    for keypath, _ in keyed:
        path = Path.from_keypath(keypath)
        for n in range(len(path) + 1):
            out.add(path[:n])
    return sorted(out)


def renew(x: Any) -> Any:
    """A new leaf with the same shape and dtype as x and different values."""
    if isinstance(x, bool):
        return not x
    if isinstance(x, int | float | complex):
        return x + 1
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.ones(x.shape, x.dtype)
    if isinstance(x, jax.Array):
        return jnp.logical_not(x) if x.dtype == jnp.bool_ else (x + 1).astype(x.dtype)
    if isinstance(x, np.ndarray | np.generic):
        a = np.asarray(x)
        new = np.logical_not(a) if a.dtype == np.bool_ else a + np.ones((), a.dtype)
        new = np.asarray(new, dtype=a.dtype)
        return new if isinstance(x, np.ndarray) else new[()]
    raise TypeError(f"renew: unsupported leaf {type(x).__name__}")


def _value_copy(x: Any) -> Any:
    """A host copy of a leaf's values (a typed PRNG key array: of its key data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.array(jax.random.key_data(x), copy=True)
    return np.array(x, copy=True) if hasattr(x, "__array__") else x


def snapshot(tree: Any) -> tuple[Any, list[Any], list[Any]]:
    """The treedef, the leaf objects and copies of their values, to detect mutation."""
    leaves, treedef = tree_util.tree_flatten(tree)
    return treedef, leaves, [_value_copy(x) for x in leaves]


def assert_unchanged(tree: Any, snap: tuple[Any, list[Any], list[Any]]) -> None:
    """Asserts tree has the snapshot's structure, leaf objects and leaf values."""
    treedef, leaves, copies = snap
    now, now_def = tree_util.tree_flatten(tree)
    assert now_def == treedef
    assert len(now) == len(leaves)
    for a, b, c in zip(now, leaves, copies, strict=True):
        assert a is b
        if hasattr(a, "__array__"):
            np.testing.assert_array_equal(_value_copy(a), c)


# ----------------------------------------------------------------------------
# Hypothesis strategies.
# ----------------------------------------------------------------------------

_NP_DTYPES = [np.float32, np.float16, np.int8, np.uint16, np.int64, np.bool_, np.complex64, BF16]
_JAX_DTYPES = [jnp.float32, jnp.int32, jnp.bool_, BF16]
_SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)


def leaves() -> st.SearchStrategy[Any]:
    """Leaves: numpy and jax arrays of small varied shapes and dtypes, python scalars."""
    np_arrays = st.builds(_arange, _SHAPES, st.sampled_from(_NP_DTYPES))
    jax_arrays = st.builds(_arange, _SHAPES, st.sampled_from(_JAX_DTYPES)).map(jnp.asarray)
    scalars = st.one_of(
        st.integers(-5, 5),
        st.floats(-10, 10, allow_nan=False, allow_infinity=False),
        st.booleans(),
    )
    return st.one_of(np_arrays, jax_arrays, scalars)


def _dict_keys() -> st.SearchStrategy[Any]:
    return st.one_of(st.text(max_size=4), st.sampled_from(["a", "b", "0", "x.y", "layers_0"]))


def _numeric_keys() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(0, 2), st.booleans(), st.sampled_from([0.0, 1.0, 0.5]))


def pytrees(leaf_strategy: st.SearchStrategy[Any] | None = None, *, max_leaves: int = 8):
    """Pytrees mixing every container kind of the corpus, with `leaves()` by default.

    Dicts with str keys, int keys and mixed int/bool/float keys, OrderedDicts,
    lists, tuples, a namedtuple, a registered dataclass, custom nodes with and
    without keys, `None`, empty containers, and (when flax imports) FrozenDict
    and flax structs.
    """
    base = st.one_of(
        leaf_strategy if leaf_strategy is not None else leaves(),
        st.none(),
        st.sampled_from([dict, list, tuple]).map(lambda t: t()),
    )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        kinds = [
            st.dictionaries(_dict_keys(), children, max_size=3),
            st.dictionaries(st.integers(0, 12), children, min_size=1, max_size=3),
            # Keys that are equal across types (1 == True == 1.0) in different dicts.
            st.dictionaries(_numeric_keys(), children, min_size=1, max_size=2),
            st.dictionaries(_dict_keys(), children, max_size=3).map(collections.OrderedDict),
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.builds(Pair, children, children),
            st.builds(Dense, children, children),
            st.builds(Box, children),
            st.builds(Unkeyed, children, children),
        ]
        if HAS_FLAX:
            kinds += [
                st.dictionaries(_dict_keys(), children, max_size=3).map(FrozenDict),
                st.builds(Struct, children, children),
            ]
        return st.one_of(kinds)

    return st.recursive(base, extend, max_leaves=max_leaves)


def parts() -> st.SearchStrategy[Any]:
    """Path parts of every renderable kind, weird text included."""
    return st.one_of(
        st.text(),
        st.sampled_from(["a", "layers_0", "x.y", "b c", "it's", '"', "0", "None", "True", ""]),
        st.integers(),
        st.integers(-3, 12),
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
    )


def paths(*, max_size: int = 5) -> st.SearchStrategy[Path]:
    """Paths of up to max_size parts drawn from `parts()`."""
    return st.lists(parts(), max_size=max_size).map(Path)


# Tokens of the path grammar: glued at random, they reach deep into the scanner far
# more often than uniform text does.
_TOKENS = [
    ".", "..", "[", "]", "[0]", "[-1]", "['", "']", '["', '"]', "'", '"', "\\", "\\'",
    "*", "**", "***", "a", "_b", "layers_", "0", "12", "1.5", "1e3", "-", "None",
    "True", "False", " ", "\t", "\n", "é", "ß", "x.y", "[None]", "[1.5.2]", "[b]",
    "['x.y']", "b'x'", "\x00",
]
_GRAMMAR_ALPHABET = "ab_09.[]'\"*- \\eN\t"


def path_texts() -> st.SearchStrategy[str]:
    """Text for the path parsers: uniform, over the grammar's alphabet, or glued tokens."""
    return st.one_of(
        st.text(max_size=40),
        st.text(alphabet=_GRAMMAR_ALPHABET, max_size=14),
        st.lists(st.sampled_from(_TOKENS), max_size=12).map("".join),
    )
