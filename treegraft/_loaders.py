"""Checkpoint loaders compatible with Kauldron's `kd.ckpts`, built on graft.

A Kauldron trainer calls `transform(state)` on the freshly initialised
`TrainState` (whose `opt_state` is still None), builds the optimizer state, then
calls `transform_after_optimizer(state)`. These classes keep Kauldron's names,
fields and defaults, need no Kauldron install, and add treegraft's checks. The
base class and the simple transforms are in `treegraft._transforms`,
re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

# Only treegraft's public API (names that `treegraft/__init__.py` exports): a
# loader is what a user could write on top of `plan` and `execute`.
from treegraft._errors import GraftError, MappingError, Problem
from treegraft._formats.kauldron.source import KauldronCheckpoint
from treegraft._graft import execute
from treegraft._parse.paths import Path
from treegraft._parse.patterns import Pattern, parse_pattern
from treegraft._parse.rules import MappingLike, RuleValue
from treegraft._plan import plan
from treegraft._transforms import AbstractPartialLoader as AbstractPartialLoader
from treegraft._transforms import InitTransform as InitTransform
from treegraft._transforms import MultiTransform as MultiTransform
from treegraft._transforms import NoopTransform as NoopTransform

__all__ = [
    "InitTransform",
    "AbstractPartialLoader",
    "NoopTransform",
    "MultiTransform",
    "PartialKauldronLoader",
    "SimpleCheckpointLoader",
]

_T = TypeVar("_T")
_OPT = "opt_state"


class FrozenMapping(Mapping[str, str]):
    """A read-only, hashable mapping: a frozen loader's `new_to_old`."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]):
        self._items = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._items)


def _default_new_to_old() -> Mapping[str, str]:
    return FrozenMapping({"params": "params", "collections": "collections"})


def _frozen_fields(obj: Any) -> None:
    # Kauldron configs pass lists and dicts; keep the loader immutable and hashable.
    object.__setattr__(obj, "new_to_old", FrozenMapping(obj.new_to_old))
    for name in ("ignore_model_keys", "ignore_restored_keys"):
        value = getattr(obj, name)
        if value is None:  # as graft takes it: no pattern
            value = ()
        elif isinstance(value, str | Path | Pattern):
            value = (value,)
        else:
            try:
                value = tuple(value)
            except TypeError:
                raise MappingError(
                    f"{name} must be a sequence of path patterns, got {type(value).__name__}"
                ) from None
        object.__setattr__(obj, name, value)


