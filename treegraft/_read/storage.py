"""Where checkpoints live: one place for every look at the storage."""

from __future__ import annotations

import os
import stat

from treegraft._errors import CheckpointError

__all__: list[str] = []


def _kind(path: str, what: str) -> str | None:
    """'dir', 'file' or None (absent) for path; an unreadable path is an error.

    `os.path.isdir` and `os.path.exists` say False on a permission error: a
    folder that exists but cannot be searched would pass for a missing one.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise CheckpointError(
            f"cannot read {what} {path!r}: {e.strerror or type(e).__name__}; fix its "
            "permissions (treegraft needs to list and read it)"
        ) from e
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def _listdir(path: str, what: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as e:
        raise CheckpointError(
            f"cannot list {what} {path!r}: {e.strerror or type(e).__name__}; fix its "
            "permissions (treegraft needs to list and read it)"
        ) from e
