"""Model backends, exercised through the registry the way a user's spec is.

The tiny models are random, so these tests check structure and determinism,
never the meaning of a caption or the quality of an embedding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import CaptionConfig
from pipeline.models.moondream.hub import MOONDREAM_REPO, MOONDREAM_REVISION
from pipeline.models.identity import model_identity
from pipeline.models.base import Description, ModelUnavailable
from pipeline.models.registry import (
    UnknownModel,
    build_captioner,
    build_embedder,
    resolve_captioner,
    resolve_embedder,
)

QUESTIONS = ("Is there a person in the image?", "What colour is the car?", "How many people are there?")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    # Noise of varying sizes: distinct inputs, and the processors must resize.
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


# ---------------------------------------------------------------- transformers VLM


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    config = CaptionConfig(model=str(tiny_vlm_dir), max_new_tokens=12, answer_max_new_tokens=6)
    return build_captioner(resolve_captioner(str(tiny_vlm_dir)), config, "cpu")


def test_tiny_vlm_dir_resolves_to_transformers_backend(tiny_vlm_dir):
    ref = resolve_captioner(str(tiny_vlm_dir))
    assert (ref.backend, ref.is_local, ref.revision) == ("transformers", True, None)


def test_vlm_describe_gives_caption_and_one_answer_per_question(vlm, tiny_vlm_dir):
    out = vlm.describe(_images(3), QUESTIONS)
    assert len(out) == 3
    for d in out:
        assert isinstance(d, Description)
        assert isinstance(d.caption, str)
        assert len(d.answers) == len(QUESTIONS) and all(isinstance(a, str) for a in d.answers)
    assert any(d.caption for d in out), "a random model still emits some tokens"
    # A local model is named by its content, not its path (moving it changes nothing).
    assert vlm.model_id == "transformers:local"
    assert vlm.revision == model_identity(str(tiny_vlm_dir), "caption").revision and vlm.revision.startswith("sha256:")


def test_vlm_batched_equals_unbatched(vlm, monkeypatch):
    images = _images(4, seed=1)
    batched = vlm.describe(images, QUESTIONS)
    assert [vlm.describe([im], QUESTIONS)[0] for im in images] == batched
    # One question alone: no left padding at all, so this also checks padding.
    for i, q in enumerate(QUESTIONS):
        assert [vlm.describe([im], [q], caption=False)[0].answers[0] for im in images] == [
            d.answers[i] for d in batched
        ]
    monkeypatch.setattr(vlm, "max_sequences", 5)  # generate calls split mid-image
    assert vlm.describe(images, QUESTIONS) == batched


def test_vlm_caption_false_and_empty_inputs(vlm):
    out = vlm.describe(_images(2), QUESTIONS[:1], caption=False)
    assert [d.caption for d in out] == [None, None]
    assert all(len(d.answers) == 1 for d in out)
    assert vlm.describe(_images(2), ())[0].answers == ()
    assert vlm.describe([], QUESTIONS) == []


def test_vlm_caption_prompt_follows_length(tiny_vlm_dir):
    from pipeline.models.hf_vlm import CAPTION_PROMPTS

    ref = resolve_captioner(str(tiny_vlm_dir))
    short = build_captioner(ref, CaptionConfig(length="short", max_new_tokens=3), "cpu")
    captured = []
    short._generate = lambda images, texts, n: captured.append((texts, n)) or [""] * len(texts)
    short.describe(_images(2), ())
    assert captured == [([CAPTION_PROMPTS["short"]] * 2, 3)]


@pytest.mark.parametrize("kind", ["vlm", "clip"])
def test_tiny_models_are_deterministic_per_seed(tmp_path, kind):
    from safetensors.numpy import load_file

    from examples import tiny_models as tiny

    build, weights = {
        "vlm": (tiny.build_tiny_vlm, "model.safetensors"),
        "clip": (tiny.build_tiny_open_clip, "open_clip_model.safetensors"),
    }[kind]
    a, b, c = (load_file(build(tmp_path / n, seed=s) / weights) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    for name in os.listdir(tmp_path / "a"):  # configs, tokenizer, chat template
        if not name.endswith(".safetensors"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return build_embedder(resolve_embedder(f"open_clip:{tiny_clip_dir}"), "cpu")


def test_clip_image_and_text_embeddings(clip, tiny_clip_dir):
    from examples.tiny_models import TINY_CLIP_DIM

    images = _images(5)
    x = clip.embed_images(images + [images[0]])
    assert x.shape == (6, TINY_CLIP_DIM) == (6, clip.dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # Same image twice: the same vector (batch position may move the last bits).
    np.testing.assert_allclose(x[0], x[5], atol=1e-6)
    np.testing.assert_allclose(clip.embed_images(images[:1])[0], x[0], atol=1e-6)
    t = clip.embed_texts(["a cat on a sofa", "a red bus"])
    assert t.shape == (2, clip.dim) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert clip.embed_images([]).shape == (0, clip.dim)
    assert (clip.model_id, clip.revision) == ("open_clip:local", model_identity(str(tiny_clip_dir), "embed").revision)


def test_clip_bare_directory_resolves_to_open_clip(tiny_clip_dir):
    ref = resolve_embedder(str(tiny_clip_dir))
    assert (ref.backend, ref.is_local) == ("open_clip", True)


def test_clip_named_architecture_with_local_checkpoint(tiny_clip_dir, monkeypatch):
    # open_clip:NAME@/path/ckpt: register the tiny config under a name, as a
    # user's fine-tuned checkpoint of a built-in architecture would be loaded.
    import open_clip

    from examples.tiny_models import tiny_open_clip_config

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test", tiny_open_clip_config())
    ckpt = tiny_clip_dir / "open_clip_model.safetensors"
    e = build_embedder(resolve_embedder(f"open_clip:tiny-test@{ckpt}"), "cpu")
    assert e.model_id == "open_clip:tiny-test@local" and e.revision.startswith("sha256:") and e.dim == 32
    local = build_embedder(resolve_embedder(str(tiny_clip_dir)), "cpu")
    np.testing.assert_allclose(e.embed_images(_images(2)), local.embed_images(_images(2)), atol=1e-6)


def test_clip_directory_without_weights_names_embed_model(tiny_clip_dir, tmp_path):
    shutil.copy(tiny_clip_dir / "open_clip_config.json", tmp_path)
    with pytest.raises(ModelUnavailable, match="--embed-model"):
        build_embedder(resolve_embedder(str(tmp_path)), "cpu")


def test_clip_unknown_name_or_tag():
    with pytest.raises(ModelUnavailable, match="no model named"):
        build_embedder(resolve_embedder("open_clip:NoSuchNet"), "cpu")
    with pytest.raises(ModelUnavailable, match="known tags"):
        build_embedder(resolve_embedder("open_clip:ViT-B-32@nope"), "cpu")


# ---------------------------------------------------------------- registry


def test_unknown_specs_list_valid_backends(tmp_path):
    with pytest.raises(UnknownModel) as caption_err:
        resolve_captioner("no-such-model")
    assert "moondream2" in str(caption_err.value) and "transformers" in str(caption_err.value)
    with pytest.raises(UnknownModel) as embed_err:
        resolve_embedder("bogus:thing")
    assert "open_clip" in str(embed_err.value)
    with pytest.raises(UnknownModel, match="--caption-model"):
        resolve_captioner(str(tmp_path))  # a directory without config.json


def test_moondream_directory_resolves_to_moondream_backend(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "moondream1"}))
    ref = resolve_captioner(str(tmp_path))
    assert (ref.backend, ref.is_local) == ("moondream2", True)
    with pytest.raises(ModelUnavailable, match="--caption-model"):  # config only, no weights/code
        build_captioner(ref, CaptionConfig(), "cpu")


# ---------------------------------------------------------------- Moondream 2
# The native engine has its own tests: tests/test_moondream.py (parity with the reference, batching)
# and tests/test_moondream_backend.py (default spec through an offline HF cache, local directories).


@pytest.mark.subprocess
def test_offline_empty_cache_errors_name_the_flag(tmp_path):
    # The hub reads HF_HUB_OFFLINE/HF_HOME at import time, so a fresh process
    # is the only faithful way to start from an empty cache.
    script = """
