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
import fnmatch
import io
import os
import posixpath
import shutil
import time
import uuid
from datetime import datetime
from contextlib import contextmanager
from typing import Any, Literal

import fsspec

from pipeline import storage_limits
from pipeline.storage_limits import Limits, limits_of

Role = Literal["source", "output"]

_FILE_PREFIX = "file://"

# fsspec loads these backends lazily; a missing one is an install problem, not a bad path.
_BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(Exception):
    """A source or output cannot be used; the message says how to fix it.

    ``outage``: the storage itself failed (it stopped answering, refused the
    connection, or the disk is full), not the user's settings; rerunning the
    same command once it is back resumes (the CLI exits with
    pipeline.exit_codes.STORAGE_FAILED).
    """

    outage = False


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


def display(uri: str) -> str:
    """How a location is shown to the user: a local one as its absolute path, a URL as given."""
    return local_path(uri) if is_local(uri) else uri


def parent_of(location: str) -> str:
    """The folder holding a location: a local path's directory, a URL's prefix before its last '/'.

    A trailing '/' names the folder itself (``s3://b/out/`` -> ``s3://b``), as it does for
    ``name_of``; every "the folder beside a file" (leases, parts, exports, labels) asks here.
    """
    if is_local(location):
        return os.path.dirname(local_path(location))  # abspath already dropped a trailing separator
    return location.rstrip("/").rsplit("/", 1)[0]


def name_of(location: str) -> str:
    """The last component of a location (a file's name, or a folder's), without any trailing '/'."""
    if is_local(location):
        return os.path.basename(local_path(location))
    return location.rstrip("/").rsplit("/", 1)[-1]


def join_location(base: str, relative: str) -> str:
    """``relative`` (a '/'-separated path) under ``base`` (a local folder or a URL prefix)."""
    if is_local(base):
        return os.path.join(local_path(base), *relative.split("/"))
    return base.rstrip("/") + "/" + relative


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
        options, limits = storage_limits.backend_options(protocol_of(uri), storage_options)
    except storage_limits.LimitError as exc:
        raise kind(f"cannot open {uri}: {exc}") from exc
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        protocol = protocol_of(uri)
        raise kind(
            f"cannot open {uri}: support for {protocol}:// is not installed; {install_hint(protocol)} ({exc})"
        ) from exc
    except ValueError as exc:
        raise kind(f"cannot open {uri}: {exc}; use a local path or a URL fsspec knows (s3://, gs://, ...)") from exc
    except TypeError as exc:  # an option the backend does not take
        raise kind(f"cannot open {uri}: {exc}; check the --storage-option names for {protocol_of(uri)}://") from exc
    storage_limits.bound_backend_retries(fs, limits)
    return fs, path


# Exception class names (matched by name: none of these packages need be importable here)
# that mean the store did not answer in time or refused the connection: the storage is
# down or unreachable, not the file bad. botocore, aiohttp, fsspec and the builtins.
_UNAVAILABLE_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ServerTimeoutError", "ServerDisconnectedError", "FSTimeoutError",
    "ConnectionError", "TimeoutError",
})
# errno values that mean the disk (or quota) is full, or the filesystem became read-only.
_FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the storage timed out or refused the connection."""
    return any({cls.__name__ for cls in type(e).__mro__} & _UNAVAILABLE_NAMES for e in _chain(exc))


def is_full_disk(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk, a full quota or a read-only filesystem.

    pyarrow and DuckDB raise their own types with the OS text in the message."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_DISK_ERRNOS:
            return True
        text = str(e)
        if any(os.strerror(code) in text for code in _FULL_DISK_ERRNOS):
            return True
    return False


def full_disk_reason(exc: BaseException) -> str:
    """The OS's words for the full-disk error in ``exc`` (e.g. "No space left on device")."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_DISK_ERRNOS:
            return os.strerror(e.errno)
        for code in _FULL_DISK_ERRNOS:
            if os.strerror(code) in str(e):
                return os.strerror(code)
    return "no space left"


def full_disk_fix(exc: BaseException, where: str) -> str:
    """What to do about the full-disk error in ``exc`` at ``where``: free space, or make it writable."""
    if full_disk_reason(exc) == os.strerror(errno.EROFS):
        return f"make {where} writable again (it is on a read-only filesystem)"
    return f"free space on {where}"


def storage_limits_of(storage_options: dict[str, Any] | None) -> Limits:
    """How long a storage call is waited for with these options (pipeline.storage_limits)."""
    try:
        return limits_of(storage_options)
    except storage_limits.LimitError:
        return Limits()


