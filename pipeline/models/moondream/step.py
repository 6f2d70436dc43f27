"""The fixed-shape decode step: every slot steps every time, everything it needs stays on the device.

Slots are laid out request-major in lanes: slot j*M + r holds request j (lane j) of the image in prefix
row r (M rows), so an image's queries meet its prefix in one call of a fused attention kernel, the
prefix read once per step and never copied per prompt, with no index tensors; each slot meets its own
suffix in a second call, and the two are merged by log-sum-exp (``attend``). A step runs the first
``lanes`` lanes, all their slots (finished or empty ones too: their results are masked, which keeps the
shapes fixed), against a suffix of static length L (the pool's first L positions, a bucket of the
longest live sequence, see kv.bucket). The engine runs every lane while any probe is live and lane 0
alone (the captions) once they have all stopped: two shapes, and a long caption does not drag idle
probe slots.

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
import torch.nn.functional as F

from pipeline.models.moondream.config import ANSWER_ID, EOS_ID, LAYER_NORM_EPS, ROTARY_DIMS
from pipeline.models.moondream.layers import StackedLayers
from pipeline.models.moondream.text import TextModel
from pipeline.models.moondream.vision import gelu


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


def attention_kind(dtype: torch.dtype, device: torch.device, compiled: bool = False) -> str:
    """How ``attend`` gets each part's output and log-sum-exp, decided once, eagerly, so that a compiled step
    holds no try/except. PyTorch's public SDPA does not return the log-sum-exp that merging two key sets
    needs; aten's fused kernels do:
    "cpu_flash": both parts through aten's CPU flash-attention kernel (fused; masks; any float dtype);
    "cuda_flash": the prefix (no mask) through aten's CUDA flash kernel (bf16/fp16), the short per-slot
    suffix by hand in float32; "math": both by hand, in float32, as one softmax (where neither kernel is
    there).
    ``compiled`` (the step under torch.compile): on CPU, "math", which inductor fuses with the merge and
    its neighbours into a few C++ loops; the aten kernel is an opaque call inductor cannot fuse, and at
    decode's one query per slot its per-call setup cost more than the whole fused math (measured by
    bench/moondream.py). On CUDA the choice does not depend on compiling."""
    if compiled and device.type == "cpu":
        return "math"
    q = torch.zeros(1, 1, 1, 32, dtype=dtype, device=device)
    try:
        if device.type == "cpu":
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, False, attn_mask=q[..., :1])
            return "cpu_flash"
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, False)
            return "cuda_flash"
    except (RuntimeError, AttributeError, NotImplementedError):
        pass
    return "math"


def _part(kind: str, q, k, v, mask):
    """Attention of q (B, H, Q, d) over k/v (B, H, K, d) under an additive mask (broadcast to B, H, Q, K, or
    None): (output (B, H, Q, d), log-sum-exp of the scaled scores (B, H, Q), float32)."""
    if kind == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)
    if kind == "cuda_flash" and mask is None:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        return out[0], out[1][..., : q.shape[2]]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float()), lse


def attend(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_mask, lanes: int, kind: str):
    """Attention of N = lanes*M slots over their image's prefix plus their own suffix: two fused kernels,
    merged by log-sum-exp (by hand, kind "math": one softmax over both, _one_softmax). Slots are request-major (slot j*M + r: request j of the image in prefix row r),
    so the lanes queries of an image meet its prefix row in one kernel call, the prefix read once per
    step and never copied per prompt. q (N, H, Q, d); prefix_k/v (M, H, P, d); suffix_k/v (N, H, T, d);
    suffix_mask additive, (N or 1, 1, Q, T). Returns (N, H, Q, d) in q's dtype."""
    if kind == "math":
        return _one_softmax(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_mask, lanes)
    n, heads, n_q, head_dim = q.shape
    m = n // lanes
    grouped = q.view(lanes, m, heads, n_q, head_dim).permute(1, 2, 0, 3, 4).reshape(m, heads, lanes * n_q, head_dim)
    prefix_out, prefix_lse = _part(kind, grouped, prefix_k, prefix_v, None)
    prefix_out = prefix_out.view(m, heads, lanes, n_q, head_dim).permute(2, 0, 1, 3, 4).reshape(n, heads, n_q, head_dim)
    prefix_lse = prefix_lse.view(m, heads, lanes, n_q).permute(2, 0, 1, 3).reshape(n, heads, n_q)
    suffix_out, suffix_lse = _part(kind, q, suffix_k, suffix_v, suffix_mask)
    lse = torch.logaddexp(prefix_lse, suffix_lse)
    out = (prefix_out.float() * torch.exp(prefix_lse - lse).unsqueeze(-1)
           + suffix_out.float() * torch.exp(suffix_lse - lse).unsqueeze(-1))
    return out.to(q.dtype)


