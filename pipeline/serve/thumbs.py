"""Thumbnails made on demand from the original images, cached on disk with a size bound.

Originals are read and decoded by the pipeline's own code
(pipeline.decode.load_image: local paths and fsspec buckets, the pixel-count
guard, EXIF orientation, any colour mode to RGB, JPEG draft decoding), asked
for a long side of ``side`` pixels, then stored as JPEG.

Cache entries are keyed by (uri, image_id, side): image_id is the sha256 of
the original's bytes, so a changed file gets a new entry and an entry never
goes stale. The cache evicts the least recently used files (by mtime, bumped
on every hit) once it grows past ``max_bytes``. An original that cannot be
read or decoded gives ``None``; the caller serves a placeholder and nothing is
cached, so the thumbnail appears once the file is back.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DecodeConfig
from pipeline.decode import load_image
from pipeline.storage import Folder, temp_name

log = logging.getLogger(__name__)

SIDES = {"s": 320, "l": 1280}  # grid thumbnail, image-view preview (long side, pixels)
DEFAULT_MAX_BYTES = 512 * 2**20
_FORMAT_VERSION = "1"  # bump when the encoding below changes, so old entries are not reused
_JPEG_QUALITY = 82
# After an eviction the cache is this fraction of its bound, so evictions are rare.
_LOW_WATER = 0.9


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    etag: str  # strong ETag, quoted


def cache_key(uri: str, image_id: str | None, side: int) -> str:
    return hashlib.sha256(f"{_FORMAT_VERSION}\0{uri}\0{image_id or ''}\0{side}".encode()).hexdigest()


def default_cache_dir(index_path: Path) -> Path:
    """Beside the index: ``out/index.duckdb`` -> ``out/index.duckdb.thumbs/``."""
    return index_path.with_name(index_path.name + ".thumbs")


class ThumbnailCache:
    def __init__(
        self,
        root: Path | None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        storage_options: dict[str, Any] | None = None,
        max_pixels: int = DecodeConfig().max_pixels,
    ):
        self.max_bytes = int(max_bytes)
        self.storage_options = storage_options
        self.max_pixels = max_pixels
        self.root = self._usable(root) if root is not None and self.max_bytes > 0 else None
        self._folder = Folder(str(self.root)) if self.root is not None else None
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}
        # Decoding is CPU and memory bound: no more at once than there are cores,
        # however many requests the server's thread pool lets in.
        self._decoders = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
        self._total = self._scan_total() if self.root else 0
        # Use order of the entries touched by this process (file mtimes are too
        # coarse to order requests milliseconds apart); older entries by mtime.
        self._used: dict[Path, int] = {}
        self._clock = 0
        self.generated = 0  # thumbnails decoded from originals since start (for the bench and tests)

    @staticmethod
    def _usable(root: Path) -> Path | None:
        try:
            folder = Folder(str(root))
            folder.makedirs()
            probe = temp_name("write-probe")
            folder.write(probe, b"")
            folder.delete(probe)
            folder.cleanup_temp_files(older_than=3600)  # left by a process killed while writing
            return root
        except OSError as exc:
            log.warning("thumbnail cache %s is not writable (%s); thumbnails will be made on every request", root, exc)
            return None

    # -- public ------------------------------------------------------------------

    def get(self, uri: str, image_id: str | None, side: int) -> Thumbnail | None:
        """The JPEG thumbnail of ``uri`` with long side <= ``side``, or None if the original is unusable."""
        key = cache_key(uri, image_id, side)
        cached = self._read(key)
        if cached is not None:
            return cached
        with self._key_lock(key):  # two requests for one new thumbnail decode the original once
            try:
                cached = self._read(key)
                if cached is not None:
                    return cached
                data = self._make(uri, side)
                if data is None:
                    return None
                self._write(key, data)
                return Thumbnail(data, _etag(key))
            finally:
                with self._lock:
                    self._making.pop(key, None)

    @property
    def total_bytes(self) -> int:
        return self._total

    # -- making ------------------------------------------------------------------

    def _make(self, uri: str, side: int) -> bytes | None:
        config = DecodeConfig(max_pixels=self.max_pixels, model_max_side=side)
        try:
            with self._decoders:
                decoded = load_image(uri, config, self.storage_options)
        except Exception as exc:  # noqa: BLE001 - load_image turns read/decode failures into results; anything else still must not 500
            log.warning("thumbnail for %s failed: %s", uri, exc)
            return None
        if not decoded.ok:
            log.info("no thumbnail for %s: %s", uri, decoded.error)
            return None
        out = io.BytesIO()
        decoded.image.save(out, "JPEG", quality=_JPEG_QUALITY, optimize=True, progressive=True)
        self.generated += 1
        return out.getvalue()

    # -- the disk cache ----------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.jpg"

    def _read(self, key: str) -> Thumbnail | None:
        if self.root is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used, for the next process too
        except OSError:
            return None
        self._touch(path)
        return Thumbnail(data, _etag(key))

    def _touch(self, path: Path) -> None:
        with self._lock:
            self._clock += 1
            self._used[path] = self._clock

    def _write(self, key: str, data: bytes) -> None:
        if self.root is None:
            return
        path = self._path(key)
        try:
            # pipeline.storage's atomic write: readers see the whole file or none.
            self._folder.write(f"{key[:2]}/{key}.jpg", data)
        except OSError as exc:
            log.warning("cannot cache thumbnail %s: %s", path, exc)
            return
        self._touch(path)
        with self._lock:
            self._total += len(data)
            over = self._total > self.max_bytes
        if over:
            self._evict()

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._making.setdefault(key, threading.Lock())

    def _entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.endswith(".jpg") and not entry.name.startswith("."):
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    found.append((st.st_mtime, st.st_size, Path(entry.path)))
        return found

    def _scan_total(self) -> int:
        total = sum(size for _, size, _ in self._entries())
        return total

    def _evict(self) -> None:
        with self._lock:
            entries = self._entries()
            # Least recently used first: entries this process never touched (by
            # mtime), then the ones it did, in the order it last used them.
            entries.sort(key=lambda e: (1, self._used[e[2]], 0.0) if e[2] in self._used else (0, 0, e[0]))
            total = sum(size for _, size, _ in entries)
            target = self.max_bytes * _LOW_WATER
            for _, size, path in entries:
                if total <= target:
                    break
                try:
                    self._folder.delete(path.relative_to(self.root).as_posix())
                except OSError:
                    continue
                self._used.pop(path, None)
                total -= size
            self._total = total


def _etag(key: str) -> str:
    return f'"{key[:32]}"'
