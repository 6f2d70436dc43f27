"""`captioner run` with the default caption model, as a user runs it: no --caption-model.

A tiny Moondream 2 checkpoint in the official layout sits in a temporary HF
cache (both repos: vikhyatk/moondream2 under its 2025-06-21 tag, and
moondream/starmie-v1), with HF_HUB_OFFLINE=1. The run is a subprocess with
its own embedded Ray, so the workers see that environment exactly as a
user's would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.models.moondream.hub import MOONDREAM_REPO, MOONDREAM_REVISION
from schemas import STATUS_ERROR, STATUS_OK, check_schema
from tests.fixtures.images import make_jpegs

FIXTURES = Path(__file__).parent / "fixtures" / "moondream"
pytestmark = pytest.mark.subprocess  # every test runs the installed captioner command

CAPTIONER = os.path.join(os.path.dirname(sys.executable), "captioner")
PROBES = ["Is there text in the image?", "What colour is the sky?"]


def _run(args, hf_home, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "RAY_ADDRESS"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([CAPTIONER, *map(str, args)], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def test_default_caption_model_through_the_hf_cache_matches_the_reference(moondream_hf_cache, tiny_clip_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(FIXTURES / "img_1024x768.png", photos / "parity.png")  # 13 crops
    make_jpegs(photos, 1, size=(64, 48))  # one crop: a batch mixing crop counts
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    probes = tmp_path / "probes.yaml"
    probes.write_text("".join(f"- {q}\n" for q in PROBES))
    # The reference outputs were made with a 64-token caption cap (random weights never say EOS).
    config = tmp_path / "run.yaml"
    config.write_text("caption:\n  max_new_tokens: 64\n")
    out = tmp_path / "captions.parquet"
    done = _run(
        ["run", photos, "--out", out, "--config", config, "--probes", probes, "--embed-model", tiny_clip_dir,
         "--device", "cpu", "--dtype", "float32", "--no-progress"],
        moondream_hf_cache, tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    table = pq.read_table(out)
    run = check_schema(table.schema)
    assert run.caption_model == f"moondream2:{MOONDREAM_REPO}@{MOONDREAM_REVISION}"
    assert "tokenizer moondream/starmie-v1@" in run.caption_revision  # both repos' commits are recorded
    rows = {Path(r["uri"]).name: r for r in table.to_pylist()}
    assert rows["broken.jpg"]["status"] == STATUS_ERROR
    reference = json.loads((FIXTURES / "parity_fp32.json").read_text())
    parity = rows["parity.png"]
    assert parity["status"] == STATUS_OK
    assert parity["caption"] == reference["caption_normal"]["text"].strip()
    assert parity["caption_truncated"] is True  # it ran into the 64-token cap
    for row in (parity, rows["img_000000.jpg"]):
        assert [p["question"] for p in row["probes"]] == PROBES
        yes_no, open_question = row["probes"]
        assert 0.0 <= yes_no["yes_prob"] <= 1.0  # a yes/no question carries P(yes)
        assert open_question["yes_prob"] is None
        assert all(isinstance(p["answer"], str) and p["truncated"] in (True, False) for p in row["probes"])
        assert row["embedding"] is not None


def test_default_caption_model_missing_names_both_hf_download_commands(tmp_path, tiny_clip_dir):
    make_jpegs(tmp_path / "photos", 1)
    done = _run(["run", tmp_path / "photos", "--out", tmp_path / "c.parquet", "--embed-model", tiny_clip_dir],
                tmp_path / "empty_hf_home", tmp_path)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"hf download {MOONDREAM_REPO} --revision {MOONDREAM_REVISION}" in done.stderr
    assert "hf download moondream/starmie-v1" in done.stderr
    assert "huggingface-cli" not in done.stderr
