"""Placing values like the leaves they replace: sharding, dtype, container kind.

A grafted leaf takes the sharding of the target leaf (`jax.Array.sharding`, or
`.sharding` of a `jax.ShapeDtypeStruct`); numpy targets stay numpy, Python
scalars stay Python scalars. `place` gives every grafted leaf buffers of its
own (docs/design.md section 12); `propagate_sharding` is a placement utility like
`jax.device_put` and returns arrays already placed right as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from treegraft._errors import GraftError, MismatchError, Problem, count
from treegraft._insert.placement import (
    array_from_blocks,
    box_of,
    buffers,
    copy_array,
    shares_buffers,
)
from treegraft._insert.x64 import check_x64
from treegraft._parse.paths import Path, render_parts
from treegraft._tree import leaves as _leaves
from treegraft._tree.leaves import array_type
from treegraft._tree.pytree import flatten_parts

__all__ = ["propagate_sharding", "place", "weakly_typed", "overflow_error"]

_PY_SCALARS = (bool, int, float, complex)


def place(
    values: Sequence[Any],
    likes: Sequence[Any],
    *,
    cast: bool | str = False,
    owned: bool = False,
    name_of: Callable[[int], str] | None = None,
) -> list[Any]:
    """Places each value like the corresponding leaf of likes, in buffers of its own.

    Every placed array owns its buffers (docs/design.md section 12): it shares memory
    neither with the value it came from nor with another placed value, so the
    result can be donated (`jax.jit(f, donate_argnums=0)`) without deleting the
    caller's arrays, and a numpy result can be written to. Copies stay on the
    devices (`jax.device_put(..., may_alias=False)`), with no host round trip.

    Args:
      values: the new values (arrays or scalars).
      likes: the leaves they replace.
      cast: False, True or "unsafe": which dtype changes are allowed, under the
        policy of `treegraft._leaves.mismatch` (the plan has checked them;
        this checks again, so a refused cast can never happen silently).
      owned: the values are fresh (read from a checkpoint for this call):
        each may be used as it is once; a value that appears several times is
        still copied for its other uses. By default every value belongs to the
        caller and is copied.
      name_of: how messages name the k-th leaf (its rendered path), if known;
        called only to build a message.

    Returns:
      The placed values, in order. The inputs are not modified.

    Raises:
      MismatchError: a value's dtype differs from its like's and `cast` does
        not allow that cast.
    """
    # The moves are the ones graft was asked for: a transfer guard the caller
    # set is for the caller's own code (docs/design.md section 12).
    with jax.transfer_guard("allow"):
        return _place(values, likes, cast=cast, owned=owned, name_of=name_of)


def _place(
    values: Sequence[Any],
    likes: Sequence[Any],
    *,
    cast: bool | str,
    owned: bool,
    name_of: Callable[[int], str] | None,
) -> list[Any]:
    out: list[Any] = [None] * len(values)
    checks: list[_Check] = []  # casts on devices whose values are checked at the end
    puts: list[tuple[int, Any, Any]] = []  # (k, value, sharding): one batched device_put
    # id(value) -> [(sharding, k of its put)]: a value's shardings are compared
    # only when it comes again (hashing a sharding costs more than the put's
    # bookkeeping for a small array).
    first_put: dict[int, list[tuple[Any, int]]] = {}
    addressable: dict[Any, bool] = {}  # sharding -> is_fully_addressable, this call
    copies: dict[int, list[int]] = {}  # k of a put -> the ks that get a copy of its result
    seen: set[int] = set()
    concrete = array_type()
    for k, (value, like) in enumerate(zip(values, likes, strict=True)):
        first = id(value) not in seen
        seen.add(id(value))
        keep = owned and first  # the value may be used without a copy
        if (
            not keep
            and type(value) is concrete
            and (type(like) is concrete or type(like) is jax.ShapeDtypeStruct)
            and (sharding := like.sharding) is not None
            and value.dtype == like.dtype
            and _addressable(sharding, addressable)
        ):
            # The common case of an in-memory graft, as the branch below takes
            # it, without its isinstance checks against jax.Array's ABC (0.5 s
            # for 50,000 leaves): a caller's array of the right dtype, copied
            # into a sharding of this process.
            earlier = None if first else _put_of(first_put, value, sharding)
            if earlier is not None:
                copies.setdefault(earlier, []).append(k)
            else:
                first_put.setdefault(id(value), []).append((sharding, k))
                puts.append((k, value, sharding))
            continue
        if type(value) in _PY_SCALARS:
            # A Python scalar has no dtype: its value must fit (docs/design.md
            # section 4); it becomes an array of the like's dtype here.
            value = _scalar_for(value, like, cast, k, name_of)
        original = value
        if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
            value = _cast_for(value, like, cast, k, name_of, checks)
            keep = keep or value is not original  # a cast made a new array
            sharding = like.sharding
            if isinstance(value, jax.Array) and sharding is None:
                sharding = value.sharding
            if sharding is None:
                # No sharding to follow: the default device, in a copy of its own.
                out[k] = jax.numpy.array(value, copy=not keep)
                continue
            if not _addressable(sharding, addressable) and _is_local(value):
                out[k] = _local_to_global(value, like)
                continue
            earlier = _put_of(first_put, value, sharding)
            if keep and isinstance(value, jax.Array) and value.sharding == sharding:
                out[k] = value
                if earlier is None:
                    first_put.setdefault(id(value), []).append((sharding, k))
                continue
            if earlier is not None:
                copies.setdefault(earlier, []).append(k)
                continue
            first_put.setdefault(id(value), []).append((sharding, k))
            if not keep and not isinstance(value, jax.Array) and _on_cpu(sharding):
                # jax's CPU client keeps an aligned numpy array's memory as the
                # buffer, even with may_alias=False: copy it on the host first.
                value = np.array(value, copy=True)
            puts.append((k, value, sharding))
        elif isinstance(like, np.ndarray | np.generic):
            _check_cast(value, like, cast, k, name_of)
            array = _to_host(value)
            if _leaves._kind(array.dtype) == "c" and _leaves._kind(like.dtype) != "c":
                array = np.real(array)  # cast="unsafe": drop the imaginary part, no warning
            owned_here = keep and array is value and array.flags.writeable
            if not (owned_here and array.dtype == like.dtype):
                # A copy: never the caller's array, nor a read-only view of a device
                # buffer. A cast the policy let through (cast="unsafe") may change
                # values, as asked: no numpy warning about it.
                before = array
                with np.errstate(invalid="ignore", over="ignore"):
                    array = np.array(array, dtype=like.dtype, copy=True)
                if _leaves.values_checked(before.dtype, array.dtype, cast):
                    _refuse_overflow(before, array, k, name_of)
            out[k] = array if isinstance(like, np.ndarray) else array[()]
        elif type(like) in _PY_SCALARS:
            _check_cast(value, like, cast, k, name_of)
            host = _to_host(value)
            if _leaves._kind(host.dtype) == "c" and type(like) is not complex:
                host = np.real(host)
            out[k] = type(like)(host.item())
            if _leaves.values_checked(host.dtype, type(like), cast):
                _refuse_overflow(host, np.asarray(out[k]), k, name_of)
        else:
            out[k] = value
    puts = _copy_in_chunks(puts, out)
    if puts:
        # may_alias as a list: broadcasting one bool over the values costs more
        # than the copies of small arrays.
        placed = jax.device_put(
            [v for _, v, _ in puts], [sh for _, _, sh in puts], may_alias=[False] * len(puts)
        )
        shared: list[int] = []  # values whose replicas got one buffer
        small: list[tuple[int, Any, Any]] = []  # results copied whole, not looked at
        from_host: dict[int, jax.Array] = {}  # small results resharded through the host
        for (k, value, sharding), got in zip(puts, placed, strict=True):
            resharded = False
            if type(value) is concrete or isinstance(value, jax.Array):
                keeps, adopts = _reshard_checks(value.sharding, sharding, value.shape)
                resharded = adopts and not keeps and value.sharding != sharding
            else:
                keeps, adopts = False, _on_cpu(sharding) and _has_replicas(
                    sharding, np.shape(value))
            if keeps and buffers(got) & buffers(value):
                # jax keeps the source's buffer as one shard of a resharded array
                # (one device to replicated), even with may_alias=False.
                got = copy_array(got)
            # A reshard through the host: jax caches the source's host copy on
            # the source array and may adopt an aligned slice of it as a device's
            # buffer, memory the source still holds (section 12).
            hosted = (isinstance(value, jax.Array) and value.sharding != sharding
                      and _may_adopt_host_copy(value.sharding, sharding, value.shape))
            if resharded and got.nbytes <= _SMALL:
                out[k] = got
                small.append((k, got, sharding))
                if hosted:
                    from_host[k] = value
                continue
            if hosted and _in_host_copy(value, got):
                got = copy_array(got)
            out[k] = got
            if adopts and shares_buffers(got):
                # Replicas sharing one buffer (docs/design.md section 12): jax's
                # CPU client adopts an aligned host block's memory as the buffer
                # of every device that holds that block (whether it adopts depends
                # on where the host copy happened to land), and resharding a
                # jax.Array onto replicas (P('b') to P()) shares buffers too.
                shared.append(k)
        if small:
            # Many small reshards onto replicas (a model's biases): a compiled copy
            # of each costs less than looking at its shards' buffers (21 against
            # 33 us for 2 KiB), and a quarter of them needed a copy anyway.
            rest = _copy_in_chunks(small, out, pad=True)
            shared.extend(k for k, got, _ in rest if shares_buffers(got)
                          or (k in from_host and _in_host_copy(from_host[k], got)))
        if shared:
            # Copies onto the same sharding, every shard into a new buffer of its
            # own: compiled by chunks where many are alike, the rest in one batch
            # (one _copy per leaf cost 6x the put).
            rest = _copy_in_chunks([(k, out[k], out[k].sharding) for k in shared], out)
            if rest:
                fixed = jax.device_put(
                    [v for _, v, _ in rest],
                    [sh for _, _, sh in rest],
                    may_alias=[False] * len(rest),
                )
                for (k, _, _), got in zip(rest, fixed, strict=True):
                    out[k] = got
    # The other uses of a value placed once: device-to-device copies of the first
    # result. One batch per round, so that no batch holds the same input twice
    # (a batched device_put gives equal inputs one shared buffer).
    rounds = max((len(ks) for ks in copies.values()), default=0)
    for r in range(rounds):
        batch = [(k_first, ks[r]) for k_first, ks in copies.items() if len(ks) > r]
        made = jax.device_put(
            [out[k_first] for k_first, _ in batch],
            [out[k_first].sharding for k_first, _ in batch],
            may_alias=[False] * len(batch),
        )
        for (k_first, k), got in zip(batch, made, strict=True):
            if buffers(got) & buffers(out[k_first]):
                got = copy_array(got)
            out[k] = got
    if checks:
        _refuse_device_overflows(checks, name_of)
    for k, like in enumerate(likes):
        # A weakly typed leaf (jnp.asarray(0.0)) stays weak: a strong one would
        # promote the user's next `bfloat16 + leaf` and retrace jitted steps.
        if getattr(like, "weak_type", False) and isinstance(out[k], jax.Array):
            out[k] = weakly_typed(out[k])
    return out




def _put_of(first_put: dict[int, list[tuple[Any, int]]], value: Any, sharding: Any) -> int | None:
    """The k of the put of value onto sharding made earlier in this call, if any."""
    for placed, k in first_put.get(id(value), ()):
        if placed == sharding:
            return k
    return None


def _addressable(sharding: Any, known: dict[Any, bool]) -> bool:
    """`sharding.is_fully_addressable`, asked once per distinct sharding in a call.

    Arrays made one by one each hold a sharding object of their own: a hash
    and a compare cost a tenth of asking jax.
    """
    found = known.get(sharding)
    if found is None:
        found = known[sharding] = bool(sharding.is_fully_addressable)
    return found


def weakly_typed(x: jax.Array) -> jax.Array:
    """x as a weakly typed array, like the leaf it replaces: same dtype, sharding and values.

    The result has buffers of its own (the output of a computation).
    """
    if x.weak_type:
        return x
    # jax has no public call that sets weak_type on an array (its own
    # `jnp.asarray(0.0)` gets it from the Python scalar).
    from jax._src.lax.lax import _convert_element_type

    return _convert_element_type(x, x.dtype, weak_type=True)


class _Check(NamedTuple):
    """A cast done on devices, and the flag that says whether it overflowed."""

    k: int
    before: Any  # the array before the cast (alive anyway: the caller holds the values)
    after: Any
    overflowed: Any  # a replicated bool scalar


@functools.lru_cache(maxsize=64)
def _checked_cast(dtype: Any) -> Any:
    """A compiled cast to dtype that also says whether it made a finite value inf.

    A reduction only (no indexing), so it runs on arrays of any sharding;
    the offending value is looked for on the host, in the rare case there is one.
    """

    def cast(x: Any) -> Any:
        y = x.astype(dtype)
        return y, jax.numpy.any(jax.numpy.isfinite(x) & ~jax.numpy.isfinite(y))

    return jax.jit(cast)


def overflow_error(
    name: str, source: Any, target: Any, index: tuple[int, ...] | None, value: Any
) -> MismatchError:
    """The error for a cast under cast=True that made a finite value inf.

    Args:
      name: how the message names the leaf (its quoted path).
      source: the dtype cast from.
      target: the dtype cast to.
      index: the first offending element's index, () for a scalar, None when
        it is on another process.
      value: that element's value in the source.
    """
    if index is None:
        where = " (on another process)"
    elif index:
        where = f" (the first such value, at [{', '.join(map(str, index))}])"
    else:
        where = ""  # a scalar
    return MismatchError(
        f"cannot place {name}: casting {_dtype_name(source)} to "
        f"{_dtype_name(target)} makes {value!r}{where} inf: it is "
        "beyond the target's range. cast=True never makes inf or NaN of a finite value; "
        "make the state leaf a wider dtype, scale the values first, or pass cast='unsafe' "
        "to let them overflow"
    )


def _refuse_overflow(
    before: np.ndarray, after: np.ndarray, k: int, name_of: Callable[[int], str] | None
) -> None:
    """Raises when a cast on the host made a finite value inf (cast=True)."""
    found = _leaves.first_overflow(before, after)
    if found is not None:
        index, value = found
        raise overflow_error(
            _describe_at(k, name_of), before.dtype, _target_dtype(after), index, value.item()
        )


def _dtype_name(dtype: Any) -> str:
    return dtype.__name__ if isinstance(dtype, type) else str(dtype)


def _target_dtype(after: Any) -> Any:
    return after.dtype if hasattr(after, "dtype") else type(after)


def _refuse_device_overflows(checks: list[_Check], name_of: Callable[[int], str] | None) -> None:
    """Raises for the first cast on devices that made a finite value inf (cast=True)."""
    # Every process holds the flags (a replicated result): across processes, read
    # the local copy (addressable_data costs 150 us a flag: only where needed).
    flags = jax.device_get(
        [
            c.overflowed if c.overflowed.is_fully_addressable else c.overflowed.addressable_data(0)
            for c in checks
        ]
    )
    for check, bad in zip(checks, flags, strict=True):
        if not bool(bad):
            continue
        # The first offending element this process holds, in index order.
        found: list[tuple[tuple[int, ...], Any]] = []
        before = {s.device: s for s in check.before.addressable_shards}
        for shard in check.after.addressable_shards:
            start = tuple(sl.indices(n)[0] for sl, n in zip(shard.index, check.after.shape,
                                                             strict=False))
            start += (0,) * (check.after.ndim - len(start))
            hit = _leaves.first_overflow(np.asarray(before[shard.device].data),
                                         np.asarray(shard.data))
            if hit is not None:
                found.append((tuple(a + b for a, b in zip(start, hit[0], strict=True)), hit[1]))
        index, value = min(found, key=lambda f: f[0]) if found else (None, float("nan"))
        raise overflow_error(
            _describe_at(check.k, name_of), check.before.dtype, check.after.dtype, index,
            np.asarray(value).item(),
        )


def _scalar_for(
    value: Any, like: Any, cast: bool | str, k: int, name_of: Callable[[int], str] | None
) -> Any:
    """A Python scalar value checked against the leaf it replaces, as an array of its dtype.

    A Python scalar like keeps the value as it is (placed below).

    Raises:
      MismatchError: the leaf's dtype does not hold the value (`scalar_mismatch`).
    """
    if not isinstance(like, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic):
        if type(like) not in _PY_SCALARS:
            return value
    target = _leaves.spec_of(like)[1]
    if _leaves.is_key_dtype(target):
        return value  # refused as a dtype mismatch below
    why = _leaves.scalar_mismatch(value, target, cast=cast)
    if why is not None:
        raise MismatchError(f"cannot place {_describe_at(k, name_of)}: {why.detail}")
    if isinstance(target, type):
        return value
    return _leaves.scalar_array(value, target)


_CHUNK = 256  # arrays per compiled copy
_SMALL = 8 * 2**10  # bytes up to which a copy costs less than looking at the buffers


def _copy_in_chunks(
    puts: list[tuple[int, Any, Any]], out: list[Any], *, pad: bool = False
) -> list[tuple[int, Any, Any]]:
    """Copies many same-shape arrays onto shardings that keep their layout, by compiled chunks.

    `jax.device_put` costs about 30 us per array, so copying 50,000 small
    arrays took 1.6 s; one compiled copy of 256 arrays at a time costs a
    fraction of that, and is compiled once per shape, dtype and sharding. An
    array goes this way when its sharding puts the same blocks on the same
    devices as the target's (`is_equivalent_to`: a replicated array of one
    mesh onto a replicated sharding of another mesh of the same devices), so
    the copy moves no data between devices; there `jax.device_put` would keep
    the source's buffers, and each result had to be copied again (0.45 ms an
    array). Only groups of at least one chunk go this way (fewer would pay a
    compile for little); the rest is returned for the batched `device_put`.
    With pad, a last chunk at least half full goes this way too, filled up
    with its last array again (those copies are dropped), so the copy
    compiled for a full chunk serves it.
    """
    # Each sharding hashed once, to its first equal object (arrays made one by
    # one each hold a sharding object of their own); then keyed by ids.
    groups: dict[tuple[Any, ...], list[int]] = {}
    target_of: dict[int, Any] = {}
    layouts: dict[tuple[int, int, int], bool] = {}
    canon: dict[Any, Any] = {}
    concrete = array_type()
    for n, (_, value, sharding) in enumerate(puts):
        if not (type(value) is concrete or isinstance(value, jax.Array)):
            continue
        if not isinstance(value.dtype, np.dtype) or value.weak_type:  # a key array; weak
            continue
        have, ndim = canon.setdefault(value.sharding, value.sharding), value.ndim
        sharding = canon.setdefault(sharding, sharding)
        pair = (id(have), id(sharding), ndim)
        same = layouts.get(pair)
        if same is None:
            same = layouts[pair] = _same_layout(have, sharding, ndim)
        if same:
            target_of[id(sharding)] = sharding
            groups.setdefault((value.shape, value.dtype, id(sharding)), []).append(n)
    done: set[int] = set()
    for (_, _, sharding_id), members in groups.items():
        sharding = target_of[sharding_id]
        whole = len(members) - len(members) % _CHUNK
        if pad and len(members) % _CHUNK >= _CHUNK // 2:
            whole = len(members)
        if not whole:
            continue
        copy = _chunk_copier(sharding)
        for start in range(0, whole, _CHUNK):
            chunk = members[start : start + _CHUNK]
            args = [puts[n][1] for n in chunk]
            args += args[-1:] * (_CHUNK - len(args))
            for n, got in zip(chunk, copy(*args), strict=False):
                out[puts[n][0]] = got
            done.update(chunk)
    return [put for n, put in enumerate(puts) if n not in done] if done else puts


@functools.lru_cache(maxsize=64)
def _chunk_copier(sharding: Any) -> Any:
    """A compiled copy of _CHUNK arrays onto sharding, made once per sharding."""
    # Outputs of a computation never alias its (undonated) inputs: new buffers.
    return jax.jit(lambda *xs: tuple(x.copy() for x in xs), out_shardings=sharding)


_LAYOUTS: dict[tuple[Any, Any, int], bool] = {}
_KEEPS: dict[tuple[Any, Any, tuple[int, ...]], bool] = {}


def _may_keep(have: Any, want: Any, shape: tuple[int, ...]) -> bool:
    """Whether some device's block under want lies within its block under have.

    Only there can `jax.device_put` give the result a shard in a source
    buffer: the source's own (the same block), or a view into it (a row of
    a replicated array). Elsewhere the device holds none of the shard's
    elements, so its buffer is new, and looking at every shard's buffer
    (0.2 ms an array) is skipped. Asked once per pair of shardings and shape.
    """
    key = (have, want, shape)
    found = _KEEPS.get(key)
    if found is None:
        try:
            theirs = have.devices_indices_map(shape)
            mine = want.devices_indices_map(shape)
            found = any(
                device in theirs
                and _within(box_of(tuple(index or ()), shape),
                            box_of(tuple(theirs[device] or ()), shape))
                for device, index in mine.items()
            )
        except Exception:  # noqa: BLE001 (a sharding jax cannot map: look at the buffers)
            found = True
        if len(_KEEPS) > 4096:
            _KEEPS.clear()
        _KEEPS[key] = found
    return found


_CHECKS: dict[tuple[Any, Any, tuple[int, ...]], tuple[bool, bool]] = {}


def _reshard_checks(have: Any, want: Any, shape: tuple[int, ...]) -> tuple[bool, bool]:
    """Which buffers a `jax.device_put` of an array in have onto want must be checked for.

    Returns (keeps, adopts): whether a shard of the result may be a source
    buffer (`_may_keep`), and whether two replicas of the result may share
    one buffer. Asked once per pair of shardings and shape: looking at every
    shard's buffer costs 35 us an array, two thirds of the put of a 2 KiB bias,
    and waits for the put to finish.

    A reshard that keeps no source block goes through the host: jax gathers
    the array into one C-ordered host copy and puts each device's slice of it.
    jax's CPU client adopts a slice as the device buffer only when the slice
    is one run of memory (and happens to be aligned); a slice with gaps (the
    columns of a row-major kernel) is always copied into a new buffer. So
    when no device's block is one run of memory, every shard is new and
    owns its buffer (docs/design.md section 12), and nothing is checked.
    """
    key = (have, want, shape)
    found = _CHECKS.get(key)
    if found is None:
        if have == want:
            keeps, adopts = False, _on_cpu(want) and _has_replicas(want, shape)
        else:
            keeps = _may_keep(have, want, shape)
            adopts = _on_cpu(want) and _has_replicas(want, shape)
            if adopts and not keeps:
                adopts = _any_block_dense(want, shape)
        found = (keeps, adopts)
        if len(_CHECKS) > 4096:
            _CHECKS.clear()
        _CHECKS[key] = found
    return found


@functools.lru_cache(maxsize=4096)
def _may_adopt_host_copy(have: Any, want: Any, shape: tuple[int, ...]) -> bool:
    """Whether a reshard from have to want may adopt a slice of the source's host copy.

    Only on the CPU, and only a block that is one run of memory (`_dense`).
    """
    return _on_cpu(want) and _any_block_dense(want, shape)


def _in_host_copy(value: jax.Array, got: jax.Array) -> bool:
    """Whether a shard of got lies in the host copy jax cached on value.

    jax keeps that copy as a private attribute: where it is not found, the
    answer is yes, so that the result is copied rather than perhaps shared.
    """
    host = getattr(value, "_npy_value", _UNKNOWN)
    if host is None:
        return False
    if not isinstance(host, np.ndarray):
        return True
    lo = host.ctypes.data
    hi = lo + host.nbytes
    return any(lo <= p < hi for p in buffers(got))


_UNKNOWN = object()


def _any_block_dense(sharding: Any, shape: tuple[int, ...]) -> bool:
    """Whether some device's block of a C-ordered array of shape is one run of memory."""
    try:
        indices = sharding.devices_indices_map(shape)
    except Exception:  # noqa: BLE001 (a sharding jax cannot map: assume it may be)
        return True
    return any(_dense(box_of(tuple(index or ()), shape), shape) for index in indices.values())


