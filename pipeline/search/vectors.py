"""The vector file: an index's embeddings laid out for scanning, beside the DuckDB catalogue.

One file per index generation, ``<db name>.vectors-<token>`` in the index's
folder (pipeline.search.contract names it and the catalogue points at it):

  header   HEADER_BYTES: MAGIC, then JSON (format, dim, dtype, count, model,
           revision) padded with spaces; checked on open.
  matrix   ``count`` rows of ``dim`` float32, row-major: row = *slot*.

The catalogue's ``vector_slots`` table maps index ids to slots (with the
vector's norm and its ANN list); a slot no id points at is dead (its row was
replaced or removed). The file only grows between compactions: an update
appends the new vectors after the last committed slot, rewrites the header's
count, then publishes a new catalogue that points at more slots. Readers take
the slot count from their catalogue, never from the file's length, so a reader
of the old catalogue reads exactly the old slots while an update appends, and
an update killed half-way leaves slots that no catalogue points at (the next
update cuts them off before appending). A fresh build or a compaction writes a
new file under a new name (Folder's temporary-name rule), so a reader of the
old generation keeps its old file.

float32, not float16: numpy has no BLAS for float16, so every scan would pay a
conversion of the whole matrix, and the raw values are what `captioner sql`
returns for ``embedding``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.search.errors import SearchError

MAGIC = b"CAPTIONER-VECTORS\n"
VECTOR_FORMAT = 1
HEADER_BYTES = 4096
DTYPE = "float32"
ITEMSIZE = np.dtype(DTYPE).itemsize


@dataclass(frozen=True)
class VectorHeader:
    format: int
    dim: int
    dtype: str
    count: int  # rows written to the file (>= the slots a catalogue points at)
    model: str | None
    revision: str | None

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True).encode()
        data = MAGIC + body
        if len(data) > HEADER_BYTES - 1:
            raise SearchError("the embedding model's name is too long for the vector file header")
        return data + b" " * (HEADER_BYTES - len(data) - 1) + b"\n"


def vector_file_name(db_name: str) -> str:
    """A new generation's vector file name (unique: a reader of the old generation keeps its file)."""
    return f"{db_name}.vectors-{uuid.uuid4().hex[:12]}"


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


def open_matrix(path: Path, db_path, *, dim: int, slots: int, model, revision) -> np.ndarray:
    """The first ``slots`` rows of the vector file, memory-mapped read-only, after checking it fits the catalogue."""
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
    need = HEADER_BYTES + slots * dim * ITEMSIZE
    size = path.stat().st_size
    if header.count < slots or size < need:
        raise SearchError(
            f"{path} is truncated ({size:,} bytes, {header.count:,} vectors; the index needs {slots:,}); "
            f"{fix_for(db_path)}"
        )
    if slots == 0:
        return np.zeros((0, dim), dtype=DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER_BYTES, shape=(slots, dim))


class NewVectorFile:
    """Write a new vector file: rows appended in batches, published whole under its name (storage.Folder)."""

    def __init__(self, folder, name: str, *, dim: int, model, revision):
        self.folder, self.name, self.dim = folder, name, dim
        self.model, self.revision = model, revision
        self.count = 0
        self._ctx = folder.open_write(name)  # a temporary dot-name, renamed into place on success
        self._handle = self._ctx.__enter__()
        self._handle.write(self._header().encode())

    def _header(self) -> VectorHeader:
        return VectorHeader(VECTOR_FORMAT, self.dim, DTYPE, self.count, self.model, self.revision)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        self._handle.write(rows.tobytes())
        self.count += len(rows)

    def publish(self) -> None:
        self._handle.seek(0)
        self._handle.write(self._header().encode())
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._ctx.__exit__(None, None, None)

    def discard(self, exc: BaseException) -> None:
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


def append_rows(path: Path, db_path, committed: int, rows: np.ndarray, *, dim: int, model, revision) -> int:
    """Append ``rows`` after the ``committed`` slots of an existing vector file; the new slot count.

    Whatever lies beyond ``committed`` (rows of an update that was killed
    before its catalogue was published) is cut off first. The header's count
    is rewritten after the rows are on disk, so it never claims rows that are not.
    """
    header = read_header(path, db_path)
    if (header.dim, header.model, header.revision) != (dim, model, revision) or header.count < committed:
        raise SearchError(f"{path} does not match the index {db_path}; {fix_for(db_path)}")
    rows = np.ascontiguousarray(rows, dtype=DTYPE)
    with open(path, "r+b") as handle:
        end = HEADER_BYTES + committed * dim * ITEMSIZE
        handle.truncate(end)
        handle.seek(end)
        handle.write(rows.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
        count = committed + len(rows)
        handle.seek(0)
        handle.write(VectorHeader(VECTOR_FORMAT, dim, DTYPE, count, model, revision).encode())
        handle.flush()
        os.fsync(handle.fileno())
    return count
