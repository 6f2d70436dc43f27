"""The vector file: an index's embeddings laid out for scanning, beside the DuckDB catalogue.

One file pair per index generation, in the index's folder (pipeline.search.contract
names it and the catalogue points at it):

  ``<db name>.vectors-<token>``       header, then the *high* halves
  ``<db name>.vectors-<token>.low``   the *low* halves, nothing else

  header   HEADER_BYTES: MAGIC, then JSON (format, dim, dtype, count, model,
           revision) padded with spaces; checked on open.
  halves   ``count`` rows of ``dim`` uint16, row-major, row = *slot*, in each
           file: the top and the bottom 16 bits of each float32 value.

Each float32 is kept whole, split in two planes: its high half is its
bfloat16 truncation, so the exact scan (pipeline.search.scan) reads half the
bytes of a float32 matrix in a first, approximate pass over the high plane and
then reads both halves of the few rows that pass to score them exactly. On a
2-core machine the scan is memory-bound: float32 at about 14-15 GB/s per
core, the speed of numpy's own product; no float32 layout reads fewer bytes.
Joining the two halves (``join``) gives back the raw float32 values
bit for bit, which is what ``captioner sql`` returns for ``embedding``.

The catalogue's ``vector_slots`` table maps index ids to slots (with the
vector's norm and its ANN list); a slot no id points at is dead (its row was
replaced or removed). The files only grow between compactions: an update
appends the new rows after the last committed slot in both files, rewrites the
header's count, then publishes a new catalogue that points at more slots.
Readers take the slot count from their catalogue, never from the files'
lengths, so a reader of the old catalogue reads exactly the old slots while an
update appends, and an update killed half-way leaves slots that no catalogue
points at (the next update cuts them off before appending). A fresh build or a
compaction writes a new pair under a new name (Folder's temporary-name rule),
so a reader of the old generation keeps its old files.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.search.errors import SearchError

MAGIC = b"CAPTIONER-VECTORS\n"
# 1: one float32 matrix after the header. 2: float32 split into a high and a low plane (two files).
VECTOR_FORMAT = 2
HEADER_BYTES = 4096
DTYPE = "float32"  # what the two planes hold together
HALF = np.dtype(np.uint16)
LOW_SUFFIX = ".low"


@dataclass(frozen=True)
class VectorHeader:
    format: int
    dim: int
    dtype: str
    count: int  # rows written to the files (>= the slots a catalogue points at)
    model: str | None
    revision: str | None

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True).encode()
        data = MAGIC + body
        if len(data) > HEADER_BYTES - 1:
            raise SearchError("the embedding model's name is too long for the vector file header")
        return data + b" " * (HEADER_BYTES - len(data) - 1) + b"\n"


def split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) uint16 halves of float32 ``rows``: high is each value's bfloat16 truncation."""
    bits = np.ascontiguousarray(rows, dtype=DTYPE).view(np.uint32)
    return (bits >> 16).astype(HALF), (bits & 0xFFFF).astype(HALF)


