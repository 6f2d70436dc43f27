"""Exports with images and captions on a bucket (moto's S3 server on loopback, tests/fixtures/s3.py).

Images are read through the pipeline's storage code (s3fs over HTTP); exports
go to a local folder, to the bucket, or beside the images with --in-place.
"""

from __future__ import annotations

import json

import datasets
import pyexiv2
import pytest

from tests.export_data import LIBRARY, PROBES, library_files, library_rows
from tests.search_data import run_metadata, write_rows
from tests.cli import cli

X = 'lang="x-default"'


def export(bucket, *args, exit_code=0):
    return cli("export", *args, *bucket.cli_options, exit_code=exit_code)


@pytest.fixture
def bucket_library(s3_bucket, tmp_path):
    """The crafted library's images under s3://BUCKET/photos/ and its Parquet at s3://BUCKET/captions/."""
    s3_bucket.put_many({f"photos/{rel}": data for rel, data in library_files().items()})
    local = tmp_path / "captions.parquet"
    write_rows(local, library_rows(s3_bucket.url("photos")), run_metadata(probes=PROBES))
    s3_bucket.put("captions/captions.parquet", local.read_bytes())
    return s3_bucket, s3_bucket.url("captions/captions.parquet")


def test_imagefolder_from_a_bucket_to_a_local_folder(bucket_library, tmp_path):
    bucket, parquet = bucket_library
    export(bucket, "imagefolder", "--from", parquet, "--out", tmp_path / "ds")
    assert (tmp_path / "ds/beach/dog.jpg").read_bytes() == bucket.get("photos/beach/dog.jpg")
    train = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "ds"), split="train")
    assert sorted(train["caption"]) == sorted(c for c, *_ in LIBRARY.values())


def test_sidecars_in_place_on_the_bucket_keep_existing_fields(bucket_library):
    bucket, parquet = bucket_library
    bucket.put("photos/beach/dog.jpg.xmp", b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3"/></rdf:RDF></x:xmpmeta>')
    dry = export(bucket, "xmp", "--from", parquet, "--in-place", "--dry-run")
    assert f"update  {bucket.url('photos/beach/dog.jpg.xmp')}" in dry.output
    assert not [k for k in bucket.keys("photos/") if k.endswith(".xmp") and "dog" not in k]

    export(bucket, "xmp", "--from", parquet, "--in-place")
    export(bucket, "txt", "--from", parquet, "--in-place")
    keys = bucket.keys("photos/")
    assert {"photos/beach/dog.jpg.xmp", "photos/city/night café street.png.xmp", "photos/beach/dog.txt", "photos/portrait.txt"} <= set(keys)
    assert "photos/broken.txt" not in keys
    image = pyexiv2.ImageData(bucket.get("photos/beach/dog.jpg.xmp"))
    try:
        fields = image.read_xmp()
    finally:
        image.close()
    assert fields["Xmp.xmp.Rating"] == "3"
    assert fields["Xmp.iptc.AltTextAccessibility"] == {X: "A brown dog running along a sandy beach at low tide."}
    assert bucket.get("photos/portrait.txt").decode() == LIBRARY["portrait.jpg"][0]


def test_exports_written_to_the_bucket(bucket_library):
    bucket, parquet = bucket_library
    export(bucket, "alt-text", "--from", parquet, "--out", bucket.url("exports/alt.jsonl"))
    records = [json.loads(line) for line in bucket.get("exports/alt.jsonl").decode().splitlines()]
    assert [r["uri"] for r in records] == sorted(bucket.url(f"photos/{rel}") for rel in LIBRARY)
    export(bucket, "coco", "--from", parquet, "--out", bucket.url("exports/coco"), "--probe", "Is there a person in the image?=no")
    document = json.loads(bucket.get("exports/coco/annotations/captions.json"))
    assert [i["file_name"] for i in document["images"]] == ["beach/dog.jpg"]
    assert bucket.get("exports/coco/images/beach/dog.jpg") == bucket.get("photos/beach/dog.jpg")
    export(bucket, "hf-dataset", "--from", parquet, "--out", bucket.url("exports/hf"))
    dataset = datasets.load_from_disk(bucket.url("exports/hf"), storage_options=bucket.storage_options)
    assert sorted(dataset["file_name"]) == sorted(LIBRARY) and dataset[0]["image"].size[0] > 0
    export(bucket, "txt", "--from", parquet, "--out", bucket.url("exports/txt"))
    assert bucket.keys("exports/txt/") == sorted(
        f"exports/txt/{rel.rsplit('.', 1)[0]}.txt" for rel in LIBRARY)


def test_link_needs_local_files(bucket_library, tmp_path):
    bucket, parquet = bucket_library
    result = export(bucket, "imagefolder", "--from", parquet, "--out", tmp_path / "ds", "--link", exit_code=1)
    assert "--link needs local images" in result.output


def test_bucket_exports_rewrite_their_own_files_and_keep_a_users(bucket_library):
    bucket, parquet = bucket_library
    out = bucket.url("exports/coco")
    export(bucket, "coco", "--from", parquet, "--out", out)
    export(bucket, "coco", "--from", parquet, "--out", out, "--where", "format = 'PNG'")  # its own files (ETags recorded)
    document = json.loads(bucket.get("exports/coco/annotations/captions.json"))
    assert [i["file_name"] for i in document["images"]] == ["city/night café street.png"]

    bucket.put("exports/alt.jsonl", b"mine")
    refused = export(bucket, "alt-text", "--from", parquet, "--out", bucket.url("exports/alt.jsonl"), exit_code=1)
    assert "--overwrite" in refused.output and bucket.get("exports/alt.jsonl") == b"mine"

    images = {k: bucket.get(k) for k in bucket.keys("photos/")}
    refused = export(bucket, "imagefolder", "--from", parquet, "--out", bucket.url("photos"), exit_code=1)
    assert "--allow-out-in-images" in refused.output
    export(bucket, "imagefolder", "--from", parquet, "--out", bucket.url("photos"), "--allow-out-in-images")
    after = {k: bucket.get(k) for k in bucket.keys("photos/")}
    assert set(after) - set(images) == {"photos/metadata.jsonl", "photos/.captioner-export.json"}
    assert all(after[k] == data for k, data in images.items())  # every image left as it was
