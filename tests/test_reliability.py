"""The bad-input catalogue: every way a user can get a graft wrong, and what they see.

One table, `CATALOGUE`: each case is an input (a path, a mapping, a state or a
checkpoint that is wrong in one way), the call a user would make with it
(`tg.graft` from memory or from a checkpoint, or `tg.PartialKauldronLoader`),
the error type it must raise, and a fragment of the message the user acts on.
For every case, `test_bad_input` also proves that failing is safe:

* the caller's state and in-memory source are unchanged: same structure, the
  very same leaf objects, the same values;
* the checkpoint directories are byte-identical afterwards, with no new file or
  folder (the shared run and the case's own temporary directory are compared
  entry by entry: size, sha256 and mtime of every file and folder);
* the message is about the problem, not a dump: no array values in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import trees
from kauldron_run import (
    TrainState,
    add_half_written_step,
    add_uncommitted_step,
    data_files,
    init_params,
    snapshot,
    train_state,
    write_run,
)
from test_races import orbax_leftovers

import treegraft as tg

ADAM = optax.adam(1e-3)
SHAPES = {
    "encoder": {"dense": {"kernel": (8, 16), "bias": (16,)}},
    "decoder": {"layers_0": {"kernel": (16, 8)}, "layers_1": {"kernel": (16, 8)}},
}
EMBED = (512, 1024)  # 2 MiB of random float32: stored in an OCDBT data file, not inline


def saved_state(step: int) -> TrainState:
    """The state the source run saved at step (a TrainState, as Kauldron's)."""
    params = init_params(SHAPES, seed=step)
    rng = np.random.default_rng(step)
    params["embed"] = jnp.asarray(rng.standard_normal(EMBED, dtype=np.float32))
    return train_state(
        params, step=step, collections={"batch_stats": {"mean": jnp.zeros(16)}}, opt=ADAM
    )


def fresh_state() -> TrainState:
    """The new model's state as a trainer hands it to `transform`: opt_state None."""
    params = jax.tree.map(jnp.zeros_like, saved_state(0).params)
    return TrainState(
        step=jnp.asarray(0),
        params=params,
        collections={"batch_stats": {"mean": jnp.ones(16)}},
        opt_state=None,
    )


def memory_source() -> dict[str, Any]:
    """The source run's step 3 as an in-memory pytree (a plain dict)."""
    s = saved_state(3)
    return {"step": s.step, "params": s.params, "collections": s.collections}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A Kauldron run with steps 1 and 3, written once; cases copy it to change it."""
    root = tmp_path_factory.mktemp("catalogue")
    write_run(root / "run", {1: saved_state(1), 3: saved_state(3)})
    return str(root / "run")


# ----------------------------------------------------------------------------
# Building blocks of the table.
# ----------------------------------------------------------------------------

Call = Callable[[Any, Any, str], Any]  # (state, in-memory source, workdir) -> result
Prepare = Callable[[str, str], str]  # (shared run, case's tmp dir) -> workdir to use


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
      id: the test id.
      call: what the user runs, with the state, the memory source and a workdir.
      error: the exception type expected (a `tg.GraftError` subclass).
      match: a regex the message must contain (`re.search`).
      also: further types the error must be (`KeyError`, `FileNotFoundError`).
      state: builds the caller's state (default: `fresh_state`).
      workdir: prepares the workdir (default: the shared run, untouched).
      fails_reading: the error comes from orbax reading array data: orbax then
        leaves reads in flight (see `test_races.orbax_leftovers`), to wait for.
      source: builds the in-memory source (default: `memory_source`).
    """

    id: str
    call: Call
    error: type[Exception]
    match: str
    also: tuple[type, ...] = ()
    state: Callable[[], Any] = fresh_state
    workdir: Prepare | None = None
    fails_reading: bool = False
    source: Callable[[], Any] = memory_source


def memory(mapping: Any, **opts: Any) -> Call:
    """`tg.graft(state, <pytree>, mapping)`."""
    return lambda state, source, workdir: tg.graft(state, source, mapping, **opts)


def checkpoint(mapping: Any, **opts: Any) -> Call:
    """`tg.graft(state, tg.KauldronCheckpoint(workdir), mapping)`."""
    return lambda state, source, workdir: tg.graft(
        state, tg.KauldronCheckpoint(workdir), mapping, **opts
    )


def orbax(mapping: Any, item: Callable[[str], str]) -> Call:
    """`tg.graft(state, tg.OrbaxCheckpoint(<a directory>), mapping)`."""
    return lambda state, source, workdir: tg.graft(
        state, tg.OrbaxCheckpoint(item(workdir)), mapping
    )


_DEFAULT = object()


def loader(mapping: Any = _DEFAULT, *, phase: str = "transform", **fields: Any) -> Call:
    """`tg.PartialKauldronLoader(workdir=..., new_to_old=mapping, ...).<phase>(state)`."""

    def call(state: Any, source: Any, workdir: str) -> Any:
        kwargs = dict(fields)
        if mapping is not _DEFAULT:
            kwargs["new_to_old"] = mapping
        workdir = kwargs.pop("workdir_", workdir)  # a workdir that is not a path at all
        with tg.PartialKauldronLoader(workdir=workdir, **kwargs) as ldr:
            return getattr(ldr, phase)(state)

    return call


def replaced(path: str, value: Any, base: Callable[[], Any] = fresh_state) -> Callable[[], Any]:
    """A state factory: base() with the subtree at path replaced by value."""

    def make() -> Any:
        state = base()
        target = tg.parse_path(path)
        top, *rest = target.parts
        if isinstance(state, TrainState):
            sub = getattr(state, top)
            return state.replace(**{top: _set(sub, rest, value)})
        return _set(state, [top, *rest], value)

    return make


def _set(tree: Any, parts: list[Any], value: Any) -> Any:
    if not parts:
        return value
    head, *rest = parts
    out = dict(tree)
    out[head] = _set(tree[head], rest, value)
    return out


# -- workdirs ---------------------------------------------------------------------


def copy_run(change: Callable[[str], None] | None = None) -> Prepare:
    """A workdir: a copy of the shared run, then changed."""

    def prepare(run: str, tmp: str) -> str:
        workdir = os.path.join(tmp, "wd")
        shutil.copytree(run, workdir)
        if change is not None:
            change(workdir)
        return workdir

    return prepare


def fresh_dir(build: Callable[[str], None] | None) -> Prepare:
    """A workdir built from scratch (None: a path that does not exist)."""

    def prepare(run: str, tmp: str) -> str:
        workdir = os.path.join(tmp, "wd")
        if build is not None:
            build(workdir)
        return workdir

    return prepare


def _item(workdir: str, step: int = 3) -> str:
    return os.path.join(workdir, "checkpoints", f"ckpt_{step}", "default")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def metadata_text(text: str) -> Callable[[str], None]:
    return lambda wd: _write(os.path.join(_item(wd), "_METADATA"), text)


def _big_data_file(workdir: str) -> str:
    files = data_files(_item(workdir))
    big = max(files, key=os.path.getsize)
    assert os.path.getsize(big) > 1 << 20, "the embedding must live in a data file"
    return big


def truncate_data(wd: str) -> None:
    big = _big_data_file(wd)
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)


