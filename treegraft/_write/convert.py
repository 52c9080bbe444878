"""`convert` and `save`: a plan's output written to a checkpoint, streamed and atomic.

docs/design.md section 15. The steps, each before the next:

    options, dest   checked; an existing dest refused (nothing read yet)
    layout          `like`, or derived from the mapping (`layout.derive_like`)
    plan            the normal `plan(like, source, mapping)`: every check on metadata
    writer          the format's `Writer` checks the output's names and dtypes
    write           into a temporary folder beside dest, box by box (`stream`)
    commit          dest appears whole (`commit`)
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

import jax

from treegraft._errors import CheckpointError, GraftError, MappingError, Problem
from treegraft._parse.paths import render_parts
from treegraft._parse.rules import CastOption, MappingLike, parse_mapping
from treegraft._plan import plan
from treegraft._plan.checks import deleted_sources
from treegraft._read.progress import ProgressBar
from treegraft._read.several import as_source, source_index
from treegraft._read.source import Source
from treegraft._storage.errors import reason
from treegraft._storage.location import Location
from treegraft._tree.index import is_abstract
from treegraft._tree.leaves import is_key_dtype, spec_of
from treegraft._write import commit as _commit
from treegraft._write.interface import Budget, Share, Writer
from treegraft._write.layout import abstract_of, derive_like, is_identity
from treegraft._write.share import Disagreed, ProcessShare, agree_token
from treegraft._write.stream import box_fetch, out_leaves

log = logging.getLogger("treegraft")

__all__ = ["convert", "save"]

_FORMATS = ("orbax", "kauldron", "safetensors")
_CHUNK_BYTES = 64 * 2**20  # the orbax writer's largest chunk (its CHUNK_BYTES)
# format -> (module, class) of its writer, imported when asked for.
_WRITERS = {
    "orbax": ("treegraft._formats.orbax.write", "OrbaxWriter"),
    "kauldron": ("treegraft._formats.kauldron.write", "KauldronWriter"),
    "safetensors": ("treegraft._formats.safetensors.write", "SafetensorsWriter"),
}


def convert(
    source: Any,
    dest: str | os.PathLike[str],
    mapping: MappingLike,
    /,
    *,
    like: Any = None,
    format: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    max_host_bytes: int = 2**30,
    max_shard_bytes: int = 5 * 10**9,
    strict: bool = True,
    cast: CastOption = False,
    progress: bool | Callable[[int, int], None] = False,
) -> str:
    """Writes what `graft(like, source, mapping)` would hold to a checkpoint at dest.

    Plans first (every check on metadata, before anything is read), then pulls
    each output chunk through the plan's operations from the source boxes it
    needs, writes it and drops it: array data in host memory stays under
    `max_host_bytes` plus one chunk, whatever the model's size. A sharded
    `jax.Array` source is read shard by shard, never gathered whole; under
    `jax.distributed` each process writes the chunks of the shards it holds.
    The output is written under a temporary name beside dest and appears only
    when complete (on gs:// and s3://, its metadata is written last); the
    source is never written to.

    Args:
      source: a pytree, or a lazy `treegraft.Source` (`OrbaxCheckpoint`,
        `SafetensorsCheckpoint`, ...).
      dest: a local path, `file://`, `gs://` or `s3://` URL.
      mapping: `{new: old}` as for `treegraft.graft`.
      like: the output's layout (a pytree of arrays or `jax.ShapeDtypeStruct`s);
        leaves no rule fills are written with like's values. None derives the
        layout from the mapping: every leaf a rule produces, captures bound
        from the source, an unstack's indices from the source axis.
      format: "orbax" (a pytree item, the default), "kauldron" (with step:
        `dest/checkpoints/ckpt_<step>/default`) or "safetensors" (the default
        for a dest ending in ".safetensors").
      step: write a `CheckpointManager` step `dest/<step>/default` (orbax) or a
        Kauldron step; None writes the item at dest.
      overwrite: replace an existing dest: locally once the new one is
        complete; on gs:// and s3:// (no rename) the old one is removed first.
      max_host_bytes: array data held in host memory at once (plus one chunk).
      max_shard_bytes: the largest safetensors file before splitting into shards.
      strict: as for `treegraft.plan`.
      cast: as for `treegraft.plan`.
      progress: True draws a bar on stderr (on a terminal); a callable is
        called with `(bytes_done, bytes_total)`.

    Returns:
      The path of what was written (dest, or its step folder).

    Raises:
      CheckpointError: dest exists (and overwrite is False), or writing failed
        (permission, disk full, a refusing server): the message names dest and
        the temporary data is removed.
      GraftError: as `treegraft.plan`; or the format cannot hold the output
        (a name it cannot spell, a dtype it lacks), before anything is read.

    Example:
      >>> import os, tempfile, numpy as np, treegraft as tg
      >>> dest = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> _ = tg.convert({"enc": {"w": np.ones(2, np.float32)}}, dest, {"encoder": "enc"})
      >>> tg.graft({"encoder": {"w": np.zeros(2, np.float32)}}, tg.OrbaxCheckpoint(dest),
      ...          {"": ""})["encoder"]["w"]
      array([1., 1.], dtype=float32)
    """
    budget = _budget(max_host_bytes, max_shard_bytes)
    location = Location.parse(dest, what="dest")
    layout = _format(format, location, step)
    if not isinstance(overwrite, bool):
        raise MappingError(f"overwrite must be True or False, got {overwrite!r}")
    final = _commit.final_location(location, layout, step)
    existed = _commit.refuse_existing(final, location, overwrite)
    _refuse_source_at(source, final)
    writer = _writer(layout, step, final, budget)
    rules = parse_mapping(mapping)
    if like is None:
        like = _derived_like(source, rules)
    p = plan(like, source, mapping, strict=strict, cast=cast)
    _check_executable(p)
    rec = p._record
    _check_values(rec, location)
    leaves = out_leaves(rec)
    if problems := writer.problems(leaves):
        raise GraftError.from_problems(
            [Problem("structure", message) for message in problems],
            header=f"cannot write {location} as {writer.format}: {len(problems)} "
                   f"problem{'s' if len(problems) != 1 else ''}",
        )
    total = sum(leaf.nbytes for leaf in leaves)
    report = _progress(progress, total)
    fetch = box_fetch(rec, leaves, report)
    share, tmp = _share(rec, leaves, writer, budget, final)
    budget = dataclasses.replace(budget, share=share)
    lead = share.process == 0
    done = False
    made: list[str] = []  # folders prepare made: removed again if the write fails
    try:
        try:
            if lead:
                _agreed(share, "preparing the destination",
                        lambda: made.extend(_commit.prepare(tmp, final, existed)))
            else:
                _agreed(share, "preparing the destination", lambda: None)
            writer.write(tmp, leaves, _SourceFailures(fetch), budget)
            single = _single_file(layout, final)
            _agreed(share, "committing",
                    (lambda: _commit.commit(tmp, final, single_file=single)) if lead
                    else (lambda: None))
        except _FromSource as e:
            raise e.error from e.error.__cause__
        except Disagreed:
            raise
        except Exception as e:
            # The storage's own words (not the temporary folder's name), then the remedy.
            cause = e.__cause__ if isinstance(e, CheckpointError) and e.__cause__ else e
            said = reason(cause)
            if tmp != final:  # a file in the temporary folder is named where it would appear
                said = said.replace(tmp.key, final.key)
            raise CheckpointError(
                f"writing {location} failed: {said}; {_remedy(e)}; nothing was "
                "written there (the temporary data was removed)"
            ) from e
        done = True
    finally:
        if not done and lead:
            _commit.discard(tmp)
            _commit.remove_made(made)
    log.info("treegraft: wrote %s (%d leaves)", final, len(leaves))
    return str(final)


def save(tree: Any, dest: str | os.PathLike[str], /, **options: Any) -> str:
    """Writes a pytree (or a checkpoint) as it is: `convert(tree, dest, {"": ""})`.

    The output keeps the tree's containers (lists stay lists), so plain orbax
    restores it as it restores its own save of the same tree.

    Args:
      tree: a pytree of arrays (numpy, sharded `jax.Array`s) or a lazy source.
      dest: as for `convert`.
      **options: `convert`'s keyword options (`format`, `step`, `overwrite`,
        `max_host_bytes`, ...).

    Returns:
      The path written.

    Example:
      >>> import os, tempfile, numpy as np, treegraft as tg
      >>> dest = os.path.join(tempfile.mkdtemp(), "state")
      >>> _ = tg.save({"layers": [np.arange(3.0)]}, dest)
      >>> tg.OrbaxCheckpoint(dest).metadata()["layers"][0].shape
      (3,)
    """
    if "like" in options or "mapping" in options:
        raise MappingError("save writes the tree as it is: use tg.convert for like= or a mapping")
    return convert(tree, dest, {"": ""}, **options)


class _FromSource(Exception):
    """A failure while reading the source or running the plan's operations (not the writer's)."""

    def __init__(self, error: GraftError):
        super().__init__(str(error))
        self.error = error


class _SourceFailures:
    """The fetch, its typed errors marked as the source's so they are not blamed on dest."""

    def __init__(self, fetch: Any):
        self.fetch = fetch

    def __call__(self, i: int, box: tuple[slice, ...]) -> Any:
        try:
            return self.fetch(i, box)
        except GraftError as e:
            raise _FromSource(e) from e


