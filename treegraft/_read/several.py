"""Several sources as one: a dict of checkpoints and pytrees, planned and read as one source.

docs/design.md section 17. `{"vision": tg.SafetensorsCheckpoint(a), "llm":
tg.OrbaxCheckpoint(b), "extra": pytree}` is one source whose first path part
names a sub-source (`"llm.params.w"` is `"params.w"` of the orbax checkpoint).
One plan checks the whole target against all of them, so strictness reports
every problem at once; each read goes to the sub-source it names.

The rule: a dict counts as several sources only when at least one of its
values is a `Source`. An ordinary dict of arrays holds no `Source`, so it stays
the plain pytree it always was, and no existing graft changes meaning.

    Sources        the composite `Source`: metadata, reads and boxes dispatched
    as_source      a source as given to `plan`: a `Source`, a dict holding one, or None
    source_index   the plan's index of the source; several sources get a `SeveralIndex`
    SeveralIndex   messages naming the sub-source a path is in, did-you-mean within it
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import (
    GraftError,
    MappingError,
    Names,
    PathNotFoundError,
    Problem,
    count,
    suggest,
)
from treegraft._parse.keys import loose_part
from treegraft._parse.paths import Part, Path, render_parts
from treegraft._parse.patterns import Pattern, parse_pattern
from treegraft._read.source import BoxRequest, ReadRequest, Source
from treegraft._tree import leaves as _leaves
from treegraft._tree.index import TreeIndex, is_abstract, is_deleted
from treegraft._tree.pytree import flatten_parts

__all__ = ["Sources", "SeveralIndex", "as_source", "source_index"]

Parts = tuple[Part, ...]
_PY_SCALARS = (bool, int, float, complex)


class Sources(Source):
    """Several sources read as one: each sub-source under its name.

    A plain dict whose values include a `Source` already works wherever a
    source does (`tg.plan`, `tg.graft`); this class is that dict made
    explicit, to look at its names (`metadata`) or to close every checkpoint
    it holds at once (`with tg.Sources({...}) as src:`).

    A path's first part names the sub-source, the rest is the path inside it:
    `'llm.params.w'` is `'params.w'` of the source named `'llm'`. A sub-source
    is opened (its metadata read) only when a rule of a plan reads from it,
    and only the leaves the plan needs are read. A pytree sub-source is read
    like a graft from a pytree: its leaves are copied, never shared, as they
    were when this object was made.

    Args:
      sources: `{name: source}`, names strings; each source a `tg.Source`
        (such as `tg.OrbaxCheckpoint`) or a pytree of arrays.

    Raises:
      MappingError: sources is not a non-empty dict with string keys, or a
        value is a path string (wrap it in the checkpoint class it holds).

    Example:
      >>> import numpy as np, treegraft as tg
      >>> src = tg.Sources({'a': {'w': np.ones(2)}, 'b': {'w': np.zeros(3)}})
      >>> new = tg.graft({'x': np.zeros(2), 'y': np.ones(3)}, src, {'x': 'a.w', 'y': 'b.w'})
      >>> new['x'], new['y']
      (array([1., 1.]), array([0., 0., 0.]))
    """

    def __init__(self, sources: Mapping[str, Any], /):
        if not isinstance(sources, Mapping):
            raise MappingError(
                f"tg.Sources takes a dict {{name: source}}, got {type(sources).__name__}"
            )
        if not sources:
            raise MappingError("tg.Sources takes at least one {name: source} entry, got {}")
        problems = []
        for key, value in sources.items():
            if not isinstance(key, str):
                problems.append(
                    Problem("mapping", f"the source name {key!r} is not a string "
                            f"({type(key).__name__})")
                )
            elif isinstance(value, str | os.PathLike):
                problems.append(
                    Problem("mapping", f"source {key!r} is the path {os.fspath(value)!r}, not a "
                            "tree: wrap it in tg.OrbaxCheckpoint, tg.KauldronCheckpoint or "
                            "tg.SafetensorsCheckpoint")
                )
        if problems:
            raise GraftError.from_problems(
                problems, header=f"cannot use these sources ({count(len(problems), 'problem')}):"
            )
        self._names: tuple[str, ...] = tuple(sources)
        self._lazy: dict[str, Source] = {k: v for k, v in sources.items() if isinstance(v, Source)}
        self._opened: set[str] = set()  # the lazy sub-sources whose metadata was asked for
        # A pytree is taken as it is now (its containers rebuilt, its leaves the
        # same objects): mutating the caller's dict later changes nothing here,
        # as a plan of a pytree holds the leaves it saw.
        self._trees: dict[str, Any] = {}
        self._leaves: dict[str, dict[Parts, Any]] = {}
        for key, value in sources.items():
            if key not in self._lazy:
                paths, leaves, treedef = flatten_parts(value)
                self._trees[key] = treedef.unflatten(leaves)
                self._leaves[key] = dict(zip(paths, leaves, strict=True))

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{k!r}: {self._lazy[k]!r}" if k in self._lazy else f"{k!r}: <pytree>"
            for k in self._names
        )
        return f"Sources({{{inner}}})"

    @property
    def names(self) -> tuple[str, ...]:
        """The sub-sources' names, in the order given."""
        return self._names

    def describe(self) -> str:
        """'the sources 'vision' (the safetensors checkpoint /a), 'llm' (...)'."""
        return "the sources " + ", ".join(f"{k!r} ({self._describe_one(k)})" for k in self._names)

    def describe_source(self, name: str) -> str:
        """How messages name one sub-source: 'the checkpoint /x (source 'llm')'."""
        return f"{self._describe_one(name)} (source {name!r})"

    def _describe_one(self, name: str) -> str:
        return self._lazy[name].describe() if name in self._lazy else "the in-memory pytree"

    def metadata(self) -> dict[str, Any]:
        """`{name: metadata}` of every sub-source (a pytree is its own metadata)."""
        return {k: self._metadata_of(k) for k in self._names}

    def _metadata_of(self, name: str) -> Any:
        if name in self._lazy:
            self._opened.add(name)
        return self._lazy[name].metadata() if name in self._lazy else self._trees[name]

    def _plan_index(self, patterns: Iterable[Pattern]) -> SeveralIndex:
        """The index a plan resolves against: only the checkpoints patterns can read are opened.

        A lazy sub-source no pattern's first segment can name is an empty dict
        in it: its name is there for did-you-mean, its metadata is never read.
        A pattern starting with a wildcard may read any of them. A pytree is
        always there, as in a graft from it.
        """
        wanted = _wanted(patterns, self._names) | set(self._trees)  # a pytree costs nothing
        root = {k: self._metadata_of(k) if k in wanted else {} for k in self._names}
        return SeveralIndex(root, self)

    def prefetch(self, leaves: Sequence[Any]) -> None:
        """Each lazy sub-source prefetches its own leaves among these, in one batch each."""
        pending = {id(leaf): leaf for leaf in leaves}
        for name, source in self._lazy.items():
            if not pending:
                return
            if name not in self._opened or type(source).prefetch is Source.prefetch:
                continue  # never opened (none of these leaves is its), or nothing to fetch
            mine = [pending.pop(i) for i in _leaf_ids(source.metadata()) if i in pending]
            if mine:
                source.prefetch(mine)

    def read(self, requests: Sequence[ReadRequest]) -> list[Any]:
        """Reads each leaf from its sub-source, each lazy sub-source's leaves in one call.

        A pytree's leaf is copied: a `jax.Array` on the devices of its target
        (no host round trip), anything else on the host; the graft places it.

        Raises:
          PathNotFoundError: a path names no sub-source, or no leaf of one.
          GraftError: a pytree leaf is abstract or was deleted (donated).
          CheckpointError: a sub-source's read failed.
        """
        groups = self._split([r.path for r in requests])
        self._check_values(
            [(name, parts) for name, items in groups.items() if name in self._leaves
             for _, parts in items]
        )
        out: list[Any] = [None] * len(requests)
        for name, items in groups.items():
            if name in self._lazy:
                got = self._lazy[name].read(
                    [dataclasses.replace(requests[i], path=Path(parts)) for i, parts in items]
                )
            else:
                got = [_copy_leaf(self._leaves[name][parts], requests[i].like)
                       for i, parts in items]
            for (i, _), value in zip(items, got, strict=True):
                out[i] = value
        return out

    def read_boxes(self, requests: Sequence[BoxRequest]) -> Iterator[np.ndarray]:
        """Boxes read by the sub-sources they name, in request order, streamed.

        Consecutive requests of one sub-source go to it in one call; a
        sub-source that streams its parts is streamed through. Errors about
        the requests (an unknown path, a value that is gone) are raised here,
        before anything is read.
        """
        names = self._split_in_order([r.path for r in requests])
        self._check_values([(n, p) for n, p in names if n in self._leaves])
        runs: list[tuple[str, list[tuple[Parts, tuple[slice, ...]]]]] = []
        for (name, parts), request in zip(names, requests, strict=True):
            if not runs or runs[-1][0] != name:
                runs.append((name, []))
            runs[-1][1].append((parts, request.box))
        parts_of: list[tuple[str, int, Iterator[np.ndarray]]] = []
        for name, run in runs:
            if name in self._lazy:
                got = self._lazy[name].read_boxes([BoxRequest(Path(p), box) for p, box in run])
                parts_of.append((name, len(run), iter(got)))
            else:
                parts_of.append((name, len(run), self._memory_boxes(name, run)))
        return self._stream(parts_of)

    def _stream(
        self, parts_of: list[tuple[str, int, Iterator[np.ndarray]]]
    ) -> Iterator[np.ndarray]:
        try:
            for name, n, parts in parts_of:
                for _ in range(n):
                    part = next(parts, None)
                    if part is None:
                        raise GraftError(
                            f"{self.describe_source(name)} returned fewer boxes than asked for "
                            f"({n}); its read_boxes must give one array per request, in order"
                        )
                    yield part
        finally:
            for _, _, parts in parts_of:
                close = getattr(parts, "close", None)
                if close is not None:
                    close()  # cancels a sub-source's reads still in flight

    def _memory_boxes(
        self, name: str, run: list[tuple[Parts, tuple[slice, ...]]]
    ) -> Iterator[np.ndarray]:
        for parts, box in run:
            yield _host_box(self._leaves[name][parts], box, self.describe_source(name), parts)

    def box_nbytes(self, path: Path, box: tuple[slice, ...]) -> int:
        """Bytes the named sub-source reads for this box (a pytree's: the box's own)."""
        ((name, parts),) = self._split_in_order([path])
        if name in self._lazy:
            return self._lazy[name].box_nbytes(Path(parts), box)
        shape, dtype = _leaves.spec_of(self._leaves[name][parts])
        extents = [len(range(*s.indices(d))) for s, d in zip(box, shape or (), strict=False)]
        return int(math.prod(extents)) * np.dtype(dtype).itemsize

    def close(self) -> None:
        """Closes every sub-source it holds (each once, all tried, the first error raised)."""
        first: BaseException | None = None
        for source in self._lazy.values():
            try:
                source.close()
            except Exception as e:  # noqa: BLE001 (the others are closed before it is raised)
                first = first or e
        if first is not None:
            raise first

    # -- internals ---------------------------------------------------------------

    def _split_in_order(self, paths: Sequence[Path]) -> list[tuple[str, Parts]]:
        """Each path as (sub-source name, path inside it); every unknown path in one error."""
        out: list[tuple[str, Parts]] = []
        problems: list[str] = []
        for path in paths:
            parts = tuple(path.parts)
            name = loose_part(parts[0]) if parts else None
            if name not in self._lazy and name not in self._leaves:
                problems.append(
                    f"{render_parts(parts)!r} names no source: its first part must be one of "
                    f"{', '.join(map(repr, self._names))}"
                    + (suggest(str(name), self._names) if name is not None else "")
                )
                continue
            inner = parts[1:]
            if name in self._leaves and inner not in self._leaves[name]:
                problems.append(
                    f"{render_parts(parts)!r} is not a leaf of {self.describe_source(name)}"
                )
                continue
            out.append((name, inner))
        if problems:
            raise PathNotFoundError("; ".join(problems))
        return out

    def _split(self, paths: Sequence[Path]) -> dict[str, list[tuple[int, Parts]]]:
        groups: dict[str, list[tuple[int, Parts]]] = {}
        for i, (name, parts) in enumerate(self._split_in_order(paths)):
            groups.setdefault(name, []).append((i, parts))
        return groups

    def _check_values(self, wanted: Sequence[tuple[str, Parts]]) -> None:
        """Pytree leaves to read must hold values: every one that does not, in one error."""
        problems = [
            p for name, parts in dict.fromkeys(wanted)
            if (p := _value_problem(self._leaves[name][parts], (name, *parts), name, self))
            is not None
        ]
        if problems:
            raise GraftError.from_problems(
                problems,
                header=f"cannot read {count(len(problems), 'leaf', 'leaves')} of the sources:",
            )


