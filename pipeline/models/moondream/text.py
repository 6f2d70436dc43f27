"""Moondream 2 text decoder (Phi-1.5 style): weights, rotary tables, the image prefix prefill.

Each block is ``x + attn(ln(x)) + mlp(ln(x))`` (one LayerNorm, attention and MLP
in parallel). Rotary embeddings cover the first 32 dims of each head with the
NeoX half split (pairs j, j+16); like the reference, the rotated dims are
stored interleaved (r0, i0, r1, i1, ...) for both q and k, which leaves the
scores unchanged and keeps our cached keys identical to the reference's.

The prompts and answers (the suffix) are run by pipeline/models/moondream/step.py,
which attends to each image's prefix (stored once, shared by all its prompts) and
to each sequence's own suffix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.moondream.config import LAYER_NORM_EPS, ROPE_THETA, ROTARY_DIMS, TextConfig
from pipeline.models.moondream.vision import MLP


def rope_tables(max_context: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_context, ROTARY_DIMS // 2), float32, computed as the reference does
    (a complex exponential of float32 angles), so the tables match it bit for bit."""
    half = ROTARY_DIMS // 2
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, ROTARY_DIMS, 2, dtype=torch.float32)[:half] / ROTARY_DIMS))
    angles = torch.arange(max_context, dtype=torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    rotation = torch.exp(1j * angles)
    return rotation.real.contiguous().to(device), rotation.imag.contiguous().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, head_dim); cos/sin (B or 1, T, 16) for each query's position."""
    half = ROTARY_DIMS // 2
    real, imag = x[..., :half], x[..., half:ROTARY_DIMS]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    return torch.cat([rotated.to(x.dtype), x[..., ROTARY_DIMS:]], dim=-1)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. With bf16 weights, attention scores, probabilities and outputs
    must not be rounded to bf16 midway (the reference's fused SDPA keeps them in float32). CUDA
    writes float32 straight from bf16 operands (probabilities are then rounded to bf16, as GPU
    fused kernels do); elsewhere the operands are upcast."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.matmul(a, b)
    if a.is_cuda and _BMM_OUT_DTYPE[0]:
        a = a.to(b.dtype)
        try:
            out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
            return out.view(*a.shape[:-1], b.shape[-1])
        except (RuntimeError, TypeError, NotImplementedError):  # a torch build without bmm(out_dtype=)
            _BMM_OUT_DTYPE[0] = False
    return torch.matmul(a.float(), b.float())


_BMM_OUT_DTYPE = [True]


class TextAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.qkv = nn.Linear(c.dim, c.dim + 2 * c.n_kv_heads * c.head_dim)
        self.proj = nn.Linear(c.dim, c.dim)

    def qkv_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, T, dim) -> rotated q, rotated k, v, each (B, H, T, head_dim)."""
        batch, length, dim = x.shape
        head_dim = dim // self.n_heads
        q, k, v = (
            t.view(batch, length, self.n_heads, head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)
        )
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        batch, heads, length, head_dim = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


class TextBlock(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.ln = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.attn = TextAttention(c)
        self.mlp = MLP(c.dim, c.ff_dim, c.dim)


class TextModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Parameter(torch.empty(c.vocab_size, c.dim))
        self.blocks = nn.ModuleList(TextBlock(c) for _ in range(c.n_layers))
        self.post_ln = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(c.dim, c.vocab_size)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def setup_rope(self, device) -> None:
        # Computed, not loaded: the checkpoint has no rotary table (it is a non-persistent buffer upstream).
        self.rope_cos, self.rope_sin = rope_tables(self.config.max_context, device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.wte)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, dim) last hidden states -> (n, vocab) logits."""
        return self.lm_head(self.post_ln(hidden))

    def prefill_prefix(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, 730, dim) BOS + image embeddings -> per layer (k, v), each (B, H, 730, head_dim).
        Attention within the prefix is bidirectional, as in the reference."""
        length = x.shape[1]
        cos, sin = self.rope_cos[:length].unsqueeze(0), self.rope_sin[:length].unsqueeze(0)
        caches = []
        for i, block in enumerate(self.blocks):
            h = block.ln(x)
            q, k, v = block.attn.qkv_heads(h, cos, sin)
            caches.append((k, v))
            if i + 1 < len(self.blocks):  # the last block's output feeds nothing
                attn = block.attn.merge(F.scaled_dot_product_attention(q, k, v))
                x = x + attn + block.mlp(h)
        return caches
