"""The native Moondream 2 engine against the reference implementation's outputs.

Fixtures in tests/fixtures/moondream/ come from the upstream code (vikhyat/moondream @ 44146f1, the
code the hub revision 2025-06-21 runs) applied to a tiny random checkpoint in the official key layout
(see its README.md). Random weights prove the computation equals the reference's, not that captions
are good; the real weights were not available here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.models.moondream.config import ANSWER_ID, CAPTION_PROMPTS, QUERY_PREFIX, QUERY_SUFFIX
from pipeline.models.moondream.engine import MoondreamEngine, Request
from pipeline.models.moondream.preprocess import prepare_image, select_tiling
from pipeline.models.moondream.tokenizer import MoondreamTokenizer
from pipeline.models.moondream.vision import normalise_crops
from pipeline.models.moondream.weights import load_model
from tests.fixtures.moondream_cache import CHECKPOINT_DIR, FIXTURE_DIR, PARITY_IMAGE, tokenizer_bytes

LENGTHS = ("short", "normal", "long")


def _reference(kind: str):
    return (json.loads((FIXTURE_DIR / f"parity_{kind}.json").read_text()),
            load_file(str(FIXTURE_DIR / f"parity_{kind}.safetensors")))


def _model(dtype):
    return load_model(CHECKPOINT_DIR / "model.safetensors", CHECKPOINT_DIR / "config.json", "cpu", dtype)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_bytes(tokenizer_bytes())
    return MoondreamTokenizer(path)


@pytest.fixture(scope="module")
def parity_crops():
    return prepare_image(Image.open(PARITY_IMAGE))


@pytest.fixture(scope="module")
def fp32_model():
    return _model(torch.float32)


def _reference_requests(ref, tokenizer, **extra):
    """The reference's five prompts (three captions, two queries) with its token caps."""
    caps = ref["settings"]
    out = []
    for length in LENGTHS:
        r = ref[f"caption_{length}"]
        assert tuple(r["prompt_ids"]) == CAPTION_PROMPTS[length]
        out.append((r, Request(CAPTION_PROMPTS[length], caps["caption_max_tokens"], **extra)))
    for r in ref["queries"]:
        prompt = QUERY_PREFIX + tuple(tokenizer.encode(r["question"])) + QUERY_SUFFIX
        assert list(prompt) == r["prompt_ids"]  # the tokenizer is used exactly as the reference uses it
        out.append((r, Request(prompt, caps["answer_max_tokens"], **extra)))
    return out


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("kind, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_crops_and_tiling_identical_to_reference(parity_crops, kind, dtype):
    ref, _ = _reference(kind)
    assert list(parity_crops.tiling) == ref["tiling"] == [3, 4]
    assert parity_crops.crops.dtype == np.uint8 and parity_crops.n_crops == 13
    normalised = normalise_crops(torch.from_numpy(parity_crops.crops), dtype).float().contiguous()
    assert list(normalised.shape) == ref["crops_shape"]
    assert hashlib.sha256(normalised.numpy().tobytes()).hexdigest() == ref["crops_sha256"]


# (height, width), max_crops -> tiling, as the reference's select_tiling gives them.
@pytest.mark.parametrize("size, max_crops, tiling", [
    ((768, 1024), 12, (3, 4)), ((200, 300), 12, (1, 1)), ((378, 1500), 12, (1, 1)), ((3000, 4000), 12, (2, 4)),
    ((768, 1024), 4, (1, 2)), ((5000, 400), 12, (10, 1)), ((400, 5000), 12, (1, 10)), ((900, 900), 12, (3, 3)),
    ((2000, 700), 6, (4, 1)), ((1500, 1500), 1, (1, 1)),
])
def test_tiling_choices(size, max_crops, tiling):
    h, w = size
    assert select_tiling(h - 112, w - 112, 266, max_crops) == tiling
    crops = prepare_image(np.zeros((h, w, 3), np.uint8), max_crops=max_crops)
    assert crops.tiling == tiling and crops.crops.shape == (1 + tiling[0] * tiling[1], 378, 378, 3)


# ---------------------------------------------------------------- fp32: intermediates and exact ids


def test_fp32_vision_embeddings_and_kv_prefix_match_reference(fp32_model, parity_crops):
    ref, tensors = _reference("fp32")
    engine = MoondreamEngine(fp32_model)
    with torch.inference_mode():
        features = fp32_model.vision.encode(normalise_crops(torch.from_numpy(parity_crops.crops), torch.float32))
        torch.testing.assert_close(features[ref["vision_features_crops"]], tensors["vision_features"],
                                   rtol=1e-5, atol=1e-5)
        embeddings = fp32_model.vision.project(features, [parity_crops.tiling])
        torch.testing.assert_close(embeddings[0], tensors["image_embeddings"], rtol=1e-5, atol=1e-5)
        assert torch.equal(engine.embed_images([parity_crops]), embeddings)
        caches = engine.prefix_caches(embeddings)
    assert len(caches) == fp32_model.config.text.n_layers
    for layer, (k, v) in enumerate(caches):
        assert k.shape == (1, 1, ref["prefix_len"], 64)
        torch.testing.assert_close(k, tensors[f"kv.{layer}.k"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, tensors[f"kv.{layer}.v"], rtol=1e-4, atol=1e-4)


def test_fp32_greedy_ids_equal_reference(fp32_model, parity_crops, tokenizer):
    ref, _ = _reference("fp32")
    pairs = _reference_requests(ref, tokenizer)
    # All five prompts of the image in one call: shared prefix, one decode loop.
    (generations,) = MoondreamEngine(fp32_model).generate([parity_crops], [[r for _, r in pairs]])
    for (expected, _), got in zip(pairs, generations):
        assert list(got.ids) == expected["ids"]
        assert tokenizer.decode(got.ids) == expected["text"]
        # The tiny model never says EOS: every sequence runs to its cap, which is reported.
        assert got.hit_cap


def test_bf16_step_by_step_with_reference_tokens_fed_back(parity_crops, tokenizer):
    ref, tensors = _reference("bf16")
    model = _model(torch.bfloat16)
    pairs = _reference_requests(ref, tokenizer)
    forced = [Request(r.prompt, r.max_tokens, forced_ids=tuple(e["ids"]), record_logits=True) for e, r in pairs]
    (generations,) = MoondreamEngine(model).generate([parity_crops], [forced])
    with torch.inference_mode():
        embeddings = MoondreamEngine(model).embed_images([parity_crops])
    torch.testing.assert_close(embeddings[0].float(), tensors["image_embeddings"], rtol=0.02, atol=0.02)
    steps = ties = 0
    for (expected, _), got in zip(pairs, generations):
        assert got.logits.shape[0] == len(expected["ids"]) + 1  # prefill + one per fed token
        for step, top5 in enumerate(expected["top5_per_step"]):
            logits = got.logits[step].clone()
            if step:
                logits[ANSWER_ID] = float("-inf")
            ours, best = int(logits.argmax()), logits.max()
            ref_ids, ref_logits = top5["ids"], top5["logits"]
            steps += 1
            # Logits of the reference's top 5 agree to about one bf16 step at this magnitude.
            torch.testing.assert_close(got.logits[step][ref_ids], torch.tensor(ref_logits), rtol=0, atol=0.13)
            if ours == ref_ids[0]:
                continue
            # A tie on either side is accepted: the reference's best also scores our best, or ours
            # is among the reference's exactly-tied best.
            tied_ref = [i for i, v in zip(ref_ids, ref_logits) if v == ref_logits[0]]
            assert logits[ref_ids[0]] == best or ours in tied_ref, (expected.get("question"), step)
            assert ref_logits[0] - ref_logits[1] <= 0.125  # only where the reference itself is (near) tied
            ties += 1
    assert steps == 3 * 65 + 2 * 17 and ties < steps // 10


# ---------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def eos_model():
    """The fp32 tiny model with <|endoftext|> pushed up so that sequences stop at different steps."""
    model = _model(torch.float32)
    with torch.no_grad():
        model.text.lm_head.bias[0] = 12.0
    return model


def _mixed_images():
    base = Image.open(PARITY_IMAGE).convert("RGB")
    rng = np.random.default_rng(0)
    return [
        base.resize((300, 200)),  # tiling (1, 1): 2 crops
        Image.fromarray(rng.integers(0, 256, (380, 700, 3), dtype=np.uint8)),  # (1, 2): 3 crops
        base.crop((0, 0, 500, 900)).resize((450, 560)),  # (2, 2): 5 crops
    ]


def test_batched_equals_one_image_and_one_prompt_at_a_time(eos_model, tokenizer):
    crops = [prepare_image(im) for im in _mixed_images()]
    assert len({c.n_crops for c in crops}) == 3
    questions = ["Is there a person in the image?", "What is the main object in the image?", "Is it red?"]
    requests = [Request(CAPTION_PROMPTS["normal"], 24)] + [
        Request(QUERY_PREFIX + tuple(tokenizer.encode(q)) + QUERY_SUFFIX, 8, yes_no=q.startswith("Is"))
        for q in questions
    ]
    one_at_a_time = [[MoondreamEngine(eos_model).generate([c], [[r]])[0][0] for r in requests] for c in crops]
    flat = [g for per_image in one_at_a_time for g in per_image]
    # The model does stop at EOS at different steps, and some sequences hit their caps.
    assert len({len(g.ids) for g in flat}) >= 4 and any(g.hit_cap for g in flat) and not all(g.hit_cap for g in flat)
    # A cap of 5 sequences: images are admitted as others finish; pools are compacted on the way.
    for engine in (MoondreamEngine(eos_model, max_sequences=5), MoondreamEngine(eos_model, max_sequences=64)):
        batched = engine.generate(crops, [requests] * len(crops))
        for per_image, expected in zip(batched, one_at_a_time):
            assert [g.ids for g in per_image] == [g.ids for g in expected]
            assert [g.hit_cap for g in per_image] == [g.hit_cap for g in expected]
            for g, e in zip(per_image, expected):
                assert (g.yes_prob is None) == (e.yes_prob is None)
                if g.yes_prob is not None:
                    assert g.yes_prob == pytest.approx(e.yes_prob, abs=1e-5)
    # Images without requests and an empty call are fine.
    assert MoondreamEngine(eos_model).generate(crops[:2], [[], requests[:1]])[0] == []
    assert MoondreamEngine(eos_model).generate([], []) == []


def test_yes_probability_is_taken_from_the_first_step_logits(fp32_model, parity_crops, tokenizer):
    yes = tokenizer.single_token_ids(["Yes", "yes", " Yes", " yes"])
    no = tokenizer.single_token_ids(["No", "no", " No", " no"])
    assert yes and no
    engine = MoondreamEngine(fp32_model, yes_ids=yes, no_ids=no)
    prompt = QUERY_PREFIX + tuple(tokenizer.encode("Is there a person in the image?")) + QUERY_SUFFIX
    (gens,) = engine.generate([parity_crops], [[Request(prompt, 2, yes_no=True, record_logits=True),
                                                 Request(prompt, 2)]])
    probs = torch.softmax(gens[0].logits[0], -1)
    expected = probs[list(yes)].sum() / (probs[list(yes)].sum() + probs[list(no)].sum())
    assert gens[0].yes_prob == pytest.approx(float(expected), rel=1e-5)
    assert 0.0 < gens[0].yes_prob < 1.0 and gens[1].yes_prob is None
    assert gens[0].ids == gens[1].ids


# ---------------------------------------------------------------- checkpoint checks


def test_config_that_does_not_match_the_tensors_is_one_clear_error(tmp_path):
    from pipeline.models.moondream.config import CheckpointMismatch

    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    config["config"]["text"].update(dim=128, n_heads=2, n_kv_heads=2)
    config["config"]["vision"]["proj_out_dim"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatch, match=r"shapes differ \(e\.g\. model\.vision\.proj_mlp\.fc2\.weight is "
                                                 r"\[64, 128\], expected \[128, 128\]"):
        load_model(CHECKPOINT_DIR / "model.safetensors", tmp_path / "config.json", "cpu", torch.float32)
    # No config.json at all: the official sizes, which this small checkpoint does not have.
    with pytest.raises(CheckpointMismatch, match="config.json's \"config\" field"):
        load_model(CHECKPOINT_DIR / "model.safetensors", None, "cpu", torch.float32)


def test_official_key_layout_is_what_is_loaded():
    from pipeline.models.moondream.config import MoondreamConfig

    official = {}
    keys = Path(__file__).resolve().parent / "fixtures" / "moondream" / "weight-keys-full.tsv"
    for line in keys.read_text().splitlines():
        name, shape, _ = line.split("\t")
        official[name] = tuple(json.loads(shape))
    assert len(official) == 592
    MoondreamConfig().check_shapes(official, "weight-keys-full.tsv")  # raises on any difference
    expected = MoondreamConfig().expected_shapes()
    assert set(official) - set(expected) == {k for k in official if k.startswith("model.region.")}


def test_requests_that_cannot_fit_the_context_are_refused(fp32_model, parity_crops):
    engine = MoondreamEngine(fp32_model)
    room = fp32_model.config.text.max_context - fp32_model.config.prefix_len
    for bad in (Request((1,) * room, 4), Request(CAPTION_PROMPTS["short"], 0), Request((), 4)):
        with pytest.raises(ValueError):
            engine.generate([parity_crops], [[bad]])
