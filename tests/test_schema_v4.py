"""Schema v4: a third status, ``gone`` (the file left the source), and the v3 -> v4 upgrade."""

from __future__ import annotations

import pyarrow as pa

import schemas
from schemas import SCHEMA_VERSION, STATUS_GONE, RunMetadata, check_schema, upgrade_sql, upgrade_table
from schemas.upgrade import readable

RUN = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", 4, "0" * 64, ("Is it red?",))


def test_v4_is_v3_with_gone_as_a_status():
    v3, v4 = schemas.v3.output_schema(4), schemas.v4.output_schema(4)
    assert schemas.v4.SCHEMA_VERSION == 4 and STATUS_GONE == "gone"
    assert v4.names == v3.names and all(v4.field(n).type.equals(v3.field(n).type) for n in v4.names)
    assert "'gone'" in v4.field("status").metadata[b"doc"].decode()
    # v3 stays frozen: its readers knew only ok and error.
    assert "gone" not in v3.field("status").metadata[b"doc"].decode()
    assert readable().startswith("versions 1, 2, 3, 4")


def test_a_v3_table_upgrades_to_v4_unchanged_but_for_its_version():
    base = {"schema_version": 3, "status": "ok", "probe_set_hash": "0" * 64, "processed_at": 0, "bytes": 10}
    table = pa.Table.from_pylist([{**base, "uri": "a"}, {**base, "uri": "b", "status": "error"}],
                                 schema=schemas.v3.output_schema(4, RUN))
    upgraded = upgrade_table(table)
    assert check_schema(upgraded.schema).schema_version == SCHEMA_VERSION
    # Every v3 column comes through unchanged (v5's added columns beside them are null).
    assert [c for c in upgraded.column_names if c in table.column_names] == table.column_names
    for name in table.column_names:
        assert upgraded[name].equals(table[name])
    assert upgrade_sql(3) == upgrade_sql(4)  # the v3 -> v4 step adds nothing


def test_describe_prints_v4_and_its_gone_status():
    text = schemas.v4.describe(8)
    assert text.startswith("captioner Parquet schema v4") and "'gone'" in text
