"""pipeline.output and pipeline.rows without Ray: the part writer, resume state, the merges.

Rows are built here as the stages emit them (the current schema with run
metadata, through tests/rows.py); the store is the real one, on a local folder or fsspec's memory
filesystem standing in for a bucket (no rename; whole-object writes).
"""

from __future__ import annotations

import gc
import os
import uuid
from datetime import datetime, timedelta, timezone

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import rows as row_rule
from pipeline.cli import main
from pipeline.output import OutputStore, PartWriter
from tests import rows
from schemas import STATUS_ERROR, STATUS_OK, RunMetadata, check_schema, output_schema

DIM = 8
RUN = RunMetadata(
    caption_model="tiny-vlm", caption_revision="local", embed_model="open_clip:tiny", embed_revision="local",
    embedding_dim=DIM, probe_set_hash="0" * 64, probes=(),
)
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
# The source mtime rows record by default (epoch seconds, as listed): a day before T0.
MTIME = (T0 - timedelta(days=1)).timestamp()


def make_rows(
    uris, *, at=T0, status=STATUS_OK, error_kind=None, size=100, run=RUN, caption="a photo", seed=0, mtime=MTIME
) -> pa.Table:
    """Rows as conform emits them: one per uri, all with the given status; ``mtime``: the source_mtime recorded."""
    count = len(uris)
    ok = status == STATUS_OK
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((count, run.embedding_dim or 1)).astype(np.float32) if ok else None
    made = [
        rows.row(
            uri, run=run, at=at, status=status,
            image_id=f"{hash(uri) & 0xFFFFFFFF:064x}", bytes=size,
            source_mtime=None if mtime is None else datetime.fromtimestamp(mtime, timezone.utc),
            format="JPEG" if ok else None, width=64 if ok else None, height=48 if ok else None,
            error_kind=None if ok else error_kind, error=None if ok else f"{error_kind}: test",
            caption=caption if ok and run.caption_model else None,
            probes=[] if ok and run.caption_model else None,
            embedding=embeddings[i].tolist() if ok and run.embed_model else None,
        )
        for i, uri in enumerate(uris)
    ]  # fmt: skip
    return rows.table(made, run)


def uris(n, prefix="/photos/img"):
    return [f"{prefix}{i:05d}.jpg" for i in range(n)]


# ---- the newest-row rule ---------------------------------------------------------------


def test_newest_rule_orders_by_time_then_file_then_row():
    t = pa.array([T0, T0, T0 + timedelta(seconds=1), T0, T0], pa.timestamp("us", tz="UTC"))
    keys = pa.concat_tables([
        row_rule.key_table(pa.array(["a", "b", "c"]), t.slice(0, 3), file_rank=0),
        row_rule.key_table(pa.array(["a", "c"]), t.slice(3, 2), file_rank=1),
        row_rule.key_table(pa.array(["b"]), t.slice(0, 1), file_rank=0, first_row=3),
    ])
    current = row_rule.newest_rows(keys).to_pylist()
    assert [(r["uri"], r["file"], r["row"]) for r in current] == [("a", 1, 0), ("b", 0, 3), ("c", 0, 2)]


def test_sql_rule_is_generated_from_the_same_order():
    sql = row_rule.sql_is_newest(file="filename", row="file_row_number")
    assert sql == "row_number() OVER (PARTITION BY uri ORDER BY processed_at DESC, filename DESC, file_row_number DESC) = 1"


# ---- part writer -------------------------------------------------------------------------


def test_part_writer_commits_every_n_rows_and_flushes_the_rest(tmp_path):
    store = OutputStore(str(tmp_path / "out") + "/")
    writer = PartWriter(store, rows_per_part=4)
    for start in range(0, 10, 3):  # batches of 3 rows, as Ray hands them back
        writer.add(make_rows(uris(10)[start : start + 3]))
    assert len(store.data_files()) == 2
    writer.flush()
    files = store.data_files()
    assert [pq.read_metadata(f).num_rows for f in files] == [4, 4, 2]
    for f in files:
        assert check_schema(pq.read_schema(f)) == RUN
    assert writer.schema.equals(output_schema(DIM, RUN), check_metadata=True)


def test_part_writer_restores_metadata_ray_dropped(tmp_path):
    store = OutputStore(str(tmp_path / "out.parquet"))
    writer = PartWriter(store, rows_per_part=100)
    table = make_rows(uris(3))
    writer.add(table)
    writer.add(table.replace_schema_metadata(None))
    writer.flush()
    assert store.finalize(writer.schema) == 3
    assert check_schema(pq.read_schema(tmp_path / "out.parquet")) == RUN


# ---- resume state --------------------------------------------------------------------------


