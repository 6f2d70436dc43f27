"""Moondream 2 vision side: crops -> 729 image embeddings per image.

A SigLIP-style encoder (patch embedding, learned positions, pre-LN blocks with
bidirectional attention) runs on every crop of every image in one batch; each
image's local crops are then stitched into one feature map (overlap margins
dropped between tiles), average-pooled back to the 27x27 grid, concatenated
with the global crop's features and projected to the text width.
Module and parameter names follow the official checkpoint (``model.vision.*``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.moondream.config import LAYER_NORM_EPS, VisionConfig


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.fc1 = nn.Linear(n_in, n_hidden)
        self.fc2 = nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            t.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.enc_dim, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(c.enc_dim, c.enc_n_heads)
        self.ln2 = nn.LayerNorm(c.enc_dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(c.enc_dim, c.enc_ff_dim, c.enc_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def normalise_crops(crops_uint8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]; the reference casts first, then does the
    arithmetic in the model dtype, so the same order is kept here."""
    return crops_uint8.permute(0, 3, 1, 2).to(dtype).div_(255.0).sub_(0.5).div_(0.5)


@lru_cache(maxsize=64)
def stitch_index(tiling: tuple[int, int], grid: int, margin: int) -> np.ndarray:
    """For the stitched (rows*(grid-2m)+2m) x (cols*(grid-2m)+2m) map of an image's local crops,
    the index of each cell in the flattened (n_local*grid*grid) crop features. Tiles keep their
    outer margins only at the image border, so every cell comes from exactly one tile."""
    rows, cols = tiling
    step = grid - 2 * margin

    def axis(n_tiles: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(n_tiles * step + 2 * margin)
        tile = np.clip((pos - margin) // step, 0, n_tiles - 1)
        return tile, pos - tile * step

    tile_y, y = axis(rows)
    tile_x, x = axis(cols)
    crop = tile_y[:, None] * cols + tile_x[None, :]
    return (crop * grid * grid + y[:, None] * grid + x[None, :]).reshape(-1)


class VisionModel(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_emb = nn.Linear(c.in_channels * c.enc_patch_size**2, c.enc_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.grid**2, c.enc_dim))
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.enc_n_layers))
        self.post_ln = nn.LayerNorm(c.enc_dim, eps=LAYER_NORM_EPS)
        self.proj_mlp = MLP(2 * c.enc_dim, c.proj_inner_dim, c.proj_out_dim)

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, 378, 378) normalised crops -> (N, 729, enc_dim) features."""
        n, channels, height, width = crops.shape
        p = self.config.enc_patch_size
        # Patches flattened in (channel, row, col) order, as patch_emb's weight expects.
        x = crops.reshape(n, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(n, (height // p) * (width // p), channels * p * p)
        x = self.patch_emb(x) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.post_ln(x)

    def stitch_and_pool(self, local: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        """One image's (n_local, 729, C) local features -> (729, C): stitched, then pooled to 27x27."""
        c = self.config
        rows, cols = tiling
        step = c.grid - 2 * c.overlap_margin
        index = torch.from_numpy(stitch_index(tuple(tiling), c.grid, c.overlap_margin)).to(local.device)
        stitched = local.reshape(-1, local.shape[-1]).index_select(0, index)
        stitched = stitched.view(rows * step + 2 * c.overlap_margin, cols * step + 2 * c.overlap_margin, -1)
        pooled = F.adaptive_avg_pool2d(stitched.permute(2, 0, 1), (c.grid, c.grid))
        return pooled.permute(1, 2, 0).reshape(c.grid * c.grid, -1)

    def project(self, features: torch.Tensor, tilings: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Features of all crops of several images (each image: global crop, then its tiles, in
        order) -> (n_images, 729, text dim) image embeddings."""
        combined, start = [], 0
        for rows, cols in tilings:
            n_local = rows * cols
            pooled = self.stitch_and_pool(features[start + 1 : start + 1 + n_local], (rows, cols))
            combined.append(torch.cat([features[start], pooled], dim=-1))
            start += 1 + n_local
        if start != features.shape[0]:
            raise ValueError(f"tilings cover {start} crops but {features.shape[0]} were encoded")
        return self.proj_mlp(torch.stack(combined))
