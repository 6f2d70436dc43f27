"""`captioner export` on a crafted library (tests/export_data.py): filters, sidecars, dry runs, errors.

Images are real files; the Parquet is schema v1 written as the pipeline writes
it, with realistic captions and probe answers, so every expected value is known.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyexiv2
import pytest

from pipeline.export.alt_text import alt_text
from pipeline.search import build_index
from tests.export_data import GENERATOR, LIBRARY, PERSON, PROBES, write_library
from tests.search_data import later, ok_row, run_metadata, write_rows
from tests.cli import cli



def export(*args, exit_code=0):
    return cli("export", *args, exit_code=exit_code)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """(image root, captions.parquet, index.duckdb) of the crafted library."""
    base = tmp_path_factory.mktemp("library")
    root, parquet = base / "photos", base / "captions.parquet"
    write_library(root, parquet)
    build_index([parquet], base / "index.duckdb")
    return root, parquet, base / "index.duckdb"


def stem(name: str) -> str:
    return Path(name).name.split(".")[0]


def exported_names(fmt: str, out: Path) -> set[str]:
    """The image stems an export wrote, read back the way each format's reader reads it."""
    if fmt == "alt-text":
        return {stem(r["uri"]) for r in csv.DictReader(out.open(encoding="utf-8"))}
    if fmt in ("xmp", "txt"):
        return {stem(p.name) for p in out.rglob(f"*.{fmt}")}
    if fmt == "imagefolder":
        return {stem(json.loads(line)["file_name"]) for line in (out / "metadata.jsonl").read_text().splitlines()}
    if fmt == "coco":
        return {stem(i["file_name"]) for i in json.loads((out / "annotations/captions.json").read_text())["images"]}
    import datasets

    return {stem(name) for name in datasets.load_from_disk(str(out))["file_name"]}


