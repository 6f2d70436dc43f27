"""Static key/value pools: allocated once per engine, slots fixed, nothing compacted.

One tensor per layer for keys and one for values, each (rows, heads, P + G*L, head_dim): a row per image
in flight holds its prefix (BOS + 729 image tokens) at positions [0, P), then the suffixes (prompt and
answer) of its G lanes, lane j at [P + j*L, P + (j+1)*L). So the keys an image's sequences attend to are
one contiguous span per row, and a decode step runs one fused attention kernel (SDPA) over it with a
static mask, the prefix read once per image, never copied per prompt; running only the first lanes (the
captions, once every probe stopped) attends over the first P + lanes*L positions.

A sequence keeps its (row, lane) until it stops; retiring flips its active flag and admission overwrites
free rows. Rows and lanes are sized by the first call (a later call needing more reallocates, between
calls, when nothing is live). L starts at the bucket the first sequences need and doubles (one copy) only
when a longer sequence than any before appears, so memory follows the longest answer actually seen rather
than the largest cap, and a compiled step sees only a few shapes (one graph each).
"""

from __future__ import annotations

import torch

MIN_BUCKET = 32


def bucket(needed: int, cap: int) -> int:
    """The suffix length of a lane: the next power of two >= needed (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, needed - 1).bit_length()))


class KVPools:
    def __init__(self, n_layers: int, heads: int, head_dim: int, prefix_len: int, dtype, device, static: bool):
        self.n_layers, self.heads, self.head_dim, self.prefix_len = n_layers, heads, head_dim, prefix_len
        self.dtype, self.device = dtype, device
        self.static = static  # mark for torch.compile: fixed addresses (CUDA graphs replay on them)
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.rows = self.lanes = self.suffix_length = 0

    def _zeros(self, rows: int, lanes: int, length: int) -> list[torch.Tensor]:
        """One tensor per layer: separate tensors, not one stacked tensor, so that a compiled step's
        index_put writes in place (into a view of a stacked tensor, inductor copied the whole layer)."""
        out = []
        for _ in range(self.n_layers):
            # Zeros, not empty: masked positions get probability 0, and 0 * NaN garbage would still be NaN.
            t = torch.zeros(rows, self.heads, self.prefix_len + lanes * length, self.head_dim, dtype=self.dtype,
                            device=self.device)
            if self.static:
                torch._dynamo.mark_static_address(t)
            out.append(t)
        return out

    def reserve(self, rows: int, lanes: int, length: int) -> None:
        """Between calls (nothing live): at least ``rows`` image rows of ``lanes`` lanes of ``length``."""
        if self.k is None or self.rows < rows or self.lanes < lanes or self.suffix_length < length:
            self.rows, self.lanes = max(rows, self.rows), max(lanes, self.lanes)
            self.suffix_length = max(length, self.suffix_length)
            self.k = self.v = None  # free before allocating the replacement
            self.k = self._zeros(self.rows, self.lanes, self.suffix_length)
            self.v = self._zeros(self.rows, self.lanes, self.suffix_length)

    def grow_suffix(self, length: int) -> None:
        """During a call: longer lanes, live keys/values copied once."""
        old = self.suffix_length
        if length <= old:
            return
        p = self.prefix_len
        for name in ("k", "v"):
            layers = getattr(self, name)
            fresh = self._zeros(self.rows, self.lanes, length)
            for new, layer in zip(fresh, layers):
                new[:, :, :p] = layer[:, :, :p]
                for j in range(self.lanes):
                    new[:, :, p + j * length : p + j * length + old] = layer[:, :, p + j * old : p + (j + 1) * old]
            setattr(self, name, fresh)
        self.suffix_length = length

    def write_prefix(self, rows: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        p = self.prefix_len
        for layer, (k, v) in enumerate(caches):
            self.k[layer][rows, :, :p] = k
            self.v[layer][rows, :, :p] = v

    def write_prompts(self, layer: int, rows: torch.Tensor, lanes: torch.Tensor, k, v) -> None:
        """k, v (n, heads, width, head_dim) of n prompts at the start of lane ``lanes[i]`` of row ``rows[i]``."""
        width = k.shape[2]
        columns = (self.prefix_len + lanes * self.suffix_length).view(-1, 1) + torch.arange(width, device=k.device)
        self.k[layer][rows.view(-1, 1), :, columns] = k.transpose(1, 2)
        self.v[layer][rows.view(-1, 1), :, columns] = v.transpose(1, 2)
