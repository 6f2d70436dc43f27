"""Hostile input through the whole pipeline, and the listing/scheduling limits.

Every file of the image corpus (tests/fixtures/images.py) goes through
``captioner run`` on the tiny models: each becomes exactly one row, with the
decoder's verdict and a message saying what is wrong, and the odd-but-valid
ones (1x1, 10000x1, CMYK, 16-bit ...) are captioned and embedded like any other.
"""

from __future__ import annotations

import collections
import os
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import jobs.ray_plan as ray_plan
import jobs.run as run_module
from pipeline.cli import main
from pipeline.config import IMAGE_EXTENSIONS
from pipeline.sources import SourceItem, list_images, stored_uri
from schemas import STATUS_ERROR, STATUS_OK
from tests.fixtures.images import CORPUS_MAX_PIXELS, UPRIGHT_SIZE, make_jpegs

# What the message of each error kind must say (beside the file-specific detail).
MESSAGE_SAYS = {
    "missing": "deleted or moved after listing",
    "unreadable": "permission denied",
    "empty": "empty file",
    "not_image": "not an image",
    "unsupported_format": "cannot be decoded",
    "too_large": "raise decode.max_pixels",
    "truncated": "truncated",
    "corrupt": "corrupt image",
}


def _copy_corpus(corpus, dest):
    """Copy the session corpus (shared, read-only) so this test can add a file to it."""
    root = corpus["one_pixel"].path.parent
    locked = corpus["unreadable_chmod_000"].path
    # A non-root user cannot read the chmod-000 file to copy it: copy its twin, then lock that.
    shutil.copytree(root, dest, ignore=lambda folder, names: [locked.name] if folder == str(root) else [])
    shutil.copy(corpus["orientation_1"].path, dest / locked.name)
    os.chmod(dest / locked.name, 0)


def test_every_hostile_file_becomes_one_row_saying_what_is_wrong(
    ray_local, image_corpus, tmp_path, tiny_vlm_dir, tiny_clip_dir, monkeypatch
):
    src = tmp_path / "corpus"
    _copy_corpus(image_corpus, src)
    vanishing = make_jpegs(src, 1)[0].rename(src / "vanishing.jpg")
    # A file that is gone by the time a worker reads it: delete it right after the listing.
    real_list_images = run_module.list_images

    def list_then_delete(*args, **kwargs):
        items = real_list_images(*args, **kwargs)
        vanishing.unlink()
        return items

    monkeypatch.setattr(run_module, "list_images", list_then_delete)
    probes = tmp_path / "probes.yaml"
    probes.write_text("- Is there text in the image?\n")
    out = tmp_path / "captions.parquet"

    result = CliRunner().invoke(
        main,
        ["run", str(src), "--out", str(out), "--caption-model", str(tiny_vlm_dir), "--embed-model", str(tiny_clip_dir),
         "--probes", str(probes), "--max-pixels", str(CORPUS_MAX_PIXELS), "--no-progress"],
    )
    assert result.exit_code == 0, (result.output, result.exception)  # bad images are rows, not a failed run

    expected = {}  # stored uri -> (case name, error_kind or None, size of an ok image)
    for name, case in image_corpus.items():
        if name == "directory_as_jpg":
            continue  # a folder named like an image is walked as a folder, not listed as a file
        kind, size = case.error_kind, case.size
        if name == "unreadable_chmod_000" and os.geteuid() == 0:
            kind, size = None, UPRIGHT_SIZE  # chmod 000 does not stop root; the file is a good JPEG
        expected[stored_uri(str(src / case.path.name))] = (name, kind, size)
    expected[str(vanishing)] = ("vanishing", "missing", None)

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(expected)
    by_uri = {row["uri"]: row for row in rows}
    assert sorted(by_uri) == sorted(expected)  # exactly one row per listed file
    for uri, (name, kind, size) in expected.items():
        row = by_uri[uri]
        if kind is None:
            assert row["status"] == STATUS_OK, (name, row["error"])
            assert (row["width"], row["height"]) == size, name
            assert row["caption"] and row["probes"] and row["embedding"] is not None, name
        else:
            assert (row["status"], row["error_kind"]) == (STATUS_ERROR, kind), (name, row["error"])
            assert MESSAGE_SAYS[kind] in row["error"].lower(), (name, row["error"])
            assert "\n" not in row["error"] and row["caption"] is None and row["embedding"] is None

    # A name that is not UTF-8 is stored as printable, valid UTF-8 with the bad bytes spelled out.
    odd = stored_uri(str(src / image_corpus["non_utf8_name"].path.name))
    assert odd.endswith("/caf\\xe9_\\xff.jpg") and by_uri[odd]["status"] == STATUS_OK
    assert by_uri[stored_uri(str(src / image_corpus["long_name"].path.name))]["status"] == STATUS_OK

    kinds = collections.Counter(kind for _, kind, _ in expected.values() if kind)
    listing = ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))
    assert f"errors      {sum(kinds.values())} ({listing})" in result.output


# ---- limits -----------------------------------------------------------------------------


def test_20000_files_list_sorted_and_schedule_as_few_small_blocks(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    tiny = make_jpegs(tmp_path / "one", 1, size=(8, 8))[0].read_bytes()
    for i in range(20_000):
        # JPEG readers stop at the end-of-image marker, so the tail only makes each file distinct.
        (folder / f"{i:05d}.jpg").write_bytes(tiny + i.to_bytes(4, "big"))

    items = list_images(str(folder), extensions=IMAGE_EXTENSIONS)
    assert len(items) == 20_000 and [item.uri for item in items] == sorted(str(p) for p in folder.iterdir())

    blocks = ray_plan.input_blocks(items, batch_size=16)
    assert len(blocks) == 1250 and {b.num_rows for b in blocks} == {16}
    # The driver schedules names and sizes, never pixels: a few dozen bytes a file.
    assert set(blocks[0].column_names) == {"uri", "location", "size", "source_mtime"}
    assert sum(b.nbytes for b in blocks) < 200 * len(items)
    assert [u for b in blocks for u in b["uri"].to_pylist()] == [item.uri for item in items]


def test_input_blocks_are_capped_for_huge_listings():
    items = [SourceItem(f"/photos/{i:07d}.jpg", 1000) for i in range(300_000)]
    blocks = ray_plan.input_blocks(items, batch_size=16)
    # 2000 blocks at most: 150 files each instead of 18,750 blocks of 16.
    assert len(blocks) == 2000 and sum(b.num_rows for b in blocks) == 300_000
