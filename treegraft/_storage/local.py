"""What a local path is, and the bytes of a local file, without ever blocking.

A checkpoint folder may hold, by mistake or malice, a FIFO (opening it waits
for a writer forever), a device (`/dev/zero` reads without end), a socket or
a loop of symbolic links. `local_kind` says what a path is without opening
it; `read_local` reads a small file only if it is a regular one, checked on
the open file; `not_regular` is the error for anything else.
"""

from __future__ import annotations

import errno
import os
import stat

from treegraft._errors import CheckpointError, CheckpointNotFoundError

__all__ = ["local_kind", "mode_kind", "describe_kind", "not_regular", "read_local"]


# What each kind of local path is, as messages say it.
_KIND_PHRASES = {
    "file": "a regular file",
    "dir": "a folder",
    "fifo": "a FIFO (named pipe)",
    "char device": "a character device",
    "block device": "a block device",
    "socket": "a socket",
    "symlink loop": "a loop of symbolic links",
    "broken symlink": "a symbolic link to a missing target",
    "missing": "missing",
    "other": "neither a file nor a folder",
}


def local_kind(path: str, what: str = "path") -> str:
    """What a local path is, without opening it (opening a FIFO blocks).

    Returns one of 'file', 'dir', 'fifo', 'char device', 'block device',
    'socket', 'symlink loop', 'broken symlink', 'missing', 'other'. Symbolic
    links are followed.

    Raises:
      CheckpointError: the path cannot be looked at (permission denied).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "broken symlink" if os.path.islink(path) else "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        fix = ("; fix its permissions (treegraft needs to list and read it)"
               if e.errno in (errno.EACCES, errno.EPERM) else "")
        raise CheckpointError(
            f"cannot read {what} {path!r}: {e.strerror or type(e).__name__}{fix}"
        ) from e
    return mode_kind(mode)


def mode_kind(mode: int) -> str:
    """The `local_kind` of a file mode (from `os.stat` or `os.fstat`)."""
    for test, kind in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "char device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "other"


def describe_kind(kind: str) -> str:
    """How messages say what a path of this `local_kind` is ("a FIFO (named pipe)")."""
    return _KIND_PHRASES.get(kind, kind)


def not_regular(path: str, kind: str, what: str, expected: str = "a file or folder"
                ) -> CheckpointError:
    """The error for a local path that is not what a checkpoint holds there."""
    found = f"{what} {path!r} is {describe_kind(kind)}"
    if kind in ("missing", "broken symlink"):
        return CheckpointNotFoundError(found)
    if kind == "symlink loop":
        fix = "fix or remove the link"
    elif kind in ("file", "dir"):
        fix = f"a checkpoint holds {expected} there"
    else:  # reading it would block (a FIFO) or never end (/dev/zero)
        fix = "treegraft reads checkpoints from regular files and folders only"
    return CheckpointError(f"{found}, not {expected}: {fix}")


def read_local(path: str, what: str) -> bytes:
    """The bytes of a local regular file; never blocks on a FIFO or reads a device."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once (it would wait for a writer).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise not_regular(path, "symlink loop", what, "a file") from None
        if e.errno == errno.ENXIO:  # a socket
            raise not_regular(path, local_kind(path, what), what, "a file") from None
        raise CheckpointError(
            f"cannot read {what} {path!r}: {e.strerror or type(e).__name__}"
        ) from e
    try:
        kind = mode_kind(os.fstat(fd).st_mode)
        if kind != "file":
            raise not_regular(path, kind, what, "a file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(
            f"cannot read {what} {path!r}: {e.strerror or type(e).__name__}"
        ) from e
    finally:
        os.close(fd)
