"""The fixed-shape decode step: every slot steps every time, everything it needs stays on the device.

Slots are laid out request-major in lanes: slot j*M + r holds request j (lane j) of the image in prefix
row r (M rows), so an image's queries are scored against its prefix in one matmul, the prefix read once
per step and never copied per prompt, with no index tensors. A step runs the first ``lanes`` lanes, all
their slots (finished or empty ones too: their results are masked, which keeps the shapes fixed),
against a suffix of static length L (the pool's first L positions, a bucket of the longest live
sequence, see kv.bucket). The engine runs every lane while any probe is live and lane 0 alone (the
captions) once they have all stopped: two shapes, and a long caption does not drag idle probe slots.

Stopping rule (reference ``_generate_answer``), applied on the device: the first token is the argmax
of the prompt's last logits; a token equal to EOS ends the sequence and is not emitted; after
``limit`` emitted tokens the next token is computed and, if it is not EOS, the sequence ends as
having hit its cap. From the second step on, the answer token id is masked out before the argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.models.moondream.config import ANSWER_ID, EOS_ID
from pipeline.models.moondream.text import TextModel, fp32_matmul


@dataclass
class SlotState:
    """Per-slot decode state, allocated once (``allocate``) and updated in place by the step."""

    tokens: torch.Tensor  # (N,) long: the pending token (emitted, its key/value not yet written)
    pos: torch.Tensor  # (N,) long: the suffix position the pending token's key/value goes to
    produced: torch.Tensor  # (N,) long: tokens emitted
    limit: torch.Tensor  # (N,) long: the token cap
    active: torch.Tensor  # (N,) bool: still decoding
    hit_cap: torch.Tensor  # (N,) bool
    out: torch.Tensor  # (N, W) long: the emitted ids, out[s, :produced[s]]
    yes_prob: torch.Tensor  # (N,) float32, NaN where not asked

    @classmethod
    def allocate(cls, slots: int, width: int, device) -> "SlotState":
        def longs(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)

        flags = [torch.zeros(slots, dtype=torch.bool, device=device) for _ in range(2)]
        return cls(longs(slots), longs(slots), longs(slots), longs(slots), flags[0], flags[1], longs(slots, width),
                   torch.full((slots,), float("nan"), device=device))

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.pos, self.produced, self.limit, self.active, self.hit_cap, self.out, self.yes_prob]


def shared_prefix_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_visible, lanes: int, matmul: str):
    """Attention of N = lanes*M slots over their image's prefix plus their own suffix, one float32 softmax.

    Slots are request-major: slot j*M + r is request j of the image in prefix row r, so the lanes queries
    of an image are scored against its prefix row in one matmul. q (N, H, Q, d); prefix_k/v (M, H, P, d);
    suffix_k/v (N, H, T, d); suffix_visible (N or 1, 1, Q, T) bool. Returns (N, H, Q, d) in q's dtype."""
    n, heads, n_q, head_dim = q.shape
    m, prefix_len = n // lanes, prefix_k.shape[2]
    grouped = q.view(lanes, m, heads, n_q, head_dim).permute(1, 2, 0, 3, 4).reshape(m, heads, lanes * n_q, head_dim)
    prefix_scores = fp32_matmul(matmul, grouped, prefix_k.transpose(-1, -2))
    prefix_scores = prefix_scores.view(m, heads, lanes, n_q, prefix_len).permute(2, 0, 1, 3, 4)
    prefix_scores = prefix_scores.reshape(n, heads, n_q, prefix_len)
    suffix_scores = fp32_matmul(matmul, q, suffix_k.transpose(-1, -2)).masked_fill(~suffix_visible, float("-inf"))
    probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], dim=-1) * (1.0 / math.sqrt(head_dim)), dim=-1)
    prefix_probs, suffix_probs = probs[..., :prefix_len], probs[..., prefix_len:]
    prefix_probs = prefix_probs.reshape(lanes, m, heads, n_q, prefix_len).permute(1, 2, 0, 3, 4)
    prefix_out = fp32_matmul(matmul, prefix_probs.reshape(m, heads, lanes * n_q, prefix_len), prefix_v)
    prefix_out = prefix_out.view(m, heads, lanes, n_q, head_dim).permute(2, 0, 1, 3, 4).reshape(n, heads, n_q, head_dim)
    return (prefix_out + fp32_matmul(matmul, suffix_probs, suffix_v)).to(q.dtype)


