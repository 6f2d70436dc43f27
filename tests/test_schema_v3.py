"""Schema v3: the source file's mtime beside its size, and the v2 -> v3 upgrade every reader uses."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import SCHEMA_VERSION, RunMetadata, check_schema, output_schema, read_metadata, upgrade_sql, upgrade_table

RUN = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", 4, "0" * 64, ("Is it red?",))


def v2_table() -> pa.Table:
    base = {"schema_version": 2, "status": "ok", "probe_set_hash": "0" * 64, "processed_at": 0, "bytes": 10}
    probe = {"question": "Is it red?", "answer": "yes", "answer_bool": True, "yes_prob": 0.75, "truncated": False}
    rows = [{**base, "uri": "a", "caption": "red", "probes": [probe]}, {**base, "uri": "b", "status": "error"}]
    return pa.Table.from_pylist(rows, schema=schemas.v2.output_schema(4, RUN))


def test_v3_is_v2_plus_source_mtime_after_bytes():
    v2, v3 = schemas.v2.output_schema(4), schemas.v3.output_schema(4)
    assert schemas.v3.SCHEMA_VERSION == 3 and schemas.v4.output_schema(4).names == v3.names  # v4 added no column
    at = v2.names.index("bytes") + 1
    assert v3.names == [*v2.names[:at], "source_mtime", *v2.names[at:]]
    field = v3.field("source_mtime")
    assert field.type == pa.timestamp("us", tz="UTC") and field.nullable
    assert v3.field("probes").type == v2.field("probes").type  # no probe field added
    # v2 stays frozen.
    assert "source_mtime" not in v2.names and "2" in v2.field("schema_version").metadata[b"doc"].decode()


def test_upgrade_table_gives_v2_rows_a_null_source_mtime():
    table = v2_table()
    upgraded = upgrade_table(table)
    assert check_schema(upgraded.schema).schema_version == SCHEMA_VERSION
    assert upgraded.schema.equals(output_schema(4, read_metadata(upgraded.schema)), check_metadata=True)
    assert upgraded["source_mtime"].to_pylist() == [None, None]  # unknown, never a made-up time
    for name in table.column_names:
        assert upgraded[name].equals(table[name])


def test_upgrade_sql_composes_every_step_up_to_v3(tmp_path):
    v5 = set(upgrade_sql(4))  # what v5 added (tests/test_schema_v5.py), on top of every step below
    assert set(upgrade_sql(3)) == v5
    assert upgrade_sql(2) == {"source_mtime": "CAST(NULL AS TIMESTAMPTZ)", **upgrade_sql(4)}
    assert set(upgrade_sql(1)) == {"caption_truncated", "source_mtime", "probes"} | v5
    # What the index runs over files of each older version reads as current rows.
    for version, table in ((2, v2_table()),):
        path = tmp_path / f"v{version}.parquet"
        pq.write_table(table, path)
        exprs = upgrade_sql(version)
        select = ", ".join(f"{exprs.get(name, name)} AS {name}" for name in output_schema(4).names)
        rows = duckdb.sql(f"SELECT {select} FROM read_parquet('{path}') ORDER BY uri").fetchall()
        assert [r[output_schema(4).names.index("source_mtime")] for r in rows] == [None, None]


def test_describe_prints_v3_with_source_mtime():
    text = schemas.v3.describe(8)
    assert text.startswith("captioner Parquet schema v3")
    assert text.index("  bytes ") < text.index("source_mtime") < text.index("  format ")


def test_a_v3_row_keeps_its_source_mtime_to_the_microsecond(tmp_path):
    when = datetime(2020, 1, 1, 0, 0, 0, 123456, tzinfo=timezone.utc)
    rows = [{"schema_version": 3, "uri": "a", "status": "ok", "probe_set_hash": "0" * 64, "processed_at": 0,
             "source_mtime": when}]
    path = tmp_path / "v3.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema(4, RUN)), path)
    assert pq.read_table(path)["source_mtime"].to_pylist() == [when]
