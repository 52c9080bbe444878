"""The tree of a safetensors checkpoint: tensor names as paths of nested dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treegraft._errors import CheckpointError, PathSyntaxError
from treegraft._formats.safetensors.header import TensorInfo
from treegraft._parse.paths import Part, parse_path, render_parts

__all__ = ["MAX_DEPTH", "build_tree", "name_to_parts"]

# Most path parts a tensor name may have. jax and optree flatten a tree by
# recursion and fail (RecursionError, or a SystemError from jax) on a tree
# about 1000 levels deep, so one absurdly long name would make every tensor of
# the checkpoint unusable; real names have about 10 parts.
MAX_DEPTH = 100


def name_to_parts(name: str) -> tuple[Part, ...]:
    """A tensor name as path parts: treegraft's parser, else a split on dots.

    `model.layers.0.mlp.up_proj.weight` -> `('model', 'layers', 0, 'mlp',
    'up_proj', 'weight')`. A name the path grammar refuses (`a-b.c`) is split
    on dots, all-digit segments becoming ints.
    """
    try:
        parts = parse_path(name).parts
    except PathSyntaxError:
        parts = tuple(int(s) if s.isdigit() else s for s in name.split("."))
    return parts


def build_tree(
    infos: Sequence[TensorInfo], what: str
) -> tuple[dict[Any, Any], dict[tuple[Part, ...], TensorInfo], dict[tuple[Part, ...], TensorInfo]]:
    """The tensors as nested dicts of `TensorInfo` leaves, keyed by their names' path parts.

    Returns:
      The tree; each tensor by its path parts; and the tensors left out of the
      tree because their names have more than `MAX_DEPTH` parts, by their parts.

    Raises:
      CheckpointError: a name is empty, two names are the same path, or a
        name is both a tensor and a prefix of other tensors.
    """
    root: dict[Any, Any] = {}
    by_parts: dict[tuple[Part, ...], TensorInfo] = {}
    too_deep: dict[tuple[Part, ...], TensorInfo] = {}
    names: dict[tuple[Part, ...], str] = {}
    for info in infos:
        parts = name_to_parts(info.name)
        if not parts:
            raise CheckpointError(f"{what} has a tensor with an empty name")
        if len(parts) > MAX_DEPTH:
            # Left out, so that the other tensors stay usable; reading it by its
            # path says why it is not there.
            too_deep[parts] = info
            continue
        if parts in names:
            raise CheckpointError(
                f"{what}: tensors {names[parts]!r} and {info.name!r} are the same path "
                f"{render_parts(parts)!r}"
            )
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(
                    f"{what}: tensor {info.name!r} lies under tensor {child.name!r}; a name "
                    "cannot be both a tensor and a prefix of other tensors"
                )
            node = child
        if parts[-1] in node:
            other = next(n for p, n in names.items() if p[: len(parts)] == parts)
            raise CheckpointError(
                f"{what}: tensor {other!r} lies under tensor {info.name!r}; a name cannot be "
                "both a tensor and a prefix of other tensors"
            )
        node[parts[-1]] = info
        by_parts[parts] = info
        names[parts] = info.name
    if _unify_keys(root):
        by_parts = {}
        _leaf_parts(root, (), by_parts)
    return root, by_parts, too_deep


def _unify_keys(node: dict[Any, Any]) -> bool:
    """Makes int keys strings in dicts that mix them with names; True if any changed.

    jax cannot flatten a dict whose keys do not sort (`{0: ..., 'norm': ...}`);
    an int path part still finds the string key `'0'`, as for orbax.
    """
    changed = False
    if len({type(k) for k in node}) > 1:
        for k in [k for k in node if type(k) is not str]:
            node[str(k)] = node.pop(k)
        changed = True
    for child in node.values():
        if isinstance(child, dict):
            changed = _unify_keys(child) or changed
    return changed


def _leaf_parts(
    node: dict[Any, Any], prefix: tuple[Part, ...], out: dict[tuple[Part, ...], TensorInfo]
) -> None:
    for k, child in node.items():
        if isinstance(child, dict):
            _leaf_parts(child, (*prefix, k), out)
        else:
            out[(*prefix, k)] = child