def _share(rec: Any, leaves: Any, writer: Writer, budget: Budget,
           final: Location) -> tuple[Share, Location]:
    """This process's share of the write, and the temporary folder (one for all processes)."""
    if jax.process_count() == 1:
        _commit.clean_stale(final)
        return Share(), _commit.temporary(final)
    if not getattr(writer, "shares", False):
        raise GraftError(
            f"format {writer.format!r} cannot be written by several processes together: "
            "write it from one process (jax.process_index() == 0), from a checkpoint source"
        )
    if jax.process_index() == 0:
        _commit.clean_stale(final)
    token = agree_token(secrets.token_hex(8).encode()).decode()
    chunk = min(_CHUNK_BYTES, budget.max_host_bytes // 2)
    share = ProcessShare(rec, leaves, max(1, chunk))
    return share, _commit.temporary(final, shared=token)


def _agreed(share: Share, what: str, run: Callable[[], Any]) -> None:
    """Runs one step on this process, then agrees on it with the others."""
    try:
        run()
    except BaseException:
        share.agree(what, ok=False)
        raise
    share.agree(what)


def _budget(max_host_bytes: Any, max_shard_bytes: Any) -> Budget:
    for name, value in (("max_host_bytes", max_host_bytes), ("max_shard_bytes", max_shard_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MappingError(f"{name} must be a positive int of bytes, got {value!r}")
    return Budget(max_host_bytes=max_host_bytes, max_shard_bytes=max_shard_bytes)


def _format(format: str | None, dest: Location, step: int | None) -> str:
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise MappingError(f"step must be a non-negative int, got {step!r}")
    if format is None:
        format = "safetensors" if dest.name.endswith(".safetensors") else "orbax"
    if format not in _FORMATS:
        raise MappingError(
            f"format must be one of {', '.join(map(repr, _FORMATS))}, got {format!r}"
        )
    if format == "kauldron" and step is None:
        raise MappingError("format='kauldron' writes a step of a workdir: pass step=N")
    if format == "safetensors" and step is not None:
        raise MappingError("safetensors has no steps: leave step=None")
    if format == "safetensors" and dest.name.endswith(".safetensors") and not dest.is_local:
        raise MappingError(
            f"{dest}: on gs:// and s3:// write safetensors to a folder (dest without "
            "'.safetensors'): an object store cannot make one file appear whole by a rename"
        )
    return format


def _writer(format: str, step: int | None, final: Location, budget: Budget) -> Writer:
    module_name, class_name = _WRITERS[format]
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError):
        raise GraftError(
            f"format {format!r} cannot be written by this version of treegraft (no "
            f"{module_name}.{class_name}); write 'orbax' or 'kauldron'"
        ) from None
    # A CheckpointManager step holds the item as "default", as orbax and Kauldron save it.
    options: dict[str, Any] = {}
    if format == "orbax" and step is not None:
        options["item"] = "default"
    if format in ("orbax", "kauldron") and jax.process_count() > 1:
        options["ocdbt"] = False  # each process writes its own chunk files
    if format == "safetensors":
        # The writer refuses, in `problems`, a single-file dest the data would
        # make larger than max_shard_bytes (it would need shards and an index).
        writer = cls(str(final), budget=budget)
    else:
        writer = cls(**options)
    assert isinstance(writer, Writer)
    return writer


def _single_file(format: str, final: Location) -> bool:
    return format == "safetensors" and final.name.endswith(".safetensors")


def _refuse_source_at(source: Any, final: Location) -> None:
    """Refuses to write where the source is read (the source is never written to).

    The folder the source reads (an orbax item, a Kauldron step folder, a
    safetensors file or folder) and the folder written must not overlap: a new
    step beside the step read, in the same workdir, is fine.
    """
    if not isinstance(source, Source):
        return
    read = getattr(source, "step_dir", None) if hasattr(source, "workdir") else None
    if read is None:
        read = getattr(source, "location", None) or getattr(source, "path", None)
    if read is None:
        return
    try:
        here = read if isinstance(read, Location) else Location.parse(read)
    except GraftError:
        return
    if here.scheme != final.scheme or here.bucket != final.bucket:
        return
    a, b = here.key.rstrip("/") + "/", final.key.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise CheckpointError(
            f"the destination {final} and the source {here} overlap: write elsewhere (the "
            "source is never written to)"
        )


def _derived_like(source: Any, rules: list[Any]) -> Any:
    """The output layout without `like`: the source's own tree for a copy of all of it."""
    # A dict holding sources is several sources (docs/design.md section 17):
    # only the sub-sources the rules read are opened.
    lazy = as_source(source)
    if is_identity(rules):
        return jax.tree.map(abstract_of, lazy.metadata() if lazy is not None else source)
    return derive_like(rules, source_index(source, lazy, rules, ()))


def _check_executable(p: Any) -> None:
    abstract = [pr for pr in p.report if pr.kind == "abstract"]
    if abstract:
        raise GraftError(abstract[0].message, problems=abstract)
    rec = p._record
    if rec.lazy is None and (gone := deleted_sources(rec.source, rec.pairs)):
        raise GraftError.from_problems(gone, rules=len(p.rules))


def _check_values(rec: Any, location: Location) -> None:
    """Refuses, before anything is read, an output leaf with no value or that no format can hold."""
    grafted = {pair.target for pair in rec.pairs}
    problems = []
    for i, (parts, leaf) in enumerate(zip(rec.target.paths, rec.target.leaves, strict=True)):
        path = render_parts(parts) or "(the root)"
        if i not in grafted and is_abstract(leaf):
            problems.append(Problem("unfilled", f"{path!r}: `like` holds only its shape and "
                                    "dtype and no rule fills it: map it, or give like= a value"))
        elif is_key_dtype(spec_of(leaf)[1]):
            problems.append(Problem("dtype", f"{path!r} holds typed PRNG keys, which a "
                                    "checkpoint holds as their key data: write "
                                    "jax.random.key_data(keys)"))
    if not rec.target.leaves:
        raise GraftError(f"nothing to write to {location}: the output has no leaf")
    if problems:
        raise GraftError.from_problems(
            problems, header=f"cannot write {location}: {len(problems)} "
                             f"problem{'s' if len(problems) != 1 else ''}")


def _progress(progress: Any, total: int) -> Callable[[int], None] | None:
    if progress is False or progress is None:
        return None
    report = ProgressBar(label="writing") if progress is True else progress
    if not callable(report):
        raise MappingError(f"progress must be True, False or a callable, got {progress!r}")
    state = {"done": 0}
    report(0, total)

    def on_bytes(n: int) -> None:
        state["done"] += n
        report(state["done"], total)

    return on_bytes


def _remedy(error: BaseException) -> str:
    text = str(error).lower()
    if "no space" in text or "resource_exhausted" in text or "enospc" in text:
        return "the storage is full: free space or choose another dest"
    if "permission" in text or "eacces" in text or "read-only" in text:
        return "permission denied: choose a dest you may write, or fix the folder's permissions"
    return "check that dest can be written"