FORMATS = ["alt-text", "xmp", "txt", "imagefolder", "coco", "hf-dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_where_and_probe_filters_apply_to_every_format(library, tmp_path, fmt):
    _, parquet, index = library
    # half the formats read the index, half the Parquet: both readers filter the same way
    source = ["--index", index] if FORMATS.index(fmt) % 2 else ["--from", parquet]
    out = tmp_path / ("alt.csv" if fmt == "alt-text" else "out")
    result = export(fmt, *source, "--out", out, "--where", "format = 'JPEG'", "--probe", f"{PERSON}=yes")
    assert exported_names(fmt, out) == {"family", "portrait"}, result.output


def test_status_any_and_error_skip_rows_without_a_caption(library, tmp_path):
    _, parquet, index = library
    result = export("alt-text", "--index", index, "--out", tmp_path / "a.csv", "--status", "any")
    assert "wrote 4 alt texts" in result.output and "skipped 1 (no caption)" in result.output
    result = export("txt", "--from", parquet, "--out", tmp_path / "txt", "--status", "error")
    assert "0 created" in result.output and "skipped 1 (no caption)" in result.output


def test_alt_text_csv_and_jsonl_are_keyed_by_uri_and_marked_machine_generated(library, tmp_path):
    root, _, index = library
    export("alt-text", "--index", index, "--out", tmp_path / "alt.csv")
    export("alt-text", "--index", index, "--out", tmp_path / "alt.jsonl", "--max-chars", "60")
    rows = list(csv.DictReader((tmp_path / "alt.csv").open(encoding="utf-8")))
    assert list(rows[0]) == ["uri", "alt_text", "caption", "machine_generated", "generator"]
    by_uri = {r["uri"]: r for r in rows}
    assert by_uri[str(root / "beach/dog.jpg")]["alt_text"] == "A brown dog running along a sandy beach at low tide."
    assert by_uri[str(root / "city/night café street.png")]["alt_text"] == 'A busy street at night with a neon sign that says "OPEN 24 HRS".'
    assert by_uri[str(root / "portrait.jpg")]["alt_text"] == "An elderly man with a white beard smiling at the camera."
    family = by_uri[str(root / "beach/family.jpg")]
    assert len(family["alt_text"]) <= 125 and family["alt_text"].endswith("…")
    assert all(r["machine_generated"] == "true" and r["generator"] == GENERATOR for r in rows)
    assert family["caption"] == LIBRARY["beach/family.jpg"][0]

    lines = [json.loads(line) for line in (tmp_path / "alt.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["uri"] for r in lines] == sorted(by_uri)
    assert all(r["machine_generated"] is True and len(r["alt_text"]) <= 60 for r in lines)
    assert {r["alt_text"] for r in lines} == {alt_text(r["caption"], 60) for r in lines}


# -- XMP sidecars -----------------------------------------------------------------

LIGHTROOM_SIDECAR = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/" xmp:Rating="4">
   <dc:subject><rdf:Bag><rdf:li>holiday</rdf:li><rdf:li>beach</rdf:li></rdf:Bag></dc:subject>
   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">Rex on the beach, summer 2023</rdf:li>
    <rdf:li xml:lang="de">Rex am Strand</rdf:li></rdf:Alt></dc:description>
   <lr:hierarchicalSubject><rdf:Bag><rdf:li>pets|Rex</rdf:li></rdf:Bag></lr:hierarchicalSubject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""
X = 'lang="x-default"'


def read_xmp(path: Path) -> dict:
    with pyexiv2.Image(str(path)) as image:
        return image.read_xmp()


def test_xmp_sidecars_carry_caption_alt_text_and_the_machine_marker(library, tmp_path):
    root, _, index = library
    result = export("xmp", "--index", index, "--out", tmp_path / "xmp")
    assert "4 created, 0 updated, 0 kept" in result.output
    fields = read_xmp(tmp_path / "xmp/city/night café street.png.xmp")  # mirrors the source folders
    caption = " ".join(LIBRARY["city/night café street.png"][0].split())
    assert fields["Xmp.dc.description"] == {X: caption}
    assert fields["Xmp.iptc.AltTextAccessibility"] == {X: alt_text(caption)}
    assert fields["Xmp.iptc.ExtDescrAccessibility"] == {X: caption}
    assert fields["Xmp.captioner.MachineGenerated"] == "True" and fields["Xmp.captioner.Generator"] == GENERATOR

    again = export("xmp", "--index", index, "--out", tmp_path / "xmp")
    assert "0 created, 0 updated, 4 kept" in again.output  # nothing changed: nothing rewritten


def test_an_existing_sidecar_is_updated_not_clobbered(library, tmp_path):
    _, _, index = library
    sidecar = tmp_path / "xmp/beach/dog.jpg.xmp"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(LIGHTROOM_SIDECAR)
    result = export("xmp", "--index", index, "--out", tmp_path / "xmp", "--where", "uri LIKE '%dog%'")
    assert "0 created, 1 updated" in result.output
    fields = read_xmp(sidecar)
    assert fields["Xmp.xmp.Rating"] == "4" and fields["Xmp.dc.subject"] == ["holiday", "beach"]
    assert fields["Xmp.lr.hierarchicalSubject"] == ["pets|Rex"]
    # someone's description is theirs: kept, other languages too; the accessibility fields are added
    assert fields["Xmp.dc.description"] == {X: "Rex on the beach, summer 2023", 'lang="de"': "Rex am Strand"}
    assert fields["Xmp.iptc.AltTextAccessibility"] == {X: "A brown dog running along a sandy beach at low tide."}
    assert set(fields["Xmp.captioner.Fields"].split(",")) == {
        "Iptc4xmpCore:AltTextAccessibility", "Iptc4xmpCore:ExtDescrAccessibility"}

    export("xmp", "--index", index, "--out", tmp_path / "xmp", "--where", "uri LIKE '%dog%'", "--overwrite")
    fields = read_xmp(sidecar)
    assert fields["Xmp.dc.description"][X].startswith("The image shows a brown dog")
    assert fields["Xmp.dc.description"]['lang="de"'] == "Rex am Strand" and fields["Xmp.xmp.Rating"] == "4"


def test_fields_captioner_wrote_are_updated_on_the_next_export(library, tmp_path):
    _, parquet, _ = library
    export("xmp", "--from", parquet, "--out", tmp_path / "xmp")
    sidecar = tmp_path / "xmp/portrait.jpg.xmp"
    with pyexiv2.Image(str(sidecar)) as image:
        image.modify_xmp({"Xmp.iptc.AltTextAccessibility": {X: "stale text"}, "Xmp.xmp.Rating": "5"})
    result = export("xmp", "--from", parquet, "--out", tmp_path / "xmp")
    assert "1 updated, 3 kept" in result.output
    fields = read_xmp(sidecar)
    assert fields["Xmp.iptc.AltTextAccessibility"] == {X: "An elderly man with a white beard smiling at the camera."}
    assert fields["Xmp.xmp.Rating"] == "5"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["xmp", "txt"])
def test_dry_run_lists_changes_and_writes_nothing(library, tmp_path, fmt):
    _, parquet, _ = library
    out = tmp_path / "out"
    existing = out / "beach" / ("dog.jpg.xmp" if fmt == "xmp" else "dog.txt")
    existing.parent.mkdir(parents=True)
    existing.write_text(LIGHTROOM_SIDECAR if fmt == "xmp" else "my own words")
    before = snapshot(out)
    result = export(fmt, "--from", parquet, "--out", out, "--dry-run")
    assert snapshot(out) == before
    lines = result.output.splitlines()
    assert sum(line.startswith("create") for line in lines) == 3
    verb = "update" if fmt == "xmp" else "keep"
    assert any(line.startswith(verb) and str(existing) in line for line in lines)
    assert "would write" in lines[-1]


def test_xmp_in_place_with_stem_names_and_collisions(library, tmp_path):
    root, parquet, _ = library
    images = tmp_path / "images"
    images.mkdir()
    for rel in ("beach/dog.jpg", "portrait.jpg"):
        (images / Path(rel).name).write_bytes((root / rel).read_bytes())
    (images / "portrait.png").write_bytes((root / "city/night café street.png").read_bytes())
    run = run_metadata(probes=PROBES)
    rows = [
        ok_row(str(images / name), f"A photo named {name}.", ["no", "blue"], [1, 0, 0, 0], run=run)
        for name in ("dog.jpg", "portrait.jpg", "portrait.png")
    ]
    write_rows(tmp_path / "c.parquet", rows, run)
    refused = export("xmp", "--from", tmp_path / "c.parquet", "--in-place", "--sidecar-name", "stem", exit_code=1)
    assert "portrait.xmp" in refused.output and "--sidecar-name full" in refused.output
    assert not list(images.glob("*.xmp"))  # nothing written when any sidecar collides

    export("xmp", "--from", tmp_path / "c.parquet", "--in-place", "--sidecar-name", "stem", "--where", "uri NOT LIKE '%.png'")
    assert sorted(p.name for p in images.glob("*.xmp")) == ["dog.xmp", "portrait.xmp"]
    assert read_xmp(images / "dog.xmp")["Xmp.dc.description"] == {X: "A photo named dog.jpg."}


# -- txt sidecars ----------------------------------------------------------------


def test_txt_sidecars_mirror_the_tree_and_keep_hand_edits(library, tmp_path):
    _, parquet, _ = library
    out = tmp_path / "txt"
    (out / "beach").mkdir(parents=True)
    (out / "beach/dog.txt").write_text("hand-tuned caption")
    result = export("txt", "--from", parquet, "--out", out)
    assert "3 created, 0 updated, 1 kept" in result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.txt")) == [
        "beach/dog.txt", "beach/family.txt", "city/night café street.txt", "portrait.txt"]
    assert (out / "beach/dog.txt").read_text() == "hand-tuned caption"
    assert (out / "portrait.txt").read_text(encoding="utf-8") == LIBRARY["portrait.jpg"][0]
    export("txt", "--from", parquet, "--out", out, "--overwrite")
    assert (out / "beach/dog.txt").read_text().startswith("The image shows a brown dog")


def test_txt_in_place_writes_beside_the_images(library, tmp_path):
    root, _, index = library
    export("txt", "--index", index, "--in-place", "--where", "uri LIKE '%street%'")
    try:
        assert (root / "city/night café street.txt").read_text(encoding="utf-8").startswith("In this image, we can see")
    finally:
        (root / "city/night café street.txt").unlink()


# -- image trees ------------------------------------------------------------------


def test_imagefolder_links_and_never_copies_an_image_onto_itself(library, tmp_path):
    root, parquet, _ = library
    export("imagefolder", "--from", parquet, "--out", tmp_path / "linked", "--link")
    linked = tmp_path / "linked/beach/dog.jpg"
    assert linked.is_symlink() and linked.resolve() == (root / "beach/dog.jpg").resolve()

    before = snapshot(root)
    refused = export("imagefolder", "--from", parquet, "--out", root, exit_code=1)  # --out is the source folder
    assert "--allow-out-in-images" in refused.output and snapshot(root) == before
    export("imagefolder", "--from", parquet, "--out", root, "--allow-out-in-images")
    try:
        after = snapshot(root)
        assert {k: v for k, v in after.items() if k not in ("metadata.jsonl", ".captioner-export.json")} == before
    finally:
        (root / "metadata.jsonl").unlink()
        (root / ".captioner-export.json").unlink()


def test_root_sets_the_mirrored_tree(library, tmp_path):
    root, parquet, _ = library
    export("coco", "--from", parquet, "--out", tmp_path / "coco", "--root", root.parent)
    names = {i["file_name"] for i in json.loads((tmp_path / "coco/annotations/captions.json").read_text())["images"]}
    assert "photos/beach/dog.jpg" in names and (tmp_path / "coco/images/photos/beach/dog.jpg").is_file()
    refused = export("coco", "--from", parquet, "--out", tmp_path / "c2", "--root", root / "beach", exit_code=1)
    assert "--root" in refused.output and "does not contain" in refused.output


# -- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["alt-text", "--out", "alt.txt"], ".csv or .jsonl"),
        (["txt"], "--in-place"),
        (["coco"], "needs --out"),
        (["coco", "--out", "x", "--dry-run"], "--dry-run"),
        (["txt", "--out", "x", "--where", "width > 1; DROP TABLE x"], "';' is not allowed"),
        (["txt", "--out", "x", "--probe", "Is it raining?=yes"], PERSON),
    ],
)
def test_bad_requests_are_errors_that_say_what_to_do(library, tmp_path, monkeypatch, args, message):
    _, parquet, _ = library
    monkeypatch.chdir(tmp_path)
    result = export(*args, "--from", parquet, exit_code=2 if "needs --out" in message or message in (
        "--in-place", "--dry-run") else 1)
    assert message in result.output and "Traceback" not in result.output


