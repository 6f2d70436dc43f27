"""`captioner run` end to end on the tiny models: a real local Ray, real stages, real Parquet."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.models.identity import model_identity
from schemas import STATUS_ERROR, STATUS_OK, check_schema
from tests.fixtures.images import make_jpegs
from tests.cli import run_cli

PROBES = ["Is there text in the image?", "What colour is the sky?"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    make_jpegs(folder, 5)
    (folder / "nested").mkdir()
    make_jpegs(folder / "nested", 2, seed=7)
    good = (folder / "nested").glob("*.jpg").__next__().read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("shopping list: eggs, milk\n")
    return folder


@pytest.fixture
def probes_file(tmp_path):
    path = tmp_path / "probes.yaml"
    path.write_text("\n".join(f"- {q}" for q in PROBES))
    return path


def model_args(tiny_vlm_dir, tiny_clip_dir, probes_file):
    return ["--caption-model", tiny_vlm_dir, "--embed-model", f"open_clip:{tiny_clip_dir}", "--probes", probes_file]


def read_rows(path):
    table = pq.read_table(path)
    check_schema(table.schema, where=str(path))
    return table, table.to_pylist()


def test_run_writes_one_schema_valid_row_per_image(ray_local, photos, tmp_path, tiny_vlm_dir, tiny_clip_dir, probes_file):
    out = tmp_path / "captions.parquet"
    result = run_cli(photos, "--out", out, *model_args(tiny_vlm_dir, tiny_clip_dir, probes_file), "--batch-size", 3)

    table, rows = read_rows(out)
    assert len(rows) == 9
    assert [r["uri"] for r in rows] == sorted(str(p) for p in photos.rglob("*.jpg"))
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["broken.jpg"]["status"] == STATUS_ERROR and by_name["broken.jpg"]["error_kind"] == "truncated"
    assert by_name["notes.jpg"]["status"] == STATUS_ERROR and by_name["notes.jpg"]["error_kind"] == "not_image"
    ok = [r for r in rows if r["status"] == STATUS_OK]
    assert len(ok) == 7
    for row in ok:
        assert isinstance(row["caption"], str) and row["caption"]
        assert [p["question"] for p in row["probes"]] == PROBES
        assert all(isinstance(p["answer"], str) for p in row["probes"])
        assert len(row["image_id"]) == 64 and row["width"] == 64 and row["height"] == 48
        assert np.linalg.norm(row["embedding"]) == pytest.approx(1.0, abs=1e-4)
    for row in rows:
        if row["status"] == STATUS_ERROR:
            assert row["caption"] is None and row["embedding"] is None and row["error"]
    run = check_schema(table.schema)
    caption_id, embed_id = model_identity(str(tiny_vlm_dir), "caption"), model_identity(str(tiny_clip_dir), "embed")
    assert (run.caption_model, run.caption_revision) == (caption_id.model, caption_id.revision)
    assert (run.embed_model, run.embed_revision) == (embed_id.model, embed_id.revision) and run.embedding_dim == 32
    assert run.probes == tuple(PROBES)

    saved = json.loads((tmp_path / "captions.config.json").read_text())
    assert saved["caption"]["probes"] == PROBES and saved["source"] == str(photos)
    assert "ok          7" in result.output and "errors      2" in result.output and "images/s" in result.output


def test_rerun_skips_done_and_retries_a_fixed_file(ray_local, photos, tmp_path, tiny_vlm_dir, tiny_clip_dir, probes_file):
    out = tmp_path / "captions.parquet"
    args = ["--out", out, *model_args(tiny_vlm_dir, tiny_clip_dir, probes_file), "--no-embed"]
    run_cli(photos, *args)
    _, first = read_rows(out)

    # The two bad files failed for a permanent reason: a rerun does not pay for them again.
    again = run_cli(photos, *args)
    assert "9 already done, 0 to process" in again.output
    _, second = read_rows(out)
    assert len(second) == 9
    unchanged = {r["uri"]: r["processed_at"] for r in first if r["status"] == STATUS_OK}
    assert {r["uri"]: r["processed_at"] for r in second if r["status"] == STATUS_OK} == unchanged

    shutil.copy(next((photos / "nested").glob("*.jpg")), photos / "broken.jpg")
    run_cli(photos, *args)
    _, third = read_rows(out)
    assert len(third) == len({r["uri"] for r in third}) == 9
    fixed = next(r for r in third if r["uri"].endswith("/broken.jpg"))
    assert fixed["status"] == STATUS_OK and fixed["caption"] and fixed["embedding"] is None
    assert "9 already done, 0 to process" in run_cli(photos, *args).output  # notes.jpg is still not an image
    assert "8 already done, 1 to process" in run_cli(photos, *args, "--retry-errors").output


def test_rerun_redoes_a_file_replaced_by_same_size_bytes_with_an_older_mtime(
    ray_local, photos, tmp_path, tiny_vlm_dir, tiny_clip_dir, probes_file
):
    # cp -p, rsync -a, a backup restore: new bytes, same size, an mtime from the past.
    out = tmp_path / "captions.parquet"
    args = ["--out", out, *model_args(tiny_vlm_dir, tiny_clip_dir, probes_file), "--no-embed"]
    run_cli(photos, *args)
    _, first = read_rows(out)
    target, other = [p for p in sorted(photos.glob("*.jpg")) if p.name not in ("broken.jpg", "notes.jpg")][:2]
    before = next(r for r in first if r["uri"] == str(target))
    assert before["status"] == STATUS_OK

    data, replacement = target.read_bytes(), other.read_bytes()
    # Same length as the old file: the other photo's bytes, cut or padded after its end marker.
    same_size = (replacement + b"\0" * len(data))[: len(data)] if len(replacement) <= len(data) else None
    if same_size is None:  # the other photo is larger: keep the old bytes and flip one in the entropy data
        same_size = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
    assert len(same_size) == len(data) and same_size != data
    target.write_bytes(same_size)
    old = 1577836800  # 2020-01-01, long before the first run
    os.utime(target, (old, old))

    again = run_cli(photos, *args)
    assert "8 already done, 1 to process" in again.output
    _, second = read_rows(out)
    after = next(r for r in second if r["uri"] == str(target))
    assert after["image_id"] == hashlib.sha256(same_size).hexdigest() != before["image_id"]
    assert after["processed_at"] > before["processed_at"]
    assert after["source_mtime"].timestamp() == old
    # And the row now on record is the file as it is: the next rerun skips it.
    assert "9 already done, 0 to process" in run_cli(photos, *args).output


def test_directory_output_commits_parts_and_never_duplicates(ray_local, photos, tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("rows_per_part: 3\n")
    args = ["--out", f"{out}/", "--config", config, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes"]
    run_cli(photos, *args)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 3  # 9 rows, committed every 3
    assert (out / "_captioner_config.json").is_file()

    shutil.copy(next((photos / "nested").glob("*.jpg")), photos / "notes.jpg")
    run_cli(photos, *args)
    rows = [r for p in sorted(out.glob("part-*.parquet")) for r in read_rows(p)[1]]
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == 9
    assert next(r for r in rows if r["uri"].endswith("/notes.jpg"))["status"] == STATUS_OK
    assert not list(out.glob(".*")), "temporary files left behind"


def test_output_from_other_models_is_refused_unless_overwrite(ray_local, photos, tmp_path, tiny_vlm_dir, tiny_clip_dir, probes_file):
    out = tmp_path / "captions.parquet"
    run_cli(photos, "--out", out, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes", "--limit", 2)
    refused = run_cli(photos, "--out", out, *model_args(tiny_vlm_dir, tiny_clip_dir, probes_file), "--no-embed", "--limit", 2, expect_exit=1)
    assert "--overwrite" in refused.output
    run_cli(photos, "--out", out, *model_args(tiny_vlm_dir, tiny_clip_dir, probes_file), "--no-embed", "--limit", 2, "--overwrite")
    _, rows = read_rows(out)
    assert len(rows) == 2 and rows[0]["caption_model"] == model_identity(str(tiny_vlm_dir), "caption").model


def test_job_entrypoint_runs_a_saved_config(ray_local, photos, tmp_path, tiny_clip_dir, capsys):
    from jobs.caption_job import main as job_main

    out = tmp_path / "captions.parquet"
    run_cli(photos, "--out", out, "--embed-model", tiny_clip_dir, "--no-caption", "--no-probes", "--limit", 3)
    done = len(read_rows(out)[1])  # ok rows and permanent failures (broken.jpg) are both done
    config = json.loads((tmp_path / "captions.config.json").read_text())
    config["limit"] = None
    (tmp_path / "submit.json").write_text(json.dumps(config))
    assert job_main(["--config", str(tmp_path / "submit.json"), "--no-progress"]) == 0
    assert f"9 images listed, {done} already done, {9 - done} to process" in capsys.readouterr().err
    assert len(read_rows(out)[1]) == 9


def test_missing_moondream_weights_fail_fast_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    make_jpegs(tmp_path / "p", 1)
    result = run_cli(tmp_path / "p", "--out", tmp_path / "c.parquet", expect_exit=1)
    assert "--caption-model PATH" in result.output and "vikhyatk/moondream2" in result.output


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--embed-model", "nosuch:thing", "--no-caption", "--no-probes"], "Known backends: open_clip"),
        (["--caption-model", "nosuch", "--no-embed"], "Known backends:"),
        (["--no-caption", "--no-probes", "--no-embed"], "nothing to compute"),
    ],
)
def test_bad_flags_are_click_errors_with_the_fix(tmp_path, flags, message):
    make_jpegs(tmp_path / "p", 1)
    result = run_cli(tmp_path / "p", "--out", tmp_path / "c.parquet", *flags, expect_exit=1)
    assert message in result.output and "Traceback" not in result.output


def test_schema_command_prints_every_column():
    result = CliRunner().invoke(main, ["schema", "--dim", "1152"])
    assert result.exit_code == 0
    for column in ("image_id", "probes", "embedding", "fixed_size_list<item: float>[1152]", "processed_at"):
        assert column in result.output


def test_a_run_that_cannot_fit_the_cluster_is_refused_not_left_waiting(ray_local, photos, tmp_path, tiny_clip_dir):
    config = tmp_path / "big.yaml"
    config.write_text("ray:\n  model_actor_cpus: 64\n")
    result = run_cli(photos, "--out", tmp_path / "c.parquet", "--config", config, "--embed-model", tiny_clip_dir,
                     "--no-caption", "--no-probes", expect_exit=1)
    assert "needs 64.75 CPUs (the cluster has 4)" in result.output and "model_actor_cpus" in result.output
