"""The build side of an index's vectors: the vector file and the catalogue's vector_slots.

A build after a run that added or changed M rows costs time proportional to
M for the vectors: rows whose embedding comes from the same (file, row) of a
source file whose fingerprint is unchanged keep their slot; the others are
read from their files, appended to the vector file after its committed slots
and assigned to the trained IVF lists. The old slots of replaced rows become
dead (no id points at them). The vectors are rewritten whole, under a new
file name, when:

  * there is no usable previous index (--fresh, another format, another model),
  * dead slots would exceed ``COMPACT_SHARE`` of the file (compaction), or
  * ANN is wanted and the lists were never trained, or the index has grown
    by pipeline.search.ann.RETRAIN_GROWTH since they were (drift).

Exact results do not depend on which way the vectors were written: the same
vectors, scanned exactly, give the same top k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.search import ann, contract, vectors
from pipeline.search.contract import IndexInfo
from pipeline.search.errors import SearchError

# Rewrite the vector file once this share of its slots is dead.
COMPACT_SHARE = 0.25
FETCH_ROWS = 65_536


@dataclass(frozen=True)
class VectorBuild:
    file: str | None
    slots: int
    embedded: int
    ann_lists: int | None
    ann_trained_rows: int
    appended: int  # vectors read from Parquet by this build
    rewritten: bool  # a new vector file (else: appended to the previous one)


def build_vectors(con, db_path: Path, *, dim: int, run, files: list[str], fingerprint, previous: IndexInfo | None,
                  ann_wanted, timings: dict, storage_options=None) -> VectorBuild:
    """Fill ``vector_slots`` (and ``ann_centroids``) in the catalogue being built; write or extend the vector file.

    ``ann_wanted(live_rows) -> bool`` decides whether the index gets IVF lists.
    """
    model, revision = run.embed_model, run.embed_revision
    con.execute(
        f"CREATE TABLE {contract.VECTOR_SLOTS} (id BIGINT NOT NULL, slot BIGINT NOT NULL, norm FLOAT NOT NULL, list INTEGER)"
    )
    reusable = _reusable(previous, db_path, dim, model, revision)
    if reusable:
        unchanged = sorted(set(previous.files) & set(fingerprint))
        con.execute(f"ATTACH '{_literal(db_path)}' AS prev (READ_ONLY)")
        try:
            t0 = time.perf_counter()
            con.execute(
                f"""
                INSERT INTO {contract.VECTOR_SLOTS}
                SELECT r.id, s.slot, s.norm, s.list FROM image_rows AS r
                JOIN prev.image_rows AS pr
                  ON pr.embedding_source_file = r.embedding_source_file AND pr.embedding_source_row = r.embedding_source_row
                JOIN prev.{contract.VECTOR_SLOTS} AS s ON s.id = pr.id
                WHERE r.status = 'ok' AND r.embedding_source_file IN (SELECT unnest(?::VARCHAR[]))
                """,
                [[path for path, *_ in unchanged]],
            )
            timings["vectors_reuse"] = time.perf_counter() - t0
            kept = con.execute(f"SELECT count(*) FROM {contract.VECTOR_SLOTS}").fetchone()[0]
            new_ids, new_rows = _read_new(con, dim, timings, storage_options)
            live = kept + len(new_ids)
            dead = previous.vector_slots - kept
            wants_ann = bool(ann_wanted(live))
            retrain = wants_ann and (
                not previous.ann or live > ann.RETRAIN_GROWTH * max(1, previous.ann_trained_rows)
            )
            if dead <= COMPACT_SHARE * (previous.vector_slots + len(new_ids)) and not retrain:
                return _append(con, db_path, previous, new_ids, new_rows, live, wants_ann, dim, model, revision, timings)
        finally:
            con.execute("DETACH prev")
        con.execute(f"DELETE FROM {contract.VECTOR_SLOTS}")
    return _rewrite(con, db_path, dim=dim, model=model, revision=revision, ann_wanted=ann_wanted, timings=timings,
                    storage_options=storage_options)


def update_vectors(con, db_path: Path, *, dim: int, run, previous: IndexInfo, dropped: str, candidates: str,
                   ann_wanted, timings: dict, storage_options=None) -> VectorBuild:
    """The vectors of an updated catalogue (a copy of ``previous``'s, pipeline.search.catalogue_update).

    Its ``vector_slots`` still hold the previous slots: those of the ids in
    table ``dropped`` go (their slots become dead), the searchable rows of
    ``candidates`` without a slot are read from their files and appended,
    unless compaction or retraining (as in :func:`build_vectors`) rewrites the file.
    """
    model, revision = run.embed_model, run.embed_revision
    if _reusable(previous, db_path, dim, model, revision):
        con.execute(f"DELETE FROM {contract.VECTOR_SLOTS} WHERE id IN (SELECT id FROM {dropped})")
        kept = con.execute(f"SELECT count(*) FROM {contract.VECTOR_SLOTS}").fetchone()[0]
        new_ids, new_rows = _read_new(con, dim, timings, storage_options, candidates=candidates)
        live = kept + len(new_ids)
        dead = previous.vector_slots - kept
        wants_ann = bool(ann_wanted(live))
        retrain = wants_ann and (not previous.ann or live > ann.RETRAIN_GROWTH * max(1, previous.ann_trained_rows))
        if dead <= COMPACT_SHARE * (previous.vector_slots + len(new_ids)) and not retrain:
            if not wants_ann:
                con.execute(f"DROP TABLE IF EXISTS {contract.ANN_CENTROIDS}")
            return _append(con, db_path, previous, new_ids, new_rows, live, wants_ann, dim, model, revision, timings,
                           centroids_from=None)
    con.execute(f"DROP TABLE IF EXISTS {contract.ANN_CENTROIDS}")
    con.execute(f"DROP TABLE IF EXISTS {contract.VECTOR_SLOTS}")
    con.execute(
        f"CREATE TABLE {contract.VECTOR_SLOTS} (id BIGINT NOT NULL, slot BIGINT NOT NULL, norm FLOAT NOT NULL, list INTEGER)"
    )
    return _rewrite(con, db_path, dim=dim, model=model, revision=revision, ann_wanted=ann_wanted, timings=timings,
                    storage_options=storage_options)


def _reusable(previous: IndexInfo | None, db_path: Path, dim, model, revision) -> bool:
    if previous is None or previous.index_format != contract.INDEX_FORMAT or previous.rows_only:
        return False
    if not previous.vector_file or (previous.embedding_dim, previous.embed_model, previous.embed_revision) != (
        dim, model, revision
    ):
        return False
    try:
        vectors.open_planes(contract.vector_path(db_path, previous), db_path, dim=dim, slots=previous.vector_slots,
                            model=model, revision=revision)
    except Exception:  # noqa: BLE001 - a damaged or missing vector file is rebuilt, not reused
        return False
    return True


def _embedding_batches(con, dim: int, *, only_new: bool, storage_options, candidates: str | None = None):
    """(ids int64, rows float32 (n x dim)) per batch: the searchable rows' embeddings, read from their files.

    pyarrow streams each file's embedding column and keeps the rows the
    catalogue took them from (``embedding_source_row``); a DuckDB join of the
    Parquet with image_rows did the same several times slower (bench/search.py).
    """
    import pyarrow.parquet as pq

    from pipeline.search.index import _filesystem

    extra = f"AND id NOT IN (SELECT id FROM {contract.VECTOR_SLOTS})" if only_new else ""
    if candidates:
        extra += f" AND id IN (SELECT id FROM {candidates})"
    wanted = con.execute(
        f"SELECT embedding_source_file AS f, embedding_source_row AS r, id FROM image_rows WHERE status = 'ok' "
        f"AND embedding_source_file IS NOT NULL {extra} ORDER BY f, r"
    ).fetchnumpy()
    files, rows, ids = wanted["f"], np.asarray(wanted["r"], np.int64), np.asarray(wanted["id"], np.int64)
    starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]]) if len(files) else np.zeros(0, np.int64)
    for begin, end in zip(starts, np.r_[starts[1:], len(files)]):
        fs, inner = _filesystem(str(files[begin]), storage_options)
        file_rows, file_ids = rows[begin:end], ids[begin:end]
        offset = 0
        with pq.ParquetFile(inner, filesystem=fs) as parquet:
            for batch in parquet.iter_batches(batch_size=FETCH_ROWS, columns=["embedding"]):
                lo, hi = np.searchsorted(file_rows, [offset, offset + batch.num_rows])
                if hi > lo:
                    column = batch.column(0).take(pa.array(file_rows[lo:hi] - offset))
                    present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
                    if not present.all():
                        column = column.filter(pa.array(present))
                    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                    if values.size != len(column) * dim:
                        raise SearchError(f"{files[begin]} holds embeddings that are not {dim} floats each")
                    yield file_ids[lo:hi][present], values.reshape(len(column), dim)
                offset += batch.num_rows


def _read_new(con, dim: int, timings: dict, storage_options, candidates: str | None = None):
    """(ids, rows) of the searchable rows that have no reused slot (among ``candidates``' ids, when given),
    read from the files that hold them."""
    t0 = time.perf_counter()
    ids, rows = [np.zeros(0, np.int64)], [np.zeros((0, dim), np.float32)]
    for i, r in _embedding_batches(con, dim, only_new=True, storage_options=storage_options, candidates=candidates):
        ids.append(i)
        rows.append(r)
    timings["embeddings"] = time.perf_counter() - t0
    return np.concatenate(ids), np.concatenate(rows)


def _append(con, db_path, previous: IndexInfo, new_ids, new_rows, live, wants_ann, dim, model, revision, timings,
            centroids_from: str | None = "prev"):
    """Append the new rows after the committed slots; ``centroids_from``: the attached database to copy the
    IVF centroids from (None: the catalogue being built has them already)."""
    t0 = time.perf_counter()
    path = contract.vector_path(db_path, previous)
    lists = None
    if wants_ann:
        if centroids_from:
            con.execute(f"CREATE TABLE {contract.ANN_CENTROIDS} AS SELECT * FROM {centroids_from}.{contract.ANN_CENTROIDS}")
        table = con.execute(f"SELECT centroid FROM {contract.ANN_CENTROIDS} ORDER BY list").fetch_arrow_table()
        centroids = table.column(0).combine_chunks().flatten().to_numpy().reshape(-1, dim)
        lists = ann.assign(centroids, new_rows) if len(new_rows) else np.zeros(0, np.int32)
    else:
        con.execute(f"UPDATE {contract.VECTOR_SLOTS} SET list = NULL")
    slots = previous.vector_slots
    if len(new_rows):
        slots = vectors.append_rows(path, db_path, previous.vector_slots, new_rows, dim=dim, model=model,
                                    revision=revision)
    _insert_slots(con, new_ids, np.arange(previous.vector_slots, slots), _norms(new_rows), lists)
    timings["vectors"] = time.perf_counter() - t0
    return VectorBuild(previous.vector_file, slots, int(live), previous.ann_lists if wants_ann else None,
                       previous.ann_trained_rows if wants_ann else 0, len(new_ids), rewritten=False)


def _rewrite(con, db_path: Path, *, dim, model, revision, ann_wanted, timings, storage_options) -> VectorBuild:
    """A new vector file with every searchable row's embedding, read from the source files."""
    from pipeline.storage import Folder

    name = vectors.vector_file_name(db_path.name)
    folder = Folder(str(db_path.parent))
    t0 = time.perf_counter()
    out = vectors.NewVectorFile(folder, name, dim=dim, model=model, revision=revision)
    ids, norms = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    try:
        for i, rows in _embedding_batches(con, dim, only_new=False, storage_options=storage_options):
            out.append(rows)
            ids.append(i)
            norms.append(_norms(rows))
        out.publish()  # under a name no catalogue points at yet: readers cannot see it
    except BaseException as exc:
        out.discard(exc)
        raise
    timings["embeddings"] = time.perf_counter() - t0
    path = db_path.with_name(name)
    try:
        ids, norms = np.concatenate(ids), np.concatenate(norms)
        lists, trained = None, 0
        if len(ids) and ann_wanted(len(ids)):
            with _timed(timings, "ann"):
                matrix = vectors.open_planes(path, db_path, dim=dim, slots=len(ids), model=model, revision=revision)
                centroids = ann.train(matrix, ann.list_count(len(ids)))
                lists = ann.assign(centroids, matrix)
                trained = len(ids)
                del matrix
                _insert_centroids(con, centroids)
        _insert_slots(con, ids, np.arange(len(ids)), norms, lists)
    except BaseException:
        for file in vectors.file_names(name):
            db_path.with_name(file).unlink(missing_ok=True)
        raise
    return VectorBuild(name, len(ids), len(ids), len(centroids) if lists is not None else None, trained, len(ids),
                       rewritten=True)


def _norms(rows: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rows, axis=1).astype(np.float32) if len(rows) else np.zeros(0, np.float32)


def _insert_slots(con, ids, slots, norms, lists) -> None:
    if not len(ids):
        return
    table = pa.table({
        "id": pa.array(np.asarray(ids, np.int64)),
        "slot": pa.array(np.asarray(slots, np.int64)),
        "norm": pa.array(np.asarray(norms, np.float32)),
        "list": pa.array(np.asarray(lists, np.int32)) if lists is not None else pa.nulls(len(ids), pa.int32()),
    })
    con.register("_new_slots", table)
    try:
        con.execute(f"INSERT INTO {contract.VECTOR_SLOTS} SELECT id, slot, norm, list FROM _new_slots")
    finally:
        con.unregister("_new_slots")


def _insert_centroids(con, centroids: np.ndarray) -> None:
    lists, dim = centroids.shape
    table = pa.table({
        "list": pa.array(np.arange(lists, dtype=np.int32)),
        "centroid": pa.FixedSizeListArray.from_arrays(pa.array(centroids.astype(np.float32).ravel()), dim),
    })
    con.register("_centroids", table)
    try:
        con.execute(f"CREATE TABLE {contract.ANN_CENTROIDS} AS SELECT list, centroid::FLOAT[{dim}] AS centroid FROM _centroids")
    finally:
        con.unregister("_centroids")


def remove_stale_vector_files(db_path: Path, keep: str | None) -> None:
    """Delete this index's vector files (both halves, and their temporaries) that its catalogue does not point at.

    Called under the index's lease, after the catalogue is published: a
    reader that opened an older generation has its file mapped already.
    """
    from pipeline.storage import Folder

    folder = Folder(str(db_path.parent))
    kept = set(vectors.file_names(keep)) if keep else set()
    for name in folder.list(include_hidden=True):
        if "/" in name or name in kept or not vectors.is_vector_file_of(name, db_path.name):
            continue
        try:
            folder.delete(name)
        except FileNotFoundError:
            pass


def undo_vectors(db_path: Path, live: IndexInfo | None) -> None:
    """After a failed build: the live catalogue's vector file as it was, and no other vector file.

    A rows appended past the committed slots are cut off and the header's
    count restored (a killed build leaves them; the next build cuts them off).
    """
    remove_stale_vector_files(db_path, keep=live.vector_file if live else None)
    path = contract.vector_path(db_path, live) if live and live.vector_file else None
    if path is None or not path.exists():
        return
    try:
        header = vectors.read_header(path, db_path)
    except Exception:  # noqa: BLE001 - not ours to repair; the reader names the fix
        return
    if header.count > live.vector_slots:
        vectors.append_rows(path, db_path, live.vector_slots, np.zeros((0, header.dim), np.float32),
                            dim=header.dim, model=header.model, revision=header.revision)


def _literal(path: Path) -> str:
    return str(path).replace("'", "''")


class _timed:
    def __init__(self, timings: dict, step: str):
        self.timings, self.step = timings, step

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.step] = self.timings.get(self.step, 0.0) + time.perf_counter() - self.t0
