"""Frozen files of every schema version stay readable (tests/golden/, built once by build_vN.py).

Each golden file is what `captioner run` wrote under that schema version:
check_schema, resume (OutputStore.load_state), the single-file merge and
`captioner index` must all keep accepting it. The files are pinned by
sha256: regenerating one would hide exactly the drift this guards against.
A new schema version adds its own golden file and a row in GOLDEN.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.output import OutputStore
from schemas import SCHEMA_VERSION, check_schema
from tests.test_output import make_rows

GOLDEN_DIR = Path(__file__).with_name("golden")
# file -> (sha256, rows of images still in the source (not gone), ok rows, (a text query, the uri it finds first))
GOLDEN = {
    "v1.parquet": ("2c9252a26489b1f073daaf75daf6871c050b100c0c4483396bf7bce577add707", 5, 4, ("kettle", "/photos/kitchen.jpg")),
    "v2.parquet": ("6f08bb88bac78e908038e2fe44cdc4cb0cc606a5acbac87a58ae3ca6927ed16e", 5, 4, ("bakery", "/photos/shopfront.png")),
    "v3.parquet": ("19e0231949680af011ce19d381a93b68bd7fdf73f8afa20c3c7fe184d794711d", 5, 4, ("harbour", "/photos/harbour.png")),
    "v4.parquet": ("62cb5f081df943e274c84c1d3bfeeb66d48f7d706414ca5e35c0b7630d8e1fa5", 5, 4, ("lighthouse", "/photos/lighthouse.png")),
    # "zanzibar" is only in the text read in the image (schema v5's text column).
    "v5.parquet": ("588147a05291636f92d1ef739e46901fb24ad11a37b1d7681b352a4193eaf5b2", 4, 3, ("zanzibar", "/photos/noticeboard.png")),
}


def _gone(path) -> int:
    """Rows of files that left the source (status gone, schema v4 on)."""
    return pq.read_table(path, columns=["status"])["status"].to_pylist().count("gone")


@pytest.fixture(params=sorted(GOLDEN))
def golden(request) -> tuple[Path, int, int]:
    path = GOLDEN_DIR / request.param
    digest, rows, ok, _ = GOLDEN[request.param]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} changed; golden files are frozen"
    return path, rows, ok


def test_golden_file_passes_check_schema(golden):
    path, rows, _ = golden
    run = check_schema(pq.read_schema(path), where=str(path))
    assert run.embed_model and run.caption_model and run.embedding_dim == 4
    assert run.schema_version == int(path.stem[1:])
    assert pq.read_metadata(path).num_rows == rows + _gone(path)


def test_golden_file_resumes_as_an_existing_output(golden, tmp_path):
    path, rows, ok = golden
    out = tmp_path / "captions.parquet"
    shutil.copy(path, out)
    run = check_schema(pq.read_schema(out))
    store = OutputStore(str(out))
    state = store.load_state(run, overwrite=False)
    assert state.rows == rows and state.errors == rows - ok
    table = pq.read_table(out)
    recorded = table["source_mtime"].to_pylist() if "source_mtime" in table.column_names else [None] * rows
    for uri, size, image_id, mtime, status in zip(
        table["uri"].to_pylist(), table["bytes"].to_pylist(), table["image_id"].to_pylist(), recorded,
        table["status"].to_pylist(),
    ):
        if status == "gone":  # the file left the source: listed again, it is never done as it is
            assert state.current[uri].gone and not state.is_done(uri, size, mtime.timestamp(), digest=lambda: image_id)
            continue
        # ok rows, and the error row: a permanent failure. Done while the file is the one the row was made from:
        # the same size and recorded mtime, or (no mtime recorded, as in every v1/v2 row) the same bytes.
        listed = mtime.timestamp() if mtime else 1.6e9
        if mtime is not None:
            assert state.is_done(uri, size, listed, digest=lambda: pytest.fail("size and mtime tell; no hash"))
            assert not state.is_done(uri, size, listed - 86400)  # an older mtime: new bytes may be there
        else:
            assert not state.is_done(uri, size, listed)  # cannot tell without the bytes
            assert state.is_done(uri, size, listed, digest=lambda: image_id)
            assert not state.is_done(uri, size, listed, digest=lambda: "0" * 64)
    errors = table.filter(pc.equal(table["status"], "error"))
    assert not state.is_done(errors["uri"][0].as_py(), errors["bytes"][0].as_py(), retry_errors=True,
                             digest=lambda: errors["image_id"][0].as_py())

    # A rerun (written as today's schema) that adds one image merges with the old file into one current-version file.
    store.write_part(make_rows(["/photos/new.jpg"], run=run, at=table["processed_at"][0].as_py() + timedelta(days=1)))
    assert store.finalize(None) == table.num_rows + 1
    merged = pq.read_table(out)
    assert check_schema(merged.schema).schema_version == SCHEMA_VERSION
    assert "/photos/new.jpg" in merged["uri"].to_pylist()
    old = {r["uri"]: r for r in table.to_pylist()}
    for row in merged.to_pylist():
        if row["uri"] in old:  # the old rows, unchanged apart from the fields their version lacks (null)
            expected = {**old[row["uri"]]}
            expected.setdefault("caption_truncated", None)
            expected.setdefault("source_mtime", None)
            for added in ("caption_short", "text", "text_lines", "ocr_model", "ocr_revision"):  # schema v5
                expected.setdefault(added, None)
            for probe in expected["probes"] or ():
                probe.setdefault("yes_prob", None)
                probe.setdefault("truncated", None)
            assert row == expected


def test_golden_file_indexes_and_searches(golden, tmp_path):
    path, rows, ok = golden
    db = tmp_path / "index.duckdb"
    runner = CliRunner()
    result = runner.invoke(main, ["index", str(path), "--db", str(db)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{rows} rows, {ok} searchable (status ok), {ok} with embeddings" in result.output
    query, first = GOLDEN[path.name][3]
    result = runner.invoke(main, ["search", query, "--mode", "text", "--index", str(db), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.output)[0]["uri"] == first


def _search(db, *args) -> list[str]:
    result = CliRunner().invoke(main, ["search", *args, "--index", str(db), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return [hit["uri"] for hit in json.loads(result.output)]


def test_v1_and_v2_files_index_together_and_answer_searches(tmp_path):
    sources = tmp_path / "outputs"
    sources.mkdir()
    for name in ("v1.parquet", "v2.parquet"):
        shutil.copy(GOLDEN_DIR / name, sources / name)
    db = tmp_path / "index.duckdb"
    # The golden files were asked different probe sets (v2's adds a question),
    # which `captioner index` refuses unless told to merge them.
    refused = CliRunner().invoke(main, ["index", str(sources), "--db", str(db)])
    assert refused.exit_code == 1 and "2 different probe sets" in refused.output, refused.output
    result = CliRunner().invoke(main, ["index", str(sources), "--db", str(db), "--mixed-probes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "10 rows, 8 searchable (status ok), 8 with embeddings" in result.output
    assert "merged 2 probe sets" in result.output

    assert _search(db, "kettle", "--mode", "text")[0] == "/photos/kitchen.jpg"  # a v1 row
    assert _search(db, "bakery", "--mode", "text")[0] == "/photos/shopfront.png"  # a v2 row
    # QUESTION=ANSWER reads answer_bool, which both versions have.
    dog = ["--mode", "text", "dog", "--probe", "Is there a dog?=yes"]
    assert sorted(_search(db, *dog)) == ["/photos/beach.jpg", "/photos/park.png"]
    # Thresholds read yes_prob: v1 rows have none, so they never pass.
    assert _search(db, "dog", "--mode", "text", "--probe", "Is there a dog?>0.5") == ["/photos/park.png"]
    text = ["--mode", "text", "sign poster lake", "--probe"]
    assert sorted(_search(db, *text, "Is there text in the image?>=0.75")) == ["/photos/poster.png", "/photos/shopfront.png"]
    assert _search(db, *text, "Is there text in the image?>0.8") == ["/photos/shopfront.png"]
    assert sorted(_search(db, *text, "Is there text in the image?<0.1")) == ["/photos/lake.png"]
    # The new columns are in the images view; v1 rows read them as null.
    sql = "SELECT uri FROM images WHERE caption_truncated"
    result = CliRunner().invoke(main, ["sql", sql, "--index", str(db), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert [r["uri"] for r in json.loads(result.output)] == ["/photos/poster.png"]


def _sql(db, sql) -> list[dict]:
    result = CliRunner().invoke(main, ["sql", sql, "--index", str(db), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def test_every_version_indexes_together_and_v3_keeps_its_source_mtime(tmp_path):
    sources = tmp_path / "outputs"
    sources.mkdir()
    for name in ("v1.parquet", "v2.parquet", "v3.parquet"):
        shutil.copy(GOLDEN_DIR / name, sources / name)
    db = tmp_path / "index.duckdb"
    # The golden files were asked different probe sets: merging them needs the flag (see above).
    result = CliRunner().invoke(main, ["index", str(sources), "--db", str(db), "--mixed-probes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "15 rows, 12 searchable (status ok), 12 with embeddings" in result.output
    assert _search(db, "harbour", "--mode", "text")[0] == "/photos/harbour.png"  # a v3 row
    assert _search(db, "kettle", "--mode", "text")[0] == "/photos/kitchen.jpg"  # a v1 row beside it
    # source_mtime is in the images view: v3's as written, null in v1/v2 rows (unknown) and where v3 had none.
    dated = _sql(db, "SELECT uri, epoch_ms(source_mtime) AS ms FROM images WHERE source_mtime IS NOT NULL ORDER BY uri")
    assert [(r["uri"], r["ms"]) for r in dated] == [
        ("/photos/half.png", 1763627405000), ("/photos/harbour.png", 1763627401250),
        ("/photos/menu.png", 1763627403750), ("/photos/terrier.png", 1763627402500),
    ]  # fmt: skip
    assert _sql(db, "SELECT count(*) AS n FROM images WHERE source_mtime IS NULL")[0]["n"] == 11


def test_a_v4_gone_row_is_not_indexed_and_indexes_beside_every_older_version(tmp_path):
    sources = tmp_path / "outputs"
    sources.mkdir()
    for name in GOLDEN:
        shutil.copy(GOLDEN_DIR / name, sources / name)
    db = tmp_path / "index.duckdb"
    result = CliRunner().invoke(main, ["index", str(sources), "--db", str(db), "--mixed-probes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "24 rows, 19 searchable (status ok), 19 with embeddings" in result.output  # v1..v4: 20 and 16, v5: 4 and 3
    uris = [r["uri"] for r in _sql(db, "SELECT uri FROM images")]
    assert "/photos/old-name.png" not in uris and "/photos/lighthouse.png" in uris and "/photos/harbour.png" in uris
    assert "/photos/old-name.png" not in _search(db, "lighthouse", "--mode", "text", "--limit", "50")
