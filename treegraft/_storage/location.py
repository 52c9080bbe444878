"""Where checkpoints live: one `Location` type for local folders, `gs://` and `s3://`.

Every look at the storage (does this exist, what is in this folder, the bytes
of this small file, the tensorstore kvstore of this folder) goes through a
`Location`. A local location uses the operating system directly (fast, and its
permission errors are precise); a remote one uses tensorstore's `gcs` and `s3`
kvstores, so reading needs neither gcsfs nor s3fs. Nothing here writes.

Endpoints come from the environment as the ecosystem sets them:
`TENSORSTORE_GCS_HTTP_URL` for GCS (tensorstore reads it itself; treegraft
also maps `STORAGE_EMULATOR_HOST` onto it), and `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` with `AWS_REGION` or `AWS_DEFAULT_REGION` for S3 (which
tensorstore does not read: treegraft passes them in the spec). Every remote
operation waits at most `timeout` seconds (default 30, or the environment's
`TREEGRAFT_STORAGE_TIMEOUT`) in `Location.wait`, then raises a
`CheckpointError` naming the location; a failure is translated once, in
`errors.translate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from treegraft._errors import CheckpointError, CheckpointNotFoundError, first_line
from treegraft._storage.errors import translate
from treegraft._storage.local import local_kind, not_regular, read_local

__all__ = ["Location", "default_timeout", "check_text", "children_of"]

_SCHEMES = ("gs", "s3")
_DEFAULT_TIMEOUT_S = 30.0


def default_timeout() -> float:
    """Seconds a remote operation may take: `TREEGRAFT_STORAGE_TIMEOUT`, else 30."""
    text = os.environ.get("TREEGRAFT_STORAGE_TIMEOUT")
    if not text:
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise CheckpointError(
            f"TREEGRAFT_STORAGE_TIMEOUT={text!r} is not a number of seconds"
        ) from None
    if not value > 0:
        raise CheckpointError(f"TREEGRAFT_STORAGE_TIMEOUT={text!r} must be positive")
    return value


class Location:
    """A folder or file of a checkpoint: a local path, or a key prefix in a bucket.

    Build one with `Location.parse`. Locations are immutable; `join` makes new
    ones. `str(location)` is the location as the user wrote it (a local path
    made absolute), extended by the names joined to it.

    Attributes:
      scheme: 'file', 'gs' or 's3'.
      bucket: the bucket of a remote location ('' for local).
      key: the local absolute path, or the object key prefix (no leading or
        trailing slash) in the bucket.
      timeout: seconds a remote operation may take.
    """

    __slots__ = ("scheme", "bucket", "key", "timeout", "_shown")

    def __init__(self, scheme: str, bucket: str, key: str, shown: str, timeout: float):
        self.scheme = scheme
        self.bucket = bucket
        self.key = key
        self.timeout = timeout
        self._shown = shown

    @classmethod
    def parse(cls, value: Any, *, timeout: float | None = None, what: str = "a checkpoint path"
              ) -> Location:
        """Parses a local path (str or PathLike, `~` expanded), `file://`, `gs://` or `s3://` URL.

        Raises:
          CheckpointError: value is not a str or PathLike, or an unknown or
            malformed URL.
        """
        if isinstance(value, Location):
            return value if timeout is None else value.with_timeout(timeout)
        if not isinstance(value, str | os.PathLike):
            raise CheckpointError(
                f"{what} must be a str or os.PathLike, got {type(value).__name__}: {value!r}"
            )
        text = os.fspath(value)
        if isinstance(text, bytes):
            raise CheckpointError(f"{what} must be a str or os.PathLike of str, got bytes")
        check_text(text, what)
        if timeout is None:
            timeout = default_timeout()
        elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise CheckpointError(f"timeout must be a positive number of seconds, got {timeout!r}")
        scheme, sep, rest = text.partition("://")
        if not sep or "/" in scheme or not scheme:
            path = os.path.abspath(os.path.expanduser(text))
            return cls("file", "", path, path, float(timeout))
        scheme = scheme.lower()
        if scheme == "file":
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise CheckpointError(
                    f"{text!r}: a file:// URL names a local path (file:///abs/path), "
                    f"not host {parts.netloc!r}"
                )
            path = os.path.abspath(unquote(parts.path) or "/")
            return cls("file", "", path, text.rstrip("/") or text, float(timeout))
        if scheme not in _SCHEMES:
            raise CheckpointError(
                f"{text!r}: unknown storage scheme {scheme!r}:// (treegraft reads local paths, "
                "file://, gs:// and s3:// URLs)"
            )
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise CheckpointError(f"{text!r} names no bucket: write {scheme}://BUCKET/path")
        _check_bucket(scheme, bucket, text)
        key = "/".join(p for p in key.split("/") if p)
        shown = f"{scheme}://{bucket}" + (f"/{key}" if key else "")
        return cls(scheme, bucket, key, shown, float(timeout))

    def with_timeout(self, timeout: float) -> Location:
        """The same location with another timeout."""
        return Location(self.scheme, self.bucket, self.key, self._shown, float(timeout))

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def name(self) -> str:
        """The last name of the location (a folder or file name)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *names: str) -> Location:
        """The location of names below this one."""
        parts = [n for name in names for n in name.split("/") if n]
        if not parts:
            return self
        tail = "/".join(parts)
        if self.is_local:
            key = os.path.join(self.key, *parts)
        else:
            key = f"{self.key}/{tail}" if self.key else tail
        return Location(self.scheme, self.bucket, key, f"{self._shown}/{tail}", self.timeout)

    def __str__(self) -> str:
        return self._shown

    def __repr__(self) -> str:
        return f"Location({self._shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.scheme, self.bucket, self.key) == (
            other.scheme, other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.scheme, self.bucket, self.key))

    @property
    def os_path(self) -> str:
        """The local path (only for local locations)."""
        if not self.is_local:
            raise CheckpointError(f"{self} is not a local path")
        return self.key

    def orbax_path(self) -> Any:
        """The location as orbax's restore takes it (an `etils.epath.Path`)."""
        from etils import epath

        if self.is_local:
            return epath.Path(self.key)
        if self.scheme == "s3":
            raise CheckpointError(
                f"orbax cannot read {self} (orbax has no S3 support); treegraft reads S3 "
                "checkpoints with tensorstore only, and this one holds a layout it does not "
                "know"
            )
        return epath.Path(f"gs://{self.bucket}/{self.key}")

    # -- tensorstore ---------------------------------------------------------

    def kvstore(self) -> dict[str, Any]:
        """The tensorstore kvstore spec of this location as a folder (path ends in '/').

        Raises:
          CheckpointError: the path holds a name that is not UTF-8 (a folder
            listed below a parsed location), which tensorstore cannot take.
        """
        check_text(self.key, "a path")
        if self.is_local:
            return {"driver": "file", "path": self.key.rstrip("/") + "/"}
        path = f"{self.key}/" if self.key else ""
        if self.scheme == "gs":
            return {"driver": "gcs", "bucket": self.bucket, "path": path}
        spec: dict[str, Any] = {"driver": "s3", "bucket": self.bucket, "path": path}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        return spec

    def context_spec(self) -> dict[str, Any]:
        """tensorstore context resources for this location: bounded retries."""
        if self.is_local:
            return {}
        # Retries of a failing request stop well within the timeout.
        retries = {"max_retries": 6, "initial_delay": "0.1s", "max_delay": "2s"}
        return {"gcs_request_retries": retries, "s3_request_retries": retries}

    def open_kvstore(self, context: Any = None, *, folder: bool = True,
                     shown: Location | None = None) -> Any:
        """The opened tensorstore kvstore of this folder: its keys are the names below it.

        Args:
          context: the tensorstore context to open it in (default: a new one
            with `context_spec`).
          folder: False to open this location as one key (b'') instead.
          shown: the location errors name (default: this one).

        Raises:
          CheckpointError: opening failed or stalled (`Location.wait`).
        """
        import tensorstore as ts

        _gcs_endpoint_from_env()
        spec = self.kvstore()
        if not folder:
            spec["path"] = spec["path"].rstrip("/")
        if context is None:
            context = ts.Context(self.context_spec())
        return self.wait(ts.KvStore.open(spec, context=context), "opening", shown=shown)

    def wait(
        self,
        future: Any,
        doing: str,
        *,
        shown: Location | None = None,
        explain: Callable[[Exception], CheckpointError | None] | None = None,
    ) -> Any:
        """The result of a tensorstore future about this location, within the timeout.

        Every wait of the read path goes through here, so that a server that
        stops answering is an error after `timeout` seconds, never a hang
        (docs/design.md section 11). A wait that times out cancels the future.

        Args:
          future: a tensorstore future.
          doing: what it does, for messages ("listing", "reading").
          shown: the location messages name (default: this one), e.g. the
            workdir the user gave rather than a folder inside it, or the file
            read in this folder.
          explain: turns a failure of the operation into a more precise error
            (e.g. a truncated file); None from it, or no explain, gives
            `errors.translate`'s.

        Raises:
          CheckpointError: the operation failed or took longer than the timeout
            (then `errors.stalled(error)` is true); the message names the
            location and what to check.
        """
        try:
            return future.result(timeout=self.timeout)
        except TimeoutError as e:
            try:
                future.cancel()
            except Exception:  # already done
                pass
            raise translate(e, self, doing, shown=shown) from e
        except Exception as e:  # tensorstore raises ValueError with a status code
            precise = explain(e) if explain is not None else None
            raise (precise or translate(e, self, doing, shown=shown)) from e

    # -- looking at the storage ---------------------------------------------

    def kind(self, what: str = "checkpoint") -> str | None:
        """'dir', 'file', or None when nothing is there.

        A remote location is a 'file' if an object has its key, a 'dir' if
        objects exist below it. A local one is what `local_kind` finds; a FIFO,
        device, socket or loop of symbolic links is an error, since opening it
        would block or read endless bytes.

        Raises:
          CheckpointError: the location cannot be looked at (permission
            denied, unreachable storage; `os.path.exists` would say False), or
            it is neither a regular file nor a folder.
        """
        if self.is_local:
            found = local_kind(self.key, what)
            if found in ("file", "dir"):
                return found
            if found in ("missing", "broken symlink"):
                return None
            raise not_regular(self.key, found, what)
        if self.key:
            found = self.wait(self.open_kvstore(folder=False).read(b""), "reading")
            if found.state == "value":
                return "file"
        return "dir" if self._keys(self.open_kvstore()) else None

    def _keys(self, kv: Any, shown: Location | None = None) -> list[str]:
        listed = self.wait(kv.list(), "listing", shown=shown)
        return sorted(k.decode("utf-8", "replace") for k in listed)

    def children(self, what: str = "folder") -> dict[str, str]:
        """{name: 'dir' or 'file'} of the entries directly in this folder.

        Raises:
          CheckpointNotFoundError: the folder does not exist (local).
          CheckpointError: it cannot be listed.
        """
        if self.is_local:
            try:
                with os.scandir(self.key) as it:
                    out = {}
                    for entry in it:
                        try:
                            out[entry.name] = "dir" if entry.is_dir() else "file"
                        except OSError:
                            out[entry.name] = "file"
                    return dict(sorted(out.items()))
            except (FileNotFoundError, NotADirectoryError):
                raise CheckpointNotFoundError(f"{what} {self.key!r} does not exist") from None
            except OSError as e:
                raise CheckpointError(
                    f"cannot list {what} {self.key!r}: {e.strerror or type(e).__name__}; fix "
                    "its permissions (treegraft needs to list and read it)"
                ) from e
        return children_of(self._keys(self.open_kvstore()))

    def keys(self, *, shown: Location | None = None) -> list[str]:
        """Every object key below this remote folder, relative to it, sorted.

        Args:
          shown: the location errors name (default: this one).
        """
        if self.is_local:
            raise CheckpointError(f"{self} is local: walk it with os")
        return self._keys(self.open_kvstore(shown=shown), shown)

    def listdir(self, what: str = "folder") -> list[str]:
        """The names of the entries directly in this folder, sorted."""
        return list(self.children(what))

    def read_bytes(self, what: str = "file") -> bytes:
        """The whole content of this (small) file.

        Raises:
          CheckpointNotFoundError: there is no such file.
          CheckpointError: it cannot be read.
        """
        if self.is_local:
            return read_local(self.key, what)
        found = self.wait(self.open_kvstore(folder=False).read(b""), "reading")
        if found.state != "value":
            raise CheckpointNotFoundError(f"{what} {self} does not exist")
        return bytes(found.value)