@pytest.fixture
def mixed_output(tmp_path):
    """An output whose current rows: ok, permanent errors, retryable errors, superseded rows."""
    store = OutputStore(str(tmp_path / "out.parquet"))
    store.write_part(make_rows(["/p/ok.jpg", "/p/fixed.jpg", "/p/broke.jpg"], at=T0))
    store.write_part(pa.concat_tables([
        make_rows(["/p/not_image.jpg"], status=STATUS_ERROR, error_kind="not_image", at=T0),
        make_rows(["/p/truncated.jpg"], status=STATUS_ERROR, error_kind="truncated", at=T0),
        make_rows(["/p/missing.jpg"], status=STATUS_ERROR, error_kind="missing", size=None, at=T0),
        make_rows(["/p/unreadable.jpg"], status=STATUS_ERROR, error_kind="unreadable", at=T0),
        make_rows(["/p/model.jpg"], status=STATUS_ERROR, error_kind="model", at=T0),
        make_rows(["/p/fixed.jpg"], status=STATUS_ERROR, error_kind="truncated", at=T0 - timedelta(hours=1)),
        make_rows(["/p/broke.jpg"], status=STATUS_ERROR, error_kind="model", at=T0 + timedelta(hours=1)),
    ]))
    return store


def test_resume_skips_permanent_failures_and_retries_the_rest(mixed_output):
    state = mixed_output.load_state(RUN, overwrite=False)
    done = {u for u in state.current if state.is_done(u, 100, MTIME)}
    assert done == {"/p/ok.jpg", "/p/fixed.jpg", "/p/not_image.jpg", "/p/truncated.jpg"}
    assert state.rows == 8 and state.errors == 6
    with_retry = {u for u in state.current if state.is_done(u, 100, MTIME, retry_errors=True)}
    assert with_retry == {"/p/ok.jpg", "/p/fixed.jpg"}
    assert not state.is_done("/p/never-seen.jpg", 100, MTIME)


def test_resume_redoes_a_file_whose_size_or_recorded_mtime_differs(mixed_output):
    state = mixed_output.load_state(RUN, overwrite=False)
    for uri in ("/p/ok.jpg", "/p/not_image.jpg"):
        assert state.is_done(uri, 100, MTIME)
        assert not state.is_done(uri, 101, MTIME)  # size changed
        assert not state.is_done(uri, 100, MTIME + 3600)  # modified since
        # New bytes with an older mtime (cp -p, rsync -a, a backup restore): not the file the row was made from.
        assert not state.is_done(uri, 100, MTIME - 86400)
        assert not state.is_done(uri, 100, MTIME + 1e-6)  # the mtime is compared to the microsecond


def test_resume_hashes_when_size_and_mtime_cannot_tell(mixed_output, tmp_path):
    state = mixed_output.load_state(RUN, overwrite=False)
    image_id = state.current["/p/ok.jpg"].image_id
    assert image_id
    # A listing without size or mtime: the bytes decide, and without them the file is redone.
    assert not state.is_done("/p/ok.jpg", None, None)
    assert state.is_done("/p/ok.jpg", None, None, digest=lambda: image_id)
    assert not state.is_done("/p/ok.jpg", 100, None, digest=lambda: "f" * 64)
    assert not state.is_done("/p/ok.jpg", 100, None, digest=lambda: None)  # unreadable now

    # Rows written before schema v3 recorded no mtime (upgraded: source_mtime null).
    store = OutputStore(str(tmp_path / "old.parquet"))
    store.write_part(make_rows(["/p/a.jpg"], mtime=None))
    state = store.load_state(RUN, overwrite=False)
    a = state.current["/p/a.jpg"]
    assert a.mtime_us is None
    assert not state.is_done("/p/a.jpg", 100, MTIME)  # cannot tell: redone unless hashed
    assert state.is_done("/p/a.jpg", 100, MTIME, digest=lambda: a.image_id)
    assert not state.is_done("/p/a.jpg", 100, MTIME, digest=lambda: "0" * 64)
    assert not state.is_done("/p/a.jpg", 101, MTIME, digest=lambda: a.image_id)  # a size change needs no hash


# ---- single-file merge: streamed ------------------------------------------------------------


