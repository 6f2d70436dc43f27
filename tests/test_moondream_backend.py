"""The Moondream 2 backend as a user meets it: the default spec resolved through an offline HF cache
in the official layout, a local directory, and the errors that name the download commands."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.hf_cache import use_hf_cache
import torch
from PIL import Image

from pipeline.config import RunConfig, CaptionConfig, ConfigError
from pipeline.models.base import ModelUnavailable
from pipeline.models.moondream.hub import (
    MOONDREAM_REPO,
    MOONDREAM_REVISION,
    STARMIE_REPO,
    STARMIE_REVISION,
    check_moondream_files,
    missing_repos,
)
from pipeline.models.registry import build_captioner, resolve_captioner
from tests.fixtures.moondream_cache import (
    FIXTURE_DIR,
    MOONDREAM_COMMIT,
    PARITY_IMAGE,
    build_moondream_hf_cache,
    local_moondream_dir,
)

QUESTIONS = ("Is there a person in the image?", "What is the main object in the image?")
MODEL_COMMAND = f"hf download {MOONDREAM_REPO} --revision {MOONDREAM_REVISION}"
TOKENIZER_COMMAND = f"hf download {STARMIE_REPO} --revision {STARMIE_REVISION}"


def _offline(monkeypatch, hf_home):
    use_hf_cache(monkeypatch, hf_home)


def test_default_spec_loads_from_the_offline_hf_cache_and_matches_the_reference(moondream_hub_env):
    ref = resolve_captioner("moondream2")  # the default spec, no path
    check_moondream_files(ref)  # the driver-side check passes without loading anything
    md = build_captioner(ref, CaptionConfig(max_new_tokens=64, answer_max_new_tokens=16), "cpu")
    # The identity rows are stamped with: the tag asked, and the commits of both repos actually loaded.
    assert md.model_id == f"moondream2:{MOONDREAM_REPO}@{MOONDREAM_REVISION}"
    assert md.revision == f"{MOONDREAM_COMMIT}; tokenizer moondream/starmie-v1@{STARMIE_REVISION}"
    assert (md.model_commit, md.tokenizer_commit) == (MOONDREAM_COMMIT, STARMIE_REVISION)
    assert md.dtype == torch.float32 and md.max_crops == 12  # auto on CPU

    reference = json.loads((FIXTURE_DIR / "parity_fp32.json").read_text())
    parity, small = Image.open(PARITY_IMAGE), Image.open(PARITY_IMAGE).convert("RGB").resize((320, 240))
    out = md.describe([parity, small], QUESTIONS)
    assert len(out) == 2
    # The parity image's caption and answers are the reference's (random weights, so the text is noise).
    assert out[0].caption == reference["caption_normal"]["text"].strip()
    assert out[0].answers == tuple(q["text"].strip() for q in reference["queries"])
    for d in out:
        assert d.caption and len(d.answers) == 2 and all(d.answers)
        assert d.caption_truncated is True and d.answers_truncated == (True, True)  # the tiny model never stops
        assert 0.0 < d.yes_probs[0] < 1.0 and d.yes_probs[1] is None  # only the yes/no question has one
    # Crops made beforehand (as the CPU decode stage will) give the same result.
    assert md.describe([md.prepare(small)], QUESTIONS) == out[1:]
    no_caption = md.describe([small], QUESTIONS[:1], caption=False)[0]
    assert no_caption.caption is None and not no_caption.caption_truncated
    assert no_caption.answers == out[1].answers[:1]


def test_check_names_the_exact_download_commands_of_what_is_missing(tmp_path, monkeypatch):
    ref = resolve_captioner("moondream2")
    _offline(monkeypatch, tmp_path / "empty")
    with pytest.raises(ModelUnavailable) as err:
        check_moondream_files(ref)
    assert MODEL_COMMAND in str(err.value) and TOKENIZER_COMMAND in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value) and "--caption-model PATH" in str(err.value)

    _offline(monkeypatch, build_moondream_hf_cache(tmp_path / "model_only", with_tokenizer=False))
    assert missing_repos(ref) == [TOKENIZER_COMMAND]
    _offline(monkeypatch, build_moondream_hf_cache(tmp_path / "tokenizer_only", with_model=False))
    assert missing_repos(ref) == [MODEL_COMMAND]
    # A tokenizer-less cache also fails at load time, blaming starmie-v1, not the moondream2 weights.
    _offline(monkeypatch, tmp_path / "model_only")
    with pytest.raises(ModelUnavailable) as err:
        build_captioner(ref, CaptionConfig(), "cpu")
    assert STARMIE_REPO in str(err.value) and TOKENIZER_COMMAND in str(err.value)


def test_local_directory_and_its_tokenizer(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "empty_cache")
    directory = local_moondream_dir(tmp_path / "md")
    ref = resolve_captioner(str(directory))
    assert (ref.backend, ref.is_local) == ("moondream2", True)
    md = build_captioner(ref, CaptionConfig(max_new_tokens=4, answer_max_new_tokens=2, max_crops=2), "cpu")
    assert (md.model_commit, md.tokenizer_commit, md.max_crops) == ("local", "local", 2)
    assert md.model_id == "moondream2:local" and md.revision.startswith("sha256:")  # named by content, not path
    (d,) = md.describe([Image.new("RGB", (900, 500), (200, 30, 30))], QUESTIONS)
    assert d.caption and len(d.answers) == 2

    # An official snapshot copied to a directory carries moondream2's legacy tokenizer.json: it is not
    # used; the starmie-v1 tokenizer must then come from the HF cache, and the error says so.
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    assert missing_repos(ref) == [TOKENIZER_COMMAND]
    with pytest.raises(ModelUnavailable, match=STARMIE_REPO):
        build_captioner(ref, CaptionConfig(), "cpu")
    _offline(monkeypatch, build_moondream_hf_cache(tmp_path / "tok_cache", with_model=False))
    md = build_captioner(ref, CaptionConfig(max_new_tokens=2), "cpu")
    assert md.tokenizer_commit == STARMIE_REVISION


def test_caption_budgets_dtype_and_config_validation():
    from pipeline.models.moondream.captioner import caption_budget, resolve_dtype

    assert caption_budget(CaptionConfig()) == 768  # the reference's cap: normal captions end at EOS
    assert caption_budget(CaptionConfig(length="long")) == 768
    assert caption_budget(CaptionConfig(length="short")) == 256
    assert caption_budget(CaptionConfig(max_new_tokens=40)) == 40
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    for bad in (dict(dtype="float16"), dict(max_crops=0), dict(max_crops=13), dict(max_new_tokens=0)):
        # Built directly, the typed config raises pydantic's ValidationError (a ValueError);
        # from a config file or the CLI the same check arrives as ConfigError.
        with pytest.raises(ValueError):
            CaptionConfig(**bad)
        with pytest.raises(ConfigError):
            RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "caption": bad})


def test_two_caption_lengths_come_from_one_image_encoding(tmp_path, monkeypatch):
    """--caption-length short,normal: two caption requests on one image prefix (as probes share it), one
    engine call; the short one is what a short-only run writes."""
    _offline(monkeypatch, tmp_path / "empty_cache")
    ref = resolve_captioner(str(local_moondream_dir(tmp_path / "md")))
    limits = dict(max_new_tokens=6, answer_max_new_tokens=2, max_crops=2)
    both = build_captioner(ref, CaptionConfig(length="short,normal", **limits), "cpu")
    calls = []
    generate = both.engine.generate
    monkeypatch.setattr(both.engine, "generate", lambda images, requests: calls.append(requests) or generate(images, requests))
    image = Image.new("RGB", (640, 480), (40, 120, 200))
    (d,) = both.describe([image], QUESTIONS[:1])
    (per_image,) = calls[0]
    assert len(calls) == 1 and len(per_image) == 3  # normal caption, short caption, the probe: one image prefix
    assert d.caption and d.short_caption and len(d.answers) == 1
    # The same weights asked one length at a time (the requests read the config) write the same two captions.
    both.config = CaptionConfig(length="short", **limits)
    assert d.short_caption == both.describe([image], ())[0].caption
    both.config = CaptionConfig(length="normal", **limits)
    (alone,) = both.describe([image], ())
    assert d.caption == alone.caption and alone.short_caption is None
