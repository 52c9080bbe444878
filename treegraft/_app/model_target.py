"""`plan --target module:function`: the state of a model defined in code.

The function takes no arguments and returns the new model's state, best
abstract (`jax.eval_shape(init)`, or `nnx.eval_shape(...)` with its
shardings), so that a mapping is planned with no checkpoint of the new model
and no memory for its arrays. An `nnx.Module` it returns stands for its
`nnx.state`. The module is imported as `python -m` would: from the current
folder first, then `sys.path`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from treegraft._errors import KEY_CUTOFF, GraftError, suggest

__all__ = ["ModelTargetError", "is_model_target", "load_model_target"]

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")


class ModelTargetError(GraftError):
    """`--target module:function` names no importable function, or calling it failed."""


def is_model_target(text: str) -> bool:
    """Whether `--target` text is `module:function` rather than a checkpoint.

    An existing file or folder of that name is a checkpoint; a URL
    (`gs://...`) never matches.
    """
    return _SPEC.fullmatch(text) is not None and not os.path.exists(text)


def load_model_target(spec: str) -> Any:
    """The state that the function named by `module:function` returns.

    Raises:
      ModelTargetError: the module cannot be imported, has no such function,
        the function fails, or returns None.
    """
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ModelTargetError(
            f"--target {spec!r}: not module:function (e.g. mymodel:abstract_state)"
        )
    module_name, attr = match.groups()
    module = _import(spec, module_name)
    function: Any = module
    for n, part in enumerate(attr.split(".")):
        if not hasattr(function, part):
            owner = ".".join([module_name, *attr.split(".")[:n]])
            names = [x for x in dir(function) if not x.startswith("_")]
            raise ModelTargetError(
                f"--target {spec!r}: {owner} has no {part!r}"
                + suggest(part, names, cutoff=KEY_CUTOFF)
            )
        function = getattr(function, part)
    if not callable(function):
        raise ModelTargetError(
            f"--target {spec!r}: {attr} is a {type(function).__name__}, not a function; "
            f"name a function that takes no arguments and returns the state"
        )
    state = _call(spec, function)
    if state is None:
        raise ModelTargetError(
            f"--target {spec!r}: {attr}() returned None; it must return the state "
            f"(e.g. jax.eval_shape(init, ...) or nnx.eval_shape(lambda: Model(...)))"
        )
    return _state_of(state)


def _import(spec: str, module_name: str) -> Any:
    """The module, imported with the current folder first on the path, as `python -m` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name) and (
            module_name == e.name or module_name.startswith(e.name + ".")
        ):
            raise ModelTargetError(
                f"--target {spec!r}: no module named {e.name!r} in the current folder "
                f"({cwd}) or on sys.path; run treegraft from the folder that holds it, "
                f"or add its folder to PYTHONPATH"
            ) from None
        raise _failed(spec, f"importing {module_name}", e) from None
    except BaseException as e:  # the user's code: reported in one line, not a traceback
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _failed(spec, f"importing {module_name}", e) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _call(spec: str, function: Any) -> Any:
    try:
        return function()
    except BaseException as e:  # the user's code: reported in one line, not a traceback
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _failed(spec, f"calling {spec.partition(':')[2]}()", e) from None


def _failed(spec: str, what: str, error: BaseException) -> ModelTargetError:
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return ModelTargetError(f"--target {spec!r}: {what} raised {reason}")


def _state_of(value: Any) -> Any:
    """An `nnx.Module`'s state; any other tree as it is."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(value, nnx.Module):
        return nnx.state(value)
    return value