def test_merge_keeps_the_newest_row_per_image_sorted_by_uri(mixed_output, tmp_path):
    assert mixed_output.finalize(None) == 8
    table = pq.read_table(tmp_path / "out.parquet")
    check_schema(table.schema)
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert table["uri"].to_pylist() == sorted(rows)
    assert rows["/p/fixed.jpg"]["status"] == STATUS_OK
    assert rows["/p/broke.jpg"]["error_kind"] == "model"
    assert not (tmp_path / "out.parquet.parts").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_merge_streams_in_row_group_slices_with_bounded_memory(tmp_path):
    """An 80-part output merged into one file: memory stays near a few parts' size, not the output's."""
    dim = 256
    run = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", dim, "0" * 64)
    store = OutputStore(str(tmp_path / "big.parquet"))
    store.merge_rows_per_group = 250
    store.merge_cache_bytes = 8 << 20
    names = uris(40_000)
    for part in range(80):  # rows of a part are a contiguous slice of the sorted listing, as in a run
        store.write_part(make_rows(names[part * 500 : (part + 1) * 500], run=run, seed=part))
    # A rerun re-did every 10th image: those rows are newer and must win.
    store.write_part(make_rows(names[::10], run=run, at=T0 + timedelta(days=1), caption="again", seed=99))
    files = store.data_files()
    total = sum(pq.read_table(f).nbytes for f in files)
    row_groups = sum(pq.read_metadata(f).num_row_groups for f in files)

    gc.collect()
    baseline = pa.total_allocated_bytes()
    peak = [0]
    real_write = pq.ParquetWriter.write_table

    def watching(self, table, *args, **kwargs):
        peak[0] = max(peak[0], pa.total_allocated_bytes() - baseline)
        return real_write(self, table, *args, **kwargs)

    pq.ParquetWriter.write_table = watching
    try:
        assert store.finalize(None) == 40_000
    finally:
        pq.ParquetWriter.write_table = real_write
    assert peak[0] < total / 3, (peak[0], total)
    # Read in row-group slices, each about once (parts cover narrow ranges of the sorted listing).
    assert row_groups <= store.merge_row_groups_read <= row_groups + 2

    merged = pq.ParquetFile(tmp_path / "big.parquet")
    assert merged.metadata.num_row_groups == 160  # written 250 rows at a time
    table = merged.read(columns=["uri", "caption"])
    assert table["uri"].to_pylist() == names
    captions = table["caption"].to_pylist()
    assert captions[::10] == ["again"] * 4000 and set(captions) == {"again", "a photo"}


def test_merge_into_a_bucket_streams_and_leaves_no_temporary_objects():
    root = f"captioner-test-{uuid.uuid4().hex}"
    store = OutputStore(f"memory://{root}/runs/out.parquet")
    assert not store.is_local
    store.merge_rows_per_group = 10
    store.write_part(make_rows(uris(25)))
    store.write_part(make_rows(uris(25)[:5], at=T0 + timedelta(seconds=1), caption="new"))
    writes = []
    fs = fsspec.filesystem("memory")
    real_pipe = type(fs).pipe_file

    def no_whole_file(self, path, *args, **kwargs):
        writes.append(path)
        return real_pipe(self, path, *args, **kwargs)

    type(fs).pipe_file = no_whole_file
    try:
        assert store.finalize(None) == 25
    finally:
        type(fs).pipe_file = real_pipe
    assert writes == []  # the merged file went through a file handle, not one bytes object
    assert fs.ls(f"/{root}/runs", detail=False) == [f"/{root}/runs/out.parquet"]
    with fs.open(f"/{root}/runs/out.parquet", "rb") as handle:
        table = pq.read_table(handle)
    assert table["caption"].to_pylist() == ["new"] * 5 + ["a photo"] * 20
    fs.rm(f"/{root}", recursive=True)


def test_directory_output_drops_superseded_rows(tmp_path):
    store = OutputStore(str(tmp_path / "out") + "/")
    store.write_part(make_rows(uris(6)))
    store.write_part(make_rows(uris(6)[:2], at=T0 + timedelta(seconds=1), caption="new"))
    assert store.finalize(None) == 6
    table = pa.concat_tables([pq.read_table(f) for f in store.data_files()]).sort_by("uri")
    assert table["caption"].to_pylist() == ["new", "new"] + ["a photo"] * 4


# ---- empty outputs (item 5) -------------------------------------------------------------------


@pytest.mark.parametrize("out", ["empty.parquet", "emptydir/"])
def test_empty_run_writes_an_empty_schema_valid_output_that_indexes(tmp_path, out):
    store = OutputStore(str(tmp_path / out))
    assert store.finalize(None, run=RUN) == 0
    [path] = store.data_files()
    assert check_schema(pq.read_schema(path)) == RUN and pq.read_metadata(path).num_rows == 0
    result = CliRunner().invoke(main, ["index", str(tmp_path / out), "--db", str(tmp_path / "i.duckdb")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "0 rows" in result.output

    # A later run that finds images replaces the placeholder.
    store = OutputStore(str(tmp_path / out))
    store.write_part(make_rows(uris(2)))
    assert store.finalize(None) == 2
    assert sum(pq.read_metadata(f).num_rows for f in store.data_files()) == 2
    assert len(store.data_files()) == 1


@pytest.mark.parametrize("out", ["captions.parquet", "captions/"])
def test_captioner_run_on_an_empty_folder_writes_an_output_that_indexes(tmp_path, out, tiny_vlm_dir, tiny_clip_dir):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, [
        "run", str(tmp_path / "empty"), "--out", str(tmp_path / out),
        "--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir), "--no-progress",
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    result = CliRunner().invoke(main, ["index", str(tmp_path / out), "--db", str(tmp_path / "i.duckdb")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "0 rows" in result.output