Sources.__module__ = "treegraft"


def as_source(source: Any) -> Source | None:
    """The lazy source a plan reads from: a `Source`, a dict holding one as `Sources`, or None.

    None means an in-memory pytree: a dict (any `Mapping`) none of whose
    values is a `Source` (docs/design.md section 17), or any other pytree.
    """
    if isinstance(source, Source):
        return source
    if isinstance(source, Mapping) and any(isinstance(v, Source) for v in source.values()):
        return Sources(source)
    return None


def source_index(
    source: Any, lazy: Source | None, rules: Iterable[Any], ignore_restored: Iterable[Pattern]
) -> TreeIndex:
    """The plan's index of its source; of several sources, only those the rules read are opened.

    An ignore pattern opens the sub-source its literal first segment names;
    one that starts with a wildcard is relative to the rules' prefixes, which
    have opened theirs.
    """
    if isinstance(lazy, Sources):
        named = [p for p in ignore_restored if p.literal_prefix()]
        return lazy._plan_index(read_patterns(rules) + named)
    if lazy is not None:
        return TreeIndex(lazy.metadata(), lazy.describe())
    return TreeIndex(source, "the source")


def read_patterns(rules: Iterable[Any]) -> list[Pattern]:
    """Every source pattern of rules: each `Pattern` a rule holds, but its new side.

    Found by walking the rule's fields, so that a rule reading several source
    patterns (an operation of several inputs) names all of them.
    """
    out: list[Pattern] = []
    for rule in rules:
        for field in dataclasses.fields(rule):
            if field.name != "new":
                out.extend(_patterns_in(getattr(rule, field.name)))
    return out


