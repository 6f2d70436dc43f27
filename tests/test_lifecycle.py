"""A collection's lifecycle across reruns (issue 16, item 5): deleted, returning and moved files.

A rerun over the same source records the files that left it (a ``gone`` row),
so the index, search, the page and the exports stop returning them;
``--keep-gone`` keeps them. A file moved or renamed with the same bytes gets
a copy of its row under the new uri (caption, probes, embedding) instead of
going through the models again. Resume stays exact: each listed image has one
current row that is not gone.
"""

from __future__ import annotations

import csv
import json
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.sources import listing_covers
from schemas import STATUS_OK, check_schema
from tests.cli import cli, run_cli
from tests.fixtures.faults import assert_each_image_once
from tests.fixtures.images import make_jpegs

PROBES = ["Is there text in the image?", "What colour is the sky?"]


def rows_by_uri(out) -> dict[str, dict]:
    table = pq.read_table(out)
    check_schema(table.schema, where=str(out))
    return {row["uri"]: row for row in table.to_pylist()}


def indexed_uris(out, db) -> list[str]:
    cli("index", out, "--db", db, "--fresh")
    found = json.loads(cli("sql", "SELECT uri FROM images ORDER BY uri", "--index", db, "--json").output)
    return [row["uri"] for row in found]


def searched_uris(db) -> set[str]:
    hits = json.loads(cli("search", "a photo", "--index", db, "--json", "--limit", "50").output)
    return {hit["uri"] for hit in hits}


def exported_uris(out, tmp_path) -> set[str]:
    alt = tmp_path / "alt.csv"
    cli("export", "alt-text", "--from", out, "--out", alt, "--status", "any", "--overwrite")
    with alt.open(newline="", encoding="utf-8") as handle:
        return {record["uri"] for record in csv.DictReader(handle)}


def embedded_collection(tmp_path, clip_dir, images: int):
    """``images`` photos run once (embeddings only) into captions.parquet: (photos, images, out, run args)."""
    photos = tmp_path / "photos"
    made = make_jpegs(photos, images)
    out = tmp_path / "captions.parquet"
    args = ["--out", out, "--embed-model", clip_dir, "--no-caption", "--no-probes"]
    run_cli(photos, *args)
    return photos, made, out, args


@pytest.mark.ray
def test_a_deleted_file_leaves_index_search_and_exports_and_comes_back_without_model_work(
    ray_local, tmp_path, tiny_clip_dir
):
    photos, images, out, args = embedded_collection(tmp_path, tiny_clip_dir, 4)
    db = tmp_path / "index.duckdb"
    first = rows_by_uri(out)
    deleted = images[1]
    kept_bytes = deleted.read_bytes()
    deleted.unlink()

    again = run_cli(photos, *args)
    assert "3 already done, 0 to process" in again.output and "1 gone from the source" in again.output
    rows = rows_by_uri(out)
    assert_each_image_once(out, [p for p in images if p != deleted], gone=[deleted])  # recorded once
    assert {u for u, r in rows.items() if r["status"] == STATUS_OK} == {str(p) for p in images if p != deleted}
    assert indexed_uris(out, db) == sorted(str(p) for p in images if p != deleted)
    assert str(deleted) not in searched_uris(db)
    # Nothing more to record: the next rerun is a no-op.
    assert "3 already done, 0 to process" in (third := run_cli(photos, *args)).output and "gone from the source" not in third.output

    # The file comes back (same bytes): live again, from its recorded row, no model work.
    deleted.write_bytes(kept_bytes)
    back = run_cli(photos, *args)
    assert "3 already done, 0 to process" in back.output and "1 reused" in back.output
    returned = rows_by_uri(out)[str(deleted)]
    assert returned["status"] == STATUS_OK and returned["embedding"] == first[str(deleted)]["embedding"]
    assert indexed_uris(out, db) == sorted(str(p) for p in images)
    assert "4 already done, 0 to process" in run_cli(photos, *args).output
    assert_each_image_once(out, images)


@pytest.mark.ray
def test_keep_gone_keeps_the_rows_of_files_no_longer_in_the_source(ray_local, tmp_path, tiny_clip_dir):
    photos = tmp_path / "photos"
    images = make_jpegs(photos, 3)
    out = tmp_path / "out"
    args = ["--out", f"{out}/", "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes"]
    run_cli(photos, *args)
    images[0].unlink()

    kept = run_cli(photos, *args, "--keep-gone")
    assert "gone from the source" not in kept.output
    assert indexed_uris(out, tmp_path / "index.duckdb") == sorted(map(str, images))
    # Only the run that does not keep them records them.
    assert "1 gone from the source" in run_cli(photos, *args).output
    assert indexed_uris(out, tmp_path / "index.duckdb") == sorted(map(str, images[1:]))


