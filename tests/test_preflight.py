"""Missing weights are found on the driver before Ray starts, with the `hf` command that fixes them.

Each case runs `captioner run` as a user would, offline with an empty HF
cache laid out in the official layout, and fails the test if Ray is started.
"""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.models.moondream.hub import MOONDREAM_REPO, MOONDREAM_REVISION
from pipeline.models.registry import resolve_captioner, resolve_embedder
from pipeline.preflight import WeightsMissing, check_caption_weights, check_embed_weights
from tests.fixtures.hf_cache import add_snapshot
from tests.fixtures.images import make_jpegs

SO400M_REPO = "timm/ViT-SO400M-14-SigLIP-384"


@pytest.fixture
def photos(tmp_path):
    make_jpegs(tmp_path / "photos", 2)
    return tmp_path / "photos"


def run_fails(photos, tmp_path, *args) -> str:
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(out), "--no-progress", *map(str, args)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output and "huggingface-cli" not in result.output
    assert not out.exists()
    return result.output


# -- through the CLI ------------------------------------------------------------------------


def test_default_embedder_missing_from_the_cache_stops_before_ray(hf_cache, no_ray, photos, tmp_path):
    out = run_fails(photos, tmp_path, "--no-caption", "--no-probes", "--embed-model", "open_clip:ViT-SO400M-14-SigLIP-384")
    assert f"hf download {SO400M_REPO}" in out and "HF_HUB_OFFLINE" in out


def test_missing_checkpoint_stops_before_ray(hf_cache, no_ray, photos, tmp_path):
    missing = tmp_path / "ckpts" / "clip.pt"
    out = run_fails(photos, tmp_path, "--no-caption", "--no-probes", "--embed-model", f"open_clip:ViT-B-32@{missing}")
    assert str(missing) in out


def test_directory_without_open_clip_config_stops_before_ray(hf_cache, no_ray, photos, tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    out = run_fails(photos, tmp_path, "--no-caption", "--no-probes", "--embed-model", f"open_clip:{folder}")
    assert "open_clip_config.json" in out


def test_missing_caption_model_names_hf_download(hf_cache, no_ray, photos, tmp_path):
    out = run_fails(photos, tmp_path, "--no-embed")
    assert f"hf download {MOONDREAM_REPO} --revision {MOONDREAM_REVISION}" in out


# -- the checks themselves ----------------------------------------------------------------------


def test_embed_weights_and_tokenizer_in_the_cache_pass(hf_cache):
    add_snapshot(hf_cache, SO400M_REPO, {"open_clip_model.safetensors": b"w"})
    # open_clip's SO400M config takes its tokenizer from another repo; without it the workers would fail
    with pytest.raises(WeightsMissing, match="hf download timm/ViT-B-16-SigLIP"):
        check_embed_weights(resolve_embedder("open_clip:ViT-SO400M-14-SigLIP-384"))
    add_snapshot(hf_cache, "timm/ViT-B-16-SigLIP", {"tokenizer_config.json": b"{}", "spiece.model": b"x"})
    check_embed_weights(resolve_embedder("open_clip:ViT-SO400M-14-SigLIP-384"))
    check_embed_weights(resolve_embedder("open_clip:ViT-SO400M-14-SigLIP-384@webli"))


def test_a_cached_repo_without_the_weights_file_is_missing(hf_cache):
    add_snapshot(hf_cache, SO400M_REPO, {"README.md": b"# readme"})
    with pytest.raises(WeightsMissing, match=f"hf download {SO400M_REPO}"):
        check_embed_weights(resolve_embedder("open_clip:ViT-SO400M-14-SigLIP-384"))


def test_hf_hub_embedder_needs_config_and_weights(hf_cache):
    with pytest.raises(WeightsMissing, match="hf download org/clip-test"):
        check_embed_weights(resolve_embedder("open_clip:hf-hub:org/clip-test"))
    add_snapshot(hf_cache, "org/clip-test", {"open_clip_config.json": b"{}", "open_clip_pytorch_model.bin": b"w"})
    check_embed_weights(resolve_embedder("open_clip:hf-hub:org/clip-test"))


def test_local_embedders_pass_when_complete(tiny_clip_dir, tmp_path, hf_cache):
    check_embed_weights(resolve_embedder(str(tiny_clip_dir)))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_clip_dir / "open_clip_config.json", config_only)
    with pytest.raises(WeightsMissing, match="no weights"):
        check_embed_weights(resolve_embedder(str(config_only)))


def test_caption_weights_cached_at_the_pinned_revision_pass(hf_cache):
    ref = resolve_captioner("moondream2")
    with pytest.raises(WeightsMissing, match=f"hf download {MOONDREAM_REPO} --revision {MOONDREAM_REVISION}"):
        check_caption_weights(ref)
    add_snapshot(hf_cache, MOONDREAM_REPO, {"model.safetensors": b"weights"}, revision=MOONDREAM_REVISION)
    # Moondream 2 also needs its tokenizer repo, moondream/starmie-v1.
    with pytest.raises(WeightsMissing, match="hf download moondream/starmie-v1"):
        check_caption_weights(ref)
    from pipeline.models.moondream.hub import STARMIE_REPO, STARMIE_REVISION

    add_snapshot(hf_cache, STARMIE_REPO, {"tokenizer.json": b"{}"}, revision="main", commit=STARMIE_REVISION)
    check_caption_weights(ref)
