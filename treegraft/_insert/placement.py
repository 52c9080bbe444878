"""Placing host blocks on devices: the one way a sharded array is built from pieces.

Every reader (orbax, safetensors), every operation (`transform.build`) and
the multi-process path of `place` build a `jax.Array` from blocks put on
each device through `array_from_blocks` (or its two halves, `put_block`
and `assemble`), which guarantees that every shard owns its buffer
(docs/design.md section 12): jax's CPU client adopts an aligned host
array's memory as the device buffer, so one block put on the several
devices of a replicated axis would otherwise give them one shared buffer,
and donating one shard would free the others.

Also here: the sharding of a target that has none (`default_sharding`),
the buffer checks `place` relies on, and putting shardings made on an
`AbstractMesh` onto the mesh in context (`concrete_likes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from treegraft._errors import GraftError
from treegraft._parse.paths import render_parts

__all__ = [
    "Box",
    "aligned_empty",
    "copy_block",
    "default_sharding",
    "sharding_of",
    "box_of",
    "devices_by_box",
    "put_block",
    "assemble",
    "array_from_blocks",
    "own_buffers",
    "shares_buffers",
    "buffers",
    "copy_array",
    "concrete_likes",
]

Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


_ALIGN = 64  # what XLA's CPU client needs to adopt a host buffer without copying


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on a 64-byte boundary.

    A block read into it is put on a CPU device without a copy: jax's CPU
    client adopts aligned host memory as the device buffer (`put_block`).
    """
    dtype = np.dtype(dtype)
    nbytes = int(math.prod(shape)) * dtype.itemsize
    raw = np.empty(max(nbytes, 1) + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def default_sharding() -> jax.sharding.Sharding:
    """Where a device target without a sharding goes: this process's first device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def sharding_of(like: Any) -> jax.sharding.Sharding:
    """A device target's sharding, or `default_sharding()` when it has none."""
    return like.sharding or default_sharding()


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """A device's index (slices, maybe open-ended, maybe fewer than axes) as a Box."""
    out = []
    for k, dim in enumerate(shape):
        s = index[k] if k < len(index) else slice(None)
        start, stop, _ = s.indices(dim)
        out.append((start, max(start, stop)))
    return tuple(out)


def devices_by_box(sharding: Any, shape: tuple[int, ...]) -> dict[Box, list[Any]]:
    """{box: devices} of sharding's addressable devices, replicas grouped, in device order."""
    return _group(sharding.addressable_devices_indices_map(shape), shape)


def _group(indices: Mapping[Any, Any], shape: tuple[int, ...]) -> dict[Box, list[Any]]:
    out: dict[Box, list[Any]] = {}
    for device, index in indices.items():
        out.setdefault(box_of(tuple(index or ()), shape), []).append(device)
    return out


def put_block(block: Any, devices: Sequence[Any], *, adopt: bool = True) -> list[jax.Array]:
    """Puts one block on each of devices, each device in a buffer of its own.

    The block must be the caller's own (a fresh read, or a copy): the first
    device may keep its memory as its buffer (jax's CPU client adopts an
    aligned numpy array); every other device gets a copy made here, never
    the same host memory (docs/design.md section 12).

    Args:
      block: a numpy array or a jax.Array.
      devices: where it goes, in order.
      adopt: let jax reuse the block's memory for the first device
        (`may_alias=None`); False puts with `may_alias=False`, which jax's
        CPU client does not always honour: a block that is a view into a
        larger array is copied here either way.

    The caller allows the transfers (`jax.transfer_guard("allow")`, as
    `array_from_blocks` does): they are the ones graft was asked for.
    """
    may_alias = None if adopt else False
    out = []
    for k, device in enumerate(devices):
        # jax's CPU client adopts an aligned C-ordered block even with
        # may_alias=False: a view into a larger array is copied first, or the
        # shard would keep the whole array alive.
        piece = block if k == 0 and _adoptable(block) else copy_block(block)
        out.append(jax.device_put(piece, device, may_alias=may_alias))
    return out


def _adoptable(block: Any) -> bool:
    """Whether a device adopting block's memory would keep no more than block alive.

    A view into a larger array (a box cut from a whole leaf read for a
    reshape) is copied instead: adopted, it would keep the whole array
    alive for as long as the shard lives.
    """
    if not isinstance(block, np.ndarray):
        return True
    root = block
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root.nbytes <= block.nbytes + _ALIGN


def copy_block(block: Any) -> Any:
    """A copy of a block in memory of its own (a jax.Array stays on its device)."""
    if isinstance(block, jax.Array):
        return jax.numpy.array(block, copy=True)
    block = np.asarray(block)
    if not block.flags.c_contiguous:
        # jax copies a strided array into a buffer of its own (it cannot adopt
        # one), faster than numpy would: one copy, not two.
        return block
    copy = aligned_empty(block.shape, block.dtype)  # aligned: the device adopts it as is
    copy[...] = block
    return copy


def assemble(
    shape: tuple[int, ...], sharding: Any, buffers_by_device: Mapping[Any, jax.Array]
) -> jax.Array:
    """The jax.Array of shape in sharding whose shard on each device is its buffer."""
    devices = sharding.addressable_devices_indices_map(shape)
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [buffers_by_device[d] for d in devices]
    )


