"""The graft itself: plan, read what the plan needs, insert it into the state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from treegraft import _leaves, _source
from treegraft._display import ProgressBar
from treegraft._errors import GraftError
from treegraft._index import is_abstract
from treegraft._leaves import format_bytes
from treegraft._multihost import plan_on_every_process
from treegraft._paths import Path, render_parts
from treegraft._plan import GraftPlan, Pair, gathered_spec, plan
from treegraft._sharding import place
from treegraft._source import ReadRequest, Source

log = logging.getLogger("treegraft")
_BATCHED_FROM = 256 * 2**20  # reads this large are batched when progress is asked
_BATCH = 64 * 2**20

__all__ = ["graft", "execute"]


def graft(
    state: Any,
    source: Any,
    mapping: Mapping[str, str],
    /,
    *,
    ignore_model_keys: Sequence[str] | str = (),
    ignore_restored_keys: Sequence[str] | str = (),
    strict: bool = True,
    cast: bool | str = False,
    progress: bool | Callable[[int, int], None] = False,
) -> Any:
    """Returns state with the leaves named by mapping taken from source.

    Plans first (every check, on metadata only, all problems in one error),
    then reads only the source leaves the plan needs, each once, placed with
    the sharding of the target leaf they replace. The result has exactly the
    state's structure, shapes and dtypes; leaves not grafted are the same
    objects as in state. The inputs are not modified; on error nothing is.

    Args:
      state: the pytree to graft into (arrays or `jax.ShapeDtypeStruct`s).
      source: a pytree, or a lazy `treegraft.Source` such as `OrbaxCheckpoint`.
      mapping: `{new_path: old_path}` (new <- old); patterns allowed.
      ignore_model_keys: see `treegraft.plan`.
      ignore_restored_keys: see `treegraft.plan`.
      strict: see `treegraft.plan`.
      cast: see `treegraft.plan`: False, True (numpy 'same_kind' casts) or
        "unsafe".
      progress: for a checkpoint source, report reading progress: True draws a
        bar on stderr (on a terminal), a callable is called with
        `(bytes_done, bytes_total)`. Reads of at least 256 MiB are then done
        in batches; progress is also logged to the `treegraft` logger.

    Returns:
      The new state.

    Raises:
      GraftError: as `treegraft.plan`, or when a source leaf has no value.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> state = {'enc': {'w': np.zeros(2)}, 'dec': {'w': np.zeros(2)}}
      >>> new = tg.graft(state, {'encoder': {'w': np.ones(2)}}, {'enc': 'encoder'})
      >>> new['enc']['w'], new['dec']['w']
      (array([1., 1.]), array([0., 0.]))
    """
    def make_plan() -> GraftPlan:
        return plan(
            state,
            source,
            mapping,
            ignore_model_keys=ignore_model_keys,
            ignore_restored_keys=ignore_restored_keys,
            strict=strict,
            cast=cast,
        )

    return execute(plan_on_every_process(state, make_plan), progress=progress)






def execute(p: GraftPlan, /, *, progress: bool | Callable[[int, int], None] = False) -> Any:
    """Runs a plan: reads the leaves it needs and returns the new state.

    `tg.graft(state, source, mapping)` is `tg.execute(tg.plan(state, source,
    mapping))`: plan once, look at it, then execute it without planning again.
    Each source leaf is read once, in its own dtype, and each target gets its
    own value, cast to its own dtype where the plan allows it.

    Args:
      p: a plan made by `treegraft.plan`.
      progress: as for `treegraft.graft`.

    Returns:
      The new state: the plan's state with every planned leaf replaced. The
      inputs are not modified.

    Raises:
      CheckpointError: reading the checkpoint failed.

    Example:
      >>> import numpy as np, treegraft as tg
      >>> p = tg.plan({'w': np.zeros(2)}, {'v': np.ones(2)}, {'w': 'v'})
      >>> tg.execute(p)['w']
      array([1., 1.])
    """
    if not isinstance(p, GraftPlan):
        raise GraftError(f"execute takes a plan made by tg.plan, got {type(p).__name__}")
    abstract = [pr for pr in p.report if pr.kind == "abstract"]
    if abstract:
        raise GraftError(abstract[0].message, problems=abstract)
    tgt, src = p.target, p.source
    likes_of = _on_concrete_meshes(p)
    plain = [pair for pair in p.pairs if _is_copy(p, pair)]
    changed = [pair for pair in p.pairs if not _is_copy(p, pair)]
    first_use: dict[int, int] = {}
    for pair in plain:
        first_use.setdefault(pair.source, pair.target)
    if p.lazy is not None:
        order = list(first_use)
        # Read in the source's own dtype: a checkpoint reader must never cast
        # unasked, and each target is cast to its own dtype afterwards.
        requests = [
            ReadRequest(
                Path(src.paths[si]),
                likes_of[first_use[si]],
                _leaves.spec_of(src.leaves[si])[1],
            )
            for si in order
        ]
        sizes = [_leaves.nbytes(_leaves.spec_of(src.leaves[si])) for si in order]
        got = _read_batched(p.lazy, requests, sizes, progress)
        value_of = dict(zip(order, got, strict=True))
    else:
        value_of = {si: src.leaves[si] for si in first_use}
        _check_concrete(p, [si for si in value_of if is_abstract(value_of[si])])
    values = [value_of[pair.source] for pair in plain]
    likes = [likes_of[pair.target] for pair in plain]
    # Values read from a checkpoint are fresh: each is used as is once (other
    # uses are copied); in-memory values belong to the caller and are copied.
    placed = place(
        values,
        likes,
        cast=p.cast,
        owned=p.lazy is not None,
        name_of=lambda k: render_parts(tgt.paths[plain[k].target]),
    )
    out = list(tgt.leaves)
    for pair, value in zip(plain, placed, strict=True):
        out[pair.target] = value
    if changed:
        blocks = _Blocks(p)
        for pair in changed:
            out[pair.target] = _build(p, pair, blocks, likes_of[pair.target])
    return tgt.treedef.unflatten(out)


def _on_concrete_meshes(p: GraftPlan) -> dict[int, Any]:
    """Each grafted target leaf, its sharding on a concrete mesh.

    `jax.eval_shape` (and `nnx.eval_shape`) under `jax.set_mesh(mesh)` gives
    shardings on an `AbstractMesh`, which names axes but no devices: they are
    put on the mesh in context when it has the same axes.

    Raises:
      GraftError: no mesh in context fits, naming the leaves.
    """
    out: dict[int, Any] = {}
    unplaced = []
    for pair in p.pairs:
        like = p.target.leaves[pair.target]
        sharding = getattr(like, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
            sharding.mesh, jax.sharding.AbstractMesh
        ):
            mesh = jax.sharding.get_mesh()
            if getattr(mesh, "empty", True) or mesh.abstract_mesh != sharding.mesh:
                unplaced.append(pair.target)
                out[pair.target] = like
                continue
            like = jax.ShapeDtypeStruct(
                like.shape, like.dtype, sharding=jax.sharding.NamedSharding(mesh, sharding.spec)
            )
        out[pair.target] = like
    if unplaced:
        names = ", ".join(repr(render_parts(p.target.paths[i])) for i in unplaced[:5])
        mesh = p.target.leaves[unplaced[0]].sharding.mesh
        raise GraftError(
            f"{len(unplaced)} target leaves are sharded on an AbstractMesh ({mesh}), which has "
            f"no devices to put them on: {names}{', ...' if len(unplaced) > 5 else ''}; graft "
            "under `with jax.set_mesh(mesh):` with the mesh they were made for, or give them "
            "concrete shardings (jax.sharding.NamedSharding(mesh, x.sharding.spec))"
        )
    return out


def _is_copy(p: GraftPlan, pair: Pair) -> bool:
    rule = p.rules[pair.rule]
    return rule.gather == "copy" and not rule.steps


def _check_concrete(p: GraftPlan, abstract: list[int]) -> None:
    if abstract:
        names = ", ".join(repr(render_parts(p.source.paths[si])) for si in abstract[:10])
        many = len(abstract) > 1
        raise GraftError(
            f"{len(abstract)} source {'leaves are' if many else 'leaf is'} abstract "
            f"(jax.ShapeDtypeStruct) and {'have' if many else 'has'} no value to graft: {names}"
        )


class _Blocks:
    """Boxes of source leaves, for the rules that transform them.

    A source that can read boxes (`read_boxes`) reads only the chunks each box
    needs; for any other, each leaf is read whole once and kept for this graft.
    """

    def __init__(self, p: GraftPlan):
        self.p = p
        self._whole: dict[int, np.ndarray] = {}

    def fetch(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        return self.fetch_many([(si, box)])[0]

    def fetch_many(self, wanted: Sequence[tuple[int, tuple[slice, ...]]]) -> list[np.ndarray]:
        """Boxes of several source leaves, read in one batch where the source can.

        Each returned array is fresh: the caller owns it (no view of a source
        leaf or of a cached read).
        """
        p = self.p
        box_request = getattr(_source, "BoxRequest", None)
        read_boxes = getattr(p.lazy, "read_boxes", None)
        if p.lazy is not None and box_request is not None and read_boxes is not None:
            requests = [box_request(Path(p.source.paths[si]), box) for si, box in wanted]
            return [np.asarray(x) for x in read_boxes(requests)]
        return [self._fetch_one(si, box) for si, box in wanted]

    def _fetch_one(self, si: int, box: tuple[slice, ...]) -> np.ndarray:
        p = self.p
        leaf = p.source.leaves[si]
        if p.lazy is None:
            _check_concrete(p, [si] if is_abstract(leaf) else [])
            whole = self._whole.get(si)
            if whole is None:
                # One host copy per source leaf: slicing a sharded jax.Array
                # per target shard would gather it once per shard instead.
                if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                    raise GraftError(
                        f"the in-memory source leaf {render_parts(p.source.paths[si])!r} spans "
                        "several processes; a stack, unstack, cast, transpose or reshape rule "
                        "cannot read it: save it and graft from the checkpoint"
                    )
                whole = self._whole[si] = np.asarray(leaf)
            return np.array(whole[box] if box else whole)
        whole = self._whole.get(si)
        if whole is None:
            shape, dtype = _leaves.spec_of(leaf)
            like = np.broadcast_to(np.zeros((), dtype), shape or ())
            request = ReadRequest(Path(p.source.paths[si]), like, dtype)
            whole = self._whole[si] = np.asarray(p.lazy.read([request])[0])
        return np.array(whole[box] if box else whole)  # the caller's own copy


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _build(p: GraftPlan, pair: Pair, blocks: _Blocks, like: Any) -> Any:
    """The value of one target leaf under a transforming rule, placed like it."""
    rule = p.rules[pair.rule]
    spec = _leaves.spec_of(p.source.leaves[pair.source])
    shape = tuple(spec[0] or ())
    fetch: Callable[[tuple[slice, ...]], np.ndarray]
    if rule.gather == "stack":
        axis = _axis(rule.axis, len(shape) + 1)
        sources = pair.sources

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            inner = box[:axis] + box[axis + 1 :]
            layers = range(box[axis].start, box[axis].stop)
            # Layer by layer into one block: host memory holds the block and
            # one layer's slice, not every slice and then their stack.
            out: np.ndarray | None = None
            for j, k in enumerate(layers):
                part = blocks.fetch(sources[k], inner)
                if out is None:
                    out = np.empty(part.shape[:axis] + (len(layers),) + part.shape[axis:],
                                   part.dtype)
                out[(slice(None),) * axis + (j,)] = part
                del part
            assert out is not None
            return out

    elif rule.gather == "unstack":
        axis = _axis(rule.axis, len(shape))
        si, index = pair.source, pair.layer
        assert index is not None

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            full = box[:axis] + (slice(index, index + 1),) + box[axis:]
            return np.squeeze(blocks.fetch(si, full), axis=axis)

    else:
        si = pair.source

        def fetch(box: tuple[slice, ...]) -> np.ndarray:
            return blocks.fetch(si, box)

    current: Any = gathered_spec(rule, spec, len(pair.sources), pair.layer)[0]
    for step in rule.steps:
        fetch = step.pull(fetch, current)
        current = step.spec(current)[0]
    dtype = _leaves.spec_of(like)[1]
    return _place_blocks(fetch, like, dtype)


def _place_blocks(fetch: Callable[[tuple[slice, ...]], np.ndarray], like: Any, dtype: Any) -> Any:
    """Builds a value like `like` from a fetch of its boxes: shard by shard if sharded."""
    shape: tuple[int, ...] = tuple(getattr(like, "shape", ()))
    whole = tuple(slice(0, d) for d in shape)

    def block(box: tuple[slice, ...]) -> np.ndarray:
        # Fetches return arrays of their own (DESIGN section 12), so a block is
        # copied only to change its dtype.
        value = np.asarray(fetch(box))
        return value if isinstance(dtype, type) else value.astype(dtype, copy=False)

    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        sharding = like.sharding
        if sharding is None:
            return jax.device_put(block(whole))
        # Each device gets its own block, put on it alone: make_array_from_callback
        # may hand one host block to several devices of a replicated sharding,
        # and the CPU client can adopt its memory for all of them.
        boxes = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            boxes[device] = tuple(
                slice(*s.indices(d)[:2]) for s, d in zip(index or (), shape, strict=True)
            )
        left: dict[tuple[tuple[int, int], ...], int] = {}
        for box in boxes.values():
            key = tuple((b.start, b.stop) for b in box)
            left[key] = left.get(key, 0) + 1
        # A block read for replicated shards is kept only until its last use,
        # so host memory holds one shard's block at a time, not the array.
        done: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
        arrays = []
        for device, box in boxes.items():
            key = tuple((b.start, b.stop) for b in box)
            left[key] -= 1
            data = done[key] if key in done else block(box)
            if left[key]:
                done[key] = data
                data = data.copy()  # this device's own buffer
            else:
                done.pop(key, None)
            arrays.append(jax.device_put(data, device, may_alias=False))
            del data
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
    value = block(whole)
    if isinstance(like, np.ndarray):
        return np.array(value, dtype=like.dtype)
    if isinstance(like, np.generic):
        return np.array(value, dtype=like.dtype)[()]
    return type(like)(value.item())


def _read_batched(
    source: Source,
    requests: list[ReadRequest],
    sizes: list[int],
    progress: bool | Callable[[int, int], None],
) -> list[Any]:
    total = sum(sizes)
    log.info(
        "reading %d %s, %s, from %s",
        len(requests),
        "leaf" if len(requests) == 1 else "leaves",
        format_bytes(total),
        source.describe(),
    )
    if not progress or total < _BATCHED_FROM:
        return list(source.read(requests))
    report = ProgressBar() if progress is True else progress
    out: list[Any] = []
    done = 0
    start = 0
    while start < len(requests):
        end, batch_bytes = start, 0
        while end < len(requests) and (end == start or batch_bytes + sizes[end] <= _BATCH):
            batch_bytes += sizes[end]
            end += 1
        out.extend(source.read(requests[start:end]))
        done += batch_bytes
        start = end
        log.info("read %s of %s", format_bytes(done), format_bytes(total))
        report(done, total)
    return out
