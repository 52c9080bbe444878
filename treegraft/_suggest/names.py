"""Names: each leaf path cut into layer indices, name tokens and a template.

The first step of `suggest` (docs/design.md section 18). A path such as
`model.layers.3.self_attn.q_proj.weight` gives the template
`model.layers.*.self_attn.q_proj.weight`, the indices `(3,)` and the tokens
`{layers, self, attn, q, proj}` plus its leaf kind `weight`. Tokens are
normalised so that the spellings of one idea meet: separators and case,
`kernel`/`weight`/`scale`, `embedding`/`embed_tokens`, `attention`/`attn`.
Everything here is pure and reads no array.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from treegraft._parse.paths import Part, is_index

__all__ = ["Leaf", "Wild", "describe_leaf", "normalise", "specific"]

# An identifier ending in `_3` carries a layer index (`layers_3`, `h_3`); only
# identifiers, so that `layers_*` is a pattern the rules can be written with.
_SUFFIX = re.compile(r"^(?P<stem>[A-Za-z_][A-Za-z0-9_]*?[A-Za-z])_(?P<index>[1-9][0-9]{0,8}|0)$")
# Linen names unnamed submodules `ClassName_N`: an order, not a layer run.
_AUTO = re.compile(r"^[A-Z][A-Za-z0-9]*_[0-9]{1,9}$")
_SPLIT = re.compile(r"[._\-\s]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

# One spelling per idea. Leaf kinds (`weight`) are kept apart from the other
# tokens: every Linear has one, so they say little about which one it is.
_SYNONYMS = {
    "kernel": "weight",
    "scale": "weight",
    "gamma": "weight",
    "embedding": "embed",
    "embeddings": "embed",
    "embedder": "embed",
    "wte": "embed",
    "attention": "attn",
    "selfattention": "attn",
    "layer": "layers",
    "blocks": "layers",
    "block": "layers",
    "h": "layers",
    "layernorm": "norm",
    "ln": "norm",
    "rmsnorm": "norm",
    "beta": "bias",
    "feedforward": "mlp",
    "ffn": "mlp",
    "ff": "mlp",
}
# Tokens that tell no module from another: a shared `params` is no evidence.
GENERIC = frozenset({"params", "param", "model", "weight", "bias", "self", "proj", "module",
                     "variables", "base", "net"})
LEAF_KINDS = frozenset({"weight", "bias"})
# A leaf's own name only: Haiku's `w` and `b` (elsewhere `b` is just a name).
_LAST = {"w": "weight", "b": "bias"}


@dataclass(frozen=True)
class Wild:
    """A template part that stands for a layer index: `*`, or a glob such as `layers_*`."""

    text: str


@dataclass(frozen=True)
class Leaf:
    """One leaf as `suggest` sees it: where, what shape, and what its name says."""

    parts: tuple[Part, ...]
    shape: tuple[int, ...]
    dtype: Any
    template: tuple[Any, ...]  # index parts replaced by `Wild`s
    indices: tuple[int, ...]  # the layer indices, in path order
    tokens: frozenset[str]  # normalised name tokens, the leaf kind excluded
    kind: str  # `bias`, `weight`, or the leaf's own name (see `leaf_class`)
    raw_kind: str  # the last name as written (`kernel`, `weight`, `scale`...)
    auto: bool  # a Linen auto-name (`Dense_0`) is on the path


def normalise(word: str) -> list[str]:
    """The tokens of one name: split on separators and camelCase, lowercased, synonyms applied."""
    tokens = []
    for piece in _SPLIT.split(_CAMEL.sub("_", word)):
        if not piece or piece.isdigit():
            continue
        low = piece.lower()
        tokens.append(_SYNONYMS.get(low, low))
    # `embed_tokens` is one idea: the tokens' embedding.
    if "embed" in tokens and "tokens" in tokens:
        tokens.remove("tokens")
    return tokens


def _cut(part: Part) -> tuple[Any, int | None, bool]:
    """A part as (template part, layer index or None, is a Linen auto-name)."""
    if is_index(part):
        return Wild("*"), int(part), False  # type: ignore[arg-type]
    if type(part) is not str:
        return part, None, False
    if _AUTO.fullmatch(part):
        return part, None, True
    m = _SUFFIX.fullmatch(part)
    if m and part.isascii():
        return Wild(m.group("stem") + "_*"), int(m.group("index")), False
    return part, None, False


def describe_leaf(parts: tuple[Part, ...], shape: tuple[int, ...], dtype: Any) -> Leaf:
    """What a leaf's path says: its template, layer indices, tokens and leaf kind."""
    template: list[Any] = []
    indices: list[int] = []
    tokens: set[str] = set()
    auto = False
    for part in parts:
        piece, index, is_auto = _cut(part)
        template.append(piece)
        auto = auto or is_auto
        if index is not None:
            indices.append(index)
        if is_auto:
            tokens.add(str(part).lower())  # `Dense_0` meets only `Dense_0`
        elif type(part) is str and not is_index(part):
            tokens.update(normalise(part if index is None else part[: -len(str(index))]))
    raw = str(parts[-1]) if parts else ""
    # Two kinds of leaf: biases, and the rest (a `kernel`, a norm's `scale`,
    # an `embedding` table); the last name's other tokens stay as evidence.
    kind = leaf_class(raw)
    tokens.difference_update(LEAF_KINDS)
    return Leaf(tuple(parts), tuple(shape), dtype, tuple(template), tuple(indices),
                frozenset(tokens), kind, raw, auto)


def leaf_class(name: str) -> str:
    """What a leaf's own name says it is: `bias`, `weight` (also `kernel`, `scale`,
    `embedding`, Haiku's `w`), or its own normalised name (`lora_a`, `cls_token`).

    Two leaves are paired only when their classes agree: a parent's name is not
    enough to pair its `lora_a` with another module's `other`.
    """
    tokens = [_LAST.get(t, t) for t in normalise(name)]
    if "bias" in tokens:
        return "bias"
    if set(tokens) <= {"weight", "embed"}:
        return "weight"
    return "_".join(tokens)


def specific(tokens: frozenset[str]) -> frozenset[str]:
    """The tokens that tell one module from another (the generic ones removed)."""
    return tokens - GENERIC
