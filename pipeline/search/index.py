"""Build the DuckDB search index from captioner Parquet output: the build side.

The index's layout (tables, view, macros, metadata) is its contract, written
down in pipeline.search.contract, which the query side (ImageIndex, the web
page, the exports) reads too; this module only fills it.

Source files of every readable schema version are indexed together: rows of
older versions are upgraded in the query that reads them (schemas.upgrade_sql),
so the tables have the current version's columns (v1 rows: null yes_prob,
probe ``truncated`` and ``caption_truncated``). Which row of a uri is current
is pipeline.rows' rule (sql_is_newest); a uri whose current row is ``gone``
(its file left the source) is not indexed at all (sql_is_live).

Searchable = status 'ok'; error rows stay in ``images`` for SQL. Every build
writes a temporary file that replaces the old one only once complete, so
readers never see a half-built index and a failed build leaves the previous
index intact. Nothing is done when the source files are unchanged (same
paths, sizes, mtimes) and the ANN choice is the same. Otherwise an update
starts from a copy of the previous catalogue and re-derives only the rows of
uris the new or changed files touch (pipeline.search.catalogue_update), the
BM25 tables in place (pipeline.search.bm25) and the vectors by appending
(pipeline.search.vector_build); a fresh build (--fresh, another format or
embedder, or rows an update cannot reach) derives everything.
``rows_only`` builds just the rows (no vectors or BM25): what
``captioner export --from`` reads through.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rows import sql_is_live, sql_is_newest
from pipeline.search import bm25, contract
from pipeline.search.catalogue_update import KEY_COLUMNS, create_source_keys
from pipeline.search.contract import INDEX_FORMAT, IndexInfo, read_info
from pipeline.search.errors import SearchError
from pipeline.search.extensions import CONNECT_CONFIG, load_extensions

# From this many searchable embeddings up, the index gets IVF lists (ANN,
# pipeline.search.ann); below it every query is an exact scan. bench/search.py
# (2 cores, D=768): the exact scan costs about 70 ms per 1M rows, so at 200k
# it is ~15 ms, while the lists cost ~10-20 s of k-means and assignment per build.
DEFAULT_ANN_MIN_ROWS = 200_000


@dataclass(frozen=True)
class BuildReport:
    info: IndexInfo
    rebuilt: bool  # False when the sources were unchanged and the index was kept
    seconds: float
    timings: dict = field(default_factory=dict)  # seconds per build step (load, fts, embeddings, ann, vectors, checkpoint)
    probe_sets: int = 1  # distinct probe sets among the captioned files (more than 1 only with mixed_probes)
    ignored: tuple[str, ...] = ()  # Parquet files in the sources' folders that captioner did not write
    vectors_read: int = 0  # embeddings read from Parquet (the rest kept their slot in the vector file)
    vectors_rewritten: bool = False  # a new vector file (fresh, compaction, ANN retrained), else appended to
    updated: bool = False  # the previous catalogue was updated in place (else built fresh)


def expand_sources(sources, storage_options: dict | None = None) -> list[str]:
    """The data files of the captioner outputs named by ``sources`` (see :func:`scan_sources`)."""
    return scan_sources(sources, storage_options)[0]


def scan_sources(sources, storage_options: dict | None = None) -> tuple[list[str], list[str]]:
    """(data files, ignored Parquet files) of ``sources``: outputs, or folders of them, local or on a bucket.

    Which files make up an output is the output module's rule
    (pipeline.output.find_output_files); Parquet files in a scanned folder that
    captioner did not write are ignored and returned second, so the caller can
    say so. Local files are absolute, symlinks resolved; bucket files are URLs.
    """
    from pipeline.output import find_output_files
    from pipeline.storage import StorageError, explain, is_local

    files: list[str] = []
    ignored: list[str] = []
    for source in sources:
        source = _source_key(source)
        try:
            found = find_output_files(source, storage_options)
        except FileNotFoundError:
            raise SearchError(f"{source} does not exist; pass Parquet files or directories written by `captioner run`") from None
        except StorageError as exc:
            raise SearchError(str(exc)) from exc
        except Exception as exc:  # backends raise their own types (credentials, buckets, endpoints)
            explained = explain(exc, source, doing="list", storage_options=storage_options)  # outage: exit 3
            raise SearchError(str(explained)) from explained
        if not found.files:
            extra = f" (only Parquet files captioner did not write: {', '.join(found.foreign[:3])})" if found.foreign else ""
            raise SearchError(f"{source} is a directory with no captioner .parquet files in it{extra}")
        files.extend(os.path.realpath(f) if is_local(f) else f for f in found.files)
        ignored.extend(found.foreign)
    unique = list(dict.fromkeys(files))
    if not unique:
        raise SearchError("no Parquet files to index; pass files or directories written by `captioner run`")
    return unique, list(dict.fromkeys(ignored))


def _filesystem(path: str, storage_options: dict | None = None):
    """(fsspec filesystem or None for local, in-filesystem path) of a data file."""
    from pipeline.storage import Folder

    folder = Folder(path, storage_options, role="source")
    return (None if folder.local else folder.fs), folder.path


def check_files(files: list[str], storage_options: dict | None = None):
    """Run metadata of each file, after checking its schema and that all share one embedder."""
    from schemas import SchemaMismatch, check_schema

    runs = []
    for path in files:
        try:
            fs, inner = _filesystem(str(path), storage_options)
            schema = pq.read_schema(inner, filesystem=fs)
        except (pa.ArrowException, OSError) as exc:
            raise SearchError(f"{path} is not a readable Parquet file: {exc}") from exc
        try:
            runs.append(check_schema(schema, where=str(path)))
        except SchemaMismatch as exc:
            raise SearchError(f"{exc}; re-run `captioner run` to rewrite it, or leave it out of the index") from exc
    # Outputs without an embedder (captions only), or with no rows yet to fix
    # its width, add captions to any index.
    embedded = [(path, run) for path, run in zip(files, runs) if run.embed_model is not None and run.embedding_dim]
    if embedded:
        first_path, first = embedded[0]
        theirs = (first.embed_model, first.embed_revision, first.embedding_dim)
        for path, run in zip(files, runs):
            ours = (run.embed_model, run.embed_revision, run.embedding_dim)
            if run.embed_model is not None and ours[:2] != theirs[:2] or (run.embedding_dim and ours != theirs):
                raise SearchError(
                    f"{path} was embedded with {_describe(*ours)} but {first_path} with {_describe(*theirs)}; "
                    f"embeddings from different models are not comparable, so build one index per embedder (--db)"
                )
    return runs


def check_probe_sets(files: list[Path], runs, *, allow: bool = False) -> int:
    """How many probe sets the captioned files were asked; more than one is refused unless ``allow``.

    Only files whose rows came from a captioner count (an embeddings-only
    output asks no questions and adds to any index). The order of the
    questions does not matter: answers are looked up by question.
    """
    sets: dict[frozenset, list] = {}
    for path, run in zip(files, runs):
        if run.caption_model is not None:
            sets.setdefault(frozenset(run.probes), []).append((path, run))
    if len(sets) > 1 and not allow:
        described = "; ".join(
            f"{_files_named([p for p, _ in members])} asked {_questions(members[0][1].probes)}"
            for members in sets.values()
        )
        raise SearchError(
            f"these files were captioned with {len(sets)} different probe sets: {described}. Indexed together, "
            f"each image would keep the answers of whichever run was newest and --probe filters would miss the "
            f"others. Index each output into its own --db (`captioner index OUTPUT --db OTHER.duckdb`), pass "
            f"only one output, or pass --mixed-probes to merge them anyway"
        )
    return max(len(sets), 1)


def _files_named(paths: list[Path], shown: int = 3) -> str:
    names = ", ".join(str(p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more files" if len(paths) > shown else "")


def _questions(probes) -> str:
    return "no probe questions" if not probes else "[" + ", ".join(repr(q) for q in probes) + "]"


def _describe(model, revision, dim) -> str:
    if model is None:
        return "no embedder"
    return f"{model} (revision {revision}, dim {dim})"


def _fingerprint(files: list[str], storage_options: dict | None = None) -> tuple[tuple[str, int, int | str], ...]:
    """(path, size, change marker) per file: the mtime in ns locally, the ETag on a bucket (pipeline.storage.Folder)."""
    from pipeline.storage import Folder

    return tuple((str(path), *Folder(str(path), storage_options, role="source").fingerprint()) for path in files)


def build_index(
    sources,
    db_path,
    *,
    ann: bool | None = None,
    ann_min_rows: int = DEFAULT_ANN_MIN_ROWS,
    fresh: bool = False,
    mixed_probes: bool = False,
    rows_only: bool = False,
    storage_options: dict | None = None,
) -> BuildReport:
    """Build (or rebuild) the index at ``db_path`` over ``sources``.

    Sources stored in an existing index are kept (and re-scanned, so files
    added to an indexed directory are picked up) unless ``fresh`` (which also
    rewrites the vectors whole). ``ann``: True/False forces IVF lists on/off;
    None builds them when there are at least ``ann_min_rows`` embeddings. Files captioned with
    different probe sets are refused unless ``mixed_probes``
    (:func:`check_probe_sets`). ``rows_only`` leaves out what only
    searches need (vectors, BM25); see pipeline.search.contract.
    """
    from pipeline.lease import lease_for_file

    started = time.perf_counter()
    db_path = Path(os.path.expanduser(str(db_path)))
    build = (ann, ann_min_rows, fresh, mixed_probes, rows_only, storage_options)
    # One builder per --db: a second is refused, naming the first, so no build's sources are lost.
    lease = lease_for_file(str(db_path), command="captioner index")
    lease.acquire()
    try:
        # Holding the lease proves no live build owns the temporaries a killed one left.
        from pipeline.storage import Folder

        Folder(str(db_path.parent)).cleanup_temp_files(of=(db_path.name, lease.name))
        for attempt in range(1, SOURCE_CHANGE_TRIES + 1):
            try:
                return _build_index(sources, db_path, *build, started=started)
            except _SourcesChanged as exc:
                if attempt == SOURCE_CHANGE_TRIES:
                    raise SearchError(
                        f"the sources changed while they were being indexed, {attempt} times ({exc}): a `captioner "
                        f"run` is probably still writing them; rerun `captioner index` once it has finished"
                    ) from None
    finally:
        lease.release()


# How often a build whose source files changed under it (a run merging or rewriting parts) starts over.
SOURCE_CHANGE_TRIES = 3


class _SourcesChanged(Exception):
    """A source file disappeared or changed while the build read it; the build is discarded and redone."""


def _build_index(sources, db_path, ann, ann_min_rows, fresh, mixed_probes, rows_only, storage_options, *,
                 started) -> BuildReport:
    # Always look at an existing file, even with fresh: never overwrite
    # something that is not one of our indexes (say, --db captions.parquet).
    existing = _existing_info(db_path)
    previous = None if fresh else existing
    all_sources = list(dict.fromkeys([*(previous.sources if previous else ()), *map(_source_key, sources)]))
    if not all_sources:
        raise SearchError("nothing to index: pass Parquet files or directories (PARQUET...)")
    try:
        files, ignored = scan_sources(all_sources, storage_options)
    except SearchError as exc:
        if not previous:
            raise
        raise SearchError(
            f"{exc}. {db_path} records the sources {list(previous.sources)} and re-scans them; "
            f"pass --fresh with the PARQUET to index to forget them"
        ) from exc
    try:
        runs = check_files(files, storage_options)
        fingerprint = _fingerprint(files, storage_options)
    except (SearchError, OSError) as exc:
        _raise_if_changed(files, None, storage_options, exc)
        raise
    probe_sets = check_probe_sets(files, runs, allow=mixed_probes)
    settings = (ann, ann_min_rows)
    if (
        previous
        and previous.index_format == INDEX_FORMAT
        and previous.files == fingerprint
        and previous.rows_only == rows_only
        and _same_ann_choice(previous, settings)
    ):
        return BuildReport(previous, rebuilt=False, seconds=time.perf_counter() - started, ignored=tuple(ignored))

    from pipeline.search.vector_build import remove_stale_vector_files, undo_vectors
    from pipeline.storage import Folder, is_full_disk, temp_name

    # Vector files of killed builds: none is the live catalogue's (a reader of an older one has it mapped).
    remove_stale_vector_files(db_path, keep=existing.vector_file if existing else None)

    # The one temporary-name rule (pipeline.storage): a dot-name beside the index, renamed into place.
    tmp = db_path.with_name(temp_name(db_path.name))
    _remove_db_files(tmp)
    timings: dict[str, float] = {}
    updated = False
    try:
        if _updatable(previous, runs, rows_only):
            # An update edits a copy of the live catalogue (readers keep the original until the rename).
            with _timed(timings, "copy"):
                Folder(str(db_path.parent)).copy(db_path.name, tmp.name)
            result = _in_database(tmp, files, fingerprint, storage_options, timings, lambda con: _update(
                con, files, runs, all_sources, fingerprint, settings, timings, db_path=db_path, previous=previous,
                storage_options=storage_options))
            updated = result is not None
            if not updated:
                _remove_db_files(tmp)
        if not updated:
            result = _in_database(tmp, files, fingerprint, storage_options, timings, lambda con: _build(
                con, files, runs, all_sources, fingerprint, settings, timings, rows_only=rows_only, db_path=db_path,
                previous=previous, storage_options=storage_options))
        info, built = result
        # A file replaced during the build (a run's final merge) may have been read half old, half new.
        _raise_if_changed(files, fingerprint, storage_options, None)
        # A leftover WAL next to the old file would be replayed onto the new one.
        _remove_db_files(db_path, keep_main=True)
        Folder(str(db_path.parent)).move(tmp.name, db_path.name)  # publishes the catalogue and its vector file
    except BaseException as exc:
        _remove_db_files(tmp)
        try:
            undo_vectors(db_path, existing)  # the live index's vector file as it was, no new one left
        except Exception:  # noqa: BLE001 - the build's own error is the one to report
            pass
        if isinstance(exc, Exception) and is_full_disk(exc):
            raise _disk_full(exc, db_path, existing is not None) from exc
        raise
    remove_stale_vector_files(db_path, keep=info.vector_file)
    return BuildReport(
        info, rebuilt=True, seconds=time.perf_counter() - started, timings=timings, probe_sets=probe_sets,
        ignored=tuple(ignored), vectors_read=built.appended if built else 0,
        vectors_rewritten=bool(built and built.rewritten), updated=updated,
    )


def _in_database(path: Path, files, fingerprint, storage_options, timings, fill):
    """Open the database file at ``path``, run ``fill(con)`` on it, checkpoint, close; fill's result."""
    con = duckdb.connect(str(path), config=CONNECT_CONFIG)
    try:
        load_extensions(con)
        # Bucket sources are read by DuckDB through the same fsspec filesystem as everything else.
        for fs in {id(fs): fs for fs in (_filesystem(f, storage_options)[0] for f in files) if fs is not None}.values():
            con.register_filesystem(fs)
        try:
            result = fill(con)
        except (duckdb.Error, OSError) as exc:
            _raise_if_changed(files, fingerprint, storage_options, exc)
            raise
        if result is not None:
            with _timed(timings, "checkpoint"):
                con.execute("CHECKPOINT")
        return result
    finally:
        con.close()


