"""Model identity, decided once: what every spec form of a model resolves to, without loading weights.

Hub names resolve through a temporary HF cache in the official layout
(tests/fixtures/hf_cache.py) with the hub switched off, as on a user's
offline machine; local models are identified by content, so moving or
copying them keeps their identity.
"""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import ConfigError
from pipeline.models.identity import identity_for_run, model_identity
from pipeline.probes import probe_set_hash
from tests.fixtures.hf_cache import add_snapshot

SO400M = "ViT-SO400M-14-SigLIP-384"
SO400M_REPO = "timm/ViT-SO400M-14-SigLIP-384"


def _open_clip_repo(cache, repo=SO400M_REPO, **kwargs):
    files = {"open_clip_model.safetensors": b"not really weights", "open_clip_config.json": b"{}"}
    return add_snapshot(cache, repo, files, **kwargs)


# -- open_clip names and tags ------------------------------------------------------


def test_bare_name_and_its_default_tag_are_one_identity_with_the_cached_commit(hf_cache):
    commit = _open_clip_repo(hf_cache)
    bare = model_identity(f"open_clip:{SO400M}", "embed")
    tagged = model_identity(f"open_clip:{SO400M}@webli", "embed")
    assert bare.model == tagged.model == f"open_clip:{SO400M}@webli"
    assert bare.revision == tagged.revision == commit
    assert bare.hub_repo == SO400M_REPO and not bare.is_local


def test_uncached_tag_offline_records_the_tag(hf_cache):
    ident = model_identity(f"open_clip:{SO400M}", "embed")
    assert (ident.model, ident.revision) == (f"open_clip:{SO400M}@webli", "webli")


def test_tags_are_normalised_as_open_clip_does(hf_cache):
    assert model_identity("open_clip:ViT-B-32@LAION2B-S34B-B79K", "embed").model == "open_clip:ViT-B-32@laion2b_s34b_b79k"


def test_unknown_name_or_tag_is_a_config_error_naming_the_valid_ones(hf_cache):
    with pytest.raises(ConfigError, match="ViT-B-32"):
        model_identity("open_clip:ViT-Nope-99", "embed")
    with pytest.raises(ConfigError, match="webli"):
        model_identity(f"open_clip:{SO400M}@openai", "embed")


def test_hf_hub_name_records_the_commit_of_the_revision_asked(hf_cache):
    main = _open_clip_repo(hf_cache, "org/clip-test")
    v2 = _open_clip_repo(hf_cache, "org/clip-test", revision="v2", commit="2" * 40)
    plain = model_identity("open_clip:hf-hub:org/clip-test", "embed")
    explicit = model_identity("open_clip:hf-hub:org/clip-test@main", "embed")
    assert plain.model == explicit.model == "open_clip:hf-hub:org/clip-test@main"
    assert plain.revision == explicit.revision == main
    other = model_identity("open_clip:hf-hub:org/clip-test@v2", "embed")
    assert (other.model, other.revision) == ("open_clip:hf-hub:org/clip-test@v2", v2)


def test_hf_hub_name_not_cached_offline_records_the_revision_asked(hf_cache):
    assert model_identity("open_clip:hf-hub:org/absent", "embed").revision == "main"


# -- local weights: identity by content -------------------------------------------------


def test_checkpoint_identity_is_its_content_not_its_path(tmp_path, hf_cache):
    first = tmp_path / "a" / "ckpt.pt"
    first.parent.mkdir()
    first.write_bytes(b"weights " * 1000)
    ident = model_identity(f"open_clip:ViT-B-32@{first}", "embed")
    assert ident.model == "open_clip:ViT-B-32@local" and ident.revision.startswith("sha256:")
    assert str(tmp_path) not in ident.model + ident.revision

    moved = tmp_path / "b" / "renamed.pt"
    moved.parent.mkdir()
    shutil.move(first, moved)
    # identities compare by what is stored (model, revision), not by where the weights are
    assert model_identity(f"open_clip:ViT-B-32@{moved}", "embed") == ident

    moved.write_bytes(b"weights " * 999 + b"WEIGHTS ")
    assert model_identity(f"open_clip:ViT-B-32@{moved}", "embed").revision != ident.revision


