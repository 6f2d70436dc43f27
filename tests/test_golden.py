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

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.output import OutputStore
from schemas import check_schema
from tests.test_output import make_rows

GOLDEN_DIR = Path(__file__).with_name("golden")
# file -> (sha256, rows, ok rows)
GOLDEN = {
    "v1.parquet": ("2c9252a26489b1f073daaf75daf6871c050b100c0c4483396bf7bce577add707", 5, 4),
}


@pytest.fixture(params=sorted(GOLDEN))
def golden(request) -> tuple[Path, int, int]:
    path = GOLDEN_DIR / request.param
    digest, rows, ok = GOLDEN[request.param]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} changed; golden files are frozen"
    return path, rows, ok


def test_golden_file_passes_check_schema(golden):
    path, rows, _ = golden
    run = check_schema(pq.read_schema(path), where=str(path))
    assert run.embed_model and run.caption_model and run.embedding_dim == 4
    assert pq.read_metadata(path).num_rows == rows


def test_golden_file_resumes_as_an_existing_output(golden, tmp_path):
    path, rows, ok = golden
    out = tmp_path / "captions.parquet"
    shutil.copy(path, out)
    run = check_schema(pq.read_schema(out))
    store = OutputStore(str(out))
    state = store.load_state(run, overwrite=False)
    assert state.rows == rows and state.errors == rows - ok
    table = pq.read_table(out)
    for uri, size in zip(table["uri"].to_pylist(), table["bytes"].to_pylist()):
        assert state.is_done(uri, size)  # ok rows, and the not_image row: a permanent failure
    assert not state.is_done("/photos/notes.jpg", 26, retry_errors=True)

    # A rerun that adds one image merges with the old file.
    store.write_part(make_rows(["/photos/new.jpg"], run=run, at=table["processed_at"][0].as_py() + timedelta(days=1)))
    assert store.finalize(None) == rows + 1
    merged = pq.read_table(out)
    check_schema(merged.schema)
    assert "/photos/new.jpg" in merged["uri"].to_pylist()


def test_golden_file_indexes_and_searches(golden, tmp_path):
    path, rows, ok = golden
    db = tmp_path / "index.duckdb"
    runner = CliRunner()
    result = runner.invoke(main, ["index", str(path), "--db", str(db)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{rows} rows, {ok} searchable (status ok), {ok} with embeddings" in result.output
    result = runner.invoke(main, ["search", "kettle", "--mode", "text", "--index", str(db), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.output)[0]["uri"] == "/photos/kitchen.jpg"
