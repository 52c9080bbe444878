"""Where a convert writes, and how its output appears: whole, or not at all.

docs/design.md section 15: the data goes to a temporary name beside the final
folder (`.<name>.treegraft-tmp-<host>-<pid>-<random>`), which no reader takes
for a checkpoint; the final name appears by one rename once everything is
written. On gs:// and s3://, which have no rename, the writer writes in place
and its metadata last (the object a reader needs to accept the folder). An
existing destination is refused before anything is read, unless overwrite is
asked; then the old one is replaced only once the new one is complete
(locally, by swapping the two names in one step where Linux allows it, so
that a kill at any moment leaves the old one or the new one whole; on object
stores it is removed first). A failed write removes what it wrote, and the
folders it made for it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import sys

from treegraft._errors import CheckpointError
from treegraft._storage.location import Location

__all__ = ["final_location", "refuse_existing", "temporary", "prepare", "commit", "discard",
           "clean_stale", "remove_made"]

_TMP = ".treegraft-tmp-"
_OLD = ".treegraft-old-"


def final_location(dest: Location, layout: str, step: int | None) -> Location:
    """The folder (or file) that appears: dest, a step of it, or a Kauldron step."""
    if step is None:
        return dest
    if layout == "kauldron":
        return dest.join("checkpoints", f"ckpt_{step}")
    return dest.join(str(step))


def refuse_existing(final: Location, dest: Location, overwrite: bool) -> bool:
    """Whether final exists; refused (a `CheckpointError` naming dest) unless overwrite."""
    try:
        found = final.kind("destination")
    except CheckpointError as e:
        raise CheckpointError(f"cannot write {dest}: {e}") from None
    if found is not None and not overwrite:
        kind = "a folder" if found == "dir" else "a file"
        where = f"{dest}" if final == dest else f"{final} (in {dest})"
        # Object stores have no rename: there the old objects go before the new are written.
        how = ("it is replaced only once the new one is complete" if final.is_local
               else "its objects are removed first, then the new ones written")
        raise CheckpointError(
            f"the destination {where} already exists ({kind}); pass overwrite=True to "
            f"replace it ({how}), or choose another dest"
        )
    return found is not None


def temporary(final: Location, shared: str | None = None) -> Location:
    """The temporary location beside final that the writer fills (final itself on object stores).

    Args:
      final: where the output appears.
      shared: a token all the processes writing together agreed on (their
        folder is then one, named by it); None for one process.
    """
    if not final.is_local:
        return final
    parent, name = os.path.split(final.key)
    tag = (f"shared-{shared}" if shared is not None
           else f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    return Location.parse(os.path.join(parent, f".{name}{_TMP}{tag}"))


def prepare(tmp: Location, final: Location, existed: bool) -> list[str]:
    """Makes room for the write: the parent folder locally, the old objects removed remotely.

    Returns:
      The local folders it made, deepest first (`remove_made` removes them
      again when the write fails, so that a failed convert leaves no folder).
    """
    if tmp.is_local:
        parent = os.path.dirname(tmp.key)
        made = []
        up = parent
        while up and not os.path.lexists(up) and os.path.dirname(up) != up:
            made.append(up)
            up = os.path.dirname(up)
        os.makedirs(parent, exist_ok=True)
        return made
    if existed:
        discard(final)
    return []


def remove_made(folders: list[str]) -> None:
    """Removes the folders `prepare` made, deepest first, those still empty; never raises."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return  # not empty (another writer's?) or gone: leave it and those above


def clean_stale(final: Location) -> list[str]:
    """Removes temporary folders beside final left by dead processes of this host.

    A convert killed mid-write leaves its temporary folder; the next convert to
    the same place removes it. A folder of a live process, or of another host
    (a shared file system), is left alone.

    Returns:
      The paths removed.
    """
    if not final.is_local:
        return []
    parent, name = os.path.split(final.key)
    prefix = f".{name}{_TMP}"
    host = socket.gethostname()
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        tag = entry[len(prefix):]
        owner, _, rest = tag.rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else None
        if owner != host or pid is None or _alive(pid):
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(os.path.join(parent, entry))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def commit(tmp: Location, final: Location, single_file: bool = False) -> None:
    """Makes the written data appear at final (a rename; the old final replaced).

    Args:
      tmp: the temporary folder written.
      final: where it appears.
      single_file: final is one file: the one file in tmp is moved there.
    """
    if not final.is_local:
        return  # written in place, its metadata last
    source = tmp.key
    if single_file:
        files = sorted(os.listdir(tmp.key))
        if len(files) != 1:
            raise CheckpointError(
                f"the output is {len(files)} files ({', '.join(files)}) and {final} names one "
                "file: give a folder as dest"
            )
        source = os.path.join(tmp.key, files[0])
    if os.path.lexists(final.key) and _exchange(source, final.key):
        # One step: no moment without a whole final. The old one is now at the
        # temporary name (removed by clean_stale if this process dies here).
        _remove_local(tmp.key)
        return
    old = None
    if os.path.lexists(final.key):
        parent, name = os.path.split(final.key)
        old = os.path.join(parent, f".{name}{_OLD}{secrets.token_hex(4)}")
        os.rename(final.key, old)
    try:
        os.rename(source, final.key)
    except BaseException:
        if old is not None:
            os.rename(old, final.key)  # the old one back: nothing replaced
        raise
    if old is not None:
        _remove_local(old)
    if single_file:
        shutil.rmtree(tmp.key, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swaps the paths a and b in one step (Linux renameat2); False where it is not supported.

    Replacing an existing output by two renames (old away, new in) leaves a
    moment with no output at all: a process killed then loses the old one.
    """
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without it
        return False
    raise OSError(code, os.strerror(code), b)


def discard(where: Location) -> None:
    """Removes a temporary (or half-written remote) folder; never raises."""
    try:
        if where.is_local:
            _remove_local(where.key)
            return
        import tensorstore as ts

        kv = where.open_kvstore()
        where.wait(kv.delete_range(ts.KvStore.KeyRange()), "removing")
    except Exception:  # best effort: the error being reported matters more
        pass


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass
