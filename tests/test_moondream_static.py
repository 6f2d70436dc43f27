"""The static engine (fixed slots, device-side step, compiled decode) against the engine it replaced.

bench/legacy_engine.py is the engine of main before the static one (growing pools, compaction, stopping
decided in Python); both run the tiny checkpoint in fp32 here and must give the same ids, cap flags and
yes-probabilities, on the parity image's five reference prompts and on a batch mixing crop counts,
caption lengths (EOS at different steps) and caps, with admission of images as others finish.
"""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from bench.legacy_engine import MoondreamEngine as LegacyEngine, Request as LegacyRequest
from pipeline.models.moondream import step
from pipeline.models.moondream.config import CAPTION_PROMPTS, QUERY_PREFIX, QUERY_SUFFIX
from pipeline.models.moondream.engine import MoondreamEngine, Request
from pipeline.models.moondream.preprocess import prepare_image
from pipeline.models.moondream.weights import load_model
from tests.fixtures.moondream_cache import CHECKPOINT_DIR, PARITY_IMAGE
from tests.test_moondream import _mixed_images, tokenizer  # noqa: F401 (a fixture)

EMBEDDINGS = None  # set by the mixed fixture
QUESTIONS = ["Is there a person in the image?", "What is the main object in the image?", "Is it red?"]


@pytest.fixture(scope="module")
def eos_model():
    """The fp32 tiny model with <|endoftext|> pushed up so that sequences stop at different steps."""
    model = load_model(CHECKPOINT_DIR / "model.safetensors", CHECKPOINT_DIR / "config.json", "cpu", torch.float32)
    with torch.no_grad():
        model.text.lm_head.bias[0] = 12.0
    return model


class _Embeddings:
    """Each image's embeddings computed once for the whole module (the 27-layer vision tower is what
    costs time here; these tests are about the text side). Installed on an engine, legacy or static."""

    def __init__(self, model, crops):
        engine = MoondreamEngine(model)
        self.rows = {id(c): engine.embed_images([c]) for c in crops}

    def install(self, engine):
        engine.embed_images = lambda images: torch.cat([self.rows[id(c)] for c in images])
        return engine


@pytest.fixture(scope="module")
def mixed(tokenizer, eos_model):  # noqa: F811
    crops = [prepare_image(im) for im in _mixed_images()] + [prepare_image(Image.open(PARITY_IMAGE))]
    assert len({c.n_crops for c in crops}) == 4  # 2, 3, 5 and 13 crops
    global EMBEDDINGS
    EMBEDDINGS = _Embeddings(eos_model, crops)
    requests = [Request(CAPTION_PROMPTS["normal"], 24)] + [
        Request(QUERY_PREFIX + tuple(tokenizer.encode(q)) + QUERY_SUFFIX, 8, yes_no=q.startswith("Is")) for q in QUESTIONS
    ]
    return crops, requests


def _yes_no(tokenizer):  # noqa: F811
    return (tokenizer.single_token_ids(["Yes", "yes", " Yes", " yes"]),
            tokenizer.single_token_ids(["No", "no", " No", " no"]))


def _legacy(model, crops, requests, tokenizer, cached: bool = True):  # noqa: F811
    yes, no = _yes_no(tokenizer)
    engine = LegacyEngine(model, yes_ids=yes, no_ids=no)
    if cached:
        EMBEDDINGS.install(engine)
    legacy_requests = [LegacyRequest(r.prompt, r.max_tokens, r.yes_no) for r in requests]
    return engine.generate(crops, [legacy_requests] * len(crops))


def _same(got, expected):
    for per_image, per_expected in zip(got, expected, strict=True):
        assert [g.ids for g in per_image] == [e.ids for e in per_expected]
        assert [g.hit_cap for g in per_image] == [e.hit_cap for e in per_expected]
        for g, e in zip(per_image, per_expected):
            assert (g.yes_prob is None) == (e.yes_prob is None)
            if g.yes_prob is not None:
                assert g.yes_prob == pytest.approx(e.yes_prob, abs=1e-5)


def test_static_engine_equals_the_legacy_engine_on_a_mixed_batch(eos_model, mixed, tokenizer):  # noqa: F811
    crops, requests = mixed
    expected = _legacy(eos_model, crops, requests, tokenizer)
    flat = [g for per_image in expected for g in per_image]
    # Sequences stop at EOS at different steps, some hit their caps, some yes-probabilities exist.
    assert len({len(g.ids) for g in flat}) >= 4 and any(g.hit_cap for g in flat) and not all(g.hit_cap for g in flat)
    yes, no = _yes_no(tokenizer)
    # 8 slots = 2 image rows of 4: images are admitted into rows freed by others, mid-run.
    for max_sequences, harvest_every in ((8, 1), (8, 3), (64, 4)):
        engine = EMBEDDINGS.install(MoondreamEngine(eos_model, max_sequences=max_sequences, yes_ids=yes, no_ids=no,
                                                    harvest_every=harvest_every))
        _same(engine.generate(crops, [requests] * len(crops)), expected)
    # Images without requests and an empty call are fine; fewer prompts than another image leaves slots empty.
    engine = EMBEDDINGS.install(MoondreamEngine(eos_model, yes_ids=yes, no_ids=no))
    got = engine.generate(crops[:3], [[], requests[:1], requests])
    assert got[0] == [] and got[1][0].ids == expected[1][0].ids and [g.ids for g in got[2]] == [g.ids for g in expected[2]]
    assert engine.generate([], []) == []


def test_static_engine_equals_the_legacy_engine_on_the_reference_prompts(tokenizer):  # noqa: F811
    from tests.test_moondream import _reference, _reference_requests

    model = load_model(CHECKPOINT_DIR / "model.safetensors", CHECKPOINT_DIR / "config.json", "cpu", torch.float32)
    ref, _ = _reference("fp32")
    requests = [r for _, r in _reference_requests(ref, tokenizer)]
    crops = [prepare_image(Image.open(PARITY_IMAGE))]
    yes, no = _yes_no(tokenizer)
    got = MoondreamEngine(model, yes_ids=yes, no_ids=no).generate(crops, [requests])
    _same(got, _legacy(model, crops, requests, tokenizer, cached=False))


def _cached_graphs(fn) -> int:
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


@pytest.mark.subprocess  # inductor compiles its C++ with the system compiler, in worker processes
def test_decode_step_compiles_in_one_graph_and_recompiles_at_most_twice(eos_model, mixed, tokenizer, monkeypatch):  # noqa: F811
    """fullgraph=True (a graph break would raise), and over a run where images of 2, 3, 5 and 13 crops join
    and leave and sequences retire at different steps, the decode step has at most 3 compiled variants
    (1 compile + 2 recompiles). Its output equals the eager engine's. About a minute on 2 shared cores."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no worker pool on a shared 2-core machine
    crops, requests = mixed
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yes, no = _yes_no(tokenizer)
    eager = EMBEDDINGS.install(MoondreamEngine(eos_model, max_sequences=8, yes_ids=yes, no_ids=no))
    # Only the decode step compiled here: the vision tower and prefix prefill compile as before.
    compiled = EMBEDDINGS.install(MoondreamEngine(eos_model, max_sequences=8, yes_ids=yes, no_ids=no, compile=True))
    # A step on new inputs (other pools or sizes) runs TorchDynamo's guards in full; a step on the inputs of the
    # step before it skips those that do not tell the cached graphs apart. The outputs below show that those
    # steps ran the right graph.
    calls, step_fn = [], compiled._step  # (skipping guards, the step's pools, state and sizes)

    def watched(*args, **kwargs):
        calls.append((torch._dynamo.eval_frame._is_skip_guard_eval_unsafe_stance(),
                      (*args[1:8], kwargs["slots"], kwargs["lanes"], kwargs["length"])))
        return step_fn(*args, **kwargs)

    def same(a, b):
        return all(x is y if not isinstance(x, int) else x == y for x, y in zip(a, b))

    compiled._step = watched
    started = time.perf_counter()
    got = compiled.generate(crops, [requests] * len(crops))
    took = time.perf_counter() - started
    _same(got, eager.generate(crops, [requests] * len(crops)))
    _same(compiled.generate(crops[::-1], [requests] * len(crops)), eager.generate(crops[::-1], [requests] * len(crops)))
    skipped = [skip for skip, _ in calls]
    assert skipped == [k > 0 and same(calls[k][1], calls[k - 1][1]) for k in range(len(calls))]
    assert 0 < skipped.count(False) < len(calls) / compiled.harvest_every  # first steps of a harvest period too
    assert not torch._dynamo.eval_frame._is_skip_guard_eval_unsafe_stance()  # scoped to the decode loop
    variants = _cached_graphs(step.decode_step)
    assert 1 <= variants <= 3
    assert not torch._dynamo.utils.counters["graph_break"]
    print(f"compiled run (compile included): {took:.1f} s, {variants} compiled variants")


def test_the_fused_attention_merge_equals_one_softmax_over_prefix_and_suffix():
    """step.attend (two fused kernel calls merged by log-sum-exp; the by-hand fallback) against one float32
    softmax over each slot's prefix row and its own visible suffix, with request-major lanes."""
    torch.manual_seed(0)
    lanes, m, heads, n_q, head_dim, prefix, suffix = 3, 2, 2, 4, 32, 10, 6
    n = lanes * m
    q = torch.randn(n, heads, n_q, head_dim)
    prefix_k, prefix_v = torch.randn(m, heads, prefix, head_dim), torch.randn(m, heads, prefix, head_dim)
    suffix_k, suffix_v = torch.randn(n, heads, suffix, head_dim), torch.randn(n, heads, suffix, head_dim)
    visible = torch.rand(n, 1, n_q, suffix) > 0.4
    visible[..., 0] = True
    rows = torch.arange(n) % m  # slot j*M + r reads prefix row r
    keys = torch.cat([prefix_k[rows], suffix_k], dim=2)
    values = torch.cat([prefix_v[rows], suffix_v], dim=2)
    scores = (q @ keys.transpose(-1, -2)) / head_dim**0.5
    scores = scores.masked_fill(~torch.cat([torch.ones(n, 1, n_q, prefix, dtype=torch.bool), visible], -1), float("-inf"))
    expected = torch.softmax(scores, -1) @ values
    mask = step.additive(visible, torch.float32)
    for kind in ("cpu_flash", "math"):
        got = step.attend(q, prefix_k, prefix_v, suffix_k, suffix_v, mask, lanes, kind)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6, msg=kind)
    assert step.attention_kind(torch.float32, torch.device("cpu")) == "cpu_flash"