def _one_softmax(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_mask, lanes: int):
    """``attend`` by hand (kind "math"), in float32: one softmax over each slot's prefix row and its own
    suffix together (their scores share one max and one sum), so no second normalisation and no
    log-sum-exp merge. The same lanes grouping for the prefix products. Measured at 8 tiny layers, 64
    sequences, compiled on CPU: 0.79 -> 0.73 ms per step against the two-part merge (fewer passes and
    buffers; the host-bound step at 8 sequences unchanged)."""
    n, heads, n_q, head_dim = q.shape
    m, prefix = n // lanes, prefix_k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    qf = q.float()

    def ungroup(t, last):  # (M, H, lanes * Q, last) -> (N, H, Q, last), slot j*M + r
        return t.view(m, heads, lanes, n_q, last).permute(2, 0, 1, 3, 4).reshape(n, heads, n_q, last)

    def group(t, last):  # the inverse
        return t.view(lanes, m, heads, n_q, last).permute(1, 2, 0, 3, 4).reshape(m, heads, lanes * n_q, last)

    prefix_scores = ungroup(torch.matmul(group(qf, head_dim), prefix_k.float().transpose(-1, -2)), prefix) * scale
    suffix_scores = torch.matmul(qf, suffix_k.float().transpose(-1, -2)) * scale + suffix_mask
    top = torch.maximum(prefix_scores.amax(-1), suffix_scores.amax(-1)).unsqueeze(-1)
    prefix_p, suffix_p = torch.exp(prefix_scores - top), torch.exp(suffix_scores - top)
    total = (prefix_p.sum(-1) + suffix_p.sum(-1)).unsqueeze(-1)
    out = ungroup(torch.matmul(group(prefix_p, prefix), prefix_v.float()), head_dim) + torch.matmul(suffix_p, suffix_v.float())
    return (out / total).to(q.dtype)


def additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean mask as 0 / -inf in ``dtype`` (a boolean one is converted by the kernel in every layer)."""
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


Writer = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def run_suffix(text: TextModel, tokens, positions, prefix_k, prefix_v, write: Writer, mask, lanes: int, kind: str):
    """(N, Q) suffix tokens (the prompts of newly admitted images) at absolute ``positions`` through the
    decoder -> (N, Q, dim) hidden states. ``write(layer, k, v)`` stores the new keys/values and returns the
    suffix keys/values to attend to; prefix_k/v: per layer (M, H, P, d); mask additive (N or 1, 1, Q, T)."""
    x = text.embed(tokens)
    cos, sin = text.rope_cos[positions], text.rope_sin[positions]
    for i, block in enumerate(text.blocks):
        h = block.ln(x)
        q, k, v = block.attn.qkv_heads(h, cos, sin)
        suffix_k, suffix_v = write(i, k, v)
        out = attend(q, prefix_k[i], prefix_v[i], suffix_k, suffix_v, mask, lanes, kind)
        x = x + block.attn.merge(out) + block.mlp(h)
    return x


def decode_logits(text: TextModel, layers: StackedLayers, prefix_k, prefix_v, suffix_k, suffix_v, layer_index,
                  state: SlotState, rope: RopeTables, *, slots: int, lanes: int, length: int, prefix_len: int,
                  kind: str) -> torch.Tensor:
    """One token per slot: writes each pending token's key/value at its slot's ``pos`` and returns the raw
    (slots, vocab) logits. Pools (kv.py): (layers, rows, H, positions, d), ``layer_index`` (layers, 1); the first ``slots`` = lanes * M suffix
    slots, the first M = ``slots // lanes`` prefix rows and the first ``length`` suffix positions take part.
    The blocks' weights come stacked (layers.py: qkv with fc1 and proj with fc2 as one GEMM each). Per
    layer: layer norm, the input GEMM, rotary of q and k together, two in-place writes, the two attention
    kernels and their merge, the output GEMM and the residual sum."""
    m, dim = slots // lanes, text.config.dim
    heads, head_dim = text.config.n_heads, text.config.head_dim
    qkv_out = 3 * dim  # n_kv_heads == n_heads (config.py refuses other checkpoints)
    pos = state.pos[:slots]
    rows = torch.arange(slots, device=pos.device)
    visible = torch.arange(length, device=pos.device).view(1, length) <= pos.view(slots, 1)
    mask = additive(visible, suffix_k.dtype).view(slots, 1, 1, length)  # built once per step
    cos, sin = rope.cos[prefix_len + pos].unsqueeze(1), rope.sin[prefix_len + pos].unsqueeze(1)
    x = text.embed(state.tokens[:slots])
    # The parts of the pools this step reads, sliced once (a layer's is then one select).
    prefix_keys, prefix_values = prefix_k[:, :m], prefix_v[:, :m]
    suffix_keys, suffix_values = suffix_k[:, :slots, :, :length], suffix_v[:, :slots, :, :length]
    for i in range(text.config.n_layers):
        h = F.layer_norm(x, (dim,), layers.ln_w[i], layers.ln_b[i], LAYER_NORM_EPS)
        hidden = torch.addmm(layers.b_in[i], h, layers.w_in_t[i])  # [q, k, v, fc1 out]
        qk = rope.apply(hidden[:, : 2 * dim].view(slots, 2 * heads, head_dim), cos, sin)
        layer = layer_index[i]  # a (1,) tensor: one index_put on the whole pool, in place (kv.py)
        suffix_k[layer, rows, :, pos] = qk[:, heads:]
        suffix_v[layer, rows, :, pos] = hidden[:, 2 * dim : qkv_out].view(slots, heads, head_dim)
        out = attend(qk[:, :heads].unsqueeze(2), prefix_keys[i], prefix_values[i], suffix_keys[i], suffix_values[i],
                     mask, lanes, kind)
        both = torch.cat([out.reshape(slots, dim), gelu(hidden[:, qkv_out:])], dim=1)
        x = x + torch.addmm(layers.b_proj[i], both, layers.w_out_t[i]) + layers.b_fc2[i]
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


def decode_step(text: TextModel, layers: StackedLayers, prefix_k, prefix_v, suffix_k, suffix_v, layer_index,
                state: SlotState, rope: RopeTables, *, slots: int, lanes: int, length: int, prefix_len: int,
                kind: str) -> None:
    """What ``--compile`` compiles (fullgraph): one fixed-shape step of every slot, state updated in place."""
    logits = decode_logits(text, layers, prefix_k, prefix_v, suffix_k, suffix_v, layer_index, state, rope,
                           slots=slots, lanes=lanes, length=length, prefix_len=prefix_len, kind=kind)
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
