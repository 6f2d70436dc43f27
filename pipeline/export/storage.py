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

What an export may replace there is :class:`ExportFolder`'s to decide: only
files an export wrote (recorded in its ``.captioner-export.json``), never an
indexed image, and a user's own file only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from typing import Iterable, Iterator

from pipeline.export.errors import ExportError
from pipeline.storage import Folder, StorageError, display, is_local, local_path, read_bytes
from pipeline.storage import join_location, name_of, parent_of


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
            return Folder(parent_of(location), self.options, role="output"), name_of(location)
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
        """Put the image at ``uri`` at ``location``: a copy, or with ``link`` a symlink (local only).

        Whatever is at ``location`` is replaced by a rename (never written
        through, never deleted first); :class:`ExportFolder` decides whether it may be.
        """
        if link and not (is_local(uri) and is_local(location)):
            raise ExportError("--link needs local images and a local --out; copy instead (drop --link)")
        if is_local(uri) and is_local(location):
            path = local_path(location)
            if not os.path.islink(path) and os.path.exists(path) and os.path.samefile(local_path(uri), path):
                return  # the image itself is already there (a link to it is replaced)
            if link:
                folder, file = self._place(location)
                folder.link(file, local_path(uri))
                return
            with self.open_write(location) as handle, open(local_path(uri), "rb") as source:
                shutil.copyfileobj(source, handle)
            return
        self.write(location, self.read(uri))

    def display(self, location: str) -> str:
        return display(location)


# ---- what an export may replace ------------------------------------------------------

MANIFEST = ".captioner-export.json"
OUT_IN_IMAGES_FLAG = "--allow-out-in-images"
SOURCE_IMAGE = "its place in --out is another indexed image, never replaced"

NEW, OURS, FOREIGN, SOURCE, SAME = "new", "ours", "foreign", "source", "same"