def _patterns_in(value: Any) -> Iterator[Pattern]:
    if isinstance(value, Pattern):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _patterns_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _patterns_in(getattr(value, field.name))


def _wanted(patterns: Iterable[Pattern], names: Sequence[str]) -> set[str]:
    """The sub-sources the patterns can name: by a literal first segment, or all of them."""
    wanted: set[str] = set()
    for pattern in patterns:
        head = pattern.literal_prefix()
        if not head:
            return set(names)
        wanted.add(loose_part(head[0]))
    return wanted & set(names)


class SeveralIndex(TreeIndex):
    """The index of several sources: each path named by the sub-source it is in.

    A missing path says which checkpoint lacks it ("not found in the
    checkpoint /b (source 'llm')"), a mistyped path or pattern is answered
    with names of the sub-source it names, and `restate` names the
    sub-source in every problem about a source path.
    """

    def __init__(self, root: dict[str, Any], sources: Sources):
        super().__init__(root, sources.describe())
        self.sources = sources
        self._near: dict[tuple[str, bool], Names] = {}

    def name_of(self, parts: Parts) -> str | None:
        """The sub-source a path is in, or None (the root, or no such sub-source)."""
        name = loose_part(parts[0]) if parts else None
        return name if name in self.sources.names else None

    def what_at(self, parts: Parts) -> str:
        name = self.name_of(parts)
        return self.what if name is None else self.sources.describe_source(name)

    def names_near(self, text: str) -> Names:
        patterns = "*" in text
        every = self.node_names(patterns=patterns)
        name = next(
            (n for n in self.sources.names
             if text == (r := render_parts((n,))) or text.startswith((r + ".", r + "["))),
            None,
        )
        if name is None:
            return every
        near = self._near.get((name, patterns))
        if near is None:
            head = render_parts((name,))
            near = self._near[(name, patterns)] = Names(
                n for n in every.names if n == head or n.startswith((head + ".", head + "["))
            )
        return near

    def restate(self, problems: Sequence[Problem], pairs: Iterable[Any]) -> list[Problem]:
        """The plan's problems with their sub-sources named, and the pairs' valueless leaves.

        A problem about a source path names the sub-source it is in; a pytree
        leaf the pairs read that has no value (abstract, deleted) is one more
        problem, as a plan from that pytree alone would report it.
        """
        out = [self._named(p) for p in problems]
        read = sorted({si for pair in pairs for si in (pair.sources or (pair.source,))})
        for si in read:
            name = self.name_of(self.paths[si])
            if name is None or name not in self.sources._leaves:
                continue
            found = _value_problem(self.leaves[si], self.paths[si], name, self.sources)
            if found is not None:
                out.append(found)
        return out

    def _named(self, problem: Problem) -> Problem:
        message = problem.message
        if problem.source is not None:
            name = self.name_of(problem.source.parts)
        elif problem.pattern is not None and self.what in message:
            # An ignore pattern of the source that names a sub-source from the root.
            name = self.name_of(_head(problem.pattern))
        elif problem.rule is not None and " the source" in message and (
            old := _OLD_SIDE.search(problem.rule)
        ):
            # A rule's sources as a whole (a stack's): the sub-source its old side names.
            name = self.name_of(_head(old.group(2)))
        else:
            name = None
        if name is None:
            return problem
        named = self.sources.describe_source(name)
        if named in message:
            return problem
        for said, says in (
            (" the source subtrees", f" the subtrees of {named}"),
            (" in the source", f" in {named}"),
            (f" {self.what}", f" {named}"),
            (" the source", f" {named}"),
        ):
            if said in message:
                message = message.replace(said, says, 1)
                break
        else:
            message += f" (in {named})"
        return dataclasses.replace(problem, message=message)


