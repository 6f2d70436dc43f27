"""Exports never overwrite or delete a file they did not write (issue 14).

An --out that holds indexed images is refused unless --allow-out-in-images;
even then a source image is never replaced. A user's own files at an export's
destinations (a same-named image, metadata.jsonl, captions.json, an alt-text
.csv) are kept unless --overwrite. A re-export into a folder the export wrote
itself (recorded in its .captioner-export.json) still rewrites it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.search import build_index
from tests.cli import cli
from tests.export_data import PROBES, image_bytes, write_library
from tests.search_data import ok_row, run_metadata, write_rows

FLAG = "--allow-out-in-images"
MANIFEST = ".captioner-export.json"


def export(*args, exit_code=0):
    return cli("export", *args, exit_code=exit_code)


def two_pictures(tmp_path, first: str, second: str):
    """T/<first> and T/<second>: two different pictures with their own captions, run + index."""
    tree = tmp_path / "T"
    run = run_metadata(probes=PROBES)
    rows = []
    for n, rel in enumerate((first, second)):
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes((32 + 8 * n, 24), "JPEG", 30 + 150 * n))
        rows.append(ok_row(str(path), f"Picture number {n} of a red kite.", ["no", "blue"], [1, n, 0, 0], run=run))
    write_rows(tmp_path / "c.parquet", rows, run)
    build_index([tmp_path / "c.parquet"], tmp_path / "i.duckdb")
    return tree, {rel: (tree / rel).read_bytes() for rel in (first, second)}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the repro: an export destroyed an original photo ------------------------------

# imagefolder copies T/a.jpg to OUT/a.jpg, coco to OUT/images/a.jpg: an --out where that is the other picture
REPRO = {"imagefolder": ("sub/a.jpg", "sub"), "coco": ("images/a.jpg", "")}


@pytest.mark.parametrize("fmt", sorted(REPRO))
def test_an_out_holding_indexed_images_is_refused_and_names_the_flag(tmp_path, fmt):
    second, out = REPRO[fmt]
    tree, originals = two_pictures(tmp_path, "a.jpg", second)
    before = snapshot(tree)
    result = export(fmt, "--index", tmp_path / "i.duckdb", "--out", tree / out, exit_code=1)
    assert FLAG in result.output and "Traceback" not in result.output
    assert any(str(tree / rel) in result.output for rel in originals)  # names an indexed image it holds
    assert snapshot(tree) == before  # nothing written, nothing deleted


@pytest.mark.parametrize("fmt", sorted(REPRO))
def test_with_the_flag_a_source_image_is_never_replaced(tmp_path, fmt):
    second, out = REPRO[fmt]
    tree, originals = two_pictures(tmp_path, "a.jpg", second)
    result = export(fmt, "--index", tmp_path / "i.duckdb", "--out", tree / out, FLAG)
    for rel, data in originals.items():
        assert (tree / rel).read_bytes() == data, rel  # the original photos are intact
    assert "indexed image" in result.output and "skipped 1" in result.output
    # the dataset never pairs a caption with the wrong picture
    if fmt == "imagefolder":
        records = [json.loads(line) for line in (tree / out / "metadata.jsonl").read_text().splitlines()]
        pairs = {r["file_name"]: r["caption"] for r in records}
        base = tree / out
    else:
        document = json.loads((tree / out / "annotations/captions.json").read_text())
        captions = {a["image_id"]: a["caption"] for a in document["annotations"]}
        pairs = {i["file_name"]: captions[i["id"]] for i in document["images"]}
        base = tree / out / "images"
    assert pairs == {second: "Picture number 1 of a red kite."}
    assert (base / second).read_bytes() == originals[second]


def test_with_the_flag_out_as_the_image_folder_leaves_every_image_in_place(tmp_path):
    tree, originals = two_pictures(tmp_path, "a.jpg", "sub/b.jpg")
    export("imagefolder", "--index", tmp_path / "i.duckdb", "--out", tree, exit_code=1)
    export("imagefolder", "--index", tmp_path / "i.duckdb", "--out", tree, FLAG)
    again = export("imagefolder", "--index", tmp_path / "i.duckdb", "--out", tree, FLAG)  # a re-export too
    assert "wrote an imagefolder dataset of 2 images" in again.output
    assert {k: v for k, v in snapshot(tree).items() if k not in ("metadata.jsonl", MANIFEST)} == originals
    names = [json.loads(line)["file_name"] for line in (tree / "metadata.jsonl").read_text().splitlines()]
    assert sorted(names) == ["a.jpg", "sub/b.jpg"]


# -- a user's own files in --out ---------------------------------------------------


@pytest.fixture
def library(tmp_path):
    root, parquet = tmp_path / "photos", tmp_path / "captions.parquet"
    write_library(root, parquet)
    return root, parquet


OWN_FILES = [
    ("imagefolder", "ds", "metadata.jsonl"),
    ("imagefolder", "ds", "beach/dog.jpg"),
    ("coco", "coco", "annotations/captions.json"),
    ("coco", "coco", "images/portrait.jpg"),
    ("hf-dataset", "hf", "state.json"),
    ("alt-text", "alt.csv", ""),
]


@pytest.mark.parametrize("fmt, out, own", OWN_FILES)
def test_a_users_own_file_is_not_overwritten_without_overwrite(library, tmp_path, fmt, out, own):
    _, parquet = library
    target = tmp_path / out / own if own else tmp_path / out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"mine, not captioner's")
    before = snapshot(tmp_path / out) if own else None
    result = export(fmt, "--from", parquet, "--out", tmp_path / out, exit_code=1)
    assert "--overwrite" in result.output and str(target) in result.output and "Traceback" not in result.output
    assert target.read_bytes() == b"mine, not captioner's"
    if own:
        assert snapshot(tmp_path / out) == before  # refused before anything was written

    export(fmt, "--from", parquet, "--out", tmp_path / out, "--overwrite")
    assert target.read_bytes() != b"mine, not captioner's"


@pytest.mark.parametrize("fmt, out", [("imagefolder", "ds"), ("coco", "coco"), ("hf-dataset", "hf"), ("alt-text", "alt.csv")])
def test_a_re_export_rewrites_what_the_export_wrote(library, tmp_path, fmt, out):
    _, parquet = library
    export(fmt, "--from", parquet, "--out", tmp_path / out)
    second = export(fmt, "--from", parquet, "--out", tmp_path / out, "--where", "format = 'PNG'")
    assert "Traceback" not in second.output
    if fmt == "alt-text":
        assert len(list(csv.DictReader((tmp_path / out).open(encoding="utf-8")))) == 1
    elif fmt == "imagefolder":
        assert len((tmp_path / out / "metadata.jsonl").read_text().splitlines()) == 1
    elif fmt == "coco":
        assert len(json.loads((tmp_path / out / "annotations/captions.json").read_text())["images"]) == 1
    else:
        import datasets

        assert len(datasets.load_from_disk(str(tmp_path / out))) == 1


def test_a_file_the_export_wrote_but_the_user_changed_since_is_theirs(library, tmp_path):
    _, parquet = library
    out = tmp_path / "ds"
    export("imagefolder", "--from", parquet, "--out", out)
    (out / "metadata.jsonl").write_text('{"file_name": "beach/dog.jpg", "caption": "Rex, hand-written"}\n')
    result = export("imagefolder", "--from", parquet, "--out", out, exit_code=1)
    assert "--overwrite" in result.output and "metadata.jsonl" in result.output
    assert "hand-written" in (out / "metadata.jsonl").read_text()


def test_linked_exports_re_export_and_never_write_through_a_users_link(library, tmp_path):
    root, parquet = library
    out = tmp_path / "linked"
    export("imagefolder", "--from", parquet, "--out", out, "--link")
    export("imagefolder", "--from", parquet, "--out", out, "--link")  # its own links are replaced
    export("imagefolder", "--from", parquet, "--out", out)  # and replaced by copies
    assert not (out / "beach/dog.jpg").is_symlink()
    assert (out / "beach/dog.jpg").read_bytes() == (root / "beach/dog.jpg").read_bytes()

    mine = tmp_path / "mine"
    (mine / "beach").mkdir(parents=True)
    (mine / "beach/dog.jpg").symlink_to(root / "portrait.jpg")  # someone's link into the library
    portrait = (root / "portrait.jpg").read_bytes()
    result = export("imagefolder", "--from", parquet, "--out", mine, exit_code=1)
    assert "--overwrite" in result.output
    export("imagefolder", "--from", parquet, "--out", mine, "--overwrite")
    assert (root / "portrait.jpg").read_bytes() == portrait  # replaced the link, not written through it
    assert (mine / "beach/dog.jpg").read_bytes() == (root / "beach/dog.jpg").read_bytes()
