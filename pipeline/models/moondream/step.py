"""The fixed-shape decode step: every slot steps every time, everything it needs stays on the device.

Slots are laid out request-major in lanes: slot j*M + r holds request j (lane j) of the image in row r
(M rows) of the key/value pools (kv.py), whose span is the image's prefix followed by its lanes'
suffixes. So one fused attention kernel (SDPA) per layer scores an image's queries against its prefix
(read once per step, never copied per prompt) and each query against its own suffix, with one static
mask built once per step. A step runs the first ``lanes`` lanes, all their slots (finished or empty ones
too: their results are masked, which keeps the shapes fixed), over a static span (the prefix plus
``lanes`` lanes of the pool's length, a bucket of the longest sequence seen, see kv.bucket). The engine
runs every lane while any probe is live and lane 0 alone (the captions) once they have all stopped: two
shapes, and a long caption does not drag idle probe slots.

Stopping rule (reference ``_generate_answer``), applied on the device: the first token is the argmax
of the prompt's last logits; a token equal to EOS ends the sequence and is not emitted; after
``limit`` emitted tokens the next token is computed and, if it is not EOS, the sequence ends as
having hit its cap. From the second step on, the answer token id is masked out before the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.models.moondream.config import ANSWER_ID, EOS_ID, ROTARY_DIMS
from pipeline.models.moondream.text import TextModel


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


@dataclass(frozen=True)
class RopeTables:
    """Rotary embedding as two gathers and a multiply-add, for q and k of a step together (one call per
    layer instead of text.apply_rope's dozen ops on each). Exactly apply_rope's arithmetic: rotated dim 2i
    is real_i*cos_i + imag_i*(-sin_i), dim 2i+1 imag_i*cos_i + real_i*sin_i (the same products and sums,
    IEEE-equal), the other dims x*1 + y*0 = x. ``cos``/``sin`` (context, head_dim) float32 per position."""

    cos: torch.Tensor
    sin: torch.Tensor
    take_u: torch.Tensor  # (head_dim,) long: dims 2i, 2i+1 <- real_i, imag_i; the rest unchanged
    take_w: torch.Tensor  # (head_dim,) long: dims 2i, 2i+1 <- imag_i, real_i

    @classmethod
    def build(cls, text: TextModel) -> "RopeTables":
        half, head_dim = ROTARY_DIMS // 2, text.config.head_dim
        cos_half, sin_half = text.rope_cos, text.rope_sin  # (context, half), the reference's tables
        device = cos_half.device
        cos = torch.ones(cos_half.shape[0], head_dim, device=device)
        sin = torch.zeros(cos_half.shape[0], head_dim, device=device)
        cos[:, 0:ROTARY_DIMS:2], cos[:, 1:ROTARY_DIMS:2] = cos_half, cos_half
        sin[:, 0:ROTARY_DIMS:2], sin[:, 1:ROTARY_DIMS:2] = -sin_half, sin_half
        take_u, take_w = torch.arange(head_dim), torch.arange(head_dim)
        i = torch.arange(half)
        take_u[2 * i], take_u[2 * i + 1] = i, half + i
        take_w[2 * i], take_w[2 * i + 1] = half + i, i
        return cls(cos, sin, take_u.to(device), take_w.to(device))

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (N, heads, head_dim) at positions whose rows of cos/sin are given as (N, 1, head_dim)."""
        return (x.index_select(-1, self.take_u) * cos + x.index_select(-1, self.take_w) * sin).to(x.dtype)


def grouped_attention(q, keys, values, mask, lanes: int):
    """One fused attention (SDPA) per image row over its pool span: N = lanes*M request-major queries
    q (N, H, Q, d); keys/values (M, H, S, d) (prefix, then lane suffixes); mask (M or 1, 1, lanes*Q, S)
    bool, True where visible. Returns (N, H, Q, d)."""
    n, heads, n_q, head_dim = q.shape
    m = n // lanes
    grouped = q.view(lanes, m, heads, n_q, head_dim).permute(1, 2, 0, 3, 4).reshape(m, heads, lanes * n_q, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
    return out.view(m, heads, lanes, n_q, head_dim).permute(2, 0, 1, 3, 4).reshape(n, heads, n_q, head_dim)


def prompt_mask(lanes: int, width: int, prefix_len: int, device) -> torch.Tensor:
    """(1, 1, lanes*width, prefix_len + lanes*width): every prompt sees the prefix and itself, causally."""
    lane, t = torch.arange(lanes, device=device).repeat_interleave(width), torch.arange(width, device=device).repeat(lanes)
    own = (lane.view(-1, 1) == lane.view(1, -1)) & (t.view(1, -1) <= t.view(-1, 1))
    prefix = torch.ones(lanes * width, prefix_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], dim=1).view(1, 1, lanes * width, prefix_len + lanes * width)


Writer = Callable[[int, torch.Tensor, torch.Tensor], None]


def run_prompts(text: TextModel, tokens, positions, prefix_k, prefix_v, write: Writer, lanes: int):
    """The prompts of newly admitted images: (N, W) tokens (request-major, N = lanes*M) at absolute
    ``positions`` through the decoder -> (N, W, dim) hidden states. prefix_k/v: per layer (M, H, P, d) of
    those images; ``write(layer, k, v)`` stores the prompts' keys/values (N, H, W, d) in the pool."""
    n, width = tokens.shape
    m, prefix_len = n // lanes, prefix_k[0].shape[2]
    mask = prompt_mask(lanes, width, prefix_len, tokens.device)
    x = text.embed(tokens)
    cos, sin = text.rope_cos[positions], text.rope_sin[positions]

    def grouped(t):
        return t.view(lanes, m, *t.shape[1:]).permute(1, 2, 0, 3, 4).reshape(m, t.shape[1], lanes * width, -1)

    for i, block in enumerate(text.blocks):
        h = block.ln(x)
        q, k, v = block.attn.qkv_heads(h, cos, sin)
        write(i, k, v)
        keys, values = torch.cat([prefix_k[i], grouped(k)], dim=2), torch.cat([prefix_v[i], grouped(v)], dim=2)
        out = grouped_attention(q, keys, values, mask, lanes)
        x = x + block.attn.merge(out) + block.mlp(h)
    return x


def decode_logits(text: TextModel, keys, values, state: SlotState, rope: RopeTables, *, slots: int, lanes: int,
                  stride: int, prefix_len: int) -> torch.Tensor:
    """One token per slot: writes each pending token's key/value at its slot's ``pos`` and returns the raw
    (slots, vocab) logits. Pools (kv.py): per layer (rows, H, P + G*stride, d); the first ``slots`` =
    lanes * M slots, rows [0, M) and each row's first P + lanes*stride positions take part. About 20
    operators per layer: layer norm, qkv, rope of q and k together, two in-place writes, one SDPA, the
    output projection, the MLP and the residual sum."""
    m, dim = slots // lanes, text.config.dim
    heads, head_dim = text.config.n_heads, text.config.head_dim
    pos = state.pos[:slots]
    slot = torch.arange(slots, device=pos.device)
    row, start = slot % m, prefix_len + (slot // m) * stride
    column = start + pos  # where the pending token's key/value goes in its row's span
    span = prefix_len + lanes * stride
    t = torch.arange(span, device=pos.device).view(1, span)
    visible = (t < prefix_len) | ((t >= start.view(slots, 1)) & (t <= column.view(slots, 1)))
    # Additive (0 / -inf), in the keys' dtype: a boolean mask is converted by SDPA in every layer.
    hidden = torch.zeros((), dtype=keys[0].dtype, device=pos.device).masked_fill(~visible, float("-inf"))
    mask = hidden.view(lanes, m, 1, span).permute(1, 2, 0, 3).contiguous()  # (M, 1, lanes, span), once
    cos, sin = rope.cos[prefix_len + pos].unsqueeze(1), rope.sin[prefix_len + pos].unsqueeze(1)
    x = text.embed(state.tokens[:slots])
    for i, block in enumerate(text.blocks):
        h = block.ln(x)
        qkv = block.attn.qkv(h)
        qk = rope.apply(qkv[:, : 2 * dim].view(slots, 2 * heads, head_dim), cos, sin)
        keys[i][row, :, column] = qk[:, heads:]
        values[i][row, :, column] = qkv[:, 2 * dim :].view(slots, heads, head_dim)
        q = qk[:, :heads].view(lanes, m, heads, head_dim).permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, keys[i][:m, :, :span], values[i][:m, :, :span], attn_mask=mask)
        x = x + block.attn.proj(out.permute(2, 0, 1, 3).reshape(slots, dim)) + block.mlp(h)
    return text.logits(x)


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


def decode_step(text: TextModel, keys, values, state: SlotState, rope: RopeTables, *, slots: int, lanes: int,
                stride: int, prefix_len: int) -> None:
    """What ``--compile`` compiles (fullgraph): one fixed-shape step of every slot, state updated in place."""
    logits = decode_logits(text, keys, values, state, rope, slots=slots, lanes=lanes, stride=stride,
                           prefix_len=prefix_len)
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
