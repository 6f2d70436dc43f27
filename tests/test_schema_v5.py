"""Schema v5: the text read in the image (OCR), its lines, the OCR model, a short caption; the v4 -> v5 upgrade."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import SCHEMA_VERSION, RunMetadata, check_schema, output_schema, read_metadata, upgrade_sql, upgrade_table
from schemas.upgrade import readable

RUN = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", 4, "0" * 64, ("Is it red?",))


def v4_table() -> pa.Table:
    base = {"schema_version": 4, "status": "ok", "probe_set_hash": "0" * 64, "processed_at": 0, "bytes": 10}
    rows = [{**base, "uri": "a", "caption": "a red sign"}, {**base, "uri": "b", "status": "gone"}]
    return pa.Table.from_pylist(rows, schema=schemas.v4.output_schema(4, RUN))


def test_v5_is_v4_plus_the_text_columns_each_after_its_anchor():
    v4, v5 = schemas.v4.output_schema(4).names, output_schema(4).names
    assert SCHEMA_VERSION == 5 and readable() == "versions 1, 2, 3, 4, 5"
    added = {"caption_short": "caption_truncated", "text": "probes", "text_lines": "text",
             "ocr_model": "embed_revision", "ocr_revision": "ocr_model"}
    assert [n for n in v5 if n not in added] == v4
    for name, anchor in added.items():
        assert v5.index(name) == v5.index(anchor) + 1 and output_schema(4).field(name).nullable
    line = output_schema(4).field("text_lines").type.value_type
    assert [f.name for f in line] == ["text", "confidence", "box"] and line.field("box").type == pa.list_(pa.float32(), 8)
    # v4 stays frozen.
    assert "text" not in v4 and "4" in schemas.v4.output_schema(4).field("schema_version").metadata[b"doc"].decode()
    # RunMetadata without OCR (every older file) reads as OCR off; OCR is not in what resume must match.
    assert RUN.ocr_model is None and RUN.models_signature() == RunMetadata(*RUN.__dict__.values()).models_signature()


def test_a_v4_table_upgrades_with_null_text_never_empty_text():
    upgraded = upgrade_table(v4_table())
    assert check_schema(upgraded.schema).schema_version == SCHEMA_VERSION
    assert upgraded.schema.equals(output_schema(4, read_metadata(upgraded.schema)), check_metadata=True)
    for name in ("caption_short", "text", "text_lines", "ocr_model", "ocr_revision"):
        assert upgraded[name].to_pylist() == [None, None]  # unknown: OCR never ran, not ''
    assert upgraded["caption"].to_pylist() == ["a red sign", None]


def test_upgrade_sql_reads_v4_files_as_v5_rows_in_duckdb(tmp_path):
    path = tmp_path / "v4.parquet"
    pq.write_table(v4_table(), path)
    exprs = upgrade_sql(4)
    assert set(exprs) == {"caption_short", "text", "text_lines", "ocr_model", "ocr_revision"}
    names = output_schema(4).names
    select = ", ".join(f"{exprs.get(name, name)} AS {name}" for name in names)
    relation = duckdb.sql(f"SELECT {select} FROM read_parquet('{path}') ORDER BY uri")
    types = dict(zip(relation.columns, map(str, relation.types)))
    assert types["text_lines"] == "STRUCT(\"text\" VARCHAR, confidence FLOAT, box FLOAT[8])[]"
    rows = relation.fetchall()
    assert [r[names.index("text")] for r in rows] == [None, None]


def test_describe_prints_v5_and_its_text_columns():
    text = schemas.describe(8)
    assert text.startswith("captioner Parquet schema v5") and "text_lines" in text and "OCR" in text
