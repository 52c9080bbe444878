"""The answer of `tg.suggest`: a mapping usable as is, and why each rule is there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from treegraft._parse.ops import Cast, Operation, Stack, Transpose, Unstack

__all__ = ["Suggestion", "Reason", "value_code"]


@dataclass(frozen=True)
class Reason:
    """One row of `Suggestion.explain()`: a rule and the evidence behind it."""

    new: str
    value: str | Operation | None
    leaves: int
    shape: str  # "equal", "transposed", "stacked (48)", "unstacked (48)", "kept"
    tokens: tuple[str, ...]
    indices: str
    sure: str


@dataclass(frozen=True)
class Suggestion:
    """A proposed mapping, with what it left alone.

    Attributes:
      mapping: `{new: old}`, usable as is: `tg.graft(state, source,
        s.mapping)` grafts every leaf it matched and keeps (rules with value
        `None`) every state leaf it did not.
      unmatched_state: state leaves no source leaf feeds (kept by the mapping).
      unmatched_source: source leaves the mapping does not read.
      ambiguous: state leaves with two or more equally good source candidates,
        told apart by nothing the names or shapes say: never guessed, kept by
        the mapping; each maps to its candidates.
    """

    mapping: dict[str, Any]
    unmatched_state: tuple[str, ...]
    unmatched_source: tuple[str, ...]
    ambiguous: dict[str, tuple[str, ...]]
    reasons: tuple[Reason, ...] = field(default=(), repr=False)

    def explain(self) -> str:
        """Why, rule by rule: leaves, shapes, name tokens matched, index runs, how sure.

        Each rule is one line as `as_code` writes it (`new <- old`), then one
        indented line of evidence; the ambiguous leaves and the counts of what
        was left alone follow.
        """
        lines = []
        for r in self.reasons:
            lines.append(f"{r.new} <- {_short(r.value)}")
            leaves = f"{r.leaves} leaf" if r.leaves == 1 else f"{r.leaves} leaves"
            facts = [f"{leaves}, {r.shape}"]
            if r.tokens:
                facts.append(f"names: {' '.join(r.tokens)}")
            if r.indices != "-":
                facts.append(f"indices {r.indices}")
            facts.append(f"sure: {r.sure}")
            lines.append("    " + "; ".join(facts))
        for path, cands in self.ambiguous.items():
            lines.append(f"ambiguous: {path} could be any of {', '.join(cands)}")
        lines.append(f"{len(self.unmatched_state)} state leaves without a source, "
                     f"{len(self.unmatched_source)} source leaves unused, "
                     f"{len(self.ambiguous)} ambiguous")
        return "\n".join(lines)

    def as_code(self) -> str:
        """The mapping as Python source to paste (uses `tg` and, for casts, `jnp`)."""
        if not self.mapping:
            return "{}"
        body = "".join(f"    {json.dumps(k)}: {value_code(v)},\n" for k, v in self.mapping.items())
        return "{\n" + body + "}"


def _short(value: Any) -> str:
    return "keep" if value is None else value_code(value).replace("tg.", "")


def value_code(value: Any) -> str:
    """A rule value as Python source: a string, `None`, or `tg.` operation calls."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Stack | Unstack):
        name = "stack" if isinstance(value, Stack) else "unstack"
        return f"tg.{name}({json.dumps(value.source)}, axis={value.axis})"
    if isinstance(value, Transpose):
        return f"tg.transpose({value_code(value.value)}, {tuple(value.axes)!r})"
    if isinstance(value, Cast):
        return f"tg.cast({value_code(value.value)}, jnp.{np.dtype(value.dtype).name})"
    raise AssertionError(f"suggest made an operation it cannot write: {value!r}")


Suggestion.__module__ = "treegraft"
