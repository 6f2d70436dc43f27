"""The config tree: typed, checked before Ray starts, saved with absolute paths.

Driven through ``captioner run`` as a user meets it; the checks need no Ray
(a bad config fails before it starts), the rerun-from-elsewhere test runs one.
"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, RunConfig
from tests.fixtures.images import make_jpegs


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args), "--no-progress"])


@pytest.fixture
def photos(tmp_path):
    make_jpegs(tmp_path / "photos", 2)
    return tmp_path / "photos"


@pytest.mark.parametrize(
    "text, says",
    [
        # YAML 1.1 reads 1e8 as a string: refused with the fix, not a TypeError traceback.
        ("decode:\n  max_pixels: 1e8\n", "decode.max_pixels: Input should be a valid integer, got the string '1e8' (YAML reads"),
        ("caption:\n  probes: Is there a cat?\n", "caption.probes: must be a list, got the single string 'Is there a cat?'"),
        ("caption:\n  probes:\n    - Is it day?\n    - Is   it day?\n", "duplicate questions ['Is it day?']"),
        ("caption:\n  probes:\n    - Is it day?\n    - 42\n", "caption.probes"),
        ("caption:\n  batch_size: '8'\n", "caption.batch_size: Input should be a valid integer, got the string '8'"),
        ("caption:\n  batch_size: 0\n", "caption.batch_size: Input should be greater than or equal to 1"),
        ("embed:\n  enabled: 'no'\n", "embed.enabled: Input should be a valid boolean"),
        ("ray:\n  model_actor_cpus: two\n", "ray.model_actor_cpus"),
        ("device: gpu\n", "device: must be one of auto, cpu, cuda, got 'gpu'"),
    ],
)
def test_config_files_are_type_checked_with_the_fix(photos, tmp_path, text, says):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    result = run(photos, "--out", tmp_path / "c.parquet", "--config", config)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert says in result.output and "Traceback" not in result.output


def test_probes_from_any_origin_pass_the_same_validator():
    with pytest.raises(ConfigError, match="duplicate questions"):
        RunConfig.from_dict({"source": "/x", "output": "/y.parquet", "caption": {"probes": ["Is it?", "Is  it?"]}})
    config = RunConfig.from_dict({"source": "/x", "output": "/y.parquet", "caption": {"probes": ["  Is   it day? "]}})
    assert config.caption.probes == ("Is it day?",)


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path, tiny_clip_dir):
    (tmp_path / "conf").mkdir()
    os.symlink(tiny_clip_dir, tmp_path / "conf" / "clip")
    config = tmp_path / "conf" / "run.yaml"
    config.write_text("source: ../photos\noutput: out/c.parquet\nembed:\n  model: clip\n")
    from pipeline.config import load_run_config

    loaded = load_run_config(config)
    assert loaded.source == str(tmp_path / "photos")
    assert loaded.output == str(tmp_path / "conf" / "out" / "c.parquet")
    assert loaded.embed.model == str(tmp_path / "conf" / "clip")


def test_saved_config_has_absolute_paths_and_reruns_from_another_directory(
    ray_local, photos, tmp_path, tiny_clip_dir, monkeypatch
):
    """Issue 8.11: relative paths typed by the user must not end up in the saved config."""
    os.symlink(tiny_clip_dir, tmp_path / "clip")
    monkeypatch.chdir(tmp_path)
    first = run("photos", "--out", "out/c.parquet", "--embed-model", "clip", "--no-caption", "--no-probes", "--limit", 1)
    assert first.exit_code == 0, first.output
    saved = tmp_path / "out" / "c.config.json"
    data = json.loads(saved.read_text())
    assert data["source"] == str(photos) and data["output"] == str(tmp_path / "out" / "c.parquet")
    assert data["embed"]["model"] == str(tmp_path / "clip")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data["limit"] = None
    saved.write_text(json.dumps(data))
    again = run("--config", saved)
    assert again.exit_code == 0, again.output
    assert "2 images listed, 1 already done, 1 to process" in again.output
    assert pq.read_table(tmp_path / "out" / "c.parquet").num_rows == 2


def test_run_without_source_or_out_says_what_to_pass(tmp_path):
    result = run()
    assert result.exit_code == 1 and "no source given: pass SOURCE" in result.output
    result = run(tmp_path)
    assert result.exit_code == 1 and "no output given: pass --out PATH" in result.output