def check_text(text: str, what: str) -> None:
    """Refuses a path tensorstore cannot take: a NUL byte, or a name that is not UTF-8."""
    if "\x00" in text:
        raise CheckpointError(
            f"{what} {text!r} holds a NUL byte (\\x00), which no file or object name may "
            "hold: check how the path was built"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # os.fsdecode keeps bytes that are not UTF-8 as lone surrogates.
        bad = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise CheckpointError(
            f"{what} {text!r} is not valid UTF-8 (bytes {bad!r} at character {e.start}): "
            "tensorstore, which reads checkpoints, takes UTF-8 paths only; rename the folder, "
            "or link it under a UTF-8 name (ln -s)"
        ) from None


# The storage's rules for bucket names, for messages (tensorstore checks them).
_BUCKET_RULES = {
    "gs": "3-63 characters: lowercase letters, digits, '-', '_' and '.', starting and "
          "ending with a letter or digit",
    "s3": "3-63 characters: lowercase letters, digits, '-' and '.', starting and ending "
          "with a letter or digit",
}


def _check_bucket(scheme: str, bucket: str, text: str) -> None:
    """Refuses a bucket name the storage rejects, as tensorstore would when opening it."""
    import tensorstore as ts

    driver = "gcs" if scheme == "gs" else "s3"
    try:
        ts.KvStore.Spec({"driver": driver, "bucket": bucket})
    except Exception as e:  # tensorstore raises ValueError naming the rule broken
        _, reason = first_line(e, limit=200)
        raise CheckpointError(
            f"{text!r}: {bucket!r} is not a valid {scheme}:// bucket name ({reason}); "
            f"bucket names have {_BUCKET_RULES[scheme]}"
        ) from None


def children_of(keys: list[str]) -> dict[str, str]:
    """{name: 'dir' or 'file'} of the first names of object keys (relative to a folder)."""
    out: dict[str, str] = {}
    for key in keys:
        first, sep, _ = key.partition("/")
        if first:
            out[first] = "dir" if sep else out.get(first, "file")
    return dict(sorted(out.items()))


def _gcs_endpoint_from_env() -> None:
    """Lets tensorstore find a GCS emulator named by `STORAGE_EMULATOR_HOST` only."""
    if "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        if host:
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = (
                host if "://" in host else f"http://{host}"
            )