def explain(exc: BaseException, uri: str, *, doing: str, role: Role = "source",
            storage_options: dict[str, Any] | None = None) -> StorageError:
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
    if remote and is_unavailable(exc):
        error = kind(f"cannot {doing} {uri}: {unavailable_reason(reason, storage_options)}. Fix: {UNAVAILABLE_FIX}")
        error.outage = True
        return error
    if is_full_disk(exc):
        error = kind(f"cannot {doing} {uri}: {full_disk_reason(exc)}. Fix: {full_disk_fix(exc, display(uri))} and rerun the same command")
        error.outage = True
        return error
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return kind(f"cannot {doing} {uri}: {reason} (a parent of the path is a file, not a folder)")
    fix = "check the bucket name, credentials and --storage-option values" if remote else "check the path"
    return kind(f"cannot {doing} {uri}: {reason}. Fix: {fix}")


UNAVAILABLE_FIX = "check that the store is up, the network and --storage-option endpoint_url, then rerun the same command"


def unavailable_reason(reason: str, storage_options: dict[str, Any] | None) -> str:
    """Why a store counts as down, with the endpoint and the deadline it was given (pipeline.storage_limits)."""
    return (f"the storage endpoint{_endpoint_of(storage_options)} did not answer ({reason}; "
            f"{storage_limits_of(storage_options).describe()})")


