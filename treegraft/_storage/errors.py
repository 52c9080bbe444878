"""What a failed or stalled storage operation means: the translation, written once.

tensorstore reports a failure as a `ValueError` whose first line starts with a
status code (`NOT_FOUND: ...`, `PERMISSION_DENIED: ...`), followed by
kilobytes of spec and, for HTTP, the raw response body; a wait that runs out
of time raises a `TimeoutError` with no message. `translate` is the one place
that turns either into a `CheckpointError` naming the location, what was
being done, and the remedy for the cause (docs/design.md section 11);
`reason` is the storage's own words, for messages that name their own
context (a leaf, a file); `stalled` tells a timeout from any other failure.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from treegraft._errors import CheckpointError, CheckpointNotFoundError, first_line

if TYPE_CHECKING:
    from treegraft._storage.location import Location

__all__ = ["translate", "reason", "stalled", "endpoint_hint"]

# How much of the storage's message a translated error quotes.
_LINE_LIMIT = 300
# A tensorstore status line: an upper-case code, a colon, the message.
_STATUS = re.compile(r"[A-Z][A-Z_]+:")


def translate(error: BaseException, location: Location, doing: str, *,
              shown: Location | None = None) -> CheckpointError:
    """The `CheckpointError` for a failed or timed-out tensorstore operation.

    Args:
      error: what the operation raised (a `TimeoutError` for a wait that ran
        out of time).
      location: the location operated on; its scheme decides the remedy and
        its timeout is the one a stall ran out of.
      doing: what the operation did, for messages ("listing", "reading").
      shown: the location messages name (default: location).

    Returns:
      A stall (`stalled` is true of it once raised from error): what to check
      and how to wait longer. Refused credentials, a missing bucket or an
      unreachable remote storage: what to check. Anything else: the storage's
      own first line. A missing bucket is a `CheckpointNotFoundError`.
    """
    where = shown or location
    if isinstance(error, TimeoutError):
        return CheckpointError(
            f"{doing} {where} took more than {location.timeout:g} s: "
            f"{endpoint_hint(location)}; pass timeout= or set TREEGRAFT_STORAGE_TIMEOUT to "
            "wait longer"
        )
    line = _status_line(error)
    status = line.split(":", 1)[0].strip()
    if where.is_local:  # a local path has no credentials and no bucket
        if status == "PERMISSION_DENIED":
            return CheckpointError(
                f"{doing} {where} failed: permission denied; fix its permissions (treegraft "
                f"needs to list and read it). ({line})"
            )
    else:
        if status in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            fix = ("the credentials were refused: check them ("
                   + ("GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
                      "login`" if where.scheme == "gs" else
                      "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
                   + ") and that they may read this bucket")
            return CheckpointError(f"{doing} {where} failed: {fix}. ({line})")
        if status == "NOT_FOUND" or "NoSuchBucket" in line:
            return CheckpointNotFoundError(
                f"{doing} {where} failed: the bucket {where.bucket!r} does not exist "
                f"(or is not visible with these credentials). ({line})"
            )
    if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "UNKNOWN"):
        return CheckpointError(
            f"{doing} {where} failed: the storage could not be reached: "
            f"{endpoint_hint(where)}. ({line})"
        )
    return CheckpointError(f"{doing} {where} failed: {line}")


def reason(error: BaseException) -> str:
    """What the storage (or library) said about a failure, for a message that names its context.

    A stall is its whole message (the location, what to check, how to wait
    longer: a `TimeoutError` says nothing). Otherwise the first line of the
    root cause: a tensorstore status line as it is (`NOT_FOUND: ...`), any
    other error with its type name (`OSError: ...`).
    """
    root = _root(error)
    if stalled(error) or isinstance(root, CheckpointError):  # already in our words
        return str(error if stalled(error) else root)
    line = _status_line(root)
    if isinstance(root, ValueError) and _STATUS.match(line):
        return line
    return f"{type(root).__name__}: {line}"


def stalled(error: BaseException) -> bool:
    """Whether error is a wait of `Location.wait` that ran out of time.

    A fallback that catches a failed read to try another way must let a stall
    through: the other way waits on the same stalled storage, and a chain of
    timeouts would add up to many times the timeout.
    """
    if not isinstance(error, CheckpointError):
        return False
    # Wrappers that add a leaf or file name keep the stall as their cause.
    cause: BaseException | None = error
    while isinstance(cause, CheckpointError):
        cause = cause.__cause__
    return isinstance(cause, TimeoutError)


def endpoint_hint(location: Location) -> str:
    """What to check when the storage of location does not answer."""
    if location.scheme == "gs":
        url = os.environ.get("TENSORSTORE_GCS_HTTP_URL") or "https://storage.googleapis.com"
        return f"check the network and the endpoint {url} (TENSORSTORE_GCS_HTTP_URL)"
    if location.scheme == "s3":
        url = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
               or "AWS's default")
        return f"check the network, the endpoint {url} (AWS_ENDPOINT_URL) and AWS_REGION"
    return "check the disk"


def _root(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _status_line(error: BaseException) -> str:
    """The first line of error's root cause, without the HTTP body tensorstore appends."""
    _, line = first_line(error, limit=_LINE_LIMIT)
    return line.split(" [http_response", 1)[0]  # the raw body repeats the message
