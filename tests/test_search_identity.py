"""Search meets the models and the data as a user does.

- `captioner sql` over every column (timestamps included) works, and the
  "(the index is read-only)" hint appears only for statements that write.
- run -> index -> search --mode hybrid with every spec form of the default
  embedder (see the end-to-end tests below).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests import search_doubles
from tests.search_data import crafted_rows, run_metadata, write_rows

search_doubles.register()


def invoke(*args, exit_code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == exit_code, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def crafted_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted_sql")
    write_rows(folder / "part-0.parquet", crafted_rows(), run_metadata())
    db = folder / "index.duckdb"
    invoke("index", folder, "--db", db)
    return db


def test_sql_select_star_returns_timestamps(crafted_db):
    out = invoke("sql", "SELECT * FROM images ORDER BY uri", "--index", crafted_db, "--json").output
    rows = json.loads(out)
    assert len(rows) == 6
    assert rows[0]["processed_at"].startswith("2024-05-01 00:00:00")
    table = invoke("sql", "SELECT uri, processed_at FROM images ORDER BY uri", "--index", crafted_db).output
    assert "2024-05-01" in table


def test_read_only_hint_only_for_writes(crafted_db):
    bad_query = invoke("sql", "SELECT no_such_column FROM images", "--index", crafted_db, exit_code=1).output
    assert "no_such_column" in bad_query and "read-only" not in bad_query
    write = invoke("sql", "DELETE FROM image_rows", "--index", crafted_db, exit_code=1).output
    assert "read-only" in write
    create = invoke("sql", "CREATE TABLE t AS SELECT 1", "--index", crafted_db, exit_code=1).output
    assert "read-only" in create
