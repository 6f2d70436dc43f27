"""pipeline.storage.Folder, the one storage abstraction, and the user-visible rules built on it.

Each CLI test here was written against a defect first: an existing non-Parquet
--out, `export coco --out coco.json`, `captioner index s3://...`, and a folder
holding an output plus an unrelated Parquet file.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import storage
from pipeline.cli import main
from pipeline.storage import Folder, is_temp_name, temp_name
from tests.export_data import PROBES, library_rows
from tests.fixtures.images import make_jpegs
from tests.search_data import crafted_rows, run_metadata, write_rows


def cli(*args, exit_code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == exit_code, (result.output, result.exception)
    return result


# -- the abstraction, local and on a bucket ------------------------------------------


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return Folder(str(tmp_path / "f"))
    bucket = request.getfixturevalue("s3_bucket")
    return Folder(bucket.url("f"), bucket.storage_options)


def test_write_list_read_move_delete(folder):
    folder.write("b/two.txt", b"2")
    folder.write("one.txt", b"1")
    folder.write("_side.txt", b"s")
    assert folder.list() == ["one.txt"]
    assert folder.list(recursive=True) == ["b/two.txt", "one.txt"]
    assert folder.list("*.txt", recursive=True, include_hidden=True) == ["_side.txt", "b/two.txt", "one.txt"]
    assert folder.read_bytes("b/two.txt") == b"2"
    folder.move("one.txt", "b/one.txt")
    assert not folder.exists("one.txt") and folder.read_bytes("b/one.txt") == b"1"
    folder.delete("b/one.txt")
    assert folder.list(recursive=True) == ["b/two.txt"]
    assert folder.display("b/two.txt") == (
        os.path.join(folder.path, "b", "two.txt") if folder.local else folder.uri + "/b/two.txt"
    )


def test_a_failed_write_publishes_nothing_and_leaves_no_temporary(folder):
    folder.write("keep.txt", b"old")
    with pytest.raises(RuntimeError):
        with folder.open_write("keep.txt") as handle:
            handle.write(b"half")
            raise RuntimeError("writer died")
    assert folder.read_bytes("keep.txt") == b"old"
    assert folder.list(include_hidden=True) == ["keep.txt"]


def test_link_replaces_by_rename_and_fingerprints_see_links_as_themselves(tmp_path):
    target = tmp_path / "photo.jpg"
    target.write_bytes(b"the original")
    folder = Folder(str(tmp_path / "out"))
    folder.write("a/.hidden", b"x")
    folder.write("a/photo.jpg", b"someone's copy")
    folder.link("a/photo.jpg", str(target))  # replaces the file; never writes into it
    assert os.path.islink(tmp_path / "out/a/photo.jpg") and target.read_bytes() == b"the original"
    folder.link("a/photo.jpg", str(target))  # and an older link
    prints = folder.fingerprints()
    assert set(prints) == {"a/.hidden", "a/photo.jpg"}
    assert prints["a/photo.jpg"] == folder.fingerprint("a/photo.jpg", follow_symlinks=False) != folder.fingerprint("a/photo.jpg")
    assert Folder(str(tmp_path / "missing")).fingerprints() == {}
    assert not [n for n in os.listdir(tmp_path / "out/a") if is_temp_name(n)]


def test_one_temp_name_rule_and_one_cleanup(tmp_path):
    name = temp_name("part-1.parquet")
    assert name.startswith(".part-1.parquet.tmp-") and is_temp_name(name) and not is_temp_name("part-1.parquet")
    folder = Folder(str(tmp_path))
    (tmp_path / name).write_bytes(b"abandoned")
    (tmp_path / "part-1.parquet").write_bytes(b"kept")
    assert folder.cleanup_temp_files() == [name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-1.parquet"]


def test_one_is_local_spelling():
    assert storage.is_local("/a/b") and storage.is_local("file:///a") and not storage.is_local("s3://b/k")
    assert Folder("file:///tmp/x").local and Folder("/tmp/x").path == "/tmp/x"


# -- which files make up an output: the index uses the output's rule -------------------------


def test_index_ignores_an_unrelated_parquet_beside_an_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_rows(out / "part-0.parquet", crafted_rows(), run_metadata())
    pq.write_table(pa.table({"x": [1, 2]}), out / "stats.parquet")  # not written by captioner
    result = cli("index", out, "--db", tmp_path / "i.duckdb")
    assert "indexed 1 files" in result.output and "6 rows" in result.output
    assert "stats.parquet" in result.output and "not a captioner output" in result.output


# -- captioner index s3://... ------------------------------------------------------


def test_index_reads_an_output_on_a_bucket(s3_bucket, tmp_path, monkeypatch):
    local = tmp_path / "part.parquet"
    write_rows(local, library_rows(s3_bucket.url("photos")), run_metadata(probes=PROBES))
    s3_bucket.put("captions/part-00001.parquet", local.read_bytes())
    s3_bucket.put("captions/notes.parquet.tmp-1-abc", b"not parquet")  # ignored: not an output file
    # `captioner index` takes the endpoint as any AWS tool does, from the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    db = tmp_path / "i.duckdb"
    result = cli("index", s3_bucket.url("captions/"), "--db", db)
    assert "indexed 1 files" in result.output
    found = cli("sql", "SELECT count(*) AS n, min(source_file) AS f FROM images", "--index", db, "--json").output
    assert '"n": ' in found and s3_bucket.url("captions/part-00001.parquet") in found
    assert "up to date" in cli("index", "--db", db).output  # the bucket fingerprint is stable
    s3_bucket.put("captions/part-00002.parquet", local.read_bytes())
    assert "indexed 2 files" in cli("index", "--db", db).output  # re-scanned: the new part is picked up



def test_index_takes_the_endpoint_its_error_names(s3_bucket, tmp_path):
    # A store that does not answer is "Fix: ... --storage-option endpoint_url" (pipeline.storage), for
    # `captioner index` too: the flag must exist there, as on run, search, serve and export.
    local = tmp_path / "part.parquet"
    write_rows(local, library_rows(s3_bucket.url("photos")), run_metadata(probes=PROBES))
    s3_bucket.put("captions/part-00001.parquet", local.read_bytes())
    db = tmp_path / "i.duckdb"
    option = ("--storage-option", f"endpoint_url={s3_bucket.endpoint}")  # no AWS_ENDPOINT_URL in the environment
    assert "indexed 1 files" in cli("index", s3_bucket.url("captions/"), "--db", db, *option).output
    assert "up to date" in cli("index", "--db", db, *option).output  # recorded bucket sources re-scanned with it
    gone = "http://127.0.0.1:9"  # the discard port: nothing listens, connection refused
    refused = cli("index", s3_bucket.url("captions/"), "--db", tmp_path / "j.duckdb",
                  "--storage-option", f"endpoint_url={gone}", exit_code=3)
    assert f"the storage endpoint {gone} did not answer" in refused.output


def test_index_of_a_bucket_whose_endpoint_is_gone_exits_3(tmp_path, monkeypatch):
    # README's exit codes: 3 when a store refuses connections, for `captioner index` as for a run
    # (rerun once the storage is back), with the endpoint named.
    import socket

    from pipeline import exit_codes
    from tests.fixtures.s3 import clear_s3fs_instances, set_fake_aws_env

    with socket.socket() as probe:  # a loopback port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    set_fake_aws_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    clear_s3fs_instances()
    db = tmp_path / "i.duckdb"
    result = cli("index", "s3://captioner-gone/captions/", "--db", db, exit_code=exit_codes.STORAGE_FAILED)
    assert "did not answer" in result.output and endpoint in result.output
    assert not db.exists()

# -- first-contact defects ------------------------------------------------------------


def test_out_naming_an_existing_non_parquet_file_says_so(tmp_path, tiny_vlm_dir, tiny_clip_dir):
    photos = tmp_path / "photos"
    make_jpegs(photos, 1)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    result = cli(
        "run", photos, "--out", notes, "--caption-model", tiny_vlm_dir, "--embed-model", tiny_clip_dir,
        "--no-progress", exit_code=1,
    )
    assert "parent of the path is a file" not in result.output
    assert f"{notes} exists and is not a captioner Parquet output" in result.output
    assert "--out" in result.output and ".parquet" in result.output
    assert notes.read_text() == "my notes"


def test_export_coco_to_a_json_path_is_refused_with_the_fix(tmp_path):
    parquet = tmp_path / "captions.parquet"
    write_rows(parquet, crafted_rows(), run_metadata())
    result = cli("export", "coco", "--from", parquet, "--out", tmp_path / "coco.json", exit_code=2)
    assert "--out of coco is a folder" in result.output and "--out " + str(tmp_path / "coco") in result.output
    assert not (tmp_path / "coco.json").exists()


def test_thumbnail_cache_writes_and_evicts_through_the_folder_from_a_relative_root(tmp_path, monkeypatch):
    from pathlib import Path

    from pipeline.serve.thumbs import ThumbnailCache, cache_key

    monkeypatch.chdir(tmp_path)
    cache = ThumbnailCache(Path("thumbs"), max_bytes=250)
    for n in range(3):
        cache._write(cache_key(f"/img/{n}.jpg", None, 320), bytes(100))
    left = sorted(p.name for p in (tmp_path / "thumbs").rglob("*") if p.is_file())
    assert len(left) == 2 and cache.total_bytes == 200
    assert not [name for name in left if is_temp_name(name)]


@pytest.mark.parametrize("location, parent, name", [
    ("s3://bucket/out/captions.parquet", "s3://bucket/out", "captions.parquet"),
    ("s3://bucket/out/", "s3://bucket", "out"),
    ("gs://b/x", "gs://b", "x"),
])
def test_parent_and_name_of_a_url(location, parent, name):
    from pipeline.storage import join_location, name_of, parent_of

    assert (parent_of(location), name_of(location)) == (parent, name)
    assert join_location(parent_of(location), name_of(location)) == location.rstrip("/")


def test_parent_and_name_of_a_local_path(tmp_path):
    from pipeline.storage import join_location, name_of, parent_of

    for location in (str(tmp_path / "out" / "captions.parquet"), f"file://{tmp_path}/out/captions.parquet",
                     str(tmp_path / "out" / "captions.parquet") + os.sep):
        assert parent_of(location) == str(tmp_path / "out")
        assert name_of(location) == "captions.parquet"
    assert join_location(str(tmp_path), "a/b.txt") == str(tmp_path / "a" / "b.txt")