def _updatable(previous: IndexInfo | None, runs, rows_only: bool) -> bool:
    """Whether the previous index can be updated in place: same format and embedder, both searchable."""
    if previous is None or rows_only or previous.rows_only or previous.index_format != INDEX_FORMAT:
        return False
    run, dim = _index_embedder(runs)
    if dim is None and previous.embedding_dim is None:
        return True
    return (run.embed_model, run.embed_revision, dim) == (
        previous.embed_model, previous.embed_revision, previous.embedding_dim)


def _update(con, files, runs, sources, fingerprint, settings, timings, *, db_path, previous, storage_options):
    """The copied catalogue brought up to date with the changed files: (IndexInfo, VectorBuild or None),
    or None when the rows cannot be derived from the changed files alone (then the caller builds fresh)."""
    from schemas import COLUMN_NAMES

    from pipeline.search.catalogue_update import update_rows

    run, dim = _index_embedder(runs)
    before = set(map(tuple, previous.files))
    new_files = [str(path) for path, *marker in fingerprint if (str(path), *marker) not in before]
    now = set(map(tuple, fingerprint))
    gone_files = [str(path) for path, *marker in previous.files if (str(path), *marker) not in now]
    fresh_files = set(new_files)
    versions: dict[int, list[str]] = {}
    for path, file_run in zip(map(str, files), runs):
        if path in fresh_files:
            versions.setdefault(file_run.schema_version, []).append(path)
    plain = [c for c in COLUMN_NAMES if c != "embedding"]
    with _timed(timings, "load"):
        if versions:
            new_sql, new_params = _sources_sql(versions, plain), list(versions.values())
        else:  # nothing new: an empty selection of the same columns
            new_sql, new_params = f"SELECT * FROM ({_empty_sources_sql(con, plain)})", []
        delta = update_rows(con, new_sql=new_sql, new_params=new_params, new_files=new_files,
                            gone_files=gone_files, columns=plain)
    if delta is None:
        return None
    _check_row_models(con, run)
    with _timed(timings, "fts"):
        bm25.update(con, delta.removed, delta.added)
    built = None
    if dim:
        from pipeline.search.vector_build import update_vectors

        built = update_vectors(
            con, db_path, dim=dim, run=run, previous=previous, dropped=delta.dropped_slots, candidates=delta.added,
            ann_wanted=lambda live: _ann_wanted(settings, live), timings=timings, storage_options=storage_options,
        )
    con.execute(f"DROP TABLE {contract.INDEX_META}")
    return _write_info(con, run, dim, runs, sources, fingerprint, built, False), built


