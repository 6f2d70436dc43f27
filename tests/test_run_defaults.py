"""The paths a new user takes first: default flags over folders that mix good and bad files.

Tiny models stand in for Moondream/SigLIP (no hub here), but batch sizes,
stages, listing and output are the defaults a user gets.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from schemas import STATUS_ERROR, STATUS_OK, check_schema
from tests.cli import run_cli


def _png(seed: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def mixed_folder(root, count: int, bad_every: int):
    """``count`` PNGs; every ``bad_every``-th one truncated (a half-downloaded file)."""
    root.mkdir(parents=True, exist_ok=True)
    bad = set()
    for i in range(count):
        data = _png(i)
        if (i + 1) % bad_every == 0:
            data = data[: len(data) // 2]
            bad.add(f"img_{i:04d}.png")
        (root / f"img_{i:04d}.png").write_bytes(data)
    return bad


def check_one_row_per_file(out, folder, bad):
    table = pq.read_table(out)
    check_schema(table.schema)
    rows = table.to_pylist()
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in rows) == names
    for row in rows:
        name = row["uri"].rsplit("/", 1)[-1]
        if name in bad:
            assert row["status"] == STATUS_ERROR and row["error_kind"] == "truncated", row
        else:
            assert row["status"] == STATUS_OK, row
    return rows


def test_one_truncated_png_among_31_good_ones_with_default_batch_sizes(ray_local, tmp_path, tiny_vlm_dir, tiny_clip_dir):
    """Issue 8.1: an error-free decode block and one with a failure met in one embed batch."""
    folder = tmp_path / "photos"
    bad = mixed_folder(folder, 32, bad_every=32)
    out = tmp_path / "captions.parquet"
    run_cli(folder, "--out", out, "--caption-model", tiny_vlm_dir, "--embed-model", tiny_clip_dir)
    rows = check_one_row_per_file(out, folder, bad)
    assert sum(r["status"] == STATUS_OK for r in rows) == 31


@pytest.mark.parametrize(
    "flags",
    [
        [],  # default flags
        ["--batch-size", "1"],
        ["--batch-size", "3"],
        ["--batch-size", "8"],
        ["--batch-size", "32"],
        ["--embed-batch-size", "5", "--no-caption", "--no-probes"],
        ["--embed-batch-size", "16", "--no-caption", "--no-probes"],
        ["--embed-batch-size", "64", "--no-caption", "--no-probes"],
    ],
    ids=lambda flags: "-".join(f.lstrip("-") for f in flags) or "defaults",
)
def test_200_images_every_7th_corrupt_any_batch_size(ray_local, tmp_path_factory, tiny_vlm_dir, tiny_clip_dir, flags):
    folder = tmp_path_factory.mktemp("mixed") / "photos"
    bad = mixed_folder(folder, 200, bad_every=7)
    out = folder.parent / "captions.parquet"
    extra = []
    if flags:
        # Batching is what varies here; a few tokens per answer keep the tiny model's share small.
        config = folder.parent / "short.yaml"
        config.write_text("caption:\n  max_new_tokens: 4\n  answer_max_new_tokens: 2\n")
        extra = ["--config", config]
    run_cli(folder, "--out", out, "--caption-model", tiny_vlm_dir, "--embed-model", tiny_clip_dir, *flags, *extra)
    rows = check_one_row_per_file(out, folder, bad)
    assert len(rows) == 200 and sum(r["status"] == STATUS_ERROR for r in rows) == len(bad) == 28


def test_no_caption_still_asks_the_probes(ray_local, tmp_path, tiny_vlm_dir, tiny_clip_dir):
    """Issue 8.9: --no-caption drops the caption, not the probe answers."""
    folder = tmp_path / "photos"
    mixed_folder(folder, 3, bad_every=99)
    probes = tmp_path / "probes.yaml"
    probes.write_text("- Is there a cat?\n- What colour is it?\n")
    out = tmp_path / "c.parquet"
    run_cli(folder, "--out", out, "--caption-model", tiny_vlm_dir, "--no-embed", "--no-caption", "--probes", probes)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert row["caption"] is None
        assert [p["question"] for p in row["probes"]] == ["Is there a cat?", "What colour is it?"]
        assert all(isinstance(p["answer"], str) for p in row["probes"])
    assert rows[0]["caption_model"] is not None


def test_no_caption_and_no_probes_skips_the_caption_model(ray_local, tmp_path, tiny_clip_dir):
    folder = tmp_path / "photos"
    mixed_folder(folder, 2, bad_every=99)
    out = tmp_path / "c.parquet"
    # A caption model that does not exist proves the model is never built.
    run_cli(folder, "--out", out, "--caption-model", "/nonexistent/model", "--embed-model", tiny_clip_dir,
            "--no-caption", "--no-probes")
    rows = pq.read_table(out).to_pylist()
    assert all(r["probes"] is None and r["caption_model"] is None and r["embedding"] for r in rows)


@pytest.mark.parametrize("limit", [None, 0])
def test_an_empty_folder_says_so_and_writes_an_indexable_empty_output(tmp_path, tiny_clip_dir, limit):
    """Issue 8.5: no images -> a clear message and a valid empty file that `captioner index` accepts."""
    folder = tmp_path / "empty"
    folder.mkdir()
    if limit is not None:
        mixed_folder(folder, 2, bad_every=99)
    out = tmp_path / "c.parquet"
    extra = ["--limit", str(limit)] if limit is not None else []
    result = run_cli(folder, "--out", out, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes", *extra)
    assert "no images found" in result.output
    table = pq.read_table(out)
    check_schema(table.schema)
    assert table.num_rows == 0
    index = CliRunner().invoke(main, ["index", str(out), "--db", str(tmp_path / "i.duckdb")])
    assert index.exit_code == 0, index.output