# The first quoted path after a rule's arrow ("'new' <- stack('old.*', axis=0)"): its old side.
_OLD_SIDE = re.compile(r""" <- [^'"]*(['"])(.*?)\1""")


def _head(text: str) -> Parts:
    """The literal first part of a pattern's text, if it has one and parses."""
    try:
        return parse_pattern(text).literal_prefix()[:1]
    except GraftError:
        return ()


def _value_problem(leaf: Any, parts: Parts, name: str, sources: Sources) -> Problem | None:
    """The problem of a pytree leaf that has no value to read, or None."""
    if not (is_abstract(leaf) or is_deleted(leaf)):
        return None  # the common case, without a message made for nothing
    where = f"{render_parts(parts)!r} in {sources.describe_source(name)}"
    if is_abstract(leaf):
        return Problem(
            "abstract",
            f"{where} is abstract (jax.ShapeDtypeStruct) and has no value to graft",
            source=Path(parts),
        )
    if is_deleted(leaf):
        return Problem(
            "deleted",
            f"{where} ({_leaves.describe(_leaves.spec_of(leaf))}) has been deleted: "
            "its buffer is gone",
            source=Path(parts),
            remedy="a source array was deleted, usually donated to a jitted function "
            "(donate_argnums) or freed with .delete(): graft from a live copy, e.g. before "
            "the call that donates it",
        )
    return None