Writer = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def run_suffix(text: TextModel, tokens, positions, prefix_k, prefix_v, write: Writer, visible, lanes: int, matmul: str):
    """(N, Q) suffix tokens at absolute ``positions`` through the decoder -> (N, Q, dim) hidden states.
    ``write(layer, k, v)`` stores the new keys/values and returns the suffix keys/values to attend to;
    prefix_k/v: per layer (M, H, P, d)."""
    x = text.embed(tokens)
    cos, sin = text.rope_cos[positions], text.rope_sin[positions]
    for i, block in enumerate(text.blocks):
        h = block.ln(x)
        q, k, v = block.attn.qkv_heads(h, cos, sin)
        suffix_k, suffix_v = write(i, k, v)
        out = shared_prefix_attention(q, prefix_k[i], prefix_v[i], suffix_k, suffix_v, visible, lanes, matmul)
        x = x + block.attn.merge(out) + block.mlp(h)
    return x


def decode_logits(text: TextModel, prefix_k, prefix_v, suffix_k, suffix_v, state: SlotState, *, slots: int,
                  lanes: int, length: int, prefix_len: int, matmul: str) -> torch.Tensor:
    """One token per slot: writes each pending token's key/value at its slot's ``pos`` and returns the raw
    (slots, vocab) logits. Pools: per layer (rows, H, positions, d); the first ``slots`` = lanes * M suffix
    slots, the first M = ``slots // lanes`` prefix rows and the first ``length`` suffix positions take part."""
    pos = state.pos[:slots]
    rows = torch.arange(slots, device=pos.device)

    def write(layer, k, v):
        keys, values = suffix_k[layer], suffix_v[layer]
        keys[rows, :, pos] = k[:, :, 0]
        values[rows, :, pos] = v[:, :, 0]
        return keys[:slots, :, :length], values[:slots, :, :length]

    visible = (torch.arange(length, device=pos.device).view(1, length) <= pos.view(slots, 1)).view(slots, 1, 1, length)
    m = slots // lanes
    hidden = run_suffix(text, state.tokens[:slots].view(slots, 1), (prefix_len + pos).view(slots, 1),
                        [k[:m] for k in prefix_k], [v[:m] for v in prefix_v], write, visible, lanes, matmul)
    return text.logits(hidden[:, -1])


def advance(state: SlotState, logits: torch.Tensor, slots: int) -> None:
    """The stopping rule for a decode step (not the first token), in place, on the device."""
    logits[:, ANSWER_ID] = float("-inf")
    token = logits.argmax(-1)
    active, produced = state.active[:slots], state.produced[:slots]
    eos = token == EOS_ID
    capped = ~eos & (produced >= state.limit[:slots])
    emit = active & ~eos & ~capped
    state.hit_cap[:slots] |= active & capped
    # Written unconditionally: a slot that did not emit never reads out[s, produced[s]].
    width = state.out.shape[1]
    state.out[:slots].scatter_(1, produced.clamp(max=width - 1).view(slots, 1), token.view(slots, 1))
    state.tokens[:slots] = torch.where(emit, token, state.tokens[:slots])
    step = emit.long()
    produced += step
    state.pos[:slots] += step
    active.copy_(emit)


def decode_step(text: TextModel, prefix_k, prefix_v, suffix_k, suffix_v, state: SlotState, *, slots: int,
                lanes: int, length: int, prefix_len: int, matmul: str) -> None:
    """What ``--compile`` compiles (fullgraph): one fixed-shape step of every slot, state updated in place."""
    logits = decode_logits(text, prefix_k, prefix_v, suffix_k, suffix_v, state, slots=slots, lanes=lanes,
                           length=length, prefix_len=prefix_len, matmul=matmul)
    advance(state, logits, slots)


def accept_first(state: SlotState, where: torch.Tensor, logits: torch.Tensor, real: torch.Tensor,
                 limits: torch.Tensor, lengths: torch.Tensor) -> None:
    """The first token of newly admitted slots ``where`` (from their prompts' last logits), on the device.
    ``real`` marks slots holding a request (an image with fewer prompts than G leaves the others empty)."""
    token = logits.argmax(-1)
    emit = real & (token != EOS_ID)  # limits are >= 1: the first token is never over the cap
    state.tokens[where] = token
    state.out[where, 0] = token
    state.produced[where] = emit.long()
    state.pos[where] = lengths
    state.limit[where] = limits
    state.active[where] = emit
    state.hit_cap[where] = False
