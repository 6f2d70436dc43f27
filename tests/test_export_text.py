"""Exports carry the text read in the image (schema v5) and start alt text from the short caption."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.export.alt_text import alt_text_with_text
from tests.cli import cli
from tests.search_data import ok_row, run_metadata, write_rows

CAPTION = "A bakery shop front on a narrow street, with a striped awning and bread in the window."
SHORT = "A bakery shop front."
TEXT = "ZANZIBAR BAKERY\nopen daily"
X = 'lang="x-default"'


@pytest.fixture
def library(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    run = run_metadata(embed_model=None)
    rows = []
    for name, text, short in (("bakery.jpg", TEXT, SHORT), ("meadow.jpg", "", None), ("old.jpg", None, None)):
        Image.new("RGB", (64, 48), (200, 180, 120)).save(photos / name)
        row = ok_row(str(photos / name), CAPTION if name == "bakery.jpg" else "A meadow of flowers.", [], None, run=run)
        row.update(text=text, caption_short=short, width=64, height=48, probes=[])
        rows.append(row)
    parquet = tmp_path / "captions.parquet"
    write_rows(parquet, rows, run)
    return photos, parquet


def test_alt_text_txt_coco_and_hf_carry_the_text(library, tmp_path):
    photos, parquet = library
    cli("export", "alt-text", "--from", parquet, "--out", tmp_path / "alt.jsonl")
    alt = {r["uri"].rsplit("/", 1)[-1]: r for r in map(json.loads, (tmp_path / "alt.jsonl").read_text().splitlines())}
    assert alt["bakery.jpg"]["alt_text"] == 'A bakery shop front. Text: "ZANZIBAR BAKERY / open daily"'
    assert alt["bakery.jpg"]["caption"] == CAPTION  # the long caption stays the long description
    assert alt["meadow.jpg"]["alt_text"] == alt["old.jpg"]["alt_text"] == "A meadow of flowers."

    cli("export", "txt", "--from", parquet, "--out", tmp_path / "txt")
    assert (tmp_path / "txt" / "bakery.txt").read_text() == f'{CAPTION} Text: "ZANZIBAR BAKERY / open daily"'
    assert (tmp_path / "txt" / "meadow.txt").read_text() == "A meadow of flowers."

    cli("export", "coco", "--from", parquet, "--out", tmp_path / "coco")
    images = {i["file_name"]: i for i in json.loads((tmp_path / "coco" / "annotations" / "captions.json").read_text())["images"]}
    assert images["bakery.jpg"]["text"] == TEXT and images["meadow.jpg"]["text"] == "" and "text" not in images["old.jpg"]

    datasets = pytest.importorskip("datasets")
    cli("export", "hf-dataset", "--from", parquet, "--out", tmp_path / "hf")
    rows = {r["file_name"]: r for r in datasets.load_from_disk(str(tmp_path / "hf"))}
    assert (rows["bakery.jpg"]["image_text"], rows["bakery.jpg"]["caption_short"]) == (TEXT, SHORT)
    assert rows["old.jpg"]["image_text"] is None


def test_xmp_quotes_the_text_in_alt_text_and_the_extended_description(library, tmp_path):
    pyexiv2 = pytest.importorskip("pyexiv2")
    _, parquet = library
    cli("export", "xmp", "--from", parquet, "--out", tmp_path / "xmp")
    with pyexiv2.Image(str(tmp_path / "xmp" / "bakery.jpg.xmp")) as image:
        fields = image.read_xmp()
    assert fields["Xmp.iptc.AltTextAccessibility"] == {X: alt_text_with_text(SHORT, TEXT)}
    assert fields["Xmp.iptc.ExtDescrAccessibility"] == {X: f'{CAPTION} Text in the image: "ZANZIBAR BAKERY / open daily"'}
    assert fields["Xmp.dc.description"] == {X: CAPTION}