def test_a_missing_index_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = export("alt-text", "--out", "a.csv", exit_code=1)
    assert "captioner index" in result.output


@pytest.mark.parametrize("fmt, module", [("xmp", "pyexiv2"), ("hf-dataset", "datasets")])
def test_a_missing_optional_package_names_the_extra(library, tmp_path, monkeypatch, fmt, module):
    _, parquet, _ = library
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import now fails as if not installed
    result = export(fmt, "--from", parquet, "--out", tmp_path / "o", exit_code=1)
    assert "pip install 'captioner[export]'" in result.output and module in result.output


@pytest.mark.parametrize("fmt", ["imagefolder", "coco", "hf-dataset"])
def test_an_image_gone_since_captioning_is_skipped_not_fatal(library, tmp_path, fmt):
    root, _, _ = library
    run = run_metadata(probes=PROBES)
    rows = [ok_row(str(root / rel), LIBRARY[rel][0], ["no", "blue"], [1, 0, 0, 0], run=run) for rel in ("portrait.jpg", "beach/dog.jpg")]
    rows.append(ok_row(str(root / "deleted.jpg"), "A photo of a deleted file.", ["no", "blue"], [1, 0, 0, 0], run=run))
    write_rows(tmp_path / "c.parquet", rows, run)
    result = export(fmt, "--from", tmp_path / "c.parquet", "--out", tmp_path / "out")
    assert "skipped 1 (image missing or unreadable)" in result.output
    assert exported_names(fmt, tmp_path / "out") == {"portrait", "dog"}


