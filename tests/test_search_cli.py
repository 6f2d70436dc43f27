"""`captioner index | search | sql | duplicates` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.search.commands import SEARCH_COMMANDS
from tests import search_doubles
from tests.search_data import PERSON, crafted_rows, run_metadata, write_rows
from tests.cli import cli

search_doubles.register()
search_doubles.TEXT_VECTORS.update({"beach": [1, 0, 0, 0]})
COMMANDS = {c.name: c for c in SEARCH_COMMANDS}


def invoke(name, *args, exit_code=0):
    return cli(*args, exit_code=exit_code, command=COMMANDS[name])


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    write_rows(folder / "part-0.parquet", crafted_rows(), run_metadata())
    db = folder / "index.duckdb"
    out = invoke("index", folder, "--db", db).output
    assert "6 rows, 5 searchable" in out and "ANN: no" in out  # was "HNSW: no" (the HNSW path is gone)
    assert "up to date" in invoke("index", "--db", db).output
    return db


def test_commands_are_exported():
    assert sorted(COMMANDS) == ["duplicates", "index", "search", "sql"]


def test_search_prints_a_table(db):
    out = invoke("search", "beach", "--index", db, "--limit", "2").output.splitlines()
    assert out[0].split() == ["rank", "score", "path", "caption"]
    assert out[1].split()[2] == "/img/dog_beach.jpg" and out[1].split()[0] == "1"
    assert len(out) == 3


@pytest.mark.parametrize("mode, first", [("text", "people_beach"), ("semantic", "cat_sofa"), ("hybrid", "dog_beach")])
def test_search_json_per_mode(db, mode, first):
    hits = json.loads(invoke("search", "beach", "--index", db, "--mode", mode, "--json").output)
    assert hits[0]["uri"] == f"/img/{first}.jpg"
    assert set(hits[0]) >= {"rank", "score", "uri", "caption", "image_id"}


def test_search_filters(db):
    args = ["search", "beach", "--index", db, "--json", "--mode", "semantic"]
    hits = json.loads(invoke(*args, "--probe", f"{PERSON}=yes", "--where", "height = 480").output)
    assert [h["uri"] for h in hits] == ["/img/red_car.jpg", "/img/people_beach.jpg"]


def test_search_errors_say_what_to_do(db, tmp_path):
    out = invoke("search", "beach", "--index", tmp_path / "none.duckdb", exit_code=1).output
    assert "captioner index" in out
    out = invoke("search", "beach", "--index", db, "--where", "1=1; DROP TABLE images", exit_code=1).output
    assert "single SQL expression" in out
    out = invoke("search", "--index", db, exit_code=1).output
    assert "QUERY" in out


def test_sql_command(db):
    out = invoke("sql", "SELECT status, count(*) AS n FROM images GROUP BY ALL ORDER BY status", "--index", db).output
    assert out.splitlines()[0].split() == ["status", "n"]
    rows = json.loads(invoke("sql", "SELECT uri FROM images WHERE status = 'error'", "--index", db, "--json").output)
    assert rows == [{"uri": "/img/broken.jpg"}]
    assert "read-only" in invoke("sql", "DELETE FROM image_rows", "--index", db, exit_code=1).output


def test_duplicates_command(db):
    # the crafted vectors are all distinct; at a loose threshold cat and dog group
    groups = json.loads(invoke("duplicates", "--index", db, "--threshold", "0.85", "--json").output)
    assert [[m["uri"] for m in g["images"]] for g in groups] == [["/img/cat_sofa.jpg", "/img/dog_beach.jpg"]]
    assert "no near-duplicates" in invoke("duplicates", "--index", db).output


def test_search_help_documents_where():
    out = invoke("search", "--help").output
    assert "--where" in out and "read-only" in out and "--probe" in out