def test_local_directory_identity_survives_moving_and_copying(tmp_path, tiny_clip_dir):
    here = tmp_path / "models" / "clip"
    shutil.copytree(tiny_clip_dir, here)
    original = model_identity(f"open_clip:{tiny_clip_dir}", "embed")
    assert original.model == "open_clip:local" and original.revision.startswith("sha256:")
    assert model_identity(str(here), "embed") == original
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.move(here, moved)
    assert model_identity(f"open_clip:{moved}", "embed") == original


def test_local_directories_with_other_weights_differ(tmp_path, tiny_clip_dir):
    from examples.tiny_models import build_tiny_open_clip

    other = build_tiny_open_clip(tmp_path / "other", seed=1)
    assert model_identity(str(other), "embed").revision != model_identity(str(tiny_clip_dir), "embed").revision


def test_missing_local_weights_are_a_config_error_naming_the_path(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match="nope.pt"):
        model_identity(f"open_clip:ViT-B-32@{tmp_path / 'nope.pt'}", "embed")


# -- captioners ------------------------------------------------------------------------


def test_moondream_default_records_the_cached_commit_of_its_pinned_revision(hf_cache):
    from pipeline.config import DEFAULT_CAPTION_MODEL

    from pipeline.models.moondream.hub import MOONDREAM_REPO, MOONDREAM_REVISION, STARMIE_REPO, STARMIE_REVISION

    commit = add_snapshot(hf_cache, MOONDREAM_REPO, {"config.json": b"{}"}, revision=MOONDREAM_REVISION)
    ident = model_identity(DEFAULT_CAPTION_MODEL, "caption")
    # Moondream reads its tokenizer from a second repo: both commits are what was run.
    assert ident.model == f"moondream2:{MOONDREAM_REPO}@{MOONDREAM_REVISION}"
    assert ident.revision == f"{commit}; tokenizer {STARMIE_REPO}@{STARMIE_REVISION}"
    assert model_identity("moondream2", "caption") == ident


def test_local_captioner_directory_is_identified_by_content(tmp_path, tiny_vlm_dir):
    ident = model_identity(str(tiny_vlm_dir), "caption")
    assert ident.model == "transformers:local" and ident.revision.startswith("sha256:")
    copy = shutil.copytree(tiny_vlm_dir, tmp_path / "vlm copy")
    assert model_identity(f"transformers:{copy}", "caption") == ident


# -- backends report the same identity ------------------------------------------------------


def test_backends_report_the_identity_function_s_answer(tiny_clip_dir, tiny_vlm_dir):
    from pipeline.config import CaptionConfig
    from pipeline.models import build_captioner, build_embedder, resolve_captioner, resolve_embedder

    embedder = build_embedder(resolve_embedder(str(tiny_clip_dir)), "cpu")
    ident = model_identity(str(tiny_clip_dir), "embed")
    assert (embedder.model_id, embedder.revision) == (ident.model, ident.revision)
    captioner = build_captioner(resolve_captioner(str(tiny_vlm_dir)), CaptionConfig(), "cpu")
    ident = model_identity(str(tiny_vlm_dir), "caption")
    assert (captioner.model_id, captioner.revision) == (ident.model, ident.revision)


def test_identity_for_run_stamps_both_models_and_the_probe_set(tiny_clip_dir, hf_cache):
    run = identity_for_run(None, f"open_clip:{tiny_clip_dir}", ["Is there a cat?"])
    assert run.caption_model is None and run.caption_revision is None
    embed = model_identity(str(tiny_clip_dir), "embed")
    assert (run.embed_model, run.embed_revision) == (embed.model, embed.revision)
    assert run.probes == ("Is there a cat?",) and run.probe_set_hash == probe_set_hash(("Is there a cat?",))
    assert run.embedding_dim is None