@pytest.mark.ray
def test_a_run_over_another_source_into_the_same_output_records_nothing_gone(ray_local, tmp_path, tiny_clip_dir):
    # One output may collect several sources: only files under the source listed now can be gone.
    first, second = tmp_path / "first", tmp_path / "second"
    make_jpegs(first, 2)
    make_jpegs(second, 2, seed=3)
    out = tmp_path / "captions.parquet"
    args = ["--out", out, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes"]
    run_cli(first, *args)
    assert "gone from the source" not in run_cli(second, *args).output
    assert sorted(r["status"] for r in rows_by_uri(out).values()) == [STATUS_OK] * 4


@pytest.mark.ray
def test_a_renamed_folder_reuses_captions_probes_and_embeddings(
    ray_local, tmp_path, tiny_vlm_dir, tiny_clip_dir
):
    photos = tmp_path / "photos"
    make_jpegs(photos, 2)
    make_jpegs(photos / "trip", 3, seed=7)
    probes = tmp_path / "probes.yaml"
    probes.write_text("\n".join(f"- {q}" for q in PROBES))
    out = tmp_path / "captions.parquet"
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 2\n")  # the 6 copied rows (3 gone, 3 reused) are committed 2 at a time
    args = ["--out", out, "--caption-model", tiny_vlm_dir, "--embed-model", f"open_clip:{tiny_clip_dir}",
            "--probes", probes, "--config", config]
    run_cli(photos, *args)
    before = rows_by_uri(out)

    (photos / "trip").rename(photos / "holiday")
    moved = run_cli(photos, *args)
    # No model work: nothing went to the stages (Ray is not even started), 3 rows copied, 3 old uris recorded gone.
    assert "2 already done, 0 to process" in moved.output
    assert "3 reused" in moved.output and "3 gone from the source" in moved.output
    after = rows_by_uri(out)
    for name in ("trip", "holiday"):
        assert len([u for u in after if f"/{name}/" in u]) == 3
    for old_uri, old in before.items():
        if "/trip/" not in old_uri:
            assert after[old_uri] == old  # untouched
            continue
        assert after[old_uri]["status"] == "gone"
        new = after[old_uri.replace("/trip/", "/holiday/")]
        assert new["status"] == STATUS_OK and new["processed_at"] > old["processed_at"]
        for column in ("image_id", "caption", "probes", "embedding", "caption_model", "embed_model", "bytes"):
            assert new[column] == old[column], column

    db = tmp_path / "index.duckdb"
    assert [u for u in indexed_uris(out, db) if "/trip/" in u] == []
    assert searched_uris(db) == exported_uris(out, tmp_path) == {u for u in after if "/trip/" not in u}
    assert "5 already done, 0 to process" in run_cli(photos, *args).output
    assert_each_image_once(out, sorted(photos.rglob("*.jpg")), gone=sorted(p for p in before if "/trip/" in p))


def test_only_uris_a_listing_of_the_source_would_give_can_be_gone(tmp_path):
    photos = tmp_path / "photos"
    covers = listing_covers(str(photos), extensions=(".jpg", ".png"))
    assert covers(f"{photos}/a.jpg") and covers(f"{photos}/deep/er/B.PNG")
    assert not covers(f"{tmp_path}/photos2/a.jpg")  # a sibling folder whose name starts the same
    assert not covers(f"{tmp_path}/elsewhere/a.jpg") and not covers(f"{photos}/notes.txt")
    assert not covers(f"{photos}/.thumbs/a.jpg")  # hidden: never listed
    assert listing_covers(f"{photos}/a.jpg", extensions=(".png",))(f"{photos}/a.jpg")  # a file source: itself
    bucket = listing_covers("s3://bucket/album/", extensions=(".jpg",))
    assert bucket("s3://bucket/album/2024/x.jpg") and not bucket("s3://bucket/album-old/x.jpg")


@pytest.mark.ray
def test_a_source_that_lists_nothing_records_nothing_gone(ray_local, tmp_path, tiny_clip_dir):
    """An empty listing is far likelier a mount that failed or a mistyped prefix than a collection
    emptied on purpose: the rerun says so and records nothing, so the index keeps every image."""
    photos, images, out, args = embedded_collection(tmp_path, tiny_clip_dir, 3)
    for image in images:
        image.unlink()  # what an unmounted share looks like: the folder is there, empty

    again = run_cli(photos, *args)
    assert "gone from the source" not in again.output
    assert "recorded nothing as gone" in again.output
    assert_each_image_once(out, images)


@pytest.mark.ray
def test_an_updated_index_drops_a_deleted_file_as_a_fresh_build_does(ray_local, tmp_path, tiny_clip_dir):
    """The incremental index update (no --fresh) follows the gone rows like a fresh build."""
    photos, images, out, args = embedded_collection(tmp_path, tiny_clip_dir, 4)
    db = tmp_path / "index.duckdb"
    cli("index", out, "--db", db)
    assert len(searched_uris(db)) == 4
    images[2].unlink()
    run_cli(photos, *args)
    cli("index", out, "--db", db)  # an update of the existing index
    updated = searched_uris(db)
    fresh_db = tmp_path / "fresh.duckdb"
    cli("index", out, "--db", fresh_db, "--fresh")
    assert updated == searched_uris(fresh_db) == {str(p) for p in images if p != images[2]}
