"""Flax NNX adapter: an NNX `Variable`'s value sits at the Variable's own path.

How NNX flattens in jax (flax 0.12.8, jax 0.10.2):

* `nnx.State` is a registered pytree node (a `MutableMapping`). One level down
  its children are keyed `DictKey(name)`; nested states flatten as plain dicts
  (the treedef is `CustomNode(State[keys], [{...}])`), and `nnx.List` or list
  attributes give int keys (`DictKey(0)`).
* `nnx.Variable` (`Param`, `BatchStat`, `RngKey`, `RngCount`, optax's
  `OptState`/`OptVariable` in `nnx.Optimizer`, ...) is a pytree node with one
  child, its raw value, under `GetAttrKey('value')`; the variable's metadata
  (sharding annotations, `eager_sharding`, `hijax`, `ref`) is the node's aux
  data, so it survives a flatten/unflatten.
* So a jax key path of a parameter is
  `(DictKey('encoder'), DictKey('linear'), DictKey('kernel'), GetAttrKey('value'))`
  and its leaf is the raw `jax.Array` (a typed `PRNGKeyArray` for an `RngKey`,
  a `jax.ShapeDtypeStruct` under `nnx.eval_shape`). `nnx.to_pure_dict(state)`
  gives plain dicts whose path is the same without the final `value`; orbax
  saves an `nnx.State` as nested dicts with a last `'value'` key (orbax
  records no key types: `GetAttrKey` and `DictKey` both become dict keys).

treegraft drops that `value` key: a Variable is a transparent node whose value
takes the Variable's own path (`encoder.linear.kernel`). An `nnx.State` and its
pure dict then flatten to the same paths, and grafting between them needs no
conversion. The leaves and the treedef are jax's own, so a grafted
`nnx.State` comes back as an `nnx.State` of the same Variable types and
metadata, which `nnx.merge` accepts.

flax is never imported here: a type is an NNX Variable only if `flax.nnx` is
already in `sys.modules` (a Variable cannot exist otherwise).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from jax import tree_util

from treegraft._errors import GraftError

__all__ = ["is_variable_type", "value_of", "drop_value_keys"]

_VALUE_KEY = tree_util.GetAttrKey("value")


def _variable_bases() -> tuple[type, ...]:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return ()
    # `VariableState` was the leaf type of `nnx.State` before flax 0.11; since,
    # it is a deprecated alias of `Variable` that warns on attribute access, so
    # the module's dict is read directly.
    names = vars(nnx)
    bases = (names.get("Variable"), names.get("VariableState"))
    return tuple(b for b in bases if isinstance(b, type))


def is_variable_type(t: type) -> bool:
    """Whether t is a flax NNX Variable type, without importing flax."""
    bases = _variable_bases()
    return bool(bases) and issubclass(t, bases)


def value_of(variable: Any) -> Any:
    """The one child jax flattens a Variable to: its raw value."""
    get = getattr(variable, "get_raw_value", None)  # flax >= 0.11: what jax flattens to
    if get is not None:
        return get()
    kids, _ = tree_util.tree_flatten(variable, is_leaf=lambda x: x is not variable)
    if len(kids) != 1:  # not a layout this adapter knows: should not happen
        raise GraftError(
            f"a flax NNX {type(variable).__name__} flattened to {len(kids)} children, "
            "expected one (its value): this flax version is not supported"
        )
    return kids[0]


def drop_value_keys(
    tree: Any, keyed: list[tuple[Any, Any]], is_leaf: Callable[[Any], bool] | None
) -> list[tuple[Any, Any]]:
    """jax's `(keypath, leaf)` list with each Variable's `value` key removed.

    For the slow path of a flatten (jax's own key paths): a `GetAttrKey('value')`
    may come from a Variable or from any dataclass with a `value` field, so the
    Variables' positions are found by a second flatten that stops at them. The
    two flattens are paired by key path, not by position: a custom node may
    give its children in another order on each call (docs/design.md section
    4). A tree with no `value` key at all is returned as is.

    Args:
      tree: the tree `keyed` was flattened from.
      keyed: `tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]`.
      is_leaf: as passed to that flatten.

    Returns:
      A list of the same length and leaves, in the same order.
    """
    if not any(_VALUE_KEY in keypath for keypath, _ in keyed):
        return keyed
    bases = _variable_bases()
    if not bases:
        return keyed

    def stop(x: Any) -> bool:
        return isinstance(x, bases) or (is_leaf is not None and is_leaf(x))

    # jax's key path of each leaf -> the same path without the Variables' `value` keys.
    short_of: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    count = 0

    def walk(full: tuple[Any, ...], short: tuple[Any, ...], node: Any) -> None:
        nonlocal count
        for keypath, x in tree_util.tree_flatten_with_path(node, is_leaf=stop)[0]:
            kp = tuple(keypath)
            if isinstance(x, bases) and not (is_leaf is not None and is_leaf(x)):
                walk(full + kp + (_VALUE_KEY,), short + kp, value_of(x))
            else:
                short_of[full + kp] = short + kp
                count += 1

    try:
        walk((), (), tree)
        shortened = [(short_of.get(tuple(keypath)), leaf) for keypath, leaf in keyed]
    except TypeError:  # an unhashable key: cannot pair by key, keep jax's paths
        return keyed
    if count != len(short_of) or any(short is None for short, _ in shortened):
        return keyed  # two leaves under one key path, or one unknown: keep jax's paths
    # The leaves stay jax's own objects, in jax's order.
    return shortened
