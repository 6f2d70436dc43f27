"""`captioner index` over several outputs of the same images (issue 8, item 10).

An embeddings-only output made after a captioning run must not wipe the
captions: per image, the index keeps the newest caption/probes (with their
caption model columns) and the newest embedding (with its embed model
columns), both from rows of the same bytes (image_id) as the newest row.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from schemas import STATUS_ERROR, RunMetadata
from tests.test_output import DIM, T0, make_rows

CAPTION_ONLY = RunMetadata("tiny-vlm", "local", None, None, None, "1" * 64, ("Is it red?",))
CAPTION_AND_EMBED = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", DIM, "1" * 64, ("Is it red?",))
EMBED_ONLY = RunMetadata(None, None, "open_clip:tiny", "local", DIM, "0" * 64)
URIS = ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]


def write(path, table: pa.Table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def cli(*args):
    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def images(db) -> dict[str, dict]:
    out = cli(
        "sql", "SELECT uri, status, caption, caption_model, probe_set_hash, embed_model, embedding IS NOT NULL AS embedded "
        "FROM images ORDER BY uri", "--index", db, "--json",
    )
    return {row["uri"]: row for row in json.loads(out)}


@pytest.mark.parametrize("first", [CAPTION_ONLY, CAPTION_AND_EMBED], ids=["caption-only", "caption-and-embed"])
def test_embeddings_only_output_keeps_the_captions_of_another(tmp_path, first):
    captioned = write(tmp_path / "captions.parquet", make_rows(URIS, run=first, caption="a red bicycle", at=T0))
    embedded = write(tmp_path / "vectors" / "part-1.parquet", make_rows(URIS, run=EMBED_ONLY, at=T0 + timedelta(days=1), seed=5))
    db = tmp_path / "index.duckdb"
    cli("index", captioned, embedded.parent, "--db", db)

    rows = images(db)
    for uri in URIS:
        row = rows[uri]
        assert row["status"] == "ok"
        assert (row["caption"], row["caption_model"], row["probe_set_hash"]) == ("a red bicycle", "tiny-vlm", "1" * 64)
        assert row["embedded"] and row["embed_model"] == "open_clip:tiny"
    hits = json.loads(cli("search", "bicycle", "--mode", "text", "--index", db, "--json"))
    assert sorted(h["uri"] for h in hits) == URIS
    # The embedding is the newer run's.
    vectors = json.loads(cli("sql", "SELECT uri, embedding FROM images ORDER BY uri", "--index", db, "--json"))
    newer = make_rows(URIS, run=EMBED_ONLY, seed=5)["embedding"].to_pylist()
    assert [v["embedding"] for v in vectors] == newer  # float32 values, exactly


def test_a_changed_file_does_not_inherit_the_old_caption(tmp_path):
    captioned = write(tmp_path / "captions.parquet", make_rows(URIS, run=CAPTION_ONLY, caption="a red bicycle", at=T0))
    newer = make_rows(URIS, run=EMBED_ONLY, at=T0 + timedelta(days=1))
    ids = newer["image_id"].to_pylist()
    ids[0] = "f" * 64  # a.jpg was replaced by another picture
    newer = newer.set_column(newer.schema.get_field_index("image_id"), newer.schema.field("image_id"), pa.array(ids))
    embedded = write(tmp_path / "vectors.parquet", newer)
    db = tmp_path / "index.duckdb"
    cli("index", captioned, embedded, "--db", db)
    rows = images(db)
    assert rows["/p/a.jpg"]["caption"] is None and rows["/p/a.jpg"]["caption_model"] is None
    assert rows["/p/b.jpg"]["caption"] == "a red bicycle"


def test_newest_error_row_still_wins_whole(tmp_path):
    captioned = write(tmp_path / "captions.parquet", make_rows(URIS, run=CAPTION_AND_EMBED, at=T0))
    failed = write(
        tmp_path / "later.parquet",
        make_rows(URIS[:1], run=EMBED_ONLY, status=STATUS_ERROR, error_kind="unreadable", at=T0 + timedelta(days=1)),
    )
    db = tmp_path / "index.duckdb"
    cli("index", captioned, failed, "--db", db)
    rows = images(db)
    assert rows["/p/a.jpg"]["status"] == "error" and rows["/p/a.jpg"]["caption"] is None
    assert rows["/p/b.jpg"]["status"] == "ok" and rows["/p/b.jpg"]["embedded"]


# Outputs made with two probe sets (issue 13, first contact): the README's own
# `captioner run ./photos --out out/ --probes my_probes.yaml` writes its part
# files beside a main job's out/captions.parquet, and `captioner index out/`
# used to merge both without a word.
OTHER_PROBES = RunMetadata("tiny-vlm", "local", "open_clip:tiny", "local", DIM, "2" * 64, ("Is there a dog?", "Is it night?"))


def two_probe_sets(tmp_path):
    out = tmp_path / "out"
    main_job = write(out / "captions.parquet", make_rows(URIS, run=CAPTION_AND_EMBED, at=T0))
    probed = write(out / "part-1.parquet", make_rows(URIS[:1], run=OTHER_PROBES, at=T0 + timedelta(days=1)))
    return out, main_job, probed


def test_a_folder_with_two_probe_sets_is_refused_with_the_fix(tmp_path):
    out, main_job, probed = two_probe_sets(tmp_path)
    db = tmp_path / "index.duckdb"
    result = CliRunner().invoke(main, ["index", str(out), "--db", str(db)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    # It names both files and both probe sets, and says what to do.
    assert str(main_job) in text and str(probed) in text
    assert "Is it red?" in text and "Is there a dog?" in text
    assert "--db" in text and "--mixed-probes" in text
    assert not db.exists()


def test_a_new_probe_set_in_an_indexed_folder_is_refused_and_the_index_kept(tmp_path):
    out, main_job, probed = two_probe_sets(tmp_path)
    probed.unlink()
    db = tmp_path / "index.duckdb"
    cli("index", out, "--db", db)
    before = db.read_bytes()
    write(probed, make_rows(URIS[:1], run=OTHER_PROBES, at=T0 + timedelta(days=1)))
    result = CliRunner().invoke(main, ["index", "--db", str(db)])  # re-scans the recorded folder
    assert result.exit_code == 1 and "Is there a dog?" in result.output, result.output
    assert db.read_bytes() == before


def test_mixed_probes_merges_two_probe_sets_and_says_so(tmp_path):
    out, _, _ = two_probe_sets(tmp_path)
    db = tmp_path / "index.duckdb"
    output = cli("index", out, "--db", db, "--mixed-probes")
    assert "2 probe sets" in output
    rows = images(db)
    assert rows["/p/a.jpg"]["probe_set_hash"] == "2" * 64 and rows["/p/b.jpg"]["probe_set_hash"] == "1" * 64


def test_an_output_without_a_captioner_adds_to_any_probe_set(tmp_path):
    # Embeddings-only output asks no probes: nothing to mix (see the first test of this file).
    out, _, probed = two_probe_sets(tmp_path)
    probed.unlink()
    write(out / "part-2.parquet", make_rows(URIS, run=EMBED_ONLY, at=T0 + timedelta(days=1)))
    output = cli("index", out, "--db", tmp_path / "index.duckdb")
    assert "probe sets" not in output


# ---- an index beside a run's final merge (issue 14, item 7) -----------------------------


def _pending_single_file(tmp_path, n_parts=3, per_part=4):
    """``captions.parquet`` as a run leaves it before its first merge: only committed parts."""
    from tests import search_data

    run = search_data.run_metadata()
    parts = tmp_path / "captions.parquet.parts"
    parts.mkdir()
    uris = []
    for p in range(n_parts):
        rows = [search_data.ok_row(f"/img/{p}-{i}.jpg", "a photo", ["yes", "no"], [1.0, 0.5, 0.2, 0.1], run=run)
                for i in range(per_part)]
        uris += [r["uri"] for r in rows]
        search_data.write_rows(parts / f"part-20260101T00000{p}-run-{p:05d}.parquet", rows, run)
    return tmp_path / "captions.parquet", parts, sorted(uris)


def _merge_now(out, parts):
    """What the run's finalize does: the merged file moved into place, then its parts deleted."""
    tables = [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))]
    tmp = out.with_name(".captions.parquet.tmp-1-merge")
    pq.write_table(pa.concat_tables(tables), tmp)
    tmp.replace(out)
    for p in parts.glob("part-*.parquet"):
        p.unlink()
    parts.rmdir()


