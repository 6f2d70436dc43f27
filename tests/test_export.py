"""Every export format round-trips through the library that reads it, on real pipeline output.

The input is what a user has: `captioner run` (local Ray, the tiny offline
models, a folder with nested images and a broken file) then `captioner
index`, both through the CLI, once for the module. Each format is then read
back with its own consumer: pyexiv2 (exiv2) for XMP, datasets for
imagefolder and save_to_disk, pycocotools for COCO.
"""

from __future__ import annotations

import csv
import json

import datasets
import pycocotools.coco as coco_module
import pyexiv2
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.export.alt_text import alt_text
from tests.fixtures.images import make_jpegs
from tests.cli import cli


PROBES = ["Is there a person in the image?", "What is the main object in the image?"]
X = 'lang="x-default"'


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_vlm_dir, ray_module):
    """(photos folder, captions.parquet, index.duckdb, ok rows by uri) from the real pipeline (the shared Ray)."""
    base = tmp_path_factory.mktemp("export_e2e")
    photos = base / "photos"
    make_jpegs(photos, 2, size=(64, 48))
    make_jpegs(photos / "trip" / "day 1", 2, size=(48, 64), seed=3)
    (photos / "broken.jpg").write_bytes(next(photos.glob("*.jpg")).read_bytes()[:200])
    probes = base / "probes.yaml"
    probes.write_text("\n".join(f"- {q}" for q in PROBES))
    parquet, index = base / "out" / "captions.parquet", base / "out" / "index.duckdb"
    # No embedder: no export reads embeddings, and one model actor fewer keeps the module fast.
    cli("run", photos, "--out", parquet, "--caption-model", tiny_vlm_dir, "--no-embed", "--probes", probes, "--no-progress")
    cli("index", parquet, "--db", index)
    import pyarrow.parquet as pq

    rows = {r["uri"]: r for r in pq.read_table(parquet).to_pylist() if r["status"] == "ok"}
    assert len(rows) == 4
    return photos, parquet, index, rows


def test_alt_text_jsonl_from_the_index(captioned, tmp_path):
    _, _, index, rows = captioned
    out = tmp_path / "alt.jsonl"
    cli("export", "alt-text", "--index", index, "--out", out)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["uri"] for r in records) == sorted(rows)
    for record in records:
        assert record["alt_text"] == alt_text(rows[record["uri"]]["caption"]) and len(record["alt_text"]) <= 125
        assert record["machine_generated"] is True and record["generator"].startswith("transformers:local@sha256:")


def test_xmp_sidecars_read_back_with_exiv2(captioned, tmp_path):
    photos, _, index, rows = captioned
    cli("export", "xmp", "--index", index, "--out", tmp_path / "xmp")
    for uri, row in rows.items():
        rel = uri[len(str(photos)) + 1:]
        with pyexiv2.Image(str(tmp_path / "xmp" / f"{rel}.xmp")) as image:
            fields = image.read_xmp()
        caption = " ".join(row["caption"].split())
        assert fields["Xmp.dc.description"] == {X: caption}
        assert fields["Xmp.iptc.AltTextAccessibility"] == {X: alt_text(caption)}
        assert fields["Xmp.iptc.ExtDescrAccessibility"] == {X: caption}


def test_txt_sidecars_from_parquet(captioned, tmp_path):
    photos, parquet, _, rows = captioned
    cli("export", "txt", "--from", parquet, "--out", tmp_path / "txt")
    found = {p.relative_to(tmp_path / "txt").as_posix(): p.read_text(encoding="utf-8") for p in (tmp_path / "txt").rglob("*.txt")}
    expected = {uri[len(str(photos)) + 1:].rsplit(".", 1)[0] + ".txt": " ".join(r["caption"].split()) for uri, r in rows.items()}
    assert found == expected and any(k.startswith("trip/day 1/") for k in found)


def test_imagefolder_loads_with_datasets(captioned, tmp_path):
    photos, _, index, rows = captioned
    out = tmp_path / "imagefolder"
    cli("export", "imagefolder", "--index", index, "--out", out)
    train = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert train.num_rows == 4
    assert {"image", "caption", "image_id", "is_there_a_person_in_the_image", "what_is_the_main_object_in_the_image"} <= set(train.column_names)
    by_id = {r["image_id"]: r for r in rows.values()}
    for example in train:
        row = by_id[example["image_id"]]
        assert example["caption"] == row["caption"]
        assert example["image"].size == (row["width"], row["height"])
        assert example["what_is_the_main_object_in_the_image"] == row["probes"][1]["answer"]


def test_coco_captions_load_with_pycocotools(captioned, tmp_path):
    _, _, index, rows = captioned
    out = tmp_path / "coco"
    cli("export", "coco", "--index", index, "--out", out)
    coco = coco_module.COCO(str(out / "annotations/captions.json"))
    image_ids = coco.getImgIds()
    assert len(image_ids) == 4
    for image in coco.loadImgs(image_ids):
        with Image.open(out / "images" / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"])
        [annotation] = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert annotation["caption"] in {" ".join(r["caption"].split()) for r in rows.values()}
    # a captioning model's results, scored the way pycocoevalcap does it
    results = coco.loadRes([{"image_id": i, "caption": "a photo"} for i in image_ids])
    assert sorted(results.getImgIds()) == sorted(image_ids) and len(results.getAnnIds()) == 4
    assert set(json.loads((out / "annotations/captions.json").read_text())["info"]) >= {"description", "version", "year", "date_created"}


def test_hf_dataset_loads_from_disk(captioned, tmp_path):
    _, parquet, _, rows = captioned
    out = tmp_path / "hf"
    cli("export", "hf-dataset", "--from", parquet, "--out", out)
    dataset = datasets.load_from_disk(str(out))
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.num_rows == 4
    by_id = {r["image_id"]: r for r in rows.values()}
    for example in dataset:
        row = by_id[example["image_id"]]
        assert example["caption"] == row["caption"] and example["image"].size == (row["width"], row["height"])
        assert example["is_there_a_person_in_the_image"] == row["probes"][0]["answer_bool"]


def test_alt_text_csv_with_every_status(captioned, tmp_path):
    _, parquet, _, _ = captioned
    result = cli("export", "alt-text", "--from", parquet, "--out", tmp_path / "alt.csv", "--status", "any")
    assert "wrote 4 alt texts" in result.output and "skipped 1 (no caption)" in result.output
    assert len(list(csv.DictReader((tmp_path / "alt.csv").open(encoding="utf-8")))) == 4
