"""What the Moondream benches share: random-weight models of given sizes, the prompts, the one-at-a-time loop.

Random weights generate arbitrary tokens, so <|endoftext|> is suppressed (its logit bias set to -1e4):
every caption and answer decodes exactly its token cap, and both sides of a comparison decode the same
number of tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.models.moondream.config import (  # noqa: E402
    ANSWER_ID, CAPTION_PROMPTS, EOS_ID, QUERY_PREFIX, QUERY_SUFFIX, MoondreamConfig, TextConfig, VisionConfig,
)
from pipeline.models.moondream.engine import Request  # noqa: E402
from pipeline.models.moondream.model import MoondreamModel  # noqa: E402

# Token ids standing in for 5 probe questions (about 8-10 tokens each, as real probes encode).
PROBES = [(5512, 2198, 282, 13506, 308, 324, 2115, 40), (23908, 350, 324, 5357, 848, 308, 324, 2115, 40),
          (5512, 612, 1854, 308, 324, 2115, 40), (2437, 867, 661, 389, 612, 40), (5512, 428, 257, 1035, 4067, 40)]


def mid_size(text_layers: int = 2, vision_layers: int = 2) -> MoondreamConfig:
    """Official widths, few layers: CPU-sized, with the real per-layer arithmetic."""
    return MoondreamConfig(TextConfig(n_layers=text_layers), VisionConfig(enc_n_layers=vision_layers))


def tiny_widths(text_layers: int = 24, width: int = 1) -> MoondreamConfig:
    """The official layer count (what sets the kernels per step) at the smallest widths the architecture
    allows: ``width`` 32-dim heads (32 rotary dims need a 32-dim head; dim = ff = 32 * width), a 256-token
    vocabulary and 42-pixel crops (3x3 patches: a 10-token image prefix instead of 730), so that a step's
    arithmetic is as small as it gets and time per step is mostly host time (Python, dispatch, kernel
    launches: what a GPU would wait on). ``width=2`` doubles every width: bench/moondream.py times it to
    show how much of a step is still arithmetic. Crops: ``prepare_image(..., tiny.vision.crop_geometry)``."""
    dim = 32 * width
    return MoondreamConfig(
        TextConfig(dim=dim, ff_dim=dim, n_layers=text_layers, vocab_size=256, n_heads=width, n_kv_heads=width),
        VisionConfig(enc_dim=32, enc_n_layers=1, enc_ff_dim=64, enc_n_heads=1, proj_out_dim=dim, proj_inner_dim=64,
                     crop_size=42, overlap_margin=1),
    )


def random_model(config: MoondreamConfig, device: str, dtype: torch.dtype, seed: int = 0) -> MoondreamModel:
    torch.manual_seed(seed)
    with torch.device(device):
        model = MoondreamModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.01)
            elif p.dim() == 1:  # layer norm weights
                p.fill_(1.0)
            elif name.endswith("wte") or name.endswith("pos_emb"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
        model.text.lm_head.bias[EOS_ID] = -1e4  # never stop early: every sequence decodes to its cap
    model.text.setup_rope(device)
    return model.to(dtype).eval().requires_grad_(False)


def requests(caption_tokens: int, answer_tokens: int, vocab_size: int = 51200, probes: int = 5,
             request_type=Request) -> list:
    """A normal caption plus ``probes`` probes (ids folded into a small vocabulary when there is one)."""
    def fold(ids):
        return tuple(i % vocab_size for i in ids)

    probe_prompts = [PROBES[k % len(PROBES)] for k in range(probes)]
    return [request_type(fold(CAPTION_PROMPTS["normal"]), caption_tokens)] + [
        request_type(fold(QUERY_PREFIX + p) + QUERY_SUFFIX, answer_tokens, True) for p in probe_prompts
    ]


@torch.inference_mode()
def one_at_a_time(engine, crops, reqs) -> list[list[int]]:
    """The reference's loop: per image encode once (vision + prefix), then every prompt alone with batch 1,
    its KV cache grown token by token (the legacy engine's suffix forward pass, eager)."""
    from bench.legacy_engine import forward_suffix

    model, device = engine.model, engine.device
    text, prefix_len = model.text, engine.prefix_len
    out = []
    for image in crops:
        prefix = engine.prefix_caches(engine.embed_images([image]))
        for req in reqs:
            cache: list[tuple[torch.Tensor, torch.Tensor]] = []

            def write(layer, k, v):
                if layer < len(cache):
                    cache[layer] = (torch.cat([cache[layer][0], k], 2), torch.cat([cache[layer][1], v], 2))
                else:
                    cache.append((k, v))
                return cache[layer]

            zero = torch.zeros(1, dtype=torch.long, device=device)
            tokens = torch.tensor([req.prompt], device=device)
            n = tokens.shape[1]
            visible = torch.ones(n, n, dtype=torch.bool, device=device).tril().view(1, 1, n, n)
            positions = (prefix_len + torch.arange(n, device=device)).view(1, n)
            hidden = forward_suffix(text, text.embed(tokens), positions, write, prefix, zero, zero, 1, visible)
            token, ids = int(text.logits(hidden[:, -1]).argmax(-1)), []
            while token != EOS_ID and len(ids) < req.max_tokens:
                ids.append(token)
                filled = cache[0][0].shape[2]
                visible = torch.ones(1, 1, 1, filled + 1, dtype=torch.bool, device=device)
                positions = torch.tensor([[prefix_len + filled]], device=device)
                hidden = forward_suffix(text, text.embed(torch.tensor([[token]], device=device)), positions, write,
                                        prefix, zero, zero, 1, visible)
                logits = text.logits(hidden[:, -1])
                logits[:, ANSWER_ID] = float("-inf")
                token = int(logits.argmax(-1))
            out.append(ids)
    return out


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
