"""`captioner export --from PARQUET` goes through the index builder (issue 13, item 2).

One current-row rule for both readers (the index's, pipeline/rows.py), and the
output is never read whole into memory: the rows land in a temporary index
that is removed afterwards.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from schemas import RunMetadata
from tests.export_data import PROBES, write_library
from tests.search_data import later, ok_row, run_metadata, write_rows


def export(*args, exit_code=0):
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    assert result.exit_code == exit_code, (result.output, result.exception)
    return result


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """Point tempfile at a folder of our own, to see what an export leaves behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_from_never_reads_the_output_whole(tmp_path, monkeypatch, own_tmp):
    root, parquet = tmp_path / "photos", tmp_path / "captions.parquet"
    write_library(root, parquet)

    def refuse(*args, **kwargs):
        raise AssertionError("export --from read a whole Parquet file into memory")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetDataset, "read", refuse)
    export("alt-text", "--from", parquet, "--out", tmp_path / "alt.jsonl")
    assert len(records(tmp_path / "alt.jsonl")) == 4
    assert list(own_tmp.iterdir()) == []  # the temporary index is gone


def test_the_temporary_index_is_removed_when_the_export_fails(tmp_path, own_tmp):
    root, parquet = tmp_path / "photos", tmp_path / "captions.parquet"
    write_library(root, parquet)
    result = export("alt-text", "--from", parquet, "--out", tmp_path / "a.jsonl", "--where", "no_such_column > 1", exit_code=1)
    assert "no_such_column" in result.output
    assert list(own_tmp.iterdir()) == []


def test_from_and_index_pick_the_same_current_row(tmp_path):
    """A folder holding a captioned part and a newer embeddings-only part: the index keeps the
    caption (pipeline.search.index), and so must --from, since it reads through the same builder."""
    run = run_metadata(probes=PROBES)
    embed_only = RunMetadata(None, None, run.embed_model, run.embed_revision, run.embedding_dim, "0" * 64)
    out = tmp_path / "out"
    out.mkdir()
    captioned = ok_row("/p/a.jpg", "A red bicycle against a wall.", ["no", "blue"], [1, 0, 0, 0], run=run)
    vectors = ok_row("/p/a.jpg", None, [], [0, 1, 0, 0], run=embed_only, at=later(5))
    vectors["image_id"] = captioned["image_id"]  # the same bytes, embedded again later
    write_rows(out / "part-a.parquet", [captioned], run)
    write_rows(out / "part-b.parquet", [vectors], embed_only)

    export("alt-text", "--from", out, "--out", tmp_path / "from.jsonl")
    CliRunner().invoke(main, ["index", str(out), "--db", str(tmp_path / "i.duckdb")], catch_exceptions=False)
    export("alt-text", "--index", tmp_path / "i.duckdb", "--out", tmp_path / "index.jsonl")
    assert records(tmp_path / "from.jsonl") == records(tmp_path / "index.jsonl")
    assert [r["caption"] for r in records(tmp_path / "from.jsonl")] == ["A red bicycle against a wall."]


@pytest.mark.parametrize("source", ["--from", "--index"])
def test_where_cannot_reach_files_from_either_source(tmp_path, source):
    root, parquet = tmp_path / "photos", tmp_path / "captions.parquet"
    write_library(root, parquet)
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    if source == "--index":
        CliRunner().invoke(main, ["index", str(parquet), "--db", str(tmp_path / "i.duckdb")], catch_exceptions=False)
    where = f"EXISTS (SELECT * FROM read_csv('{secret}'))"
    result = export("alt-text", source, parquet if source == "--from" else tmp_path / "i.duckdb",
                    "--out", tmp_path / "a.jsonl", "--where", where, exit_code=1)
    assert "Traceback" not in result.output and not (tmp_path / "a.jsonl").exists()


def test_both_sources_see_the_same_images_view_and_features(tmp_path):
    from pipeline.export.rows import open_rows
    from pipeline.search import build_index

    root, parquet = tmp_path / "photos", tmp_path / "captions.parquet"
    write_library(root, parquet)
    build_index([parquet], tmp_path / "i.duckdb")
    columns = "SELECT column_name FROM (DESCRIBE images)"
    with open_rows(parquet=parquet) as from_parquet, open_rows(index=tmp_path / "i.duckdb") as from_index:
        assert from_parquet._query(columns, []) == from_index._query(columns, [])
        assert from_parquet.has_yes_prob == from_index.has_yes_prob  # schema v1 rows read as v2: the field, all null
        assert from_parquet.questions == from_index.questions == PROBES
        assert list(from_parquet.rows()) == list(from_index.rows())


def test_a_rows_only_index_answers_sql_but_refuses_searches(tmp_path):
    from pipeline.search import ImageIndex, SearchError, build_index

    root, parquet = tmp_path / "photos", tmp_path / "captions.parquet"
    write_library(root, parquet)
    report = build_index([parquet], tmp_path / "rows.duckdb", rows_only=True)
    assert report.info.rows_only and report.info.embedded_rows == 0 and not report.info.ann
    with ImageIndex.open(tmp_path / "rows.duckdb") as idx:
        assert idx.sql("SELECT count(*) FROM images").rows == [(5,)]
        assert idx.sql("SELECT probe_bool(probes, 'Is there a person in the image?') FROM images LIMIT 1").rows
        with pytest.raises(SearchError, match="rows only"):
            idx.search_text("dog")
        with pytest.raises(SearchError, match="rows only"):
            idx.search_similar(0)