def join(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """The float32 values whose halves are ``high`` and ``low`` (bit for bit)."""
    bits = high.astype(np.uint32)
    bits <<= 16
    bits |= low
    return bits.view(np.float32)


def vector_file_name(db_name: str) -> str:
    """A new generation's vector file name (unique: a reader of the old generation keeps its files)."""
    return f"{db_name}.vectors-{uuid.uuid4().hex[:12]}"


def file_names(name: str) -> tuple[str, str]:
    """The names of a generation's two files: the header and high halves, and the low halves."""
    return name, name + LOW_SUFFIX


def low_path(path: Path) -> Path:
    return path.with_name(path.name + LOW_SUFFIX)


def is_vector_file_of(name: str, db_name: str) -> bool:
    return name.startswith(f"{db_name}.vectors-") or name.startswith(f".{db_name}.vectors-")


def fix_for(db_path) -> str:
    return f"rebuild it with `captioner index --fresh --db {db_path} PARQUET...`"


def read_header(path: Path, db_path) -> VectorHeader:
    """The header of the vector file at ``path``; SearchError (naming the fix) when it is not one of ours."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
    except FileNotFoundError:
        raise SearchError(f"the index {db_path} lacks its vector file {path.name}; {fix_for(db_path)}") from None
    if not head.startswith(MAGIC):
        raise SearchError(f"{path} is not a captioner vector file; {fix_for(db_path)}")
    try:
        data = json.loads(head[len(MAGIC):].decode())
        header = VectorHeader(**{k: data[k] for k in VectorHeader.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        raise SearchError(f"{path} has a damaged header; {fix_for(db_path)}") from None
    if header.format != VECTOR_FORMAT or header.dtype != DTYPE:
        raise SearchError(
            f"{path} is a vector file of format {header.format} ({header.dtype}); this captioner reads format "
            f"{VECTOR_FORMAT} ({DTYPE}); {fix_for(db_path)}"
        )
    return header


class VectorPlanes:
    """The first ``slots`` rows of a vector file pair, memory-mapped read-only.

    Indexing (an int array or a slice of slots) gives float32 rows, joined from
    both halves; ``high`` is the high plane alone (uint16, bfloat16 bits), what
    the approximate pass scans.
    """

    def __init__(self, high: np.ndarray, low: np.ndarray):
        self.high, self.low = high, low
        self.shape = high.shape
        self.dim = high.shape[1]
        self._high_tensor = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, slots) -> np.ndarray:
        if not isinstance(slots, slice):
            slots = np.asarray(slots, np.int64)
            # A run of consecutive slots (SQL's view scans them in order) is read as a slice: no gather copy.
            if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and np.all(np.diff(slots) == 1):
                slots = slice(int(slots[0]), int(slots[-1]) + 1)
            else:
                return join(np.take(self.high, slots, axis=0), np.take(self.low, slots, axis=0))
        return join(self.high[slots], self.low[slots])

    def high_tensor(self):
        """The high plane as a torch bfloat16 tensor over the same mapped pages (no copy)."""
        if self._high_tensor is None:
            import warnings

            import torch

            with warnings.catch_warnings():  # read-only pages: torch warns that it could write them; it never does
                warnings.simplefilter("ignore", UserWarning)
                self._high_tensor = torch.from_numpy(np.asarray(self.high).view(np.int16)).view(torch.bfloat16)
        return self._high_tensor

    def will_need(self) -> None:
        """Ask the kernel to start reading the high plane in: the first scan then finds it in memory."""
        base = getattr(self.high, "_mmap", None)
        try:
            if base is not None:
                base.madvise(mmap.MADV_WILLNEED)
        except (AttributeError, OSError, ValueError):
            pass


def empty_planes(dim: int) -> VectorPlanes:
    return VectorPlanes(np.zeros((0, dim), HALF), np.zeros((0, dim), HALF))


def open_planes(path: Path, db_path, *, dim: int, slots: int, model, revision) -> VectorPlanes:
    """The first ``slots`` rows of the vector files at ``path``, after checking they fit the catalogue."""
    header = read_header(path, db_path)
    if header.dim != dim:
        raise SearchError(
            f"{path} holds {header.dim}-dimensional vectors but the index {db_path} says {dim}; {fix_for(db_path)}"
        )
    if (header.model, header.revision) != (model, revision):
        raise SearchError(
            f"{path} holds vectors of {header.model} (revision {header.revision}) but the index {db_path} was built "
            f"with {model} (revision {revision}); {fix_for(db_path)}"
        )
    plane = slots * dim * HALF.itemsize
    low = low_path(path)
    try:
        sizes = path.stat().st_size - HEADER_BYTES, low.stat().st_size
    except FileNotFoundError:
        raise SearchError(f"the index {db_path} lacks its vector file {low.name}; {fix_for(db_path)}") from None
    if header.count < slots or min(sizes) < plane:
        raise SearchError(
            f"{path} is truncated ({sizes[0]:,} and {sizes[1]:,} bytes of halves, {header.count:,} vectors; the "
            f"index needs {slots:,}); {fix_for(db_path)}"
        )
    if slots == 0:
        return empty_planes(dim)
    return VectorPlanes(np.memmap(path, dtype=HALF, mode="r", offset=HEADER_BYTES, shape=(slots, dim)),
                        np.memmap(low, dtype=HALF, mode="r", shape=(slots, dim)))


class NewVectorFile:
    """Write a new vector file pair: rows appended in batches, published whole under its names (storage.Folder)."""

    def __init__(self, folder, name: str, *, dim: int, model, revision):
        self.folder, self.name, self.dim = folder, name, dim
        self.model, self.revision = model, revision
        self.count = 0
        high_name, low_name = file_names(name)
        self._contexts = [folder.open_write(high_name), folder.open_write(low_name)]  # temporary dot-names
        self._high, self._low = (ctx.__enter__() for ctx in self._contexts)
        self._high.write(self._header().encode())

    def _header(self) -> VectorHeader:
        return VectorHeader(VECTOR_FORMAT, self.dim, DTYPE, self.count, self.model, self.revision)

    def append(self, rows: np.ndarray) -> None:
        high, low = split(rows)
        self._high.write(high.tobytes())
        self._low.write(low.tobytes())
        self.count += len(rows)

    def publish(self) -> None:
        """Both files renamed into place: the low halves first, so a published header always has its halves."""
        self._high.seek(0)
        self._high.write(self._header().encode())
        for handle in (self._low, self._high):
            handle.flush()
            os.fsync(handle.fileno())
        for ctx in reversed(self._contexts):
            ctx.__exit__(None, None, None)

    def discard(self, exc: BaseException) -> None:
        for ctx in reversed(self._contexts):
            ctx.__exit__(type(exc), exc, exc.__traceback__)


def append_rows(path: Path, db_path, committed: int, rows: np.ndarray, *, dim: int, model, revision) -> int:
    """Append ``rows`` after the ``committed`` slots of an existing vector file pair; the new slot count.

    Whatever lies beyond ``committed`` (rows of an update that was killed
    before its catalogue was published) is cut off first. The header's count
    is rewritten after the rows are on disk in both files, so it never claims rows that are not.
    """
    header = read_header(path, db_path)
    if (header.dim, header.model, header.revision) != (dim, model, revision) or header.count < committed:
        raise SearchError(f"{path} does not match the index {db_path}; {fix_for(db_path)}")
    high, low = split(rows)
    plane = committed * dim * HALF.itemsize
    with open(low_path(path), "r+b") as low_file, open(path, "r+b") as high_file:
        for handle, start, halves in ((low_file, plane, low), (high_file, HEADER_BYTES + plane, high)):
            handle.truncate(start)
            handle.seek(start)
            handle.write(halves.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        count = committed + len(rows)
        high_file.seek(0)
        high_file.write(VectorHeader(VECTOR_FORMAT, dim, DTYPE, count, model, revision).encode())
        high_file.flush()
        os.fsync(high_file.fileno())
    return count
