"""The bytes of a kvstore read of one file, checked: present, whole, and not rewritten.

A format reads a file of its folder in byte ranges (a header length, a header,
tensor bytes) through the folder's kvstore; `read_value` waits for one such
read (`Location.wait`, so within the timeout) and turns what can go wrong
with a file into a `CheckpointError` naming it: missing, shorter than the
range asked for, or rewritten since its first read (its storage generation
changed).
"""

from __future__ import annotations

import re
from typing import Any

from treegraft._errors import CheckpointError
from treegraft._storage.location import Location

__all__ = ["read_value"]

# tensorstore's message for a byte range past the end of a value.
_SIZE = re.compile(r"value of size (\d+)")


def read_value(
    future: Any,
    file: str,
    location: Location,
    what: str,
    *,
    bytes_wanted: int | None = None,
    generations: dict[str, bytes] | None = None,
    changed_since: str = "it was first read",
    changed_fix: str = "read it again",
) -> bytes:
    """The bytes of a kvstore read of file in the folder location, or a CheckpointError.

    Args:
      future: the read (`KvStore.read` of file, maybe of a byte range).
      file: the file's name in the folder.
      location: the folder: its timeout bounds the wait.
      what: what is read, for messages ("its header length").
      bytes_wanted: the file size the range needs (its end), to tell a
        truncated file from another failure.
      generations: {file: storage generation}; the file's is recorded on its
        first read and must be the same on every later one: a file rewritten
        since would otherwise give bytes that do not match what was read first.
      changed_since: when the file was first read, for messages.
      changed_fix: the remedy when the file has changed.

    Raises:
      CheckpointError: the read failed or stalled, the file is missing,
        truncated or rewritten; the message names the file.
    """
    where = location.join(file)

    def truncated(e: Exception) -> CheckpointError | None:
        message = str(e)
        size = _SIZE.search(message)
        if "OUT_OF_RANGE" in message and size is not None and bytes_wanted is not None:
            return CheckpointError(
                f"{where} is truncated or damaged: reading {what} needs "
                f"{bytes_wanted} bytes but the file has {size.group(1)}"
            )
        return None  # the storage layer's message (`errors.translate`)

    result = location.wait(future, f"reading {what} from", shown=where, explain=truncated)
    if result.state != "value":
        raise CheckpointError(
            f"{where} does not exist (reading {what}); was it moved or deleted?"
        )
    if generations is not None:
        seen = generations.setdefault(file, result.stamp.generation)
        if seen != result.stamp.generation:
            raise CheckpointError(
                f"{where} has changed since {changed_since} (reading {what}): {changed_fix}"
            )
    return bytes(result.value)
