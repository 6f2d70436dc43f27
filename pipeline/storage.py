"""The one place that opens storage: local paths and fsspec URLs, for sources and outputs.

Every filesystem the pipeline reads images from or writes Parquet to is opened
by :func:`open_filesystem`, and every backend error that means "the user must
fix something" (a backend package not installed, no credentials, no such
bucket, access refused, an endpoint that does not answer) is turned into a
:class:`StorageError` whose message names the fix, here and nowhere else.
Sources raise :class:`SourceError`, outputs :class:`OutputError`; both are
StorageErrors.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Literal

import fsspec

Role = Literal["source", "output"]

_FILE_PREFIX = "file://"

# fsspec loads these backends lazily; a missing one is an install problem, not a bad path.
_BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(Exception):
    """A source or output cannot be used; the message says how to fix it."""


class SourceError(StorageError):
    """The source as a whole cannot be listed or opened."""


class OutputError(StorageError, RuntimeError):
    """The output cannot be used as asked."""


def error_class(role: Role) -> type[StorageError]:
    return SourceError if role == "source" else OutputError


def is_local(uri: str) -> bool:
    return uri.startswith(_FILE_PREFIX) or "://" not in uri


def local_path(uri: str) -> str:
    """The absolute filesystem path of a local uri (plain path or file:// URL)."""
    if uri.startswith(_FILE_PREFIX):
        uri = uri[len(_FILE_PREFIX):]
    return os.path.abspath(os.path.expanduser(uri))


def protocol_of(uri: str) -> str:
    return "file" if is_local(uri) else uri.split("://", 1)[0].lower()


def install_hint(protocol: str) -> str:
    extra = _BACKEND_EXTRAS.get(protocol)
    return f"pip install 'captioner[{extra}]'" if extra else f"install the fsspec backend for {protocol}://"


def open_filesystem(
    uri: str, storage_options: dict[str, Any] | None = None, *, role: Role = "source"
) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and in-filesystem path for ``uri``.

    Raises SourceError / OutputError (by ``role``) when the backend for the
    URL's protocol is not installed or the URL is not one fsspec knows.
    """
    kind = error_class(role)
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as exc:
        protocol = protocol_of(uri)
        raise kind(
            f"cannot open {uri}: support for {protocol}:// is not installed; {install_hint(protocol)} ({exc})"
        ) from exc
    except ValueError as exc:
        raise kind(f"cannot open {uri}: {exc}; use a local path or a URL fsspec knows (s3://, gs://, ...)") from exc
    except TypeError as exc:  # an option the backend does not take
        raise kind(f"cannot open {uri}: {exc}; check the --storage-option names for {protocol_of(uri)}://") from exc


def explain(exc: BaseException, uri: str, *, doing: str, role: Role = "source") -> StorageError:
    """A StorageError for a backend failure while ``doing`` something with ``uri``, naming the fix.

    Backends raise their own types (botocore, google-auth, aiohttp ...); the
    class name and service error code are matched by name so that none of
    those packages has to be importable here.
    """
    kind = error_class(role)
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ImportError):
        protocol = protocol_of(uri)
        return kind(f"cannot {doing} {uri}: support for {protocol}:// is not installed; {install_hint(protocol)} ({exc})")
    names = {cls.__name__ for cls in type(exc).__mro__}
    code = str(service_error(exc).get("Code", ""))
    reason = _reason(exc)
    remote = not is_local(uri)
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"} or code in (
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    ):
        return kind(
            f"cannot {doing} {uri}: no valid credentials ({reason}). Fix: set credentials for {protocol_of(uri)}:// "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS), "
            "or pass --storage-option anon=true for a public bucket"
        )
    if code == "NoSuchBucket" or "NoSuchBucket" in str(exc) or (remote and "bucket does not exist" in str(exc).lower()):
        return kind(f"cannot {doing} {uri}: the bucket does not exist ({reason}). Fix: check the bucket name, and the region / endpoint_url given with --storage-option")
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "403", "AllAccessDisabled"):
        fix = "check the bucket policy, credentials and --storage-option values" if remote else "make it accessible to this user"
        return kind(f"cannot {doing} {uri}: access denied ({reason}). Fix: {fix}")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"}:
        return kind(
            f"cannot {doing} {uri}: the storage endpoint does not answer ({reason}). Fix: check the network and "
            "--storage-option endpoint_url"
        )
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return kind(f"cannot {doing} {uri}: {reason} (a parent of the path is a file, not a folder)")
    fix = "check the bucket name, credentials and --storage-option values" if remote else "check the path"
    return kind(f"cannot {doing} {uri}: {reason}. Fix: {fix}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def service_error(exc: BaseException | None) -> dict:
    """The botocore ``Error`` dict of the first exception in the cause chain that carries one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return response["Error"]
        exc = exc.__cause__ or exc.__context__
    return {}


# ---- reading one object --------------------------------------------------------------


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> bytes:
    """The file's bytes (at most ``max_bytes`` of them when given). Errors are the OSError subclasses open() raises."""
    size = -1 if max_bytes is None else max_bytes
    if is_local(uri):
        with open(local_path(uri), "rb") as handle:
            return handle.read(size)
    if max_bytes == 0:
        return b""
    fs, path = open_filesystem(uri, storage_options)
    try:
        # A ranged read from 0 is one GET; s3fs's open(), or cat_file() without
        # a range, first asks for the size (a HEAD): two requests per image.
        return fs.cat_file(path, start=0, end=max_bytes)
    except PermissionError as exc:
        raise _explain_refused_read(exc) from exc


def _explain_refused_read(exc: PermissionError) -> OSError:
    """A clearer error for a read the store refuses although access is allowed.

    S3 answers GET on an archived object (GLACIER / DEEP_ARCHIVE storage
    class) with 403 InvalidObjectState, which s3fs turns into PermissionError;
    "permission denied" would send the user after credentials instead.
    """
    error = service_error(exc)
    if error.get("Code") != "InvalidObjectState":
        return exc
    storage = error.get("StorageClass") or "an archive"
    return OSError(
        errno.EIO,
        f"the object is archived in storage class {storage} and must be restored before it can be read "
        f"(S3 InvalidObjectState)",
    )
