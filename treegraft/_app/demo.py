"""`treegraft demo`: a pretrained run, a new model, a checked graft, a verification.

Writes a small "pretrained" encoder/decoder run in Kauldron's layout (params,
collections and an Adam-like optimizer state, two steps) with plain orbax, then
grafts it into a model of another structure with `PartialKauldronLoader`, in
both of Kauldron's phases, and checks the result against the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from treegraft._app.display import Style
from treegraft._formats.kauldron.source import KauldronCheckpoint
from treegraft._loaders import PartialKauldronLoader
from treegraft._parse.paths import render_parts
from treegraft._plan import plan
from treegraft._tree.pytree import flatten_parts

__all__ = ["run_demo"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The shape of Kauldron's TrainState (a flax struct dataclass there)."""

    step: Any
    params: Any
    collections: Any
    opt_state: Any


class ScaleByAdamState(NamedTuple):
    """The fields of optax's Adam state, so the demo needs no optax."""

    count: Any
    mu: Any
    nu: Any


class EmptyState(NamedTuple):
    """Optax's empty state (saved by orbax as None)."""


def _layer(key: jax.Array, width: int) -> dict[str, Any]:
    k1, k2 = jax.random.split(key)
    return {
        "attn": {"qkv": {"kernel": jax.random.normal(k1, (width, 3 * width))}},
        "mlp": {
            "kernel": jax.random.normal(k2, (width, width)),
            "bias": jnp.zeros((width,)),
        },
    }


def _params(seed: int, enc_layers: int, dec_layers: int, width: int = 16) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(seed), enc_layers + dec_layers + 1)
    return {
        "embed": {"embedding": jax.random.normal(keys[-1], (32, width))},
        "encoder": {f"layers_{i}": _layer(keys[i], width) for i in range(enc_layers)},
        "decoder": {
            f"layers_{i}": _layer(keys[enc_layers + i], width) for i in range(dec_layers)
        },
    }


def _adam(params: Any) -> tuple[ScaleByAdamState, EmptyState]:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return (ScaleByAdamState(jnp.zeros((), jnp.int32), zeros, zeros), EmptyState())