def _is_opt(new_path: Any) -> bool:
    # Paths and patterns are keys too (as in `graft`): an opt_state entry given
    # as `tg.parse_path('opt_state')` must wait for the optimizer like its string.
    if not isinstance(new_path, str | Path | Pattern):
        return False  # not a path: `plan` reports it with the mapping's other problems
    pattern = parse_pattern(new_path)
    return pattern.literal_prefix()[:1] == (_OPT,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartialKauldronLoader(InitTransform):
    """Loads part of a state from another Kauldron run's checkpoint.

    Compatible with `kd.ckpts.PartialKauldronLoader`: same fields, defaults and
    phases, but every shape, dtype and structure is checked before reading,
    ignore patterns never crash, and only the mapped arrays are read.

    Attributes:
      workdir: the work directory of the run to load from.
      new_to_old: `{new_path: old_path}`; patterns with captures allowed.
        Defaults to all params and collections; an empty mapping is an error
        (a `MappingError`), as it is for `graft`.
      step: the step to load; -1 (default) for the latest complete one.
      ignore_model_keys: patterns of state leaves that may be absent from the
        checkpoint (they keep their value).
      ignore_restored_keys: patterns of checkpoint leaves that may have no
        place in the state.
      lightweight_initialize: accepted so that Kauldron configs that set it
        keep working; it has no effect (treegraft reads metadata only anyway).

    Example:
      >>> import treegraft as tg
      >>> loader = tg.PartialKauldronLoader(          # doctest: +SKIP
      ...     workdir='/runs/pretrain',
      ...     new_to_old={'params.decoder.layers_0': 'params.encoder'},
      ... )
      >>> state = loader.transform(state)             # doctest: +SKIP
    """

    workdir: str | os.PathLike[str]
    new_to_old: MappingLike = dataclasses.field(default_factory=_default_new_to_old)
    step: int = -1
    ignore_model_keys: Sequence[str] = ()
    ignore_restored_keys: Sequence[str] = ()
    lightweight_initialize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.new_to_old, Mapping):
            raise MappingError(
                "new_to_old must be a mapping {new_path: old_path}, got "
                f"{type(self.new_to_old).__name__}"
            )
        _frozen_fields(self)
        # Not a field: no part of the loader's value (equality, hash, repr).
        object.__setattr__(self, "_between_calls", _Carried())

    @property
    def _carried(self) -> _Carried:
        """What the loader carries between its calls (set in `__post_init__`)."""
        carried: _Carried = self.__dict__["_between_calls"]
        return carried

    def __enter__(self) -> PartialKauldronLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Releases the opened checkpoint, if any (opens nothing itself)."""
        checkpoint, self._carried.checkpoint = self._carried.checkpoint, None
        if checkpoint is not None:
            checkpoint.close()

    def _split(self) -> tuple[dict[Any, RuleValue], dict[Any, RuleValue]]:
        if not self.new_to_old:
            # graft refuses an empty mapping; a loader that loads nothing is as
            # likely a mistake, and would pass silently.
            raise MappingError(
                "new_to_old is empty: nothing would be loaded; give at least one "
                "{new_path: old_path} entry, or leave new_to_old out for Kauldron's "
                "default {'params': 'params', 'collections': 'collections'}"
            )
        first: dict[Any, RuleValue] = {}
        after: dict[Any, RuleValue] = {}
        for new, old in dict(self.new_to_old).items():
            (after if _is_opt(new) else first)[new] = old
        return first, after

    def _checkpoint(self) -> KauldronCheckpoint:
        if self._carried.checkpoint is None:
            self._carried.checkpoint = KauldronCheckpoint(self.workdir, step=self.step)
        return self._carried.checkpoint

    def _graft(
        self, state: Any, mapping: MappingLike, *, last: bool, later: Sequence[str] = ()
    ) -> Any:
        earlier = self._carried.unused_ignores
        p = plan(
            state,
            self._checkpoint(),
            mapping,
            ignore_model_keys=self.ignore_model_keys,
            ignore_restored_keys=self.ignore_restored_keys,
            # A single phase checks its patterns in plan, with all other problems.
            check_ignores=last and earlier is None,
            # Strict by hand when a later phase fills abstract leaves of this state.
            strict=not later,
        )
        if later:
            fatal = [pr for pr in p.report if _fatal_before(pr, later)]
            if fatal:
                raise GraftError.from_problems(fatal, rules=len(p.rules))
        unmatched = [pr for pr in p.report if pr.kind == "unmatched_ignore"]
        unused = {pr.pattern for pr in unmatched if pr.pattern is not None}
        if earlier is not None:
            unused &= earlier
            self._carried.unused_ignores = None
        if not last:
            self._carried.unused_ignores = unused
        elif unused:
            # A pattern is unused when no phase matched it.
            problems = [pr for pr in unmatched if pr.pattern in unused]
            raise GraftError.from_problems(problems, rules=len(p.rules))
        return execute(p)

    def transform(self, state: _T) -> _T:
        """Grafts every entry whose new path is not under `opt_state`."""
        first, after = self._split()
        if not first:
            return state
        return self._graft(state, first, last=not after, later=tuple(after))

    def transform_after_optimizer(self, state: _T) -> _T:
        """Grafts the `opt_state` entries; returns state unchanged if none."""
        first, after = self._split()
        if not after:
            return state
        return self._graft(state, after, last=True)


def _fatal_before(problem: Problem, later: Sequence[str]) -> bool:
    """Whether a problem of the first phase's lenient plan fails it, as strict would.

    An abstract `opt_state` leaf that an `opt_state` rule of the second phase
    fills is no error yet (docs/design.md section 5); every other problem that
    strict mode refuses is. Unused ignore patterns are counted over both phases.
    """
    if problem.kind in ("abstract", "unmatched_ignore"):
        return False
    if problem.kind == "unfilled" and problem.target is not None:
        parts = problem.target.parts
        return not any(parse_pattern(new).match_prefix(parts) is not None for new in later)
    return True


class _Carried:
    """What a loader carries between its calls, kept out of its fields.

    Attributes:
      checkpoint: the checkpoint opened by the first call, until `close()`.
      unused_ignores: the ignore patterns `transform` left unused, for
        `transform_after_optimizer` to check: a pattern is unused only when
        neither phase matched it. None outside the two phases.
    """

    __slots__ = ("checkpoint", "unused_ignores")

    def __init__(self) -> None:
        self.checkpoint: KauldronCheckpoint | None = None
        self.unused_ignores: set[str] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimpleCheckpointLoader(InitTransform):
    """Loads params and collections (and the optimizer state, if asked) as saved.

    Compatible with `kd.ckpts.SimpleCheckpointLoader`, with treegraft's checks:
    a wrong shape, dtype or structure is an error, never silently accepted.

    Example:
      >>> import treegraft as tg
      >>> loader = tg.SimpleCheckpointLoader(  # doctest: +SKIP
      ...     workdir='/runs/a', load_opt_state=True)
    """

    workdir: str | os.PathLike[str]
    step: int = -1
    load_opt_state: bool = False

    def __post_init__(self) -> None:
        mapping = dict(_default_new_to_old())
        if self.load_opt_state:
            mapping[_OPT] = _OPT
        # Not a field: no part of the loader's value. It opens nothing until used.
        partial = PartialKauldronLoader(workdir=self.workdir, new_to_old=mapping, step=self.step)
        object.__setattr__(self, "_loader", partial)

    @property
    def _partial(self) -> PartialKauldronLoader:
        """The loader that does the work (set in `__post_init__`)."""
        loader: PartialKauldronLoader = self.__dict__["_loader"]
        return loader

    def __enter__(self) -> SimpleCheckpointLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Releases the opened checkpoint, if any."""
        self._partial.close()

    def transform(self, state: _T) -> _T:
        """Grafts params and collections."""
        return self._partial.transform(state)

    def transform_after_optimizer(self, state: _T) -> _T:
        """Grafts the optimizer state when `load_opt_state` is set.

        As Kauldron's, it returns a state without optimizer state (`opt_state`
        None: built with `skip_optimizer=True`) unchanged.
        """
        opt = state.get(_OPT) if isinstance(state, Mapping) else getattr(state, _OPT, None)
        if not self.load_opt_state or opt is None:
            return state
        return self._partial.transform_after_optimizer(state)


for _cls in (PartialKauldronLoader, SimpleCheckpointLoader):
    _cls.__module__ = "treegraft"