def delete_data(wd: str) -> None:
    os.remove(_big_data_file(wd))


def garble_data(wd: str) -> None:
    _write(_big_data_file(wd), "garbage")


def _only_half_written(run: str, tmp: str) -> str:
    workdir = os.path.join(tmp, "wd")
    shutil.copytree(run, workdir)
    add_half_written_step(workdir, 5, like_step=3)
    add_half_written_step(workdir, 6, like_step=1)
    for step in (1, 3):
        shutil.rmtree(os.path.join(workdir, "checkpoints", f"ckpt_{step}"))
    return workdir


def _only_uncommitted(run: str, tmp: str) -> str:
    workdir = os.path.join(tmp, "wd")
    shutil.copytree(run, workdir)
    add_uncommitted_step(workdir, 7, like_step=3)
    for step in (1, 3):
        shutil.rmtree(os.path.join(workdir, "checkpoints", f"ckpt_{step}"))
    return workdir


def _with_half_written(change_step: int) -> Prepare:
    def prepare(run: str, tmp: str) -> str:
        workdir = os.path.join(tmp, "wd")
        shutil.copytree(run, workdir)
        add_half_written_step(workdir, change_step, like_step=3)
        return workdir

    return prepare


def _junk_default(wd: str) -> None:
    item = _item(wd)
    shutil.rmtree(item)
    os.makedirs(os.path.join(item, "sub"))
    _write(os.path.join(item, "notes.txt"), "not a checkpoint")


def _no_default(wd: str) -> None:
    shutil.rmtree(_item(wd))


def _not_a_checkpoint(wd: str) -> None:
    os.makedirs(os.path.join(wd, "logs"))
    _write(os.path.join(wd, "README"), "a folder, not a checkpoint")


# -- round 3 (issue #21): values, hangs and raw errors ------------------------------

_F32 = np.zeros(3, np.float32)


