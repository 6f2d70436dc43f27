"""Listing input images and reading their bytes, from a local folder or any fsspec URL.

Local sources are walked with ``os.scandir`` (one ``stat`` per matching file, no
more) and yield absolute paths; remote sources (``s3://``, ``gs://``,
``memory://`` ...) are listed through fsspec and keep their protocol in the uri.
``file://`` URLs count as local. Hidden files and hidden folders (name starting
with ".") are skipped on both sides.

On object stores a listing always asks the store (never s3fs's listings cache,
which may predate the latest uploads), "folder" marker keys ending in "/" are
not images, and a whole object is read with one GET.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

import fsspec

log = logging.getLogger(__name__)

_FILE_PREFIX = "file://"

# Backends fsspec loads lazily; a missing one is an install problem, not a bad path.
_BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


@dataclass(frozen=True)
class SourceItem:
    uri: str
    size: int | None


class SourceError(Exception):
    """The source as a whole cannot be listed; the message says how to fix it."""


def is_local(uri: str) -> bool:
    return uri.startswith(_FILE_PREFIX) or "://" not in uri


def local_path(uri: str) -> str:
    """The absolute filesystem path of a local uri (plain path or file:// URL)."""
    if uri.startswith(_FILE_PREFIX):
        uri = uri[len(_FILE_PREFIX):]
    return os.path.abspath(os.path.expanduser(uri))


def stored_uri(uri: str) -> str:
    """The uri as written to Parquet: always valid UTF-8.

    A file name that is not UTF-8 lists as a str with surrogate escapes, which
    open() accepts but Parquet cannot store. Those bytes are written as \\xNN
    instead; the mapping is deterministic, so resume matches it again.
    """
    try:
        uri.encode("utf-8")
        return uri
    except UnicodeEncodeError:
        return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and in-filesystem path for ``uri``; SourceError when the backend is missing."""
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as exc:
        protocol = uri.split("://", 1)[0]
        extra = _BACKEND_EXTRAS.get(protocol)
        hint = f"pip install 'captioner[{extra}]'" if extra else "install the fsspec backend for it"
        raise SourceError(f"cannot open {uri}: support for {protocol}:// is not installed; {hint} ({exc})") from exc
    except ValueError as exc:
        raise SourceError(f"cannot open {uri}: {exc}; use a local path or a URL fsspec knows (s3://, gs://, ...)") from exc


def list_images(
    source: str,
    *,
    extensions: tuple[str, ...],
    storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> list[SourceItem]:
    """Every image under ``source``, sorted by uri; the first ``limit`` of them when given."""
    source = os.fspath(source)
    wanted = frozenset(ext.lower() for ext in extensions)
    if is_local(source):
        items = _list_local(local_path(source), wanted)
    else:
        items = _list_remote(source, wanted, storage_options)
    items.sort(key=lambda item: item.uri)
    return items if limit is None else items[:limit]


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> bytes:
    """The file's bytes (at most ``max_bytes`` of them when given). Errors are the OSError subclasses open() raises."""
    size = -1 if max_bytes is None else max_bytes
    if is_local(uri):
        with open(local_path(uri), "rb") as handle:
            return handle.read(size)
    if max_bytes == 0:
        return b""
    fs, path = open_fs(uri, storage_options)
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
    error = _service_error(exc)
    if error.get("Code") != "InvalidObjectState":
        return exc
    storage = error.get("StorageClass") or "an archive"
    return OSError(
        errno.EIO,
        f"the object is archived in storage class {storage} and must be restored before it can be read "
        f"(S3 InvalidObjectState)",
    )


def _service_error(exc: BaseException | None) -> dict:
    """The botocore ``Error`` dict of the first exception in the cause chain that carries one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return response["Error"]
        exc = exc.__cause__
    return {}


def _has_extension(name: str, wanted: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in wanted


def _list_local(root: str, wanted: frozenset[str]) -> list[SourceItem]:
    if os.path.isfile(root):
        # A file named explicitly is taken whatever its extension: the user asked for it.
        return [SourceItem(root, os.path.getsize(root))]
    if not os.path.exists(root):
        raise SourceError(f"source {root} does not exist; check the path (relative paths are from {os.getcwd()})")
    if not os.path.isdir(root):
        raise SourceError(f"source {root} is neither a file nor a directory; pass an image folder or file")

    items: list[SourceItem] = []
    # Real paths of folders already walked: a symlink back up the tree (a loop)
    # or a second link to the same folder is walked once.
    seen: set[str] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            if folder == root:
                raise SourceError(f"cannot list {root}: {exc.strerror or exc}; make it readable by this user") from exc
            log.warning("skipping folder %s: %s", folder, exc.strerror or exc)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                # is_dir/is_file follow symlinks; a dangling link is neither.
                if entry.is_dir():
                    subfolders.append(entry.path)
                elif entry.is_file() and _has_extension(entry.name, wanted):
                    items.append(SourceItem(entry.path, entry.stat().st_size))
            except OSError as exc:
                log.warning("skipping %s: %s", entry.path, exc.strerror or exc)
        # Reversed so the stack pops folders in name order: which alias of a
        # doubly-linked folder wins is then the same on every run.
        pending.extend(reversed(subfolders))
    return items


def _list_remote(source: str, wanted: frozenset[str], storage_options: dict[str, Any] | None) -> list[SourceItem]:
    fs, root = open_fs(source, storage_options)
    # Listings cached by this (process-wide, shared) filesystem instance may be
    # older than the objects now in the store; isfile/exists would trust them.
    fs.invalidate_cache(root)
    try:
        if fs.isfile(root):
            return [SourceItem(fs.unstrip_protocol(root), fs.size(root))]
        if not fs.exists(root):
            raise SourceError(f"source {source} does not exist; check the bucket and prefix")
        found = fs.find(root, detail=True)
    except SourceError:
        raise
    except Exception as exc:  # backends raise their own types (auth, network, ...)
        raise SourceError(
            f"cannot list {source}: {type(exc).__name__}: {exc}; check credentials, endpoint and --storage-option values"
        ) from exc

    prefix = root.rstrip("/") + "/"
    items = []
    for path, info in found.items():
        relative = path[len(prefix):] if path.startswith(prefix) else path
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        # "album.jpg/" is a zero-byte folder marker (S3 consoles create them), not an image.
        if path.endswith("/") or info.get("type", "file") != "file" or not _has_extension(path, wanted):
            continue
        items.append(SourceItem(fs.unstrip_protocol(path), info.get("size")))
    return items