def _endpoint_of(storage_options: dict[str, Any] | None) -> str:
    endpoint = (storage_options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" {endpoint}" if endpoint else ""


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


# ---- one place for listing, atomic writes, moves and deletes -------------------------

# The one temporary-name rule: a dot-name in the destination's folder, so readers
# (which skip '.' and '_' names) never see it, and a rename within one folder
# publishes it. ``.NAME.tmp-<pid>-<random>``; cleanup matches TEMP_GLOB.
# Temporaries of older versions (``.NAME.tmp``, ``.NAME.captioner-tmp``) count too, so that
# cleanup removes what a killed writer of any version left.
TEMP_MARK = ".tmp-"
TEMP_GLOB = ".*tmp*"


def temp_name(name: str) -> str:
    """The temporary name ``name`` is written under before it is moved into place."""
    return f".{name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temp_name(name: str, of: str | None = None) -> bool:
    """Whether ``name`` is a temporary (of the file named ``of``, when given: ``.OF.tmp-...``, ``.OF.tmp``)."""
    if of is not None and not name.startswith((f".{of}{TEMP_MARK}", f".{of}.tmp", f".{of}.captioner-tmp")):
        return False
    return name.startswith(".") and (TEMP_MARK in name or name.endswith((".tmp", ".captioner-tmp")))


class Folder:
    """A folder (local path, file:// URL or bucket prefix) and the files below it.

    Modelled on datatrove's DataFolder: every path argument is relative to the
    folder ('/'-separated); ``display`` spells one for the user. Local writes go
    to a temporary dot-name (:func:`temp_name`) renamed into place; on a bucket
    one PUT publishes a whole object, so nothing is staged. On buckets
    "directories" are only key prefixes: nothing is created (s3fs's makedirs
    would create a missing *bucket*), and listings are never answered from
    the listings cache, which may predate writes by another process.
    Backend errors on open are StorageErrors of ``role`` (see open_filesystem).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, role: Role = "output"):
        self.uri = uri
        self.storage_options = storage_options or None
        self.role = role
        self.local = is_local(uri)
        if self.local:
            from fsspec.implementations.local import LocalFileSystem

            self.fs = LocalFileSystem()
            self.path = local_path(uri).rstrip(os.sep) or os.sep
        else:
            self.fs, path = open_filesystem(uri, storage_options, role=role)
            self.path = path.rstrip("/")

    # -- names -------------------------------------------------------------------
    def full(self, relative: str = "") -> str:
        """The in-filesystem path of ``relative`` (as fsspec and pyarrow take it)."""
        if not relative:
            return self.path
        if self.local:
            return os.path.join(self.path, *relative.split("/"))
        return posixpath.join(self.path, relative)

    def join(self, relative: str) -> str:
        """The uri of ``relative`` below this folder (a local path or a URL)."""
        return self.display(relative)

    def display(self, relative: str = "") -> str:
        """How the user spells ``relative``: an absolute local path, or a URL with its protocol."""
        full = self.full(relative)
        return full if self.local else self.fs.unstrip_protocol(full)

    def folder(self, relative: str) -> "Folder":
        return Folder(self.join(relative), self.storage_options, role=self.role)

    def relative(self, full: str) -> str:
        """``full`` (an in-filesystem path below the folder) relative to it."""
        prefix = self.path.rstrip("/" if not self.local else os.sep)
        rel = full[len(prefix):].lstrip("/" if not self.local else os.sep)
        return rel.replace(os.sep, "/") if self.local else rel

    # -- reading -----------------------------------------------------------------
    def forget_listings(self, relative: str = "") -> None:
        # s3fs answers ls/isfile from listings it cached, and fsspec shares one
        # filesystem instance per set of options across the whole process.
        if not self.local:
            self.fs.invalidate_cache(self.full(relative))

    def list(self, pattern: str | None = None, *, recursive: bool = False, include_hidden: bool = False) -> list[str]:
        """Files below the folder, relative and sorted; ``pattern`` matches the file name (fnmatch, literal folders).

        Names starting with '.' or '_' (temporaries, side files) are left out
        unless ``include_hidden``. A missing folder lists nothing.
        """
        self.forget_listings()
        try:
            if recursive:
                found = self.fs.find(self.path, withdirs=False)
            else:
                found = [e["name"] for e in self.fs.ls(self.path, detail=True) if e.get("type") == "file"]
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for full in found:
            rel = self.relative(full)
            if not rel:
                continue
            name = rel.rsplit("/", 1)[-1]
            if not include_hidden and any(p.startswith((".", "_")) for p in rel.split("/")):
                continue
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            out.append(rel)
        return sorted(out)

    def exists(self, relative: str = "") -> bool:
        if self.local:
            return os.path.lexists(self.full(relative))
        self.forget_listings(relative)
        return self.fs.exists(self.full(relative))

    def isfile(self, relative: str = "") -> bool:
        self.forget_listings(relative)
        return self.fs.isfile(self.full(relative))

    def isdir(self, relative: str = "") -> bool:
        self.forget_listings(relative)
        return self.fs.isdir(self.full(relative))

    def info(self, relative: str = "") -> dict:
        self.forget_listings(relative)
        return self.fs.info(self.full(relative))

    def read_bytes(self, relative: str = "", max_bytes: int | None = None) -> bytes:
        return read_bytes(self.join(relative), self.storage_options, max_bytes)

    def open_read(self, relative: str = ""):
        return self.fs.open(self.full(relative), "rb")

    # -- writing -----------------------------------------------------------------
    def makedirs(self, relative: str = "") -> None:
        """Create the folder (locally; on a bucket a prefix exists once a key under it does)."""
        if self.local:
            os.makedirs(self.full(relative), exist_ok=True)

    @contextmanager
    def open_write(self, relative: str):
        """A binary file to write ``relative`` through, published whole when the block ends without error.

        Local: a temporary dot-name (:func:`temp_name`) beside it, renamed into
        place; removed on failure. Bucket: buffered in memory and stored with one
        PUT (a streamed upload would publish a partial object when writing fails,
        and pyarrow closes files even on error).
        """
        if not self.local:
            buffer = io.BytesIO()
            yield buffer
            self.fs.pipe_file(self.full(relative), buffer.getvalue())
            return
        final = self.full(relative)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, temp_name(os.path.basename(final)))
        try:
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, final)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    @contextmanager
    def open_staged(self, relative: str):
        """A streamed write of a large file: written to a temporary dot-name, then moved into place.

        Unlike :meth:`open_write` nothing is buffered in memory; on a bucket the
        temporary object is copied server-side to its name, then deleted.
        """
        final = self.full(relative)
        sep = os.sep if self.local else "/"
        parent, name = final.rsplit(sep, 1) if sep in final else ("", final)
        tmp = (parent + sep if parent else "") + temp_name(name)
        if self.local and parent:
            os.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as handle:
                yield handle
            self._move_full(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)

    def write(self, relative: str, data: bytes) -> None:
        with self.open_write(relative) as handle:
            handle.write(data)

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Create ``relative`` holding ``data`` only if nothing is there; False when something is.

        Local: written under a temporary name, then hard-linked into place
        (link fails if the name exists, and readers never see a partial file).
        Buckets: the store's conditional create (fsspec ``mode="create"``: S3
        ``If-None-Match: *``, GCS ``ifGenerationMatch=0``). A backend without
        one falls back to check, write, read back and compare: best effort.
        """
        final = self.full(relative)
        if self.local:
            parent = os.path.dirname(final)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, temp_name(os.path.basename(final)))
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        try:
            self.fs.pipe_file(final, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # S3 answers a lost race with 412 PreconditionFailed / 409 ConditionalRequestConflict
            if "precondition" in str(exc).lower().replace("-", "") or "conflict" in str(exc).lower():
                return False
            raise
        except (TypeError, NotImplementedError, ValueError):  # no conditional create in this backend
            if self.exists(relative):
                return False
            self.fs.pipe_file(final, data)
            return self.read_bytes(relative) == data

    def link(self, relative: str, target: str) -> None:
        """Make ``relative`` a symlink to the local path ``target`` (local folders only).

        Created under a temporary dot-name and renamed into place: whatever was
        at ``relative`` (a file, an older link) is replaced, never written through.
        """
        if not self.local:
            raise OutputError(f"cannot link {self.display(relative)}: symlinks need a local folder")
        final = self.full(relative)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, temp_name(os.path.basename(final)))
        try:
            os.symlink(target, tmp)
            os.replace(tmp, final)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def move(self, source: str, target: str) -> None:
        """Move ``source`` to ``target`` (both relative): a rename locally, a server-side copy + delete on a bucket."""
        self._move_full(self.full(source), self.full(target))

    def copy(self, source: str, target: str) -> None:
        """Copy ``source`` to ``target`` (both relative; ``target`` is overwritten, not published atomically:
        give it a temporary name and :meth:`move` it)."""
        if self.local:
            shutil.copyfile(self.full(source), self.full(target))
            return
        self.fs.cp_file(self.full(source), self.full(target))

    def _move_full(self, source: str, target: str) -> None:
        if self.local:
            os.replace(source, target)
            return
        # cp_file and rm_file, not mv: mv expands glob characters in the key.
        self.fs.cp_file(source, target)
        self.fs.rm_file(source)

    def delete(self, relative: str) -> None:
        # rm_file, not rm: fsspec's rm expands glob characters, so on a bucket
        # "run[1]/part-x.parquet" would match nothing (or another key).
        self.fs.rm_file(self.full(relative))

    def remove_empty(self, relative: str = "") -> None:
        """Remove the (local) folder if it is empty; on a bucket a prefix goes with its last key."""
        if self.local:
            try:
                os.rmdir(self.full(relative))
            except OSError:
                pass

    def cleanup_temp_files(self, relative: str = "", *, older_than: float | None = None,
                           of: tuple[str, ...] | None = None) -> list[str]:
        """Delete the temporaries (:func:`temp_name`) a killed writer left directly in the folder ``relative``.

        ``older_than`` (seconds): only those not modified for that long (another
        writer may be using a fresh one). ``of``: only temporaries of these file
        names (in a folder the user shares with us). Returns the relative paths deleted.
        """
        folder = self.folder(relative) if relative else self
        gone = []
        for rel in folder.list(TEMP_GLOB, include_hidden=True):
            if "/" in rel or not (is_temp_name(rel) if of is None else any(is_temp_name(rel, name) for name in of)):
                continue
            if older_than is not None:
                try:
                    mtime = modified_time(folder.info(rel))
                except FileNotFoundError:
                    continue
                if mtime is not None and time.time() - mtime < older_than:
                    continue
            try:
                folder.delete(rel)
            except FileNotFoundError:
                continue
            gone.append(posixpath.join(relative, rel) if relative else rel)
        return gone

    def fingerprint(self, relative: str = "", *, follow_symlinks: bool = True) -> tuple[int, int | str]:
        """(size, change marker) of a file: the mtime in ns locally, the ETag / mtime on a bucket.

        ``follow_symlinks=False``: a local symlink's own (the link, not its target).
        """
        if self.local:
            st = os.stat(self.full(relative), follow_symlinks=follow_symlinks)
            return st.st_size, st.st_mtime_ns
        return _info_fingerprint(self.info(relative))

    def fingerprints(self, *, recursive: bool = True) -> dict[str, tuple[int, int | str]]:
        """Every file below the folder (or, not ``recursive``, directly in it), hidden ones too,
        relative -> :meth:`fingerprint` (symlinks as themselves). One listing on a bucket; a missing folder has none.
        """
        out: dict[str, tuple[int, int | str]] = {}
        if self.local:
            for parent, _, files in os.walk(self.path):
                if not recursive and parent != self.path:
                    break
                for file in files:
                    full = os.path.join(parent, file)
                    try:
                        st = os.lstat(full)
                    except FileNotFoundError:
                        continue
                    out[self.relative(full)] = (st.st_size, st.st_mtime_ns)
            return out
        self.forget_listings()
        try:
            if recursive:
                found = self.fs.find(self.path, withdirs=False, detail=True)
            else:
                found = {e["name"]: e for e in self.fs.ls(self.path, detail=True) if e.get("type") == "file"}
        except (FileNotFoundError, NotADirectoryError):
            return out
        for full, info in found.items():
            rel = self.relative(full)
            if rel:
                out[rel] = _info_fingerprint(info)
        return out


def _info_fingerprint(info: dict) -> tuple[int, str]:
    marker = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info.get("size") or 0), str(marker)


def modified_time(info: dict) -> float | None:
    """Modification time from a listing entry, in epoch seconds; None when the backend gives none.

    s3fs says LastModified (a datetime), gcsfs "updated" (ISO text), local
    and memory filesystems "mtime"/"created" (epoch seconds or a datetime).
    """
    for key in ("LastModified", "mtime", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
