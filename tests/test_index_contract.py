"""The index's layout is what pipeline.search.contract says it is (issue 13, item 2)."""

from __future__ import annotations

import pytest

from pipeline.search import ImageIndex, build_index, contract
from schemas import COLUMN_NAMES
from tests.search_data import crafted_rows, run_metadata, write_rows


@pytest.mark.parametrize("rows_only", [False, True], ids=["search", "rows-only"])
def test_a_built_index_has_the_contracts_tables_columns_and_macros(tmp_path, rows_only):
    run = run_metadata()
    write_rows(tmp_path / "c.parquet", crafted_rows(run), run)
    info = build_index([tmp_path / "c.parquet"], tmp_path / "i.duckdb", rows_only=rows_only).info
    assert info.index_format == contract.INDEX_FORMAT and info.rows_only == rows_only
    with ImageIndex.open(tmp_path / "i.duckdb") as idx:
        tables = {name for (name,) in idx.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").rows}
        # format 2: the catalogue's vector_slots, and the reader's views over the vector file;
        # format 3: the source rows' keys, for updates
        search_tables = {contract.EMBEDDINGS, contract.DOCS, contract.VECTOR_SLOTS, contract.VECTOR_ARROW,
                         contract.SOURCE_KEYS}
        expected = {contract.IMAGE_ROWS, contract.IMAGES, contract.INDEX_META} | (set() if rows_only else search_tables)
        assert tables == expected
        columns = [c for (c,) in idx.sql(f"SELECT column_name FROM (DESCRIBE {contract.IMAGES})").rows]
        assert columns == [*COLUMN_NAMES, *contract.VIEW_COLUMNS]
        row_columns = [c for (c,) in idx.sql(f"SELECT column_name FROM (DESCRIBE {contract.IMAGE_ROWS})").rows]
        assert sorted(row_columns) == sorted([*(c for c in COLUMN_NAMES if c != "embedding"), *contract.ROW_COLUMNS])
        macros = {name for (name,) in idx.sql("SELECT function_name FROM duckdb_functions() WHERE function_type = 'macro' "
                                              "AND schema_name = 'main'").rows}
        assert {"probe_answer", "probe_bool", "probe_yes_prob"} <= macros
        assert idx.has_yes_prob() and not idx.yes_prob_filled()  # schema v1 rows: the field, all null
        assert contract.read_info(idx._con) == info
