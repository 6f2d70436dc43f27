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

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import SourceError, explain, is_local, local_path, modified_time, open_filesystem, read_bytes

log = logging.getLogger(__name__)

__all__ = [
    "SourceError", "SourceItem", "is_local", "list_images", "listing_covers", "local_path", "mtime_micros", "read_bytes",
    "stored_uri",
]


@dataclass(frozen=True)
class SourceItem:
    uri: str
    size: int | None
    # Seconds since the epoch, when the listing has it (local files, S3, GCS);
    # rows record it (source_mtime) and resume redoes a file whose size or
    # mtime differs from its row's. Not part of equality: two listings of the
    # same files are the same listing.
    mtime: float | None = field(default=None, compare=False)


def mtime_micros(mtime: float | None) -> int | None:
    """A listed mtime (epoch seconds) as whole microseconds: how ``source_mtime`` stores it and resume compares it."""
    return None if mtime is None else round(mtime * 1_000_000)


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


def listing_covers(source: str, *, extensions: tuple[str, ...]):
    """A test ``covers(uri)``: would a listing of ``source`` (these ``extensions``) give ``uri`` were the file there?

    What a rerun may record as gone when it is not listed: only rows of this
    source, so that an output that also holds another source's rows keeps
    them. ``uri`` as stored (:func:`stored_uri`).
    """
    source = os.fspath(source)
    wanted = frozenset(ext.lower() for ext in extensions)
    if is_local(source):
        root, separator = local_path(source).rstrip(os.sep) or os.sep, os.sep
    else:
        # Listed uris carry the protocol (fs.unstrip_protocol); so does a bucket source as the user names it.
        root, separator = source.rstrip("/"), "/"
    root = stored_uri(root)

    def covers(uri: str) -> bool:
        if uri == root:  # the source is this one file
            return True
        if not uri.startswith(root.rstrip(separator) + separator):
            return False
        relative = uri[len(root.rstrip(separator)) + 1:]
        return _has_extension(relative, wanted) and not any(part.startswith(".") for part in relative.split(separator))

    return covers


def _has_extension(name: str, wanted: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in wanted


def _list_local(root: str, wanted: frozenset[str]) -> list[SourceItem]:
    if os.path.isfile(root):
        # A file named explicitly is taken whatever its extension: the user asked for it.
        stat = os.stat(root)
        return [SourceItem(root, stat.st_size, stat.st_mtime)]
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
                    stat = entry.stat()
                    items.append(SourceItem(entry.path, stat.st_size, stat.st_mtime))
            except OSError as exc:
                log.warning("skipping %s: %s", entry.path, exc.strerror or exc)
        # Reversed so the stack pops folders in name order: which alias of a
        # doubly-linked folder wins is then the same on every run.
        pending.extend(reversed(subfolders))
    return items


def _list_remote(source: str, wanted: frozenset[str], storage_options: dict[str, Any] | None) -> list[SourceItem]:
    fs, root = open_filesystem(source, storage_options, role="source")
    # Listings cached by this (process-wide, shared) filesystem instance may be
    # older than the objects now in the store; isfile/exists would trust them.
    fs.invalidate_cache(root)
    try:
        if fs.isfile(root):
            info = fs.info(root)
            return [SourceItem(fs.unstrip_protocol(root), info.get("size"), modified_time(info))]
        if not fs.exists(root):
            raise SourceError(f"source {source} does not exist; check the bucket and prefix")
        found = fs.find(root, detail=True)
    except SourceError:
        raise
    except Exception as exc:  # backends raise their own types (auth, network, ...)
        raise explain(exc, source, doing="list", role="source", storage_options=storage_options) from exc

    prefix = root.rstrip("/") + "/"
    items = []
    for path, info in found.items():
        relative = path[len(prefix):] if path.startswith(prefix) else path
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        # "album.jpg/" is a zero-byte folder marker (S3 consoles create them), not an image.
        if path.endswith("/") or info.get("type", "file") != "file" or not _has_extension(path, wanted):
            continue
        items.append(SourceItem(fs.unstrip_protocol(path), info.get("size"), modified_time(info)))
    return items