def test_probe_columns_are_typed_and_carry_yes_prob_when_the_probes_have_it():
    from pipeline.export.labels import feature_types, probe_columns, probe_values
    from pipeline.export.rows import _row

    questions = ("Is there a person in the image?", "What colour is the sky?", "Is there a person in the image!", "3 cats?")
    columns = probe_columns(questions)
    assert list(columns.values()) == [
        "is_there_a_person_in_the_image", "what_colour_is_the_sky", "is_there_a_person_in_the_image_2", "q_3_cats"]
    row = _row({
        "id": 0, "uri": "/p.jpg", "status": "ok", "error": None, "caption": "A man.", "width": 1, "height": 1,
        "format": "JPEG", "bytes": 1, "image_id": "x", "caption_model": "m", "caption_revision": "r",
        "probes": [  # schema v2 shape: P(yes) beside the answer
            {"question": questions[0], "answer": "yes", "answer_bool": True, "yes_prob": 0.93},
            {"question": questions[1], "answer": "grey", "answer_bool": None, "yes_prob": None},
        ],
    })
    values = probe_values(row, columns, with_yes_prob=True)
    assert values["is_there_a_person_in_the_image"] is True
    assert values["is_there_a_person_in_the_image_yes_prob"] == pytest.approx(0.93)
    assert values["what_colour_is_the_sky"] == "grey" and values["q_3_cats"] is None
    types = feature_types(columns, with_yes_prob=True)
    assert types["is_there_a_person_in_the_image"] == "bool" and types["is_there_a_person_in_the_image_yes_prob"] == "float"
    assert set(values) == set(types)
    assert "is_there_a_person_in_the_image_yes_prob" not in probe_values(row, columns, with_yes_prob=False)


