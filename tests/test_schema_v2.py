"""Schema v2: its columns, the v1 -> v2 upgrade every reader uses, and the --probe threshold form."""

from __future__ import annotations

import pyarrow as pa
import pytest
from click.testing import CliRunner

import schemas
from pipeline.search.commands import SEARCH_COMMANDS
from pipeline.search.errors import SearchError
from pipeline.search.filters import ProbeFilter, filter_sql
from schemas import (
    SCHEMA_VERSION,
    RunMetadata,
    SchemaMismatch,
    check_schema,
    output_schema,
    read_metadata,
    upgrade_schema,
    upgrade_table,
)

RUN = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", 4, "0" * 64, ("Is it red?",))


def v1_table() -> pa.Table:
    base = {"schema_version": 1, "status": "ok", "probe_set_hash": "0" * 64, "processed_at": 0}
    rows = [
        {**base, "uri": "a", "caption": "red", "probes": [{"question": "Is it red?", "answer": "yes", "answer_bool": True}, None]},
        {**base, "uri": "b", "status": "error", "probes": None},
        {**base, "uri": "c", "caption": "blue", "probes": [{"question": "Is it red?", "answer": "no", "answer_bool": False}]},
    ]
    return pa.Table.from_pylist(rows, schema=schemas.v1.output_schema(4, RUN))


def test_v2_is_v1_plus_the_new_fields():
    v1, v2 = schemas.v1.output_schema(4), schemas.v2.output_schema(4)
    assert schemas.v2.SCHEMA_VERSION == 2
    assert v2.names == [*v1.names[: v1.names.index("caption") + 1], "caption_truncated", *v1.names[v1.names.index("caption") + 1 :]]
    assert v2.field("caption_truncated").type == pa.bool_() and v2.field("caption_truncated").nullable
    probe = v2.field("probes").type.value_type
    assert [f.name for f in probe] == ["question", "answer", "answer_bool", "yes_prob", "truncated"]
    assert probe.field("yes_prob").type == pa.float32() and probe.field("yes_prob").nullable
    assert probe.field("truncated").type == pa.bool_() and probe.field("truncated").nullable
    assert "2" in v2.field("schema_version").metadata[b"doc"].decode()
    # v1 stays frozen.
    assert [f.name for f in v1.field("probes").type.value_type] == ["question", "answer", "answer_bool"]


def test_output_schema_stamps_its_own_version():
    assert read_metadata(output_schema(4, RUN)).schema_version == SCHEMA_VERSION == RUN.schema_version
    assert read_metadata(schemas.v2.output_schema(4, RUN)).schema_version == 2
    assert read_metadata(schemas.v1.output_schema(4, RUN)).schema_version == 1


def test_check_schema_accepts_v1_and_v2_and_says_which():
    assert check_schema(schemas.v1.output_schema(4, RUN)).schema_version == 1
    assert check_schema(schemas.v2.output_schema(4, RUN)).schema_version == 2
    assert check_schema(output_schema(4, RUN)).schema_version == SCHEMA_VERSION


def test_check_schema_refuses_unknown_versions_and_wrong_columns():
    future = output_schema(4, RUN)
    with pytest.raises(SchemaMismatch, match="schema version 99; this captioner reads versions 1, 2, 3"):
        check_schema(future.with_metadata({**future.metadata, b"captioner.schema_version": b"99"}))
    # A v2 file that claims to be v1 (or the reverse) is a mismatch, not silently accepted.
    lying = schemas.v2.output_schema(4).with_metadata(schemas.v1.output_schema(4, RUN).metadata)
    with pytest.raises(SchemaMismatch, match="schema v1 expects"):
        check_schema(lying)