def _empty_sources_sql(con, columns: list[str]) -> str:
    """Zero rows shaped like image_rows' schema columns plus source_file/source_row."""
    return f"SELECT {', '.join(columns)}, source_file, source_row FROM {contract.IMAGE_ROWS} WHERE false"


def _raise_if_changed(files, fingerprint, storage_options, cause) -> None:
    """Raise _SourcesChanged when one of ``files`` is gone or (given ``fingerprint``) differs from it."""
    try:
        now = _fingerprint(files, storage_options)
    except FileNotFoundError as exc:
        raise _SourcesChanged(f"{exc.filename or exc} is gone") from cause
    except Exception:  # noqa: BLE001 - cannot tell: the original error stands
        return
    if fingerprint is not None and now != fingerprint:
        changed = next(path for (path, *a), (_, *b) in zip(now, fingerprint) if a != b)
        raise _SourcesChanged(f"{changed} was rewritten") from cause


def _disk_full(exc: Exception, db_path: Path, existed: bool) -> SearchError:
    """A full disk while building (DuckDB says so in its own IOException text), as one line."""
    from pipeline.storage import full_disk_fix, full_disk_reason

    kept = f"the old index {db_path} is untouched" if existed else f"no index was written at {db_path}"
    error = SearchError(f"cannot build the index {db_path}: {full_disk_reason(exc)}; {kept}. "
                        f"Fix: {full_disk_fix(exc, str(db_path.parent))} and rerun the same command")
    error.outage = True  # the CLI exits with pipeline.exit_codes.STORAGE_FAILED
    return error


