"""The collection's lifecycle on a bucket source (moto's server): a deleted object is recorded gone, a renamed one reused."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from schemas import STATUS_OK
from tests.cli import run_cli
from tests.fixtures.images import make_jpegs
from tests.test_s3 import ray_fake_aws  # noqa: F401 - the module's Ray, whose workers reach the bucket

pytestmark = pytest.mark.ray


def test_a_bucket_rerun_records_a_deleted_object_and_reuses_a_renamed_one(ray_fake_aws, s3_bucket, tmp_path, tiny_clip_dir):  # noqa: F811
    for path in make_jpegs(tmp_path / "jpegs", 3):
        s3_bucket.put(f"album/{path.name}", path.read_bytes())
    deleted, renamed, kept = s3_bucket.keys("album/")
    out = tmp_path / "captions.parquet"
    args = [s3_bucket.url("album"), "--out", out, *s3_bucket.cli_options, "--embed-model", tiny_clip_dir,
            "--no-caption", "--no-probes"]
    run_cli(*args)
    before = {r["uri"]: r for r in pq.read_table(out).to_pylist()}

    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=deleted)
    s3_bucket.put("album/2024/moved.jpg", s3_bucket.get(renamed))
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=renamed)
    again = run_cli(*args)
    assert "1 already done, 0 to process, 1 reused" in again.output and "2 gone from the source" in again.output
    after = {r["uri"]: r for r in pq.read_table(out).to_pylist()}
    assert {u: r["status"] for u, r in after.items()} == {
        s3_bucket.url(deleted): "gone", s3_bucket.url(renamed): "gone", s3_bucket.url(kept): STATUS_OK,
        s3_bucket.url("album/2024/moved.jpg"): STATUS_OK,
    }
    assert after[s3_bucket.url("album/2024/moved.jpg")]["embedding"] == before[s3_bucket.url(renamed)]["embedding"]