def test_upgrade_table_turns_v1_rows_into_current_rows_with_nulls():
    table = v1_table()
    upgraded = upgrade_table(table)
    assert upgraded.schema.equals(output_schema(4, read_metadata(upgraded.schema)), check_metadata=True)
    assert check_schema(upgraded.schema).schema_version == SCHEMA_VERSION
    assert upgraded["caption_truncated"].to_pylist() == [None, None, None]
    assert upgraded["source_mtime"].to_pylist() == [None, None, None]  # v3's column, through v2
    assert upgraded["probes"].to_pylist() == [
        [{"question": "Is it red?", "answer": "yes", "answer_bool": True, "yes_prob": None, "truncated": None}, None],
        None,
        [{"question": "Is it red?", "answer": "no", "answer_bool": False, "yes_prob": None, "truncated": None}],
    ]
    # The rest is untouched, including the row's own schema_version.
    for name in table.column_names:
        if name != "probes":  # (columns v2 and v3 added are checked above)
            assert upgraded[name].equals(table[name])


@pytest.mark.parametrize("piece", ["slice", "chunks"], ids=str)
def test_upgrade_table_handles_sliced_and_chunked_columns(piece):
    table = v1_table()
    table = table.slice(1) if piece == "slice" else pa.concat_tables([table, table.slice(1)])
    upgraded = upgrade_table(table)
    assert [p is None for p in upgraded["probes"].to_pylist()] == [p is None for p in table["probes"].to_pylist()]
    assert upgraded.num_rows == table.num_rows


def test_upgrade_table_on_some_columns_and_on_v2():
    assert upgrade_table(v1_table().select(["uri", "caption", "status"])).column_names == [
        "uri", "caption", "caption_truncated", "caption_short", "status"  # caption_short: v5, after v2's column
    ]
    current = upgrade_table(v1_table())
    assert upgrade_table(current) is current
    assert upgrade_schema(schemas.v1.output_schema(4, RUN)).names == output_schema(4).names


def test_upgrade_table_needs_captioner_metadata():
    with pytest.raises(SchemaMismatch, match="not written by captioner"):
        upgrade_table(pa.table({"uri": ["a"]}))


def test_describe_prints_v2():
    text = schemas.v2.describe(8)
    assert text.startswith("captioner Parquet schema v2")
    assert text.index("caption_truncated") > text.index("  caption ") and "yes_prob" in text


@pytest.mark.parametrize(
    "text, question, operator, answer",
    [
        ("Is there text in the image?>0.8", "Is there text in the image?", ">", "0.8"),
        ("Is there text in the image? >= 0.5", "Is there text in the image?", ">=", "0.5"),
        ("Is it red?<0.25", "Is it red?", "<", "0.25"),
        ("Is it red?<=1", "Is it red?", "<=", "1"),
        ("Is it red?=yes", "Is it red?", "=", "yes"),
        ("What is 1+1=2?=2", "What is 1+1=2?", "=", "2"),
    ],
)
def test_probe_filter_forms(text, question, operator, answer):
    parsed = ProbeFilter.parse(text)
    assert (parsed.question, parsed.operator, parsed.answer) == (question, operator, answer)
    sql, params = filter_sql(None, [parsed], [question])
    assert question not in sql  # bound, never spliced
    assert question.lower() in params


def test_probe_threshold_is_bound_and_compares_yes_prob():
    sql, params = filter_sql(None, [ProbeFilter.parse("Is it red?>0.8")], ["Is it red?"])
    assert "p.yes_prob > ?" in sql and "0.8" not in sql
    assert params == ["is it red?", 0.8]


@pytest.mark.parametrize("text", ["Is it red?>high", "Is it red?>1.5", "Is it red?<-0.1", "Is it red?>nan", "Is it red?>"])
def test_probe_threshold_must_be_a_probability(text):
    with pytest.raises(SearchError, match="--probe"):
        ProbeFilter.parse(text)


def test_search_help_teaches_the_threshold_form():
    search = next(c for c in SEARCH_COMMANDS if c.name == "search")
    out = CliRunner().invoke(search, ["--help"]).output
    assert "Is there text in the image?>0.8" in out and ">=" in out and "schema v1" in out