def _safetensors(header: bytes) -> Callable[[str], None]:
    """A workdir holding m.safetensors with this JSON header and 4 data bytes."""

    def build(workdir: str) -> None:
        import struct

        os.makedirs(workdir)
        with open(os.path.join(workdir, "m.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + bytes(4))

    return build


def safetensors(mapping: Any) -> Call:
    """`tg.graft(state, tg.SafetensorsCheckpoint(<workdir>/m.safetensors), mapping)`."""
    return lambda state, source, workdir: tg.graft(
        state, tg.SafetensorsCheckpoint(os.path.join(workdir, "m.safetensors")), mapping
    )


def convert(mapping: Any, dest: str, *, from_run: bool = False, **opts: Any) -> Call:
    """`tg.convert(<pytree or the run's checkpoint>, <workdir>/dest, mapping)`."""

    def call(state: Any, source: Any, workdir: str) -> Any:
        src = tg.KauldronCheckpoint(workdir) if from_run else source
        target = dest.replace("{item}", _item(workdir)) if "{item}" in dest else (
            os.path.join(workdir, dest))
        return tg.convert(src, target, mapping, **opts)

    return call


def _folder_with_a_file(workdir: str) -> None:
    os.makedirs(os.path.join(workdir, "out"))
    _write(os.path.join(workdir, "out", "notes.txt"), "kept")


def _nested(depth: int) -> Any:
    """An operation nested depth deep, built from the class (the public functions stop at 100)."""
    from treegraft._parse.ops import Transpose

    value: Any = "w"
    for _ in range(depth):
        value = Transpose(value, (0,))
    return value


# ----------------------------------------------------------------------------
# The catalogue.
# ----------------------------------------------------------------------------

P = {"params": "params"}

CATALOGUE: list[Case] = [
    # -- path syntax: the column and a caret, whatever the entry point --------------
    Case("path-double-dot", loader({"params..encoder": "params.encoder"}),
         tg.PathSyntaxError,
         r"invalid path 'params\.\.encoder': empty name \(two dots in a row, or a leading dot\) "
         r"at column 8\n  params\.\.encoder\n {9}\^"),
    Case("path-trailing-dot", memory({"params.": "params"}), tg.MappingError,
         r"entry 'params\.': invalid path 'params\.': expected a name after '\.' at column 8"),
    Case("path-leading-dot", checkpoint({".params": "params"}), tg.MappingError,
         r"invalid path '\.params': empty name \(two dots in a row, or a leading dot\) "
         r"at column 1"),
    Case("path-dash", memory({"params": "params.en-coder"}), tg.MappingError,
         r"invalid path 'params\.en-coder': unexpected '-', expected '\.' or '\[' at column 10"),
    Case("path-blank", loader({"params.layers 0": "params"}), tg.PathSyntaxError,
         r"invalid path 'params\.layers 0': unexpected blank, expected '\.' or '\[' "
         r"at column 14"),
    Case("path-bare-word-in-brackets", memory({"params[encoder]": "params.encoder"}),
         tg.MappingError,
         r"bare name 'encoder' in brackets; quote it: \['encoder'\] at column 8"),
    Case("path-unclosed-bracket", checkpoint({"params.decoder[0": "params"}), tg.MappingError,
         r"invalid path 'params\.decoder\[0': unclosed '\[' at column 15"),
    Case("path-unclosed-quote", memory({"params['encoder": "params.encoder"}),
         tg.MappingError, r"invalid path \"params\['encoder\": unclosed quote at column 8"),
    Case("path-float-then-dot-in-brackets", memory({"a[1.5.2]": "params"}), tg.MappingError,
         r"invalid path 'a\[1\.5\.2\]': unexpected '\.', expected '\]' at column 6"),
    Case("path-every-bad-entry-listed", memory({"a..b": "params", "ok": "x-y"}),
         tg.MappingError,
         r"invalid mapping \(2 problems\):\n  entry 'a\.\.b': .*\n(.*\n)*  entry 'ok': "
         r"invalid path 'x-y'"),
    Case("pattern-syntax-in-ignore", memory(P, ignore_model_keys=["**.ke rnel"]),
         tg.MappingError,
         r"invalid ignore_model_keys \(1 problem\):\n  invalid path '\*\*\.ke rnel'"),
    Case("pattern-triple-star", memory({"params.***": "params.***"}), tg.MappingError,
         r"invalid path 'params\.\*\*\*': '\*\*' must be a whole segment at column 8"),
    # -- the mapping itself ----------------------------------------------------------
    Case("mapping-is-a-list", memory([("params", "params")]), tg.MappingError,
         r"the mapping must be a dict \{new_path: old_path\}, got list"),
    Case("mapping-is-a-string", memory("params"), tg.MappingError,
         r"the mapping must be a dict \{new_path: old_path\}, got str: did you mean \{x: x\}\?"),
    Case("new-to-old-is-a-list", loader([("params", "params")]), tg.MappingError,
         r"new_to_old must be a mapping \{new_path: old_path\}, got list"),
    Case("mapping-int-key", memory({0: "params"}), tg.MappingError,
         r"entry 0 \(key 0\): the key is an int, not a path string"),
    Case("mapping-int-value", checkpoint({"params.encoder": 3}), tg.MappingError,
         r"entry 'params\.encoder': the value 3 is an int; a value is a path string, None "
         r"\(keep the target's value\) or an operation"),
    Case("mapping-empty", memory({}), tg.MappingError,
         r"the mapping is empty: nothing would be grafted"),
    Case("new-to-old-empty", loader({}), tg.MappingError,
         r"new_to_old is empty: nothing would be loaded"),
    Case("ignore-keys-not-a-sequence", loader(P, ignore_model_keys=3), tg.MappingError,
         r"ignore_model_keys must be a sequence of path patterns, got int"),
    Case("ignore-keys-not-strings", memory(P, ignore_restored_keys=["params.embed", 3]),
         tg.MappingError,
         r"invalid ignore_restored_keys \(1 problem\):\n  3 is an int, not a pattern string"),
    Case("rule-new-side-matches-nothing", checkpoint({"params.encodr": "params.encoder"}),
         tg.PathNotFoundError,
         r"rules that match nothing: 1\n  rule 'params\.encodr' <- 'params\.encoder': path "
         r"'params\.encodr' not found in the state: 'params' has no key 'encodr' "
         r"\(did you mean 'encoder'", also=(KeyError,)),
    Case("rule-old-side-matches-nothing", loader({"params.encoder": "params.encodr"}),
         tg.PathNotFoundError,
         r"'params\.encoder' has no source: path 'params\.encodr' not found in the checkpoint "
         r".*ckpt_3: 'params' has no key 'encodr' \(did you mean 'encoder'",
         also=(KeyError,)),
    Case("rule-pattern-matches-nothing",
         memory({"params.decoder.block_*": "params.encoder.block_*"}), tg.PathNotFoundError,
         r"rule 'params\.decoder\.block_\*' <- 'params\.encoder\.block_\*': "
         r"'params\.decoder\.block_\*' matches nothing in the state"),
    Case("ignore-model-keys-matches-nothing",
         memory({"params.encoder": "params.encoder"}, ignore_model_keys=["**.kernal"]),
         tg.PathNotFoundError,
         r"ignore patterns that match nothing: 1\n  ignore_model_keys pattern '\*\*\.kernal' "
         r"matches no key of the state, relative to a rule's prefix \('params\.encoder'\) or "
         r"from the root \(did you mean 'dense\.kernel'\?\)"),
    Case("ignore-restored-keys-matches-nothing",
         loader(P, ignore_restored_keys=["params.embedd"]), tg.PathNotFoundError,
         r"ignore_restored_keys pattern 'params\.embedd' matches no key of the checkpoint "
         r".*ckpt_3, .* \(did you mean 'params\.embed'"),
    Case("rules-tied-on-a-leaf",
         checkpoint({"params.decoder.*": "params.decoder.*",
                     "params.decoder.layers_*": "params.decoder.layers_*"}),
         tg.MappingError,
         r"rules tied on the same leaf \(make one more specific\): 1\n  "
         r"'params\.decoder\.\*' <- 'params\.decoder\.\*' and 'params\.decoder\.layers_\*' <- "
         r"'params\.decoder\.layers_\*' both cover 'params\.decoder\.layers_0\.kernel'"),
    Case("wildcards-star-vs-none", loader({"params.decoder.layers_*": "params.encoder"}),
         tg.MappingError,
         r"the wildcards of 'params\.decoder\.layers_\*' \(\*\) and 'params\.encoder' \(none\) "
         r"do not correspond"),
    Case("wildcards-star-vs-double-star", memory({"params.*": "params.**"}), tg.MappingError,
         r"the wildcards of 'params\.\*' \(\*\) and 'params\.\*\*' \(\*\*\) do not correspond"),
    Case("new-leaf-old-subtree",
         checkpoint({"params.decoder.layers_0.kernel": "params.encoder.dense"}),
         tg.MismatchError,
         r"'params\.decoder\.layers_0\.kernel' is a leaf in the state \(float32\[16, 8\]\) but "
         r"'params\.encoder\.dense' is a subtree in the source \(2 leaves\)"),
    Case("new-subtree-old-leaf",
         memory({"params.encoder.dense": "params.encoder.dense.kernel"}), tg.MismatchError,
         r"'params\.encoder\.dense' is a subtree in the state but "
         r"'params\.encoder\.dense\.kernel' is a leaf in the source \(float32\[8, 16\]\)"),
    # -- values --------------------------------------------------------------------------
    Case("shape-mismatch", loader(P),
         tg.MismatchError,
         r"shape differs: 1\n  'params\.encoder\.dense\.kernel' in the state is float32\[16, 8\], "
         r"'params\.encoder\.dense\.kernel' in the source is float32\[8, 16\]",
         state=replaced("params.encoder.dense.kernel", jnp.zeros((16, 8)))),
    Case("dtype-float32-vs-bfloat16", checkpoint(P), tg.MismatchError,
         r"dtype differs \(casting is never implicit\): 1\n  "
         r"'params\.embed' in the state is bfloat16\[512, 1024\], 'params\.embed' in the source "
         r"is float32\[512, 1024\]",
         state=replaced("params.embed", jnp.zeros(EMBED, jnp.bfloat16))),
    Case("dtype-int32-vs-float32", memory({"params.encoder": "params.encoder"}),
         tg.MismatchError,
         r"'params\.encoder\.dense\.bias' in the state is int32\[16\], "
         r"'params\.encoder\.dense\.bias' in the source is float32\[16\]",
         state=replaced("params.encoder.dense.bias", np.zeros(16, np.int32))),
    Case("cast-complex-to-real",
         memory({"params.encoder.dense.bias": "params.encoder.dense.bias"}, cast=True),
         tg.MismatchError,
         r"dtype differs .*: 1\n  'params\.encoder\.dense\.bias' in the state is float32\[16\], "
         # cast=True refuses complex to real (cast="unsafe" allows it). The planner's
         # line is to end with the policy's reason, once it shows Mismatch.detail:
         # " (complex64 -> float32 drops the imaginary part; pass cast='unsafe')".
         r"'params\.encoder\.dense\.bias' in the source is complex64\[16\]",
         state=replaced("params.encoder.dense.bias", np.zeros(16, np.float32)),
         source=lambda: _set(memory_source(), ["params", "encoder", "dense", "bias"],
                             np.ones(16, np.complex64))),
    Case("cast-complex-to-python-int", memory({"step": "step"}, cast=True), tg.MismatchError,
         r"'step' in the state is int \(python\)\[\], 'step' in the source is complex64\[\]",
         state=replaced("step", 0),
         source=lambda: {**memory_source(), "step": np.complex64(1 + 2j)}),
    # -- round 2 (issue 12) --------------------------------------------------------
    Case("cast-true-float-to-uint8",
         memory({"params.encoder.dense.bias": "params.encoder.dense.bias"}, cast=True),
         tg.MismatchError, r"float32 -> uint8 can change values; pass cast='unsafe'",
         state=replaced("params.encoder.dense.bias", np.zeros(16, np.uint8))),
    Case("path-non-finite-number", loader({"params.encoder[1e999]": "params.encoder"}),
         tg.PathSyntaxError, r"number out of range \(1e999 is not a finite float\) at column 16"),
    Case("graft-under-jit",
         lambda state, source, workdir: jax.jit(
             lambda s: tg.graft(s, source, {"params": "params"}))(state),
         tg.GraftError, r"the state holds a traced value at 'step' "
         r"\(\w+Tracer\): treegraft runs outside jax\.jit"),
    Case("source-none-where-state-has-arrays", memory({"collections": "collections"}),
         tg.PathNotFoundError,
         r"'collections\.batch_stats\.mean' <- 'collections\.batch_stats\.mean': path "
         r"'collections\.batch_stats\.mean' not found in the source: 'collections' is None, "
         r"it has no key 'batch_stats'",
         source=lambda: {**memory_source(), "collections": None}),
    Case("structure-list-vs-dict", memory({"params.decoder": "params.decoder"}),
         tg.PathNotFoundError,
         r"'params\.decoder\[0\]\.kernel' <- 'params\.decoder\[0\]\.kernel': path "
         r"'params\.decoder\[0\]\.kernel' not found in the source: 'params\.decoder' has no key 0; "
         r"its keys are 'layers_0', 'layers_1'",
         state=replaced("params.decoder", [{"kernel": jnp.zeros((16, 8))}] * 2)),
    Case("structure-dict-vs-list", memory({"params.decoder": "params.decoder"}),
         tg.PathNotFoundError,
         r"path 'params\.decoder\.layers_0\.kernel' not found in the source: 'params\.decoder' "
         r"has no key 'layers_0'; its keys are 0, 1(.|\n)*unexpected in the source: .*: 2\n  "
         r"'params\.decoder\[0\.\.1\]\.kernel' in the source has no target",
         source=lambda: _set(memory_source(), ["params", "decoder"],
                             [{"kernel": np.ones((16, 8), np.float32)}] * 2)),
    Case("structure-missing-key", loader(P), tg.PathNotFoundError,
         r"missing in the source: .*: 1\n  "
         r"'params\.encoder\.dense\.scale' <- 'params\.encoder\.dense\.scale': path "
         r"'params\.encoder\.dense\.scale' not found in the checkpoint",
         state=replaced("params.encoder.dense",
                        {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16),
                         "scale": jnp.zeros(16)})),
    Case("structure-extra-key", memory(P), tg.PathNotFoundError,
         r"unexpected in the source: .*: 1\n  "
         r"'params\.encoder\.dense\.bias' in the source has no target: the state has no "
         r"'params\.encoder\.dense\.bias'",
         state=replaced("params.encoder.dense", {"kernel": jnp.zeros((8, 16))})),
    Case("python-scalar-vs-array", memory(P), tg.MismatchError,
         r"'params\.encoder\.dense\.bias' in the state is float \(python\)\[\], "
         r"'params\.encoder\.dense\.bias' in the source is float32\[16\]",
         state=replaced("params.encoder.dense.bias", 0.0)),
    Case("scalar-array-vs-vector", checkpoint({"step": "params.encoder.dense.bias"}),
         tg.MismatchError,
         r"'step' in the state is int32\[\], 'params\.encoder\.dense\.bias' in the source is "
         r"float32\[16\]"),
    Case("every-problem-at-once", checkpoint(P), tg.GraftError,
         r"^cannot graft \(1 rule\): 3 problems\n"
         r"missing in the source: .*: 1\n  'params\.head' <- 'params\.head': .*\n"
         r"shape differs: 1\n  'params\.embed' in the state is float32\[1024, 512\], "
         r"'params\.embed' in the source is float32\[512, 1024\]\n"
         r"dtype differs .*: 1\n  'params\.encoder\.dense\.kernel' in the state is "
         r"int32\[8, 16\], 'params\.encoder\.dense\.kernel' in the source is float32\[8, 16\]\n"
         r"to fix:\n  - to keep the state's values where the source has none, map them to None "
         r"\(\{'params\.head': None\}\) or add them to ignore_model_keys\n"
         r"  - float32 -> int32 can change values; pass cast='unsafe'$",
         state=replaced("params",
                        {**fresh_state().params,
                         "embed": jnp.zeros((1024, 512)),
                         "encoder": {"dense": {"kernel": jnp.zeros((8, 16), jnp.int32),
                                               "bias": jnp.zeros(16)}},
                         "head": jnp.zeros(3)})),
    # -- the state -------------------------------------------------------------------------
    Case("state-is-a-string", memory(P), tg.PathNotFoundError,
         r"rule 'params' <- 'params': path 'params' not found in the state: the root is a leaf "
         r"\(str\), it has no key 'params'", state=lambda: "params"),
    Case("state-is-none", checkpoint(P), tg.PathNotFoundError,
         r"path 'params' not found in the state: the root is None, it has no key 'params'",
         state=lambda: None),
    Case("state-leaves-are-not-arrays", loader(P), tg.MismatchError,
         r"structure differs: 5\n  'params\.decoder\.layers_0\.kernel' in the state is str, "
         r"'params\.decoder\.layers_0\.kernel' in the source is float32\[16, 8\]",
         state=replaced("params", jax.tree.map(lambda _: "w", fresh_state().params))),
    Case("state-subtree-is-an-object", memory(P), tg.MismatchError,
         r"'params' is a leaf in the state \(object\) but 'params' is a subtree in the source",
         state=replaced("params", object())),
    Case("opt-state-none-in-first-phase", checkpoint({"opt_state": "opt_state"}),
         tg.PathNotFoundError,
         r"'opt_state\[0\]\.count' in the source has no target: the state has no "
         r"'opt_state\[0\]\.count' \('opt_state' is None in the state\)"),
    Case("opt-state-none-after-optimizer",
         loader({"params": "params", "opt_state": "opt_state"},
                phase="transform_after_optimizer"),
         tg.PathNotFoundError, r"\('opt_state' is None in the state\)"),
    Case("opt-state-of-another-optimizer", loader({"opt_state": "opt_state"},
                                                  phase="transform_after_optimizer"),
         tg.PathNotFoundError,
         r"'opt_state\[0\]\.trace' \(5 leaves\) <- 'opt_state\[0\]\.trace': path "
         r"'opt_state\[0\]\.trace' not found in the checkpoint .*: 'opt_state\[0\]' has "
         r"no key 'trace'; its keys are 'count', 'mu', 'nu'",
         state=lambda: fresh_state().replace(
             opt_state=optax.sgd(0.1, momentum=0.9).init(fresh_state().params))),
    # -- the checkpoint ------------------------------------------------------------------------
    Case("workdir-missing", loader(P), tg.CheckpointNotFoundError,
         r"workdir '.*/wd' does not exist", also=(FileNotFoundError,),
         workdir=fresh_dir(None)),
    Case("workdir-is-none", loader(P, workdir_=None), tg.CheckpointError,
         r"workdir must be a path \(str or os\.PathLike\), got NoneType: None"),
    Case("workdir-is-a-file", checkpoint(P), tg.CheckpointError,
         r"workdir '.*/wd' is a file, not a Kauldron workdir",
         workdir=fresh_dir(lambda wd: _write(wd, "not a folder"))),
    Case("workdir-without-checkpoints-folder", loader(P), tg.CheckpointNotFoundError,
         r"workdir '.*/wd' has no checkpoints/ folder", also=(FileNotFoundError,),
         workdir=fresh_dir(_not_a_checkpoint)),
    Case("checkpoints-folder-empty", loader(P), tg.CheckpointNotFoundError,
         r"workdir '.*/wd' has no complete checkpoint in checkpoints/ "
         r"\(steps still being written are ignored\)", also=(FileNotFoundError,),
         workdir=fresh_dir(lambda wd: os.makedirs(os.path.join(wd, "checkpoints")))),
    Case("only-half-written-steps", loader(P), tg.CheckpointNotFoundError,
         r"has no complete checkpoint in checkpoints/ \(steps still being written are ignored\)",
         also=(FileNotFoundError,), workdir=_only_half_written),
    Case("only-uncommitted-steps", checkpoint(P), tg.CheckpointNotFoundError,
         r"has no complete checkpoint in checkpoints/", workdir=_only_uncommitted),
    Case("step-does-not-exist", loader(P, step=7), tg.CheckpointNotFoundError,
         r"workdir '.*/run' has no complete step 7; available steps: 1, 3$",
         also=(FileNotFoundError,)),
    Case("step-is-half-written", loader(P, step=5), tg.CheckpointNotFoundError,
         r"has no complete step 5; available steps: 1, 3$", workdir=_with_half_written(5)),
    Case("step-is-negative", loader(P, step=-2), tg.CheckpointError,
         r"step must be an int >= 0, or -1 for the latest; got -2"),
    Case("step-without-default-item", loader(P), tg.CheckpointError,
         r"step 3 of '.*/wd' has no 'default' item \(the train state\); it holds: "
         r"_CHECKPOINT_METADATA, commit_success\.txt, ds_iter, timer",
         workdir=copy_run(_no_default)),
    Case("metadata-invalid-json", loader(P), tg.CheckpointError,
         r"cannot read the metadata of .*/ckpt_3/default \(is _METADATA corrupt\?\): "
         r"JSONDecodeError", workdir=copy_run(metadata_text("{not json"))),
    Case("metadata-empty-file", checkpoint(P), tg.CheckpointError,
         r"\(is _METADATA corrupt\?\): JSONDecodeError: Expecting value",
         workdir=copy_run(metadata_text(""))),
    Case("metadata-json-list", loader(P), tg.CheckpointError,
         r"cannot read the metadata of .*/ckpt_3/default \(is _METADATA corrupt\?\)",
         workdir=copy_run(metadata_text("[]"))),
    Case("metadata-json-no-tree", loader(P), tg.CheckpointError,
         r"\(is _METADATA corrupt\?\): KeyError: 'tree_metadata'",
         workdir=copy_run(metadata_text(json.dumps({"use_ocdbt": True})))),
    Case("metadata-json-empty-tree", checkpoint(P), tg.CheckpointError,
         r"\(is _METADATA corrupt\?\)",
         workdir=copy_run(metadata_text(json.dumps({"tree_metadata": {}})))),
    Case("metadata-json-bad-entry", loader(P), tg.CheckpointError,
         r"\(is _METADATA corrupt\?\)",
         workdir=copy_run(metadata_text(json.dumps({"tree_metadata": {"('params',)": 5}})))),
    Case("metadata-file-deleted", loader(P), tg.CheckpointError,
         r"'.*/ckpt_3/default' is not an orbax PyTree checkpoint: neither .*/_METADATA nor "
         r".*/default/_METADATA exists",
         workdir=copy_run(lambda wd: os.remove(os.path.join(_item(wd), "_METADATA")))),
    Case("data-file-truncated", loader(P), tg.CheckpointError,
         r"reading 5 leaf\(s\) from .*/wd/checkpoints/ckpt_3/default failed: "
         r"(.|\n)*params\.embed", workdir=copy_run(truncate_data), fails_reading=True),
    Case("data-file-deleted", checkpoint({"params.embed": "params.embed"}), tg.CheckpointError,
         r"reading 1 leaf\(s\) from .*/ckpt_3/default failed: (.|\n)*params\.embed",
         workdir=copy_run(delete_data), fails_reading=True),
    Case("data-file-garbage", loader(P), tg.CheckpointError,
         r"reading 5 leaf\(s\) from .*/ckpt_3/default failed",
         workdir=copy_run(garble_data), fails_reading=True),
    Case("ocdbt-manifest-deleted", loader(P), tg.CheckpointError,
         r"cannot read the metadata of .*/ckpt_3/default .*NOT_FOUND",
         workdir=copy_run(lambda wd: os.remove(os.path.join(_item(wd), "manifest.ocdbt"))),
         fails_reading=True),
    Case("default-item-is-not-a-checkpoint", loader(P), tg.CheckpointError,
         r"'.*/ckpt_3/default' is not an orbax PyTree checkpoint: .*"
         r"\(it holds: notes\.txt, sub\)", workdir=copy_run(_junk_default)),
    Case("directory-is-not-a-checkpoint", orbax(P, lambda wd: wd), tg.CheckpointError,
         r"'.*/wd' is not an orbax PyTree checkpoint: neither .*/wd/_METADATA nor "
         r".*/wd/default/_METADATA exists \(it holds: README, logs\)",
         workdir=fresh_dir(_not_a_checkpoint)),
    Case("orbax-path-missing", orbax(P, lambda wd: os.path.join(wd, "ckpt_3")),
         tg.CheckpointNotFoundError, r"checkpoint '.*/wd/ckpt_3' does not exist",
         also=(FileNotFoundError,), workdir=fresh_dir(os.makedirs)),
    Case("orbax-temporary-folder",
         orbax(P, lambda wd: os.path.join(wd, "checkpoints", "ckpt_5.orbax-checkpoint-tmp")),
         tg.CheckpointError, r"is still being written \(orbax temporary folder\)",
         workdir=_with_half_written(5)),
    # -- round 3 (issue #21): nothing changes a value silently, nothing hangs ----------
    Case("value-scalar-does-not-fit", memory({"n": "n"}), tg.MismatchError,
         r"'n' in the state is int32\[\], 'n' in the source is int \(python\)\[\] = "
         r"1099511627776\n(.*\n)*.*outside the range of int32",
         state=lambda: {"n": jnp.zeros((), jnp.int32)}, source=lambda: {"n": 2**40}),
    Case("value-cast-true-into-float8", memory({"w": "w"}, cast=True), tg.MismatchError,
         r"float32 -> float8_e4m3fn: float8_e4m3fn holds at most 448, no inf: values can "
         r"overflow; pass cast='unsafe'",
         state=lambda: {"w": jnp.zeros(3, jnp.float8_e4m3fn)}, source=lambda: {"w": _F32}),
    Case("value-cast-true-overflows", memory({"w": "w"}, cast=True), tg.MismatchError,
         r"cannot place 'w': casting float32 to float16 makes 1000000\.0 \(the first such "
         r"value, at \[0\]\) inf",
         state=lambda: {"w": jnp.zeros(3, jnp.float16)},
         source=lambda: {"w": np.full(3, 1e6, np.float32)}),
    Case("value-stack-index-spelt-twice", memory({"layers": tg.stack("l_*", axis=0)}),
         tg.MismatchError, r"'l_01' and 'l_1' are both index 1: leading zeros do not make "
         r"another index",
         state=lambda: {"layers": {"w": jnp.zeros((2, 3))}},
         source=lambda: {"l_0": {"w": _F32}, "l_1": {"w": _F32}, "l_01": {"w": _F32}}),
    Case("value-stack-indices-far-apart", memory({"layers": tg.stack("l_*", axis=0)}),
         tg.MismatchError, r"missing 1\.\.999999999999 \(999999999999 indices\)",
         state=lambda: {"layers": {"w": jnp.zeros((2, 3))}},
         source=lambda: {"l_0": {"w": _F32}, "l_1000000000000": {"w": _F32}}),
    Case("value-abstract-leaf-left-behind", memory({"a": "a"}), tg.MappingError,
         r"'b' in the state is abstract \(float32\[3\]\) and no rule fills it\n(.*\n)*"
         r".*graft it from the source \(\{'b': 'b'\}\)",
         state=lambda: {"a": jax.ShapeDtypeStruct((3,), jnp.float32),
                        "b": jax.ShapeDtypeStruct((3,), jnp.float32)},
         source=lambda: {"a": _F32, "b": _F32}),
    Case("value-operation-on-keys", memory({"k": tg.stack("k_*")}), tg.MismatchError,
         r"'k' <- 'k_0' \(key<fry>\[\]\): typed PRNG keys cannot go through stack",
         state=lambda: {"k": jax.random.split(jax.random.key(0), 2)},
         source=lambda: {"k_0": jax.random.key(1), "k_1": jax.random.key(2)}),
    Case("value-operation-nested-3000-deep", memory({"w": _nested(3000)}), tg.MappingError,
         r"operations nest 3000 deep, more than the 100 allowed",
         state=lambda: {"w": jnp.zeros(3)}, source=lambda: {"w": _F32}),
    Case("location-bucket-name-refused", orbax(P, lambda wd: "gs://a/b"), tg.CheckpointError,
         r"'gs://a/b': 'a' is not a valid gs:// bucket name"),
    Case("location-nul-byte", orbax(P, lambda wd: wd + "/x\x00y"), tg.CheckpointError,
         r"holds a NUL byte"),
    Case("safetensors-name-twice", safetensors({"w": "w"}), tg.CheckpointError,
         r"m\.safetensors names 'w' twice in one JSON object; safetensors refuses such a file",
         state=lambda: {"w": jnp.zeros(1)},
         workdir=fresh_dir(_safetensors(
             b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
             b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'))),
    Case("safetensors-dtype-not-a-string", safetensors({"w": "w"}), tg.CheckpointError,
         r"tensor 'w' in the header of .*m\.safetensors: dtype must be a string such as "
         r"'F32', got \['F32'\]",
         state=lambda: {"w": jnp.zeros(1)},
         workdir=fresh_dir(_safetensors(
             b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}'))),
    # -- round 4 (issues #23, #24): the way out refuses before it writes a byte -------------
    Case("write-dest-exists", convert({"params": "params"}, "out"), tg.CheckpointError,
         r"the destination .*out already exists \(a folder\); pass overwrite=True",
         workdir=fresh_dir(_folder_with_a_file)),
    Case("write-into-the-source", convert({"": ""}, "{item}/inside", from_run=True),
         tg.CheckpointError, r"the destination .*inside and the source .* overlap: write "
         r"elsewhere \(the source is never written to\)"),
    Case("write-safetensors-dotted-key", convert({"": ""}, "out.safetensors"), tg.GraftError,
         r"has the key 'a\.b', which holds a '\.'",
         source=lambda: {"a.b": _F32}, workdir=fresh_dir(os.makedirs)),
    Case("write-keep-rule-without-like", convert({"w": None}, "out"), tg.MappingError,
         r"keep rule", source=lambda: {"w": _F32}, workdir=fresh_dir(os.makedirs)),
    Case("write-typed-keys", convert({"": ""}, "out"), tg.MismatchError,
         r"'k' holds typed PRNG keys, .*: write jax\.random\.key_data\(keys\)",
         source=lambda: {"k": jax.random.key(0)}, workdir=fresh_dir(os.makedirs)),
    Case("write-invert-cast-without-like",
         lambda state, source, workdir: tg.invert({"w": tg.cast("v", jnp.float16)}),
         tg.MappingError, r"like"),
    Case("write-invert-stack-of-a-non-last-star-without-like",
         lambda state, source, workdir: tg.invert(
             {"p.layers.*.kernel": tg.stack("m.layers.*.mlp.*_proj.weight")}),
         tg.MappingError, r"which '\*' of 'm\.layers\.\*\.mlp\.\*_proj\.weight' the stack "
         r"takes depends on the source.*pass like="),
    # -- round 5: found in round 4, refused in plan instead of jax's error after the reads ---
    Case("value-target-sharding-uneven", memory({"w": "w"}), tg.MismatchError,
         r"'w' in the state is float32\[5\] with sharding P\('x',\) over a mesh of x=8: "
         r"axis 0 of size 5 cannot be split 8 ways evenly",
         state=lambda: {"w": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=_uneven())},
         source=lambda: {"w": np.zeros(5, np.float32)}),
    # -- round 6: jax would narrow 64-bit values in silence (x64 off) ------------------------
    Case("value-target-float64-with-x64-off", memory({"w": "w"}), tg.MismatchError,
         r"(?s)'w' in the state is float64\[3\], which jax puts on a device as float32 while "
         r"its 64-bit types are off.*jax\.enable_x64\(True\)",
         state=lambda: {"w": jax.ShapeDtypeStruct((3,), np.float64)},
         source=lambda: {"w": np.arange(3.0)}),
    Case("value-propagate-int64-with-x64-off",
         lambda state, source, workdir: tg.propagate_sharding(source, state),
         tg.MismatchError,
         r"'w' in like is int64\[3\], which jax puts on a device as int32",
         state=lambda: {"w": jax.ShapeDtypeStruct((3,), np.int64)},
         source=lambda: {"w": np.arange(3)}),
]


def _uneven() -> Any:
    """A sharding of 8 devices along one axis (it splits a length 5 unevenly)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))


def test_catalogue_is_complete():
    """At least 40 cases, unique ids, and every error class of the API represented."""
    ids = [c.id for c in CATALOGUE]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)
    kinds = {c.error for c in CATALOGUE}
    assert kinds >= {
        tg.PathSyntaxError,
        tg.MappingError,
        tg.PathNotFoundError,
        tg.MismatchError,
        tg.CheckpointError,
        tg.CheckpointNotFoundError,
        tg.GraftError,
    }


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.id)
def test_bad_input(case: Case, run: str, tmp_path):
    workdir = case.workdir(run, str(tmp_path)) if case.workdir is not None else run
    state, source = case.state(), case.source()
    state_before, source_before = trees.snapshot(state), trees.snapshot(source)
    # Everything a case may touch: the shared run, and the case's own directory.
    watched = [os.path.dirname(run), str(tmp_path)]
    disk_before = [snapshot(d) for d in watched]

    with orbax_leftovers(settle=0.25 if case.fails_reading else 0.0):
        with pytest.raises(case.error, match=case.match) as info:
            case.call(state, source, workdir)

    error = info.value
    assert isinstance(error, tg.GraftError) and isinstance(error, ValueError)
    for kind in case.also:
        assert isinstance(error, kind)
    message = str(error)
    assert message == error.message  # str() is the message itself, even for a KeyError
    assert "Array(" not in message and "array(" not in message  # no values dumped
    # The caller's state and source: same structure, same leaf objects, same values.
    trees.assert_unchanged(state, state_before)
    trees.assert_unchanged(source, source_before)
    # No byte written, no file or folder created, in any checkpoint directory.
    assert [snapshot(d) for d in watched] == disk_before


# ----------------------------------------------------------------------------
# The good side of two catalogue entries.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["opt_state", tg.parse_path("opt_state"), tg.parse_pattern("opt_state")],
    ids=["str", "Path", "Pattern"],
)
def test_opt_state_rule_waits_for_the_optimizer(run, key):
    """opt_state is None in the first phase: an opt_state rule, however written, waits.

    A `Path` or `Pattern` key (accepted by `graft`) used to be grafted in the
    first phase, and failed there on the missing optimizer state.
    """
    saved = saved_state(3)
    mapping = {"params": "params", key: "opt_state"}
    with tg.PartialKauldronLoader(workdir=run, new_to_old=mapping) as loader:
        first = loader.transform(fresh_state())
        assert first.opt_state is None
        np.testing.assert_array_equal(first.params["embed"], saved.params["embed"])
        after = loader.transform_after_optimizer(
            first.replace(opt_state=ADAM.init(first.params))
        )
    assert after.params["embed"] is first.params["embed"]
    np.testing.assert_array_equal(after.opt_state[0].mu["embed"], saved.opt_state[0].mu["embed"])
    np.testing.assert_array_equal(after.opt_state[0].count, saved.opt_state[0].count)


def test_default_new_to_old_is_not_empty(run):
    """Only an explicitly empty new_to_old is refused; leaving it out loads params."""
    with tg.PartialKauldronLoader(workdir=run) as loader:
        out = loader.transform(fresh_state())
    np.testing.assert_array_equal(out.params["embed"], saved_state(3).params["embed"])


# ----------------------------------------------------------------------------
# The reliability page tells the truth about these tests.
# ----------------------------------------------------------------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PAGE = os.path.join(_ROOT, "docs", "reliability.md")


def test_reliability_page_names_tests_that_exist():
    """Every `tests/x.py::name` (and bare `name` after it) on the page is a real test."""
    import ast
    import re

    with open(_PAGE) as f:
        page = f.read()
    cited = re.findall(r"`(tests/\w+\.py)(?:::(\w+))?`", page)
    assert len(cited) >= 15
    defined: dict[str, set[str]] = {}
    for module, name in cited:
        if module not in defined:
            with open(os.path.join(_ROOT, module)) as f:
                tree = ast.parse(f.read())
            defined[module] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert not name or name in defined[module], f"{module}::{name} is not a test"
    # Names cited alone ("`test_fault_inside_the_read_call`") belong to some module cited.
    alone = set(re.findall(r"`(test_\w+)`", page))
    every = set().union(*defined.values())
    assert alone <= every, alone - every
    # The catalogue's size and the catalogue ids cited are the real ones.
    assert f"the catalogue of {len(CATALOGUE)} bad inputs" in page
    ids = {c.id for c in CATALOGUE}
    for case_id in re.findall(r"`((?:only|step|data|metadata)-[\w-]+)`", page):
        assert case_id in ids, case_id
