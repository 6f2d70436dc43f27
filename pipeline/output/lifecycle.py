"""A rerun's bookkeeping of the collection: files that left the source, and files moved with the same bytes.

Gone: a uri of this source (``covers``) whose current row is live but that the
listing no longer has gets a ``gone`` row (schema v4): a copy of its current
row with status ``gone`` and a new processed_at, which makes the uri gone for
every reader (pipeline.rows). Not with ``--keep-gone``, nor with ``--limit``
(a partial listing says nothing about the files after it).

Reused: a pending file whose bytes equal those of a row whose file left the
source (gone before, or gone in this run), made ok, gets a copy of that row
under its own uri (caption, probes, embedding; its size and mtime as listed
now) instead of going through the models: a rename or move is one copied row
plus one gone row. Every row of an output has the run's models and probes
(resume refuses an output made by others), so a copy is what the models
would give again. Only files whose size equals such a row's are hashed, on
the driver, a few at a time: a run in which no file left the source reads no
byte here, and a file that does match is read once instead of being decoded
and captioned. Copies of a file that is still in the source are not looked
for (that would hash every new file whose size collides with any row).
"""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.output.merge import RowGroupReader
from pipeline.output.resume import ResumeState
from pipeline.sources import SourceItem, mtime_micros, stored_uri
from schemas import SCHEMA_VERSION, STATUS_GONE, STATUS_OK, RunMetadata, output_schema

# Files hashed at once when looking for moved ones: reads on a bucket are round trips, not CPU.
HASH_THREADS = 8


@dataclasses.dataclass
class Changes:
    """What a rerun records besides the stages' rows."""

    gone: list[str] = dataclasses.field(default_factory=list)  # stored uris the listing no longer has
    reused: dict[str, tuple[str, SourceItem]] = dataclasses.field(default_factory=dict)  # new uri -> (row's uri, item)
    pending: list[SourceItem] = dataclasses.field(default_factory=list)  # what still goes to the stages


def plan_changes(
    items: list[SourceItem],
    pending: list[SourceItem],
    state: ResumeState,
    *,
    covers: Callable[[str], bool],
    digest: Callable[[str], str | None],
    record_gone: bool,
) -> Changes:
    """Which uris are gone now, which pending files reuse a row, and what is left for the stages.

    ``digest(uri)`` is the sha256 of a listed file's bytes now (None if unreadable).
    """
    listed = {stored_uri(item.uri) for item in items}
    changes = Changes()
    if record_gone:
        changes.gone = sorted(
            uri for uri, row in state.current.items() if not row.gone and uri not in listed and covers(uri)
        )
    newly_gone = set(changes.gone)
    # Rows whose file left the source and that were ok: what a moved or returning file may reuse.
    donors: dict[int, dict[str, str]] = collections.defaultdict(dict)  # size -> image_id -> uri
    for uri, row in state.current.items():
        if row.ok and (row.gone or uri in newly_gone) and row.size is not None and row.image_id is not None:
            donors[row.size].setdefault(row.image_id, uri)
    candidates = [item for item in pending if item.size in donors]
    if candidates:
        with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            digests = list(pool.map(lambda item: digest(item.uri), candidates))
        for item, sha in zip(candidates, digests):
            donor = donors[item.size].get(sha) if sha is not None else None
            if donor is not None:
                changes.reused[stored_uri(item.uri)] = (donor, item)
    changes.pending = [item for item in pending if stored_uri(item.uri) not in changes.reused]
    return changes


def change_rows(fs, state: ResumeState, changes: Changes, identity: RunMetadata, *, cache_bytes: int,
                chunk_rows: int) -> Iterator[pa.Table]:
    """The gone rows, then the reused rows, of ``changes``: tables of the current schema, ``chunk_rows`` at most each.

    In chunks so that a deleted folder of many images is copied a part at a time, not held in memory at once.
    """
    run = dataclasses.replace(identity, embedding_dim=state.run.embedding_dim if state.run else None)
    reader = RowGroupReader(fs, state.files, output_schema(run.embedding_dim, run), cache_bytes)
    # (uri of the new row, the row copied, its status, the listed item for a reused row)
    copies = [(uri, uri, STATUS_GONE, None) for uri in changes.gone] + [
        (uri, donor, STATUS_OK, item) for uri, (donor, item) in changes.reused.items()
    ]
    for start in range(0, len(copies), chunk_rows):
        yield _copied(reader, state, copies[start : start + chunk_rows])


def _copied(reader: RowGroupReader, state: ResumeState, copies: list) -> pa.Table:
    located = [state.current[donor] for _, donor, _, _ in copies]
    rows = reader.take(np.array([row.file for row in located]), np.array([row.row for row in located]))
    count = rows.num_rows
    listed_size = rows["bytes"].to_pylist()
    listed_mtime = rows["source_mtime"].cast(pa.int64()).to_pylist()
    for i, (_, _, _, item) in enumerate(copies):
        if item is not None:  # a reused row describes the file now listed under its new uri
            listed_size[i], listed_mtime[i] = item.size, mtime_micros(item.mtime)
    replaced = {
        "schema_version": pa.array([SCHEMA_VERSION] * count, pa.int16()),
        "uri": pa.array([uri for uri, _, _, _ in copies], pa.string()),
        "status": pa.array([status for _, _, status, _ in copies], pa.string()),
        "bytes": pa.array(listed_size, pa.int64()),
        "source_mtime": pa.array(listed_mtime, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "processed_at": pa.array([datetime.now(timezone.utc)] * count, pa.timestamp("us", tz="UTC")),
    }
    for name, values in replaced.items():
        at = rows.schema.get_field_index(name)
        rows = rows.set_column(at, rows.schema.field(name), values.cast(rows.schema.field(name).type))
    return rows