@pytest.mark.parametrize("step", ["check_files", "_build"])
def test_index_while_the_run_merges_reads_the_merged_file(tmp_path, monkeypatch, step):
    import duckdb

    from pipeline.search import index as ix
    from tests.cli import cli as captioner

    out, parts, uris = _pending_single_file(tmp_path)
    real = getattr(ix, step)
    calls = []

    def merge_then(*args, **kwargs):
        if not calls:
            _merge_now(out, parts)  # the file list the build took is now stale: the parts are gone
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ix, step, merge_then)
    db = tmp_path / "index.duckdb"
    captioner("index", out, "--db", db)
    con = duckdb.connect(str(db), read_only=True)
    assert [r[0] for r in con.execute("SELECT uri FROM images ORDER BY uri").fetchall()] == uris
    con.close()
    # the catalogue and the vector files it points at (both halves), nothing else
    from pipeline.search import ImageIndex, vectors

    with ImageIndex.open(db) as idx:
        vector_files = vectors.file_names(idx.info.vector_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["captions.parquet", "index.duckdb", *vector_files])


def test_index_of_sources_that_keep_changing_says_so_in_one_line(tmp_path, monkeypatch):
    from pipeline.search import index as ix
    from tests.cli import cli as captioner
    from tests.fixtures.faults import assert_one_line_error

    out, parts, _ = _pending_single_file(tmp_path)
    real = ix._build

    def rewrite_then(*args, **kwargs):
        victim = sorted(parts.glob("part-*.parquet"))[0]
        victim.unlink()  # a part deleted under every try
        return real(*args, **kwargs)

    monkeypatch.setattr(ix, "_build", rewrite_then)
    result = captioner("index", out, "--db", tmp_path / "index.duckdb", exit_code=1)
    assert_one_line_error(result.output, "changed while", "rerun `captioner index`")
    assert not (tmp_path / "index.duckdb").exists()