def write_pretrained_run(workdir: str) -> None:
    """Writes two steps of a 'pretrained' run in Kauldron's checkpoint layout."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(step_prefix="ckpt"),
    )
    try:
        for step in (1000, 2000):
            params = _params(seed=step, enc_layers=2, dec_layers=2)
            mu = jax.tree_util.tree_map(lambda x, s=step: jnp.full_like(x, s / 1e4), params)
            opt_state = (ScaleByAdamState(jnp.asarray(step, jnp.int32), mu, mu), EmptyState())
            state = TrainState(
                step=step,
                params=params,
                collections={"batch_stats": {"mean": jnp.full((16,), step / 1e3)}},
                opt_state=opt_state,
            )
            manager.save(
                step,
                args=ocp.args.Composite(
                    default=ocp.args.StandardSave(state),
                    timer=ocp.args.JsonSave({"elapsed_s": step / 10}),
                ),
            )
        manager.wait_until_finished()
    finally:
        manager.close()


def _saved_values(workdir: str, step: int) -> dict[tuple[Any, ...], np.ndarray]:
    # An independent read of everything, with orbax alone, for the verification.
    import orbax.checkpoint as ocp
    from etils import epath

    item = os.path.join(workdir, "checkpoints", f"ckpt_{step}", "default")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(epath.Path(item)).tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = handler.restore(
            epath.Path(item), args=ocp.args.PyTreeRestore(item=meta, restore_args=args)
        )
    finally:
        handler.close()
    paths, leaves, _ = flatten_parts(tree)
    return dict(zip(paths, leaves, strict=True))


def run_demo(workdir: str | None = None, *, print_fn: Callable[[str], None] = print,
             style: Style | None = None) -> int:
    """Runs the demo; returns 0 when every check passes, 1 otherwise.

    Args:
      workdir: where to write the pretrained run; a temporary folder (removed
        afterwards) when None.
      print_fn: where lines go.
      style: terminal styling.
    """
    style = style or Style(sys.stdout, plain=True)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="treegraft-demo-")
        workdir = tmp
    try:
        return _run(os.path.abspath(workdir), print_fn, style)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(workdir: str, out: Callable[[str], None], style: Style) -> int:
    out(style.bold("1. A pretrained run") + f" (2 encoder + 2 decoder layers) in {workdir}")
    write_pretrained_run(workdir)
    source = KauldronCheckpoint(workdir)
    out(f"   steps on disk: 1000, 2000; step=-1 takes the latest: {source.resolved_step}")

    out(style.bold("2. A new model") + ": 2 encoder layers, 3 decoder layers, a new head")
    params = _params(seed=0, enc_layers=2, dec_layers=3)
    params["head"] = {"kernel": jnp.zeros((16, 4))}
    state = TrainState(
        step=0,
        params=params,
        collections={"batch_stats": {"mean": jnp.zeros((16,))}},
        opt_state=None,
    )
    out("   mapping (new <- old):")
    for new, old in NEW_TO_OLD.items():
        out(f"     {new:26} <- {old}")

    first = {k: v for k, v in NEW_TO_OLD.items() if not k.startswith("opt_state")}
    out(style.bold("3. The plan") + " of the first phase (metadata only: no array read yet)")
    for line in str(plan(state, source, first)).splitlines():
        out("   " + line)

    with PartialKauldronLoader(workdir=workdir, new_to_old=NEW_TO_OLD) as loader:
        grafted = loader.transform(state)
        fresh = dataclasses.replace(grafted, opt_state=_adam(grafted.params))
        final = loader.transform_after_optimizer(fresh)

    out(style.bold("4. Verification") + " against an independent orbax read of the checkpoint")
    saved = _saved_values(workdir, source.resolved_step)
    n_grafted, n_kept, problems = _verify(fresh, final, saved)
    if problems:
        for p in problems:
            out("   " + style.bad("FAIL ") + p)
        return 1
    out(f"   {style.good('OK')}  {n_grafted} grafted leaves equal their checkpoint arrays "
        "(values and dtypes)")
    out(f"   {style.good('OK')}  {n_kept} other leaves are the very same objects as before "
        "(the head, the fresh optimizer moments, the step)")
    out(f"   {style.good('OK')}  the state's structure, shapes and dtypes are unchanged")
    return 0


# new <- old, as a Kauldron config would say it.
NEW_TO_OLD = {
    "params.embed": "params.embed",
    "params.encoder": "params.encoder",
    # Each new decoder layer starts from the pretrained encoder layer of the same index...
    "params.decoder.layers_*": "params.encoder.layers_*",
    # ...and layers_2, which has no twin, from the last one (the literal rule wins).
    "params.decoder.layers_2": "params.encoder.layers_1",
    "collections": "collections",
    "opt_state[0].mu.encoder": "opt_state[0].mu.encoder",
    "opt_state[0].nu.encoder": "opt_state[0].nu.encoder",
}


def _expected_source(parts: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # Spelled out by hand: resolving it with the plan machinery would prove nothing.
    text = render_parts(parts)
    if text.startswith("params.decoder.layers_2."):
        return ("params", "encoder", "layers_1", *parts[3:])
    if text.startswith("params.decoder.layers_"):
        return ("params", "encoder", *parts[2:])
    if text.startswith(("params.embed.", "params.encoder.", "collections.")):
        return parts
    if text.startswith(("opt_state[0].mu.encoder.", "opt_state[0].nu.encoder.")):
        return parts
    return None


def _verify(
    before: TrainState, final: TrainState, saved: dict[tuple[Any, ...], np.ndarray]
) -> tuple[int, int, list[str]]:
    problems = []
    structure = jax.tree_util.tree_structure
    if structure(final) != structure(before):  # type: ignore[operator]
        problems.append("the state's structure changed")
    old = dict(zip(*flatten_parts(before)[:2], strict=True))
    paths, leaves, _ = flatten_parts(final)
    n_grafted = n_kept = 0
    for parts, leaf in zip(paths, leaves, strict=True):
        name = render_parts(parts)
        if np.shape(leaf) != np.shape(old[parts]) or np.asarray(leaf).dtype != np.asarray(
            old[parts]
        ).dtype:
            problems.append(f"{name} changed shape or dtype")
        src = _expected_source(parts)
        if src is None:
            n_kept += 1
            if leaf is not old[parts]:
                problems.append(f"{name} should be untouched but was replaced")
        else:
            n_grafted += 1
            if not np.array_equal(np.asarray(leaf), saved[src]):
                problems.append(f"{name} differs from {render_parts(src)} in the checkpoint")
    return n_grafted, n_kept, problems