def array_from_blocks(
    shape: tuple[int, ...],
    sharding: Any,
    block_of: Callable[[Box], Any],
    *,
    adopt: bool = True,
) -> jax.Array:
    """A jax.Array of shape in sharding built from blocks, every shard in a buffer of its own.

    `block_of(box)` is called once per distinct box this process's devices
    hold, in device order, and must return a block the caller owns (numpy
    or jax.Array of the box's shape). A block held by several devices (a
    replicated axis) is copied for each after the first, and so is a block
    object returned for two boxes. One box's block is put before the next
    is asked for, so host memory holds one block at a time, not the array.
    `jax.make_array_from_callback` is not used: it may hand a replicated
    sharding one host block for every device.

    Args:
      adopt: see `put_block`.
    """
    # The device map once: jax computes it anew on every call.
    indices = sharding.addressable_devices_indices_map(shape)
    out: dict[Any, jax.Array] = {}
    used: set[int] = set()
    # The transfers graft was asked for, allowed whatever guard the caller set
    # (docs/design.md section 12): once here, not per block (5 us each).
    with jax.transfer_guard("allow"):
        for box, devices in _group(indices, shape).items():
            block = block_of(box)
            if id(block) in used:
                block = copy_block(block)
            used.add(id(block))
            for device, got in zip(devices, put_block(block, devices, adopt=adopt), strict=True):
                out[device] = got
            del block
    return jax.make_array_from_single_device_arrays(shape, sharding, [out[d] for d in indices])


def own_buffers(value: Any) -> Any:
    """value, with copies where several of its shards have one buffer (docs/design.md section 12).

    For arrays made elsewhere (orbax restores a replicated array into one host
    buffer shared by every device on CPU): a shared shard is copied through
    the host for every device after the first.
    """
    if not isinstance(value, jax.Array) or len(value.addressable_shards) < 2:
        return value
    shards = value.addressable_shards
    try:
        pointers = [s.data.unsafe_buffer_pointer() for s in shards]
    except Exception:  # noqa: BLE001 (a backend without pointers: nothing to check)
        return value
    if len(set(pointers)) == len(pointers):
        return value
    seen: set[int] = set()
    out = {}
    with jax.transfer_guard("allow"):
        for shard, pointer in zip(shards, pointers, strict=True):
            data = shard.data
            if pointer in seen:
                data = jax.device_put(np.array(data), shard.device)
            seen.add(pointer)
            out[shard.device] = data
        return assemble(value.shape, value.sharding, out)


def shares_buffers(x: jax.Array) -> bool:
    """Whether two addressable shards of x have the same device buffer."""
    # Not addressable_data(i): on a fully replicated array it is always shard 0.
    pointers = []
    for shard in x.addressable_shards:
        try:
            pointers.append(shard.data.unsafe_buffer_pointer())
        except Exception:  # noqa: BLE001 (a backend without pointers: nothing to compare)
            return False
    return len(set(pointers)) < len(pointers)


def copy_array(x: jax.Array) -> jax.Array:
    """A copy of x with the same sharding in new device buffers (no host round trip)."""
    with jax.transfer_guard("allow"):
        y = jax.device_put(x, x.sharding, may_alias=False)
        if buffers(y) & buffers(x):
            y = jax.jit(lambda a: a.copy(), out_shardings=x.sharding)(x)
    return y


def buffers(x: jax.Array) -> set[int]:
    """The device buffer addresses of an array's addressable shards."""
    out = set()
    for shard in x.addressable_shards:
        try:
            out.add(shard.data.unsafe_buffer_pointer())
        except Exception:  # noqa: BLE001 (a backend without pointers: nothing to compare)
            pass
    return out


def concrete_likes(
    targets: Sequence[int], leaves: Sequence[Any], paths: Sequence[tuple[Any, ...]]
) -> dict[int, Any]:
    """Each target leaf (by index into leaves), its sharding on a concrete mesh.

    `jax.eval_shape` (and `nnx.eval_shape`) under `jax.set_mesh(mesh)` gives
    shardings on an `AbstractMesh`, which names axes but no devices: they are
    put on the mesh in context when it has the same axes.

    Raises:
      GraftError: no mesh in context fits, naming the leaves (by paths).
    """
    out: dict[int, Any] = {}
    unplaced = []
    for target in targets:
        like = leaves[target]
        sharding = getattr(like, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
            sharding.mesh, jax.sharding.AbstractMesh
        ):
            mesh = jax.sharding.get_mesh()
            if getattr(mesh, "empty", True) or mesh.abstract_mesh != sharding.mesh:
                unplaced.append(target)
                out[target] = like
                continue
            like = jax.ShapeDtypeStruct(
                like.shape,
                like.dtype,
                sharding=jax.sharding.NamedSharding(mesh, sharding.spec),
                weak_type=getattr(like, "weak_type", False),
            )
        out[target] = like
    if unplaced:
        names = ", ".join(repr(render_parts(paths[i])) for i in unplaced[:5])
        mesh = leaves[unplaced[0]].sharding.mesh
        raise GraftError(
            f"{len(unplaced)} target leaves are sharded on an AbstractMesh ({mesh}), which has "
            f"no devices to put them on: {names}{', ...' if len(unplaced) > 5 else ''}; graft "
            "under `with jax.set_mesh(mesh):` with the mesh they were made for, or give them "
            "concrete shardings (jax.sharding.NamedSharding(mesh, x.sharding.spec))"
        )
    return out