def test_the_compiled_cpu_step_attends_by_hand_and_the_eager_one_with_the_fused_kernel():
    """Under torch.compile on CPU the attention is the by-hand math (inductor fuses it with its neighbours);
    the aten flash kernel stays for eager CPU (the prompt prefill, an eager engine)."""
    cpu = torch.device("cpu")
    assert step.attention_kind(torch.float32, cpu, compiled=True) == "math"
    assert step.attention_kind(torch.float32, cpu) == "cpu_flash"


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_the_step_reads_the_blocks_weights_stacked_over_the_layers_without_a_second_copy():
    """layers.stacked_layers: the blocks' parameters become views of the stacks (same values and names, no
    weight held twice), the stacks are built once per model, and a parameter replaced afterwards (a
    model.to(...)) is seen: the stacks are built again from the new values."""
    from pipeline.models.moondream.layers import stacked_layers

    model = load_model(CHECKPOINT_DIR / "model.safetensors", CHECKPOINT_DIR / "config.json", "cpu", torch.float32)
    text = model.text
    before = {name: p.detach().clone() for name, p in text.named_parameters()}
    stack = stacked_layers(text)
    after = dict(text.named_parameters())
    assert list(after) == list(before)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert _storage_bytes(after.values()) == sum(v.nbytes for v in before.values())  # nothing doubled
    assert stacked_layers(text) is stack
    block, qkv_out = text.blocks[1], text.blocks[1].attn.qkv.out_features
    assert torch.equal(stack.w_in[1, :qkv_out], block.attn.qkv.weight)
    assert torch.equal(stack.w_out[1, :, text.config.dim :], block.mlp.fc2.weight)
    with torch.no_grad():
        block.mlp.fc1.weight.data = block.mlp.fc1.weight + 1.0  # replaced, not written in place
    again = stacked_layers(text)
    assert again is not stack and torch.equal(again.w_in[1, qkv_out:], block.mlp.fc1.weight)


def test_the_decode_step_takes_as_many_tensors_for_24_layers_as_for_2():
    """The step's fixed cost per call grows with the tensors it is handed (TorchDynamo's guards, the compiled
    wrapper's inputs): weights and pools come stacked over the layers, so the count does not grow with them.
    Counted by a TorchDynamo backend that only records the graph's inputs (nothing is compiled)."""
    from bench.moondream_setup import random_model, requests, tiny_widths

    inputs = {}
    for n_layers in (2, 24):
        config = tiny_widths(n_layers)
        model = random_model(config, "cpu", torch.float32)
        engine = MoondreamEngine(model, max_sequences=8)
        side = config.vision.crop_size
        crops = prepare_image(Image.new("RGB", (side, side), "gray"), config.vision.crop_geometry)

        def recording(graph, example_inputs, n_layers=n_layers):
            inputs.setdefault(n_layers, len(example_inputs))
            return graph.forward

        torch._dynamo.reset()
        engine._step = torch.compile(step.decode_step, backend=recording, fullgraph=True, dynamic=False)
        engine.generate([crops], [requests(3, 3, vocab_size=config.text.vocab_size, probes=2)])
    torch._dynamo.reset()
    assert inputs[2] == inputs[24] <= 40, inputs