def _leaf_ids(tree: Any) -> list[int]:
    # The leaves as the plan's index has them (treegraft's flattening, not jax's).
    return [id(leaf) for leaf in flatten_parts(tree)[1]]


def _copy_leaf(leaf: Any, like: Any) -> Any:
    """A pytree leaf's value in memory of its own, for the graft to place like `like`.

    A `jax.Array` is copied on the devices, straight into the target's
    sharding when the target has one; anything else is copied on the host.
    A Python scalar is immutable: it is its own copy.
    """
    if type(leaf) in _PY_SCALARS:
        return leaf
    if isinstance(leaf, jax.Array):
        sharding = getattr(like, "sharding", None) if isinstance(
            like, jax.Array | jax.ShapeDtypeStruct) else None
        if sharding is None or sharding.device_set != leaf.sharding.device_set:
            # A compiled copy cannot move devices: copy where it is, the graft moves it.
            sharding = leaf.sharding
        return _copier(sharding)(leaf)
    return np.array(leaf, copy=True)  # a host value: no device transfer


@functools.lru_cache(maxsize=64)
def _copier(sharding: Any) -> Any:
    # A jitted copy writes fresh buffers, one per device (docs/design.md section 12);
    # one compiled copy per target sharding.
    return jax.jit(_copy, out_shardings=sharding)


def _copy(x: Any) -> Any:
    return x.copy()


def _host_box(leaf: Any, box: tuple[slice, ...], named: str, parts: Parts) -> np.ndarray:
    """`leaf[box]` of a pytree leaf as a host array of its own; a device array sliced first."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise GraftError(
            f"{render_parts(parts)!r} of {named} spans several processes; an operation "
            "cannot read it: save it and graft from the checkpoint"
        )
    with jax.transfer_guard("allow"):
        part = leaf[box] if box else leaf
        return np.array(part, copy=True)
