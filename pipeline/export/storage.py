"""Where exported files go, and reading the images they describe.

Every place is a *location*: an absolute local path or an fsspec URL
(``s3://bucket/key``), read and written through the same storage code as the
pipeline (pipeline.storage: ``Folder``, ``read_bytes``). Local files are
written under the one temporary dot-name rule and renamed into place, so a
crash never leaves half a sidecar; on a bucket one PUT publishes a whole object.

Exports that lay out a tree (``--out DIR``) mirror the images' folders below
a root: ``--root`` when given, else the deepest folder that holds every image
of the index or Parquet (all rows, not only the selected ones, so a filter
never changes where a file lands).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterable

from pipeline.export.errors import ExportError
from pipeline.storage import Folder, StorageError, display, is_local, local_path, read_bytes


def join(base: str, relative: str) -> str:
    """``relative`` (a '/'-separated path) under ``base`` (a local folder or a URL prefix)."""
    if is_local(base):
        return os.path.join(local_path(base), *relative.split("/"))
    return base.rstrip("/") + "/" + relative


def parent(location: str) -> str:
    return os.path.dirname(local_path(location)) if is_local(location) else location.rsplit("/", 1)[0]


def name(location: str) -> str:
    return os.path.basename(local_path(location)) if is_local(location) else location.rsplit("/", 1)[-1]


def relative_paths(uris: Iterable[str], root: str | None = None, *, tree: Iterable[str] | None = None) -> dict[str, str]:
    """uri -> its path below ``root`` ('/'-separated), for mirroring the source tree.

    Without ``root``: below the deepest folder holding every uri of ``tree``
    (default: ``uris``). A uri not under an explicit ``root`` is an error naming it.
    """
    uris = list(uris)
    keyed = {uri: _parts(uri) for uri in uris}
    if root is not None:
        base = _parts(root.rstrip("/") + "/x")[:-1]
        outside = [u for u, parts in keyed.items() if parts[: len(base)] != base or len(parts) <= len(base)]
        if outside:
            raise ExportError(f"--root {root} does not contain {outside[0]} (and {len(outside) - 1} more); pass the folder the images are under")
    else:
        base = _common_folder([_parts(u) for u in tree] if tree is not None else list(keyed.values()))
    return {uri: "/".join(parts[len(base):]) for uri, parts in keyed.items()}


def _parts(uri: str) -> list[str]:
    if is_local(uri):
        return [p for p in local_path(uri).split(os.sep) if p]
    protocol, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        # A bucket key may legally hold "..": mirrored into a local --out it would climb out of it.
        raise ExportError(f"{uri}: a '.' or '..' path segment cannot be mirrored into --out; rename the object or leave it out with --where")
    return [protocol + ":"] + parts


def _common_folder(all_parts: list[list[str]]) -> list[str]:
    if not all_parts:
        return []
    common = all_parts[0][:-1]
    for parts in all_parts[1:]:
        folder = parts[:-1]
        n = 0
        while n < min(len(common), len(folder)) and common[n] == folder[n]:
            n += 1
        common = common[:n]
    return common


class Storage:
    """Reads and writes locations with one set of fsspec storage options, through pipeline.storage.Folder."""

    def __init__(self, storage_options: dict | None = None):
        self.options = storage_options or None

    def _place(self, location: str) -> tuple[Folder, str]:
        """(the Folder holding ``location``, its name there)."""
        try:
            return Folder(parent(location), self.options, role="output"), name(location)
        except StorageError as exc:
            raise ExportError(str(exc)) from exc

    def exists(self, location: str) -> bool:
        folder, file = self._place(location)
        return folder.exists(file)

    def read(self, location: str) -> bytes:
        """The bytes at ``location``, as the pipeline reads images (one GET on a bucket)."""
        return read_bytes(location, self.options)

    def write(self, location: str, data: bytes) -> None:
        folder, file = self._place(location)
        folder.write(file, data)

    @contextmanager
    def open_write(self, location: str):
        """A binary file to write ``location`` through; published whole when the block ends without error.

        Folder.open_write: locally a temporary dot-name renamed into place; on
        a bucket buffered in memory and stored with one PUT.
        """
        folder, file = self._place(location)
        with folder.open_write(file) as handle:
            yield handle

    def copy_image(self, uri: str, location: str, *, link: bool = False) -> None:
        """Put the image at ``uri`` at ``location``: a copy, or with ``link`` a symlink (local only)."""
        if link and not (is_local(uri) and is_local(location)):
            raise ExportError("--link needs local images and a local --out; copy instead (drop --link)")
        if is_local(uri) and is_local(location):
            path = local_path(location)
            if os.path.exists(path) and os.path.samefile(local_path(uri), path):
                return  # --out is the source folder: the image is already there
            if link:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if os.path.lexists(path):
                    os.unlink(path)
                os.symlink(local_path(uri), path)
                return
            if os.path.islink(path):
                os.unlink(path)  # never write through an old symlink into the source image
            with self.open_write(location) as handle, open(local_path(uri), "rb") as source:
                shutil.copyfileobj(source, handle)
            return
        self.write(location, self.read(uri))

    def display(self, location: str) -> str:
        return display(location)