import json
from pipeline.config import CaptionConfig
from pipeline.models.registry import build_captioner, build_embedder, resolve_captioner, resolve_embedder
out = {}
for spec, build in [
    ("moondream2", lambda r: build_captioner(r, CaptionConfig(), "cpu")),
    ("transformers:org/some-vlm", lambda r: build_captioner(r, CaptionConfig(), "cpu")),
    ("open_clip:ViT-B-32", lambda r: build_embedder(r, "cpu")),
]:
    try:
        build(resolve_captioner(spec) if "clip" not in spec else resolve_embedder(spec))
        out[spec] = ["loaded", ""]
    except Exception as exc:
        out[spec] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec, flag in [("moondream2", "--caption-model"), ("transformers:org/some-vlm", "--caption-model"),
                       ("open_clip:ViT-B-32", "--embed-model")]:
        kind, message = out[spec]
        assert kind == "ModelUnavailable" and flag in message, (spec, out[spec])
    assert f"hf download {MOONDREAM_REPO} --revision {MOONDREAM_REVISION}" in out["moondream2"][1]


def _moondream_cached() -> bool:
    from pipeline.models.moondream.hub import missing_repos

    return not missing_repos(resolve_captioner("moondream2"))


@pytest.mark.real_models
def test_real_moondream2_describes_an_image():
    if not _moondream_cached():
        pytest.skip(f"{MOONDREAM_REPO}@{MOONDREAM_REVISION} or moondream/starmie-v1 is not in the HF cache")
    md = build_captioner(resolve_captioner("moondream2"), CaptionConfig(max_new_tokens=32), "auto")
    image = Image.new("RGB", (256, 256), (200, 30, 30))
    (d,) = md.describe([image], ("What colour is the image?",))
    assert d.caption and d.answers[0]
    assert "red" in d.answers[0].lower()


@pytest.mark.real_models
def test_real_default_embedder_matches_image_and_text():
    from huggingface_hub import try_to_load_from_cache

    from pipeline.config import DEFAULT_EMBED_MODEL

    repo = "timm/ViT-SO400M-14-SigLIP-384"
    if not any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        pytest.skip(f"{repo} is not in the HF cache")
    e = build_embedder(resolve_embedder(DEFAULT_EMBED_MODEL), "auto")
    red, blue = Image.new("RGB", (384, 384), (220, 20, 20)), Image.new("RGB", (384, 384), (20, 20, 220))
    sims = e.embed_images([red, blue]) @ e.embed_texts(["a red square", "a blue square"]).T
    assert e.model_id == "open_clip:ViT-SO400M-14-SigLIP-384@webli"
    assert e.revision == model_identity(DEFAULT_EMBED_MODEL, "embed").revision
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]