def _source_key(source) -> str:
    """How a source is recorded: a local one as its absolute path (symlinks resolved), a bucket one as its URL."""
    from pipeline.storage import is_local, local_path

    source = str(source)
    return os.path.realpath(local_path(source)) if is_local(source) else source


def _ann_wanted(settings, live_rows: int) -> bool:
    ann, min_rows = settings
    return bool(ann if ann is not None else live_rows >= min_rows) and live_rows > 0


def _same_ann_choice(previous: IndexInfo, settings) -> bool:
    want = previous.embedding_dim is not None and _ann_wanted(settings, previous.embedded_rows)
    return want == previous.ann


def _existing_info(db_path: Path) -> IndexInfo | None:
    if not db_path.exists():
        return None
    refuse = f"{db_path} exists and is not a captioner search index; refusing to overwrite it: pass another --db"
    try:
        con = duckdb.connect(str(db_path), read_only=True, config=CONNECT_CONFIG)
    except duckdb.Error as exc:
        raise SearchError(f"{refuse} ({_first_line(exc)})") from exc
    try:
        return read_info(con, where=str(db_path))
    except SearchError as exc:
        raise SearchError(refuse) from exc
    finally:
        con.close()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _remove_db_files(path: Path, keep_main: bool = False) -> None:
    for p in ([] if keep_main else [path]) + [Path(f"{path}.wal")]:
        if p.exists():
            p.unlink()