class ExportFolder:
    """The folder an export writes into, and which files there it may replace.

    An export never replaces or deletes a file it did not write:

      * an indexed image (any row of the index or Parquet, selected or not) is
        never replaced, whatever the flags: an image whose copy would land on
        another one is skipped (:data:`SOURCE_IMAGE`), and the very image
        itself (``--out`` is its folder) is left where it is;
      * every file an export writes is recorded, with its size and change
        marker (mtime locally, ETag on a bucket), in :data:`MANIFEST` in this
        folder; a file the manifest records unchanged is the export's own, and
        a re-export replaces it;
      * any other file at a destination is the user's: :meth:`prepare` refuses
        the export before anything is written unless ``overwrite``.

    With ``allow_in_images`` False (tree formats without the flag) a folder
    that holds indexed images is refused outright; None skips that check
    (single-file formats), which also need no recursive listing (``recursive``).
    """

    def __init__(self, storage: Storage, out: str, *, sources: Iterable[str], overwrite: bool, allow_in_images: bool | None,
                 recursive: bool = True):
        self.storage = storage
        self.recursive = recursive  # False: the export writes only directly into the folder (alt-text)
        self.out = out
        self.overwrite = overwrite
        try:
            self.folder = Folder(out, storage.options, role="output")
        except StorageError as exc:
            raise ExportError(str(exc)) from exc
        self._real: dict[str, str] = {}
        self._sources = {self._key(uri): uri for uri in sources}
        if allow_in_images is False:
            held = self._source_below()
            if held is not None:
                raise ExportError(
                    f"--out {display(out)} holds indexed images (e.g. {display(held)}); an export there would mix its "
                    f"copies with the originals, and a copy could land on another original. Pass an --out outside the "
                    f"images, or {OUT_IN_IMAGES_FLAG} to write there anyway (an indexed image is never replaced: one "
                    f"whose copy would land on another is skipped)"
                )
        self._manifest = self._read_manifest()
        self._listing = None if self.folder.local else self.folder.fingerprints(recursive=recursive)
        self._written: set[str] = set()

    # -- where things are ------------------------------------------------------------
    def location(self, rel: str) -> str:
        return join_location(self.out, rel)

    def _key(self, location: str) -> str:
        """One spelling per place: a local path with its folder's symlinks resolved (not the file's own), or a URL."""
        if is_local(location):
            head, tail = os.path.split(local_path(location))
            if head not in self._real:
                self._real[head] = os.path.realpath(head)
            return os.path.join(self._real[head], tail)
        protocol, rest = location.split("://", 1)
        return protocol.lower() + "://" + "/".join(p for p in rest.split("/") if p)

    def _source_below(self) -> str | None:
        """An indexed image inside this folder, if any."""
        if self.folder.local:
            base = os.path.realpath(self.folder.path).rstrip(os.sep) + os.sep
        else:
            base = self._key(self.out).rstrip("/") + "/"
        inside = sorted(uri for key, uri in self._sources.items() if key.startswith(base))
        return inside[0] if inside else None

    def _current(self, rel: str):
        if self._listing is not None:
            return self._listing.get(rel)
        try:
            return self.folder.fingerprint(rel, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def classify(self, rel: str, uri: str | None = None) -> str:
        """What is at ``rel`` now: NEW (nothing), OURS, FOREIGN, SOURCE (an indexed image) or SAME (``uri`` itself)."""
        key = self._key(self.location(rel))
        if key in self._sources:
            return SAME if uri is not None and self._key(uri) == key else SOURCE
        current = self._current(rel)
        if current is None:
            return NEW
        if rel in self._written or self._manifest.get(rel) == current:
            return OURS
        return FOREIGN

    # -- before writing --------------------------------------------------------------
    def prepare(self, rels: Iterable[str]) -> None:
        """Refuse the export, before anything is written, when a destination holds a file of the user's (unless --overwrite)."""
        if self.overwrite:
            return
        foreign = [rel for rel in dict.fromkeys(rels) if self.classify(rel) == FOREIGN]
        if foreign:
            more = f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else ""
            raise ExportError(
                f"{self.folder.display(foreign[0])}{more} already in --out {display(self.out)} and not written by a "
                f"captioner export (or changed since); the export would replace them. Move them away, choose another "
                f"--out, or pass --overwrite to replace them (indexed images are never replaced)"
            )

    def check_replace(self, rel: str) -> None:
        """Raise unless the export may write ``rel`` (nothing there, its own file, or --overwrite; never an indexed image)."""
        self._may_replace(rel, self.classify(rel))

    def _may_replace(self, rel: str, kind: str) -> None:
        if kind in (SOURCE, SAME):
            raise ExportError(f"{self.folder.display(rel)} is an indexed image; an export never replaces one: choose another --out")
        if kind == FOREIGN and not self.overwrite:
            raise ExportError(f"{self.folder.display(rel)} is not the export's own; move it away or pass --overwrite to replace it")

    # -- writing ---------------------------------------------------------------------
    def copy_image(self, uri: str, rel: str, *, link: bool) -> bool:
        """Copy (or link) the image to ``rel``; False when that place is another indexed image (left as it is)."""
        kind = self.classify(rel, uri)
        if kind == SAME:
            if not self.storage.exists(uri):
                raise FileNotFoundError(uri)
            return True  # --out is the image's own folder: it is already there
        if kind == SOURCE:
            return False
        self._may_replace(rel, kind)
        self.storage.copy_image(uri, self.location(rel), link=link)
        self._written.add(rel)
        return True

    @contextmanager
    def open_write(self, rel: str) -> Iterator:
        """A binary file to write ``rel`` through (Storage.open_write), recorded as the export's once published."""
        self._may_replace(rel, self.classify(rel))
        with self.storage.open_write(self.location(rel)) as handle:
            yield handle
        self._written.add(rel)

    def write(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as handle:
            handle.write(data)

    def saved(self, rels: Iterable[str]) -> None:
        """Record files written into the folder by someone on the export's behalf (datasets' save_to_disk)."""
        self._written.update(rels)

    # -- the manifest ----------------------------------------------------------------
    def _read_manifest(self) -> dict[str, tuple]:
        try:
            document = json.loads(self.folder.read_bytes(MANIFEST))
            return {str(rel): tuple(value) for rel, value in document["files"].items()}
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # none, or not readable: nothing here counts as the export's own

    def close(self) -> None:
        """Record what the export wrote (and what earlier exports wrote that is still unchanged) in the manifest."""
        if not self._written and not self._manifest:
            return
        listing = None if self.folder.local else self.folder.fingerprints(recursive=self.recursive)

        def now(rel):
            if listing is not None and not self.recursive and "/" in rel:
                return self._manifest.get(rel)  # below the folder: not listed, kept as recorded
            return listing.get(rel) if listing is not None else self._current(rel)

        files = {rel: old for rel, old in self._manifest.items() if rel not in self._written and now(rel) == old}
        for rel in self._written:
            current = now(rel)
            if current is not None:
                files[rel] = current
        if files == self._manifest:
            return  # nothing written, nothing changed: leave the folder alone
        from pipeline import __version__

        document = {
            "written_by": f"captioner {__version__} export",
            "about": "files a captioner export wrote here (size, mtime or ETag); a re-export may replace these, and no other file",
            "files": {rel: list(files[rel]) for rel in sorted(files)},
        }
        self.folder.write(MANIFEST, json.dumps(document, indent=1).encode("utf-8"))

    def __enter__(self) -> "ExportFolder":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise  # else the export's own error is the one to report