def _dense(box: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> bool:
    """Whether a box of a C-ordered array of shape is one run of memory.

    It is when every axis after some axis is whole and every axis before it
    has one index. An empty box counts as one run (it may be adopted).

    >>> _dense(((0, 4), (0, 8)), (8, 8)), _dense(((0, 8), (0, 4)), (8, 8))
    (True, False)
    """
    if any(b <= a for a, b in box):
        return True
    partial = [k for k, ((a, b), n) in enumerate(zip(box, shape, strict=True)) if (a, b) != (0, n)]
    if not partial:
        return True
    return all(b - a == 1 for a, b in box[: partial[-1]])


def _within(inner: tuple[tuple[int, int], ...], outer: tuple[tuple[int, int], ...]) -> bool:
    return all(a >= c and b <= d for (a, b), (c, d) in zip(inner, outer, strict=True))


def _same_layout(have: Any, want: Any, ndim: int) -> bool:
    """Whether two shardings put the same blocks on the same devices, in the same order.

    Asked once per pair of shardings and rank: a sync of 10,000 leaves meets a
    few shardings, and `is_equivalent_to` costs some microseconds a call.
    """
    if have == want:
        return True
    key = (have, want, ndim)
    same = _LAYOUTS.get(key)
    if same is None:
        try:
            # The device order too: a compiled copy needs its inputs on the
            # devices its output goes to, in the same order.
            same = bool(have.is_equivalent_to(want, ndim)) and list(
                have._device_assignment
            ) == list(want._device_assignment)
        except Exception:  # noqa: BLE001 (a sharding jax cannot compare: device_put decides)
            same = False
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        _LAYOUTS[key] = same
    return same


def _on_cpu(sharding: Any) -> bool:
    return any(d.platform == "cpu" for d in sharding.device_set)


def _has_replicas(sharding: Any, shape: tuple[int, ...]) -> bool:
    """Whether several devices of sharding hold the same block of an array of shape."""
    devices = len(sharding.device_set)
    if devices == 1:
        return False
    if sharding.is_fully_replicated:
        return True
    try:
        shard = sharding.shard_shape(shape)
    except Exception:  # noqa: BLE001 (a sharding jax cannot say: assume replicas, and check)
        return True
    blocks = math.prod(-(-d // b) for d, b in zip(shape, shard, strict=True) if b)
    return blocks < devices


def _describe_at(k: int, name_of: Callable[[int], str] | None) -> str:
    return repr(name_of(k)) if name_of is not None else f"leaf #{k}"


def _check_cast(
    value: Any, like: Any, cast: bool | str, k: int, name_of: Callable[[int], str] | None
) -> None:
    vdtype = getattr(value, "dtype", None)
    if vdtype is None:
        if type(value) not in _PY_SCALARS:
            return
    elif vdtype == getattr(like, "dtype", None):
        return  # the common case, without building specs
    vspec, lspec = _leaves.spec_of(value), _leaves.spec_of(like)
    if vspec[1] == lspec[1]:
        return
    why = _leaves.mismatch(lspec, vspec, cast=cast)
    if why is not None and why != "shape":
        raise MismatchError(
            f"cannot place {_describe_at(k, name_of)}: the value is {_leaves.describe(vspec)}, "
            f"the leaf it replaces is {_leaves.describe(lspec)} ({why.detail})"
        )


def _cast_for(
    value: Any,
    like: Any,
    cast: bool | str,
    k: int,
    name_of: Callable[[int], str] | None,
    checks: list[_Check],
) -> Any:
    """The value in the like's dtype, when the policy allows; the value itself otherwise.

    A cast whose values must be checked (`values_checked`: a float narrowing
    under cast=True) is checked on the host at once, or on devices through
    `checks`, which the caller reads once every cast is under way.
    """
    dtype = like.dtype
    vdtype = getattr(value, "dtype", None)
    if vdtype == dtype:
        return value
    _check_cast(value, like, cast, k, name_of)
    if vdtype is None and type(value) not in _PY_SCALARS:
        return value
    if _leaves.is_key_dtype(dtype):
        return value  # same key dtype, or _check_cast raised
    checked = vdtype is not None and _leaves.values_checked(np.dtype(vdtype), np.dtype(dtype), cast)
    if isinstance(value, jax.Array):
        if _leaves._kind(np.dtype(vdtype)) == "c" and _leaves._kind(np.dtype(dtype)) != "c":
            value = value.real  # cast="unsafe": drop the imaginary part, no warning
        if checked and value.size:
            got, overflowed = _checked_cast(np.dtype(dtype))(value)
            checks.append(_Check(k, value, got, overflowed))
            return got
        return value.astype(dtype)
    array = np.asarray(value)
    if _leaves._kind(array.dtype) == "c" and _leaves._kind(np.dtype(dtype)) != "c":
        array = np.real(array)
    with np.errstate(invalid="ignore", over="ignore"):  # cast="unsafe" asked for it
        got = array.astype(dtype)
    if checked:
        _refuse_overflow(array, got, k, name_of)
    return got


def _is_local(value: Any) -> bool:
    return not isinstance(value, jax.Array) or value.is_fully_addressable


def _local_to_global(value: Any, like: Any) -> jax.Array:
    """Places a process-local value in a sharding that spans several processes.

    The value (numpy, a Python scalar, or a jax.Array on this process's devices)
    is the same on every process, as in any multi-controller program: each
    process places only the blocks its own devices hold. `jax.device_put` would
    instead gather the whole value from every process, to check that it is the
    same everywhere, and fetch it to the host: the full array's bytes times the
    number of processes, per leaf.
    """
    local = value if isinstance(value, jax.Array) else np.asarray(value, dtype=like.dtype)

    def block(box: tuple[tuple[int, int], ...]) -> Any:
        piece = local[tuple(slice(a, b) for a, b in box)]
        # A whole-array index gives the value itself: copy it, so that the
        # placed array owns its buffers (docs/design.md section 12).
        # numpy blocks are copied too: jax's CPU client would keep their memory.
        if piece is local or not isinstance(piece, jax.Array):
            if isinstance(piece, jax.Array):
                piece = jax.numpy.array(piece, copy=True)
            else:
                piece = np.array(piece)
        return piece

    return array_from_blocks(tuple(like.shape), like.sharding, block)


def _to_host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        raise GraftError(
            "cannot turn a global jax.Array that spans several processes into a numpy "
            f"array (shape {value.shape}, sharding {value.sharding}); make the target a "
            "jax.Array or jax.ShapeDtypeStruct with a sharding instead"
        )
    with jax.transfer_guard("allow"):
        return np.asarray(value)


def propagate_sharding(values: Any, like: Any, /) -> Any:
    """Returns values placed like the leaves of `like` (same structure).

    Each leaf goes to the sharding of the corresponding leaf of `like`
    (`jax.Array` or `jax.ShapeDtypeStruct` with `.sharding`); numpy leaves of
    `like` give numpy arrays, Python scalars give Python scalars. Like
    `jax.device_put`, it moves values and does not copy what is already
    placed right: an array already on its sharding (a numpy array already of
    its dtype) is returned as it is, so the result may share buffers with
    `values` (only a value used twice is copied for its second use). Copy
    first (`jnp.copy`) if you will donate the result and still need `values`;
    `treegraft.graft` always returns leaves with buffers of their own. Dtypes
    must agree (a Python scalar meets any dtype of its kind): nothing is cast.
    The input is not modified; use the return value.

    Args:
      values: a pytree of arrays.
      like: a pytree of the same structure whose leaves say where to go.

    Returns:
      A pytree with the structure of `like`.

    Raises:
      MismatchError: the two trees do not have the same structure, or leaves
        differ in shape or dtype.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, treegraft as tg
      >>> one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      >>> like = {'w': jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one_device)}
      >>> out = tg.propagate_sharding({'w': np.ones(2, np.float32)}, like)
      >>> out['w'].sharding == like['w'].sharding
      True
    """
    vpaths, vleaves, _ = flatten_parts(values)
    lpaths, lleaves, ldef = flatten_parts(like)
    if vpaths != lpaths:
        # Paired by path, not position: a custom node may give its children
        # in another order on each flatten (docs/design.md section 4).
        at = {parts: k for k, parts in enumerate(vpaths)}
        if len(at) == len(lpaths) and all(parts in at for parts in lpaths):
            vleaves = [vleaves[at[parts]] for parts in lpaths]
            vpaths = lpaths
    if vpaths != lpaths:
        extra = sorted(render_parts(p) for p in set(vpaths) - set(lpaths))
        missing = sorted(render_parts(p) for p in set(lpaths) - set(vpaths))
        raise MismatchError(
            "propagate_sharding: values and like differ in structure: "
            f"in like only: {missing[:10]}, in values only: {extra[:10]}"
        )
    # A sharding fits any shape it divides: check shapes, or a wrong-shaped
    # value would be placed silently.
    bad = []
    for parts, v, lk in zip(vpaths, vleaves, lleaves, strict=True):
        vspec, lspec = _leaves.spec_of(v), _leaves.spec_of(lk)
        if vspec[0] is not None and lspec[0] is not None and vspec[0] != lspec[0]:
            message = (
                f"{render_parts(parts)!r}: in values {_leaves.describe(vspec)}, "
                f"in like {_leaves.describe(lspec)}"
            )
            bad.append(Problem("sharding", message, target=Path(parts)))
    if bad:
        raise GraftError.from_problems(
            bad,
            header=f"propagate_sharding: values and like differ in shape ({len(bad)} leaves):",
        )
    if narrowed := check_x64(range(len(lleaves)), lleaves, lpaths, where="like"):
        leaves = count(len(narrowed), "leaf", "leaves")
        raise GraftError.from_problems(
            narrowed, header=f"propagate_sharding: jax would narrow {leaves}:"
        )
    return ldef.unflatten(
        place(vleaves, lleaves, owned=True, name_of=lambda k: render_parts(vpaths[k]))
    )