def test_an_empty_selection_is_an_error_that_writes_nothing(library, tmp_path):
    _, parquet, _ = library
    result = export("imagefolder", "--from", parquet, "--out", tmp_path / "ds", "--where", "width > 10000", exit_code=1)
    assert "no row of Parquet" in result.output and "it has 5 rows" in result.output and "width > 10000" in result.output
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("fmt", ["imagefolder", "coco", "hf-dataset"])
def test_a_dataset_with_no_image_left_is_an_error_not_an_empty_folder(library, tmp_path, fmt):
    _, parquet, _ = library
    result = export(fmt, "--from", parquet, "--out", tmp_path / "ds", "--status", "error", exit_code=1)
    assert "no image to export (1 status error)" in result.output
    assert [p for p in (tmp_path / "ds").rglob("*") if p.is_file()] == []


def test_from_a_part_file_folder_takes_the_newest_row_per_uri(library, tmp_path):
    root, _, _ = library
    run = run_metadata(probes=PROBES)
    parts = tmp_path / "out"
    parts.mkdir()
    old = ok_row(str(root / "portrait.jpg"), "An old caption of a man.", ["yes", "blue"], [1, 0, 0, 0], run=run)
    new = ok_row(str(root / "portrait.jpg"), "A new caption of a man.", ["yes", "blue"], [1, 0, 0, 0], run=run, at=later(5))
    dog = ok_row(str(root / "beach/dog.jpg"), "A dog.", ["no", "blue"], [1, 0, 0, 0], run=run)
    write_rows(parts / "part-a.parquet", [old, dog], run)
    write_rows(parts / "part-b.parquet", [new], run)
    write_rows(parts / ".part-c.parquet.tmp", [dog], run)  # a writer's temporary file: not part of the output
    export("alt-text", "--from", f"{parts}/", "--out", tmp_path / "alt.jsonl")
    records = [json.loads(line) for line in (tmp_path / "alt.jsonl").read_text().splitlines()]
    assert [(Path(r["uri"]).name, r["caption"]) for r in records] == [
        ("dog.jpg", "A dog."), ("portrait.jpg", "A new caption of a man.")]


def test_an_unreadable_existing_sidecar_stops_the_export_before_any_write(library, tmp_path):
    _, parquet, _ = library
    (tmp_path / "xmp/beach").mkdir(parents=True)
    (tmp_path / "xmp/beach/dog.jpg.xmp").write_text("<x:xmpmeta><rdf:RDF")  # cut short
    result = export("xmp", "--from", parquet, "--out", tmp_path / "xmp", exit_code=1)
    assert "dog.jpg.xmp is not readable XMP" in result.output and "fix or move it" in result.output
    assert [p.name for p in (tmp_path / "xmp").rglob("*.xmp")] == ["dog.jpg.xmp"]


def test_mirrored_paths_never_leave_the_output_folder():
    from pipeline.export.errors import ExportError
    from pipeline.export.storage import relative_paths

    uris = ["s3://b/photos/a/x.jpg", "s3://b/photos/y.jpg"]
    assert relative_paths(uris) == {"s3://b/photos/a/x.jpg": "a/x.jpg", "s3://b/photos/y.jpg": "y.jpg"}
    assert relative_paths(uris, "s3://b/") == {"s3://b/photos/a/x.jpg": "photos/a/x.jpg", "s3://b/photos/y.jpg": "photos/y.jpg"}
    with pytest.raises(ExportError, match=r"'\.\.' path segment"):
        relative_paths(["s3://b/photos/../../escape.jpg", "s3://b/photos/y.jpg"])
    assert relative_paths(["/data/p/../q/z.jpg"]) == {"/data/p/../q/z.jpg": "z.jpg"}  # local paths are normalised first