@contextmanager
def _timed(timings: dict, step: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - t0


def _build(con, files, runs, sources, fingerprint, settings, timings, *, rows_only=False, db_path=None,
           previous=None, storage_options=None):
    """Fill an empty database with the layout pipeline.search.contract describes: (IndexInfo, VectorBuild or None)."""
    from schemas import COLUMN_NAMES

    run, dim = _index_embedder(runs)
    file_list = [str(p) for p in files]
    plain = [c for c in COLUMN_NAMES if c != "embedding"]  # constant schema column names, not user input
    versions: dict[int, list[str]] = {}
    for path, file_run in zip(file_list, runs):
        versions.setdefault(file_run.schema_version, []).append(path)

    # One row per uri: the newest row (pipeline.rows) decides status and the
    # file facts. When it is ok, caption/probes come from the newest ok row
    # that ran the captioner and the embedding from the newest ok row that ran
    # the embedder, each with its model columns, both among rows of the same
    # bytes (image_id): an embeddings-only output indexed over a captioned one
    # keeps the captions. A uri whose newest row says the file left the source (status
    # gone, schema v4) is left out: no reader of the index returns it.
    caption_cols = ["caption", "caption_truncated", "probes", "caption_model", "caption_revision", "probe_set_hash"]
    embed_cols = ["embed_model", "embed_revision"]
    newest = sql_is_newest(file="source_file", row="source_row")

    def part_of(alias: str, columns: list[str]) -> str:
        return ", ".join(f"CASE WHEN {alias}.uri IS NOT NULL THEN {alias}.{c} ELSE b.{c} END AS {c}" for c in columns)

    base_select = ", ".join(
        part_of("c", [c]) if c in caption_cols else part_of("e", [c]) if c in embed_cols else f"b.{c}" for c in plain
    )
    with _timed(timings, "load"):
        con.execute(
            f"""
            CREATE TABLE {contract.IMAGE_ROWS} AS
            WITH src AS ({_sources_sql(versions, plain)}),
            base AS (SELECT * FROM src QUALIFY {newest}),
            same_bytes AS (
                SELECT s.* FROM src AS s JOIN base AS b ON s.uri = b.uri AND s.image_id = b.image_id
                WHERE b.status = 'ok' AND s.status = 'ok'
            ),
            captioned AS (SELECT * FROM same_bytes WHERE caption_model IS NOT NULL QUALIFY {newest}),
            embedded AS (SELECT * FROM same_bytes WHERE embed_model IS NOT NULL QUALIFY {newest})
            SELECT row_number() OVER (ORDER BY b.uri) - 1 AS id, {base_select},
                   b.source_file, b.source_row,
                   e.source_file AS embedding_source_file, e.source_row AS embedding_source_row,
                   CASE WHEN c.uri IS NULL THEN b.source_file ELSE c.source_file END AS caption_source_file,
                   CASE WHEN c.uri IS NULL THEN b.source_row ELSE c.source_row END AS caption_source_row
            FROM base AS b
            LEFT JOIN captioned AS c ON c.uri = b.uri
            LEFT JOIN embedded AS e ON e.uri = b.uri
            WHERE {sql_is_live("b.status")}
            ORDER BY id
            """,
            [files_of for files_of in versions.values()],
        )
        if not rows_only:
            key_columns = [*KEY_COLUMNS, "caption_model", "embed_model"]
            create_source_keys(con, _sources_sql(versions, key_columns), list(versions.values()))
    _check_row_models(con, run)

    # The stored view's embedding is null: a reader shadows it with one over the vector file (contract).
    emb_select = f"CAST(NULL AS FLOAT[{dim}]) AS embedding" if dim else "CAST(NULL AS FLOAT[]) AS embedding"
    select_list = ", ".join(emb_select if c == "embedding" else f"r.{c}" for c in COLUMN_NAMES)
    view_extra = ", ".join(f"r.{c}" for c in contract.VIEW_COLUMNS)
    con.execute(
        f"CREATE VIEW {contract.IMAGES} AS SELECT {select_list}, {view_extra} FROM {contract.IMAGE_ROWS} AS r"
    )

    if not rows_only:
        with _timed(timings, "fts"):
            _build_docs(con)

    # Helpers for --where / captioner sql: the answer to one probe question.
    contract.add_macros(con)

    built = None
    if dim and not rows_only:
        from pipeline.search.vector_build import build_vectors

        built = build_vectors(
            con, db_path, dim=dim, run=run, files=file_list, fingerprint=fingerprint, previous=previous,
            ann_wanted=lambda live: _ann_wanted(settings, live), timings=timings, storage_options=storage_options,
        )
    return _write_info(con, run, dim, runs, sources, fingerprint, built, rows_only), built


def _build_docs(con) -> None:
    """BM25 text (the caption and every probe answer of searchable rows) and its fts index."""
    bm25.build(con)


def _index_embedder(runs):
    """(the run metadata naming the index's embedder, its dim or None): that of the files that have one
    (check_files made them agree)."""
    run = next((r for r in runs if r.embed_model is not None and r.embedding_dim), None) or next(
        (r for r in runs if r.embed_model is not None), runs[0]
    )
    return run, (int(run.embedding_dim) if run.embedding_dim else None)


def _write_info(con, run, dim, runs, sources, fingerprint, built, rows_only) -> IndexInfo:
    from schemas import SCHEMA_VERSION

    rows = con.execute("SELECT count(*) FROM image_rows").fetchone()[0]
    searchable = con.execute("SELECT count(*) FROM image_rows WHERE status = 'ok'").fetchone()[0]
    probes: dict[str, None] = {}
    for r in runs:
        probes.update(dict.fromkeys(r.probes))
    info = IndexInfo(
        index_format=INDEX_FORMAT,
        schema_version=SCHEMA_VERSION,
        embed_model=run.embed_model,
        embed_revision=run.embed_revision,
        embedding_dim=dim,
        probes=tuple(probes),
        sources=tuple(sources),
        files=fingerprint,
        rows=rows,
        searchable_rows=searchable,
        embedded_rows=built.embedded if built else 0,
        vector_file=built.file if built else None,
        vector_slots=built.slots if built else 0,
        ann_lists=built.ann_lists if built else None,
        ann_trained_rows=built.ann_trained_rows if built else 0,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        rows_only=rows_only,
    )
    contract.write_info(con, info)
    return info


def _sources_sql(versions: dict[int, list[str]], columns: list[str]) -> str:
    """Every source row as current-version ``columns`` + source_file/source_row; one parameter per version."""
    from schemas import upgrade_sql

    selects = []
    for version in versions:
        upgraded = upgrade_sql(version)
        select = ", ".join(f"{upgraded[c]} AS {c}" if c in upgraded else c for c in columns)
        selects.append(
            f"SELECT {select}, filename AS source_file, file_row_number AS source_row "
            f"FROM read_parquet(?, filename = true, file_row_number = true)"
        )
    return "\nUNION ALL\n".join(selects)


def _check_row_models(con, run) -> None:
    """Per-row embed_model/revision must agree with the files' metadata."""
    found = con.execute(
        "SELECT DISTINCT embed_model, embed_revision FROM image_rows WHERE embed_model IS NOT NULL"
    ).fetchall()
    stray = [f for f in found if f != (run.embed_model, run.embed_revision)]
    if stray:
        raise SearchError(
            f"rows were embedded with {stray} but the files' metadata says "
            f"{(run.embed_model, run.embed_revision)}; rewrite the files with one embedder before indexing"
        )
