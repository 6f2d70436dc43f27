"""Buckets for real: sources and outputs on moto's S3 server over loopback HTTP.

The server and the per-test bucket come from tests/fixtures/s3.py. Nothing of
ours is replaced: listing (paginated), ranged reads on the Ray decode workers,
part files, the single-file merge and resume all go through s3fs/botocore.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import DecodeConfig
from pipeline.decode import load_image
from pipeline.sources import SourceError, SourceItem, list_images, read_bytes
from schemas import STATUS_ERROR, STATUS_OK, check_schema
from tests.fixtures.ray import own_ray
from tests.fixtures.images import make_jpegs
from tests.fixtures.s3 import set_fake_aws_env
from tests.cli import run_cli

EXTS = (".jpg", ".jpeg", ".png")
REPO = Path(__file__).resolve().parents[1]
# Spaces, unicode (accented and CJK), '+' (which URL decoding may turn into a space), nesting.
PHOTO_KEYS = [
    "photos/beach day.jpg", "photos/café ü.jpg", "photos/nested/猫 1.jpg", "photos/nested/x+y.jpg", "photos/a.jpg", "photos/zz top.JPG",
]


@pytest.fixture(scope="module")
def ray_fake_aws(starts_ray):
    """One embedded Ray for the module, started with fake credentials but *no* endpoint.

    Decode workers inherit this environment, so they can reach the bucket only
    if the ``--storage-option endpoint_url=...`` of the run reaches them.
    """
    import ray

    with pytest.MonkeyPatch.context() as patch:
        set_fake_aws_env(patch)
        with own_ray():
            yield


@pytest.fixture
def photos(s3_bucket, tmp_path) -> dict[str, bytes]:
    """Six distinct JPEGs uploaded over HTTP under awkward keys; key -> bytes."""
    paths = make_jpegs(tmp_path / "jpegs", len(PHOTO_KEYS))
    objects = {key: path.read_bytes() for key, path in zip(PHOTO_KEYS, paths)}
    for key, data in objects.items():
        s3_bucket.put(key, data)
    return objects


def read_bucket_table(bucket, key):
    """A Parquet object read back through a fresh filesystem, after checking its schema."""
    table = pq.read_table(f"{bucket.name}/{key}", filesystem=bucket.filesystem())
    check_schema(table.schema, where=key)
    return table


# ---- listing and reading ----------------------------------------------------------


def test_listing_pages_through_thousands_of_keys_in_a_stable_order(s3_bucket):
    many = {f"photos/batch/{i:04d}.jpg": b"x" * (1 + i % 7) for i in range(2500)}
    s3_bucket.put_many(many)
    odd = {
        "photos/with space.jpg": b"1",
        "photos/ünïcødé/猫.png": b"22",
        "photos/a+b=c (1).jpeg": b"333",
    }
    for key, data in odd.items():
        s3_bucket.put(key, data)
    for key in [
        "photos/notes.txt",  # not an image
        "photos/.thumbs/t.jpg",  # hidden folder
        "photos/.hidden.jpg",  # hidden file
        "photos/album.jpg/",  # folder marker that looks like an image name
        "photos/empty/",  # plain folder marker
        "photosynthesis/leaf.jpg",  # shares the prefix "photos" but is another folder
    ]:
        s3_bucket.put(key, b"")
    # The server really pages at 1000 keys, so the listing below crosses pages.
    first_page = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="photos/")
    assert first_page["IsTruncated"] and first_page["KeyCount"] == 1000

    expected = [SourceItem(s3_bucket.url(key), len(data)) for key, data in sorted({**many, **odd}.items())]
    listed = list_images(s3_bucket.url("photos"), extensions=EXTS, storage_options=s3_bucket.storage_options)
    assert listed == expected  # sorted by uri, sizes from the listing
    assert list_images(s3_bucket.url("photos/"), extensions=EXTS, storage_options=s3_bucket.storage_options) == listed
    assert list_images(s3_bucket.url("photos"), extensions=EXTS, storage_options=s3_bucket.storage_options, limit=3) == listed[:3]

    # The filesystem instance (and its listings cache) is shared: a new listing must still see changes.
    s3_bucket.put("photos/batch/late.jpg", b"late")
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="photos/with space.jpg")
    again = list_images(s3_bucket.url("photos"), extensions=EXTS, storage_options=s3_bucket.storage_options)
    assert {item.uri for item in again} == {item.uri for item in listed} - {s3_bucket.url("photos/with space.jpg")} | {
        s3_bucket.url("photos/batch/late.jpg")
    }


def test_unreadable_objects_become_clear_error_results(s3_bucket, photos):
    options = s3_bucket.storage_options
    jpeg = photos["photos/a.jpg"]
    s3_bucket.put("photos/archived.jpg", jpeg, StorageClass="GLACIER")
    s3_bucket.put("photos/going.jpg", jpeg)
    listed = {item.uri for item in list_images(s3_bucket.url("photos"), extensions=EXTS, storage_options=options)}
    assert {s3_bucket.url("photos/archived.jpg"), s3_bucket.url("photos/going.jpg")} <= listed

    archived = load_image(s3_bucket.url("photos/archived.jpg"), DecodeConfig(), options)
    assert archived.error_kind == "unreadable"
    assert "GLACIER" in archived.error and "restored" in archived.error and "photos/archived.jpg" in archived.error

    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="photos/going.jpg")  # gone after listing
    gone = load_image(s3_bucket.url("photos/going.jpg"), DecodeConfig(), options)
    assert gone.error_kind == "missing" and "photos/going.jpg" in gone.error

    ok = load_image(s3_bucket.url("photos/nested/猫 1.jpg"), DecodeConfig(), options)
    assert ok.ok and ok.bytes == len(photos["photos/nested/猫 1.jpg"])
    assert read_bytes(s3_bucket.url("photos/a.jpg"), options, max_bytes=4) == jpeg[:4]
    assert read_bytes(s3_bucket.url("photos/a.jpg"), options, max_bytes=0) == b""


def test_missing_bucket_or_prefix_is_a_source_error(s3_bucket):
    with pytest.raises(SourceError, match="does not exist"):
        list_images(s3_bucket.url("nothing-here"), extensions=EXTS, storage_options=s3_bucket.storage_options)
    with pytest.raises(SourceError, match="does not exist"):
        list_images("s3://captioner-no-such-bucket/photos", extensions=EXTS, storage_options=s3_bucket.storage_options)


def test_missing_output_bucket_is_refused_not_created(s3_bucket, photos, tiny_clip_dir):
    missing = "captioner-no-such-bucket-out"
    result = run_cli(
        s3_bucket.url("photos"), "--out", f"s3://{missing}/out/", *s3_bucket.cli_options,
        "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes", expect_exit=1,
    )
    assert f"cannot write to s3://{missing}/out/" in result.output and "--storage-option" in result.output
    assert missing not in {b["Name"] for b in s3_bucket.client.list_buckets()["Buckets"]}


# ---- whole runs ----------------------------------------------------------------------


@pytest.mark.subprocess
def test_bucket_to_bucket_round_trip_resumed_by_another_process(ray_fake_aws, s3_bucket, photos, tmp_path, tiny_clip_dir):
    """Parts in the bucket, an archived object as an error row, then resume: first by a separate
    `captioner run` process configured only through AWS_* variables, then here again."""
    s3_bucket.put("photos/archived.jpg", photos["photos/a.jpg"], StorageClass="GLACIER")
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 3\n")
    args = [s3_bucket.url("photos"), "--out", s3_bucket.url("out/"), "--config", config, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes"]
    expected = sorted(s3_bucket.url(key) for key in [*photos, "photos/archived.jpg"])

    def rows_in_bucket():
        keys = s3_bucket.keys("out/")
        assert "out/_captioner_config.json" in keys
        assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith(".")], f"temporary objects left: {keys}"
        parts = [k for k in keys if k.startswith("out/part-")]
        return [row for key in parts for row in read_bucket_table(s3_bucket, key).to_pylist()], parts

    first = run_cli(*args, *s3_bucket.cli_options)
    assert "7 images listed, 0 already done, 7 to process" in first.output
    rows, parts = rows_in_bucket()
    assert len(parts) == 3  # 7 rows committed every 3
    assert sorted(r["uri"] for r in rows) == expected
    archived = next(r for r in rows if r["uri"].endswith("/archived.jpg"))
    assert archived["status"] == STATUS_ERROR and archived["error_kind"] == "unreadable" and "GLACIER" in archived["error"]
    assert all(r["status"] == STATUS_OK and r["embedding"] is not None for r in rows if r is not archived)

    # Restored from the archive; another process, given no --storage-option, retries just that object.
    s3_bucket.client.restore_object(Bucket=s3_bucket.name, Key="photos/archived.jpg", RestoreRequest={"Days": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_bucket.env
    second = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *map(str, args), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "7 images listed, 6 already done, 1 to process" in second.stderr
    rows, _ = rows_in_bucket()
    assert sorted(r["uri"] for r in rows) == expected  # one row per image: the error row was superseded
    assert all(r["status"] == STATUS_OK for r in rows)

    # Back here, where this process's filesystem instance listed out/ before the other process wrote.
    assert "7 images listed, 7 already done, 0 to process" in run_cli(*args, *s3_bucket.cli_options).output


def test_single_file_output_in_the_bucket(ray_fake_aws, s3_bucket, photos, tiny_clip_dir):
    # Glob characters and a space in the output prefix must be taken literally.
    out = "runs/v[1] final/captions.parquet"
    args = [s3_bucket.url("photos"), "--out", s3_bucket.url(out), *s3_bucket.cli_options, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes"]
    run_cli(*args)
    assert s3_bucket.keys("runs/") == ["runs/v[1] final/captions.config.json", out]  # parts merged away
    table = read_bucket_table(s3_bucket, out)
    assert table["uri"].to_pylist() == sorted(s3_bucket.url(key) for key in photos)
    assert set(table["status"].to_pylist()) == {STATUS_OK}

    etag = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=out)["ETag"]
    assert "6 images listed, 6 already done, 0 to process" in run_cli(*args).output
    assert s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=out)["ETag"] == etag  # not rewritten


def test_captioned_run_from_a_bucket_into_a_local_file(ray_fake_aws, s3_bucket, photos, tmp_path, tiny_vlm_dir, tiny_clip_dir):
    probes = tmp_path / "probes.yaml"
    probes.write_text("- Is there text in the image?\n")
    out = tmp_path / "x.parquet"
    run_cli(
        s3_bucket.url("photos/nested"), "--out", out, *s3_bucket.cli_options,
        "--caption-model", tiny_vlm_dir, "--probes", probes, "--no-embed",
    )
    table = pq.read_table(out)
    check_schema(table.schema, where=str(out))
    rows = table.to_pylist()
    assert [r["uri"] for r in rows] == [s3_bucket.url("photos/nested/x+y.jpg"), s3_bucket.url("photos/nested/猫 1.jpg")]
    for row in rows:
        assert row["status"] == STATUS_OK and isinstance(row["caption"], str) and row["caption"]
        assert row["bytes"] == len(photos[row["uri"].split("/", 3)[3]])
    assert (tmp_path / "x.config.json").is_file()
