"""Infrastructure and usage faults: exit code 1, one ``Error:`` line that says the fix, no traceback.

None of these runs gets as far as starting Ray: each is caught on the driver first.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import check_schema
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.fixtures.images import make_jpegs

REPO = Path(__file__).resolve().parents[1]
# Resolving an embed model is string work on the driver; its weights are never loaded here.
EMBED_ONLY = ["--no-caption", "--no-probes"]


@pytest.fixture
def embed_only(tiny_clip_dir):
    """An embeddings-only run with a model that is present, so each test meets its own error."""
    return [*EMBED_ONLY, "--embed-model", str(tiny_clip_dir)]


@pytest.fixture
def photos(tmp_path):
    make_jpegs(tmp_path / "photos", 2)
    return tmp_path / "photos"


@pytest.fixture(autouse=True)
def no_ambient_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def fails(*args) -> str:
    result = CliRunner().invoke(main, ["run", *map(str, args), "--no-progress"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    assert "Traceback" not in result.output and "Error: " in result.output
    return result.output


def test_missing_source(tmp_path, embed_only):
    output = fails(tmp_path / "no_such_folder", "--out", tmp_path / "c.parquet", *embed_only)
    assert f"source {tmp_path / 'no_such_folder'} does not exist; check the path" in output


@pytest.mark.parametrize(
    "out",
    [
        "/proc/captions.parquet",  # read-only for every user, root included
        "/proc/captioner_out/",
        "{tmp}/a_file/captions.parquet",  # the parent is a file
    ],
)
def test_unwritable_output(photos, tmp_path, out, embed_only):
    (tmp_path / "a_file").write_text("not a folder")
    out = out.format(tmp=tmp_path)
    output = fails(photos, "--out", out, *embed_only)
    assert f"cannot write to {out}" in output and "Choose a writable --out location" in output


@pytest.mark.parametrize("kind", ["other_schema", "not_parquet", "directory_part"])
def test_output_not_made_by_captioner_is_refused_unless_overwrite(photos, tmp_path, kind, embed_only):
    if kind == "directory_part":
        out = f"{tmp_path / 'out'}/"
        (tmp_path / "out").mkdir()
        pq.write_table(pa.table({"id": [1]}), tmp_path / "out" / "part-0.parquet")
    else:
        out = str(tmp_path / "captions.parquet")
        if kind == "other_schema":
            pq.write_table(pa.table({"id": [1], "label": ["cat"]}), out)
        else:
            Path(out).write_text("id,label\n1,cat\n")

    output = fails(photos, "--out", out, *embed_only)
    assert "Pass --overwrite to replace it, or choose another --out" in output

    # --overwrite clears it (--limit 0: nothing to process, so no Ray is needed to show that).
    result = CliRunner().invoke(main, ["run", str(photos), "--out", out, *embed_only, "--overwrite", "--limit", "0"])
    assert result.exit_code == 0, result.output
    # What is left is captioner's own (empty) output, which `captioner index` reads.
    left = list(tmp_path.glob("captions.parquet")) + list(tmp_path.glob("out/part-*.parquet"))
    assert len(left) == 1 and pq.read_table(left[0]).num_rows == 0
    check_schema(pq.read_schema(left[0]))


@pytest.mark.parametrize(
    "text, says",
    [
        ("- Is it day?\n- [unclosed\n", "is not valid yaml"),
        ("questions: Is it day?\n", "must be a list of questions, got dict"),
        ("- Is it day?\n- Is   it day?\n", "duplicate questions ['Is it day?']"),
        ("- Is it day?\n- 42\n", "item 2 must be a non-empty string"),
    ],
)
def test_bad_probe_file(photos, tmp_path, tiny_vlm_dir, text, says):
    probes = tmp_path / "probes.yaml"
    probes.write_text(text)
    output = fails(photos, "--out", tmp_path / "c.parquet", "--caption-model", tiny_vlm_dir, "--probes", probes)
    assert str(probes) in output and says in output
    assert "A probe file is a YAML (or JSON) list of distinct questions" in output


@pytest.mark.parametrize(
    "text, says",
    [
        ("rows_per_part: [10\n", "is not valid YAML/JSON"),
        ("rows_per_parts: 10\n", "rows_per_parts: unknown key; valid keys here: caption, decode, device"),
        ("decode:\n  max_pixel: 10\n", "decode.max_pixel: unknown key; valid keys here: extensions, max_pixels, model_max_side"),
    ],
)
def test_bad_config_file(photos, tmp_path, text, says, embed_only):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert says in fails(photos, "--out", tmp_path / "c.parquet", "--config", config, *embed_only)


@pytest.mark.parametrize(
    "flags, known",
    [
        (["--caption-model", "llava-next", "--no-embed"], ["moondream2", "transformers"]),
        (["--embed-model", "siglip:so400m", "--no-caption", "--no-probes"], ["open_clip"]),
    ],
)
def test_unknown_model_lists_the_known_ones(photos, tmp_path, flags, known):
    output = fails(photos, "--out", tmp_path / "c.parquet", *flags)
    assert f"unknown {'caption' if 'llava-next' in flags else 'embed'} model {flags[1]!r}" in output
    # Other tests may register backends of their own; the real ones must be listed.
    listed = output.split("Known backends: ")[1].split("\n")[0].split(", ")
    assert set(known) <= set(listed)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_ray_cluster_fails_in_seconds(photos, tmp_path, address, embed_only, ray_stopped):
    import ray

    assert not ray.is_initialized()  # else the run would join that Ray and never try the address
    started = time.monotonic()
    output = fails(photos, "--out", tmp_path / "c.parquet", *embed_only, "--address", address)
    assert time.monotonic() - started < 30
    assert f"cannot reach the Ray cluster at {address}" in output and "drop --address" in output


@pytest.mark.subprocess
def test_unreachable_ray_cluster_from_a_real_process(photos, tmp_path, embed_only):
    # The real console script: exit status 1 and one error line, no traceback, no hang.
    command = [sys.executable, "-m", "pipeline.cli", "run", str(photos), "--out", str(tmp_path / "c.parquet")]
    done = subprocess.run(
        [*command, *embed_only, "--address", "127.0.0.1:1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Error: cannot reach the Ray cluster at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr
