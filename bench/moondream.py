"""Moondream 2 engine throughput: batched, prefix-shared generation against a one-image-at-a-time loop.

    python bench/moondream.py                                   # CPU, mid-size config (official widths, 2+2 layers)
    python bench/moondream.py --full --device cuda --images 64  # the full-size architecture on a GPU

Both sides use the same random weights, the same images (already cropped: preprocessing is the CPU
decode stage's job and is excluded from both) and the same prompts: a normal caption plus 5 probes.
<|endoftext|> is suppressed so that every caption and answer runs to its cap and both sides decode
exactly the same number of tokens (random weights would otherwise stop anywhere).

- batched: ``MoondreamEngine.generate`` on all images at once (crops encoded together, prefixes
  prefilled together, every prompt of every image in one decode loop);
- one at a time: the reference's pattern, for each image: encode it once (vision + prefix), then
  the caption, then each probe, each prompt prefilled and decoded with batch 1 reusing the prefix.
Printed: images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.models.moondream.config import (  # noqa: E402
    ANSWER_ID, CAPTION_PROMPTS, EOS_ID, QUERY_PREFIX, QUERY_SUFFIX, MoondreamConfig, TextConfig, VisionConfig,
)
from pipeline.models.moondream.engine import MoondreamEngine, Request  # noqa: E402
from pipeline.models.moondream.model import MoondreamModel  # noqa: E402
from pipeline.models.moondream.preprocess import prepare_image  # noqa: E402

# Token ids standing in for 5 probe questions (about 8-10 tokens each, as real probes encode).
PROBES = [(5512, 2198, 282, 13506, 308, 324, 2115, 40), (23908, 350, 324, 5357, 848, 308, 324, 2115, 40),
          (5512, 612, 1854, 308, 324, 2115, 40), (2437, 867, 661, 389, 612, 40), (5512, 428, 257, 1035, 4067, 40)]


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
        model.text.lm_head.bias[EOS_ID] = -1e4  # never stop early: both sides decode to the caps
    model.text.setup_rope(device)
    return model.to(dtype).eval().requires_grad_(False)


def requests(caption_tokens: int, answer_tokens: int) -> list[Request]:
    return [Request(CAPTION_PROMPTS["normal"], caption_tokens)] + [
        Request(QUERY_PREFIX + p + QUERY_SUFFIX, answer_tokens, yes_no=True) for p in PROBES
    ]


@torch.inference_mode()
def one_at_a_time(engine: MoondreamEngine, crops, reqs: list[Request]) -> list[list[int]]:
    """The reference's loop: per image encode once, then every prompt alone with batch 1."""
    model, device = engine.model, engine.device
    text, prefix_len = model.text, engine.prefix_len
    out = []
    for image in crops:
        prefix = engine.prefix_caches(engine.embed_images([image]))
        for req in reqs:
            cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, grown token by token like a KV cache

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
            hidden = text.forward_suffix(text.embed(tokens), positions, write, prefix, zero, zero, 1, visible)
            token, ids = int(text.logits(hidden[:, -1]).argmax(-1)), []
            while token != EOS_ID and len(ids) < req.max_tokens:
                ids.append(token)
                filled = cache[0][0].shape[2]
                visible = torch.ones(1, 1, 1, filled + 1, dtype=torch.bool, device=device)
                positions = torch.tensor([[prefix_len + filled]], device=device)
                hidden = text.forward_suffix(text.embed(torch.tensor([[token]], device=device)), positions, write,
                                             prefix, zero, zero, 1, visible)
                logits = text.logits(hidden[:, -1])
                logits[:, ANSWER_ID] = float("-inf")
                token = int(logits.argmax(-1))
            out.append(ids)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full-size architecture (default: mid-size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--images", type=int, default=None, help="default 4 on CPU, 64 on a GPU")
    ap.add_argument("--size", default="1024x768", help="image WxH (1024x768 -> 13 crops)")
    ap.add_argument("--caption-tokens", type=int, default=None, help="default 24 on CPU, 96 on a GPU")
    ap.add_argument("--answer-tokens", type=int, default=4)
    ap.add_argument("--max-sequences", type=int, default=None, help="engine cap; default 64 CPU, 384 GPU")
    ap.add_argument("--vision-batch-crops", type=int, default=None, help="crops per vision pass (engine default)")
    ap.add_argument("--text-layers", type=int, default=2, help="mid-size only")
    ap.add_argument("--vision-layers", type=int, default=2, help="mid-size only")
    ap.add_argument("--loop-images", type=int, default=None, help="images timed in the slow loop (default: all)")
    args = ap.parse_args()

    gpu = args.device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    n_images = args.images or (64 if gpu else 4)
    caption_tokens = args.caption_tokens or (96 if gpu else 24)
    if args.full:
        config = MoondreamConfig()
    else:
        config = MoondreamConfig(TextConfig(n_layers=args.text_layers), VisionConfig(enc_n_layers=args.vision_layers))
    model = random_model(config, args.device, dtype)
    width, height = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    crops = [prepare_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n_images)]
    reqs = requests(caption_tokens, args.answer_tokens)
    engine = MoondreamEngine(model, max_sequences=args.max_sequences or (384 if gpu else 64),
                             vision_batch_crops=args.vision_batch_crops)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{'full' if args.full else 'mid-size'} config ({params:.0f}M params, text {config.text.n_layers} layers, "
          f"vision {config.vision.enc_n_layers} layers), {args.device} {str(dtype).split('.')[-1]}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{n_images} images {args.size} ({crops[0].n_crops} crops each), caption {caption_tokens} tokens + "
          f"{len(PROBES)} probes x {args.answer_tokens} tokens")

    engine.generate(crops[:1], [reqs[:2]])  # warm-up (allocations, kernels)
    sync(args.device)
    t = time.perf_counter()
    batched = engine.generate(crops, [reqs] * n_images)
    sync(args.device)
    batched_s = time.perf_counter() - t

    loop_images = min(args.loop_images or n_images, n_images)
    t = time.perf_counter()
    looped = one_at_a_time(engine, crops[:loop_images], reqs)
    sync(args.device)
    loop_s = time.perf_counter() - t

    flat = [list(g.ids) for per_image in batched[:loop_images] for g in per_image]
    same = sum(a == b for a, b in zip(flat, looped))
    batched_ips, loop_ips = n_images / batched_s, loop_images / loop_s
    print(f"batched engine:   {batched_ips:8.2f} images/s  ({batched_s:.1f} s for {n_images})")
    print(f"one at a time:    {loop_ips:8.2f} images/s  ({loop_s:.1f} s for {loop_images})")
    print(f"ratio:            {batched_ips / loop_ips:8.1f}x")
    print(f"same token ids:   {same}/{len(looped)} sequences")


if __name__ == "__main__":
    main()
