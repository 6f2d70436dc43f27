"""Static key/value pools: allocated once per engine, slots fixed, nothing compacted.

The prefix pool holds one row per image in flight (BOS + 729 image tokens, every layer); the suffix pool
one row per sequence slot (prompt and answer). A sequence keeps its slot until it stops; retiring flips
its active flag and admission overwrites free slots. Rows are sized by the first call (a later call
needing more reallocates, between calls, when nothing is live). The suffix length starts at the bucket
the first sequences need and doubles (one copy) only when a longer sequence than any before appears, so
memory follows the longest answer actually seen rather than the largest cap, and a compiled step sees
only a few lengths (one graph each).
"""

from __future__ import annotations

import torch

MIN_BUCKET = 32


def bucket(needed: int, cap: int) -> int:
    """The suffix length a step attends over: the next power of two >= needed (at least MIN_BUCKET), at most cap."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, needed - 1).bit_length()))


class KVPools:
    """Four tensors, (layers, rows, heads, positions, head_dim) each: prefix and suffix keys and values.

    One tensor per kind, not one per layer: a decode step's fixed cost grows with the tensors it is
    handed (layers.py says why). The step writes a layer's new keys with one index_put on the whole
    tensor (layer, slot and position as index tensors, ``layer_index``), which a compiled step does in
    place; writing through the layer's view instead made inductor copy the whole layer every step."""

    def __init__(self, n_layers: int, heads: int, head_dim: int, prefix_len: int, dtype, device, static: bool):
        self.n_layers, self.heads, self.head_dim, self.prefix_len = n_layers, heads, head_dim, prefix_len
        self.dtype, self.device = dtype, device
        self.static = static  # mark for torch.compile: fixed addresses (CUDA graphs replay on them)
        self.prefix_k = self.prefix_v = self.suffix_k = self.suffix_v = None
        # (layers, 1): layer_index[i] indexes the first dimension as a tensor (an index_put, not a view)
        self.layer_index = torch.arange(n_layers, device=device).view(n_layers, 1)
        if static:
            torch._dynamo.mark_static_address(self.layer_index)

    def _zeros(self, rows: int, length: int) -> torch.Tensor:
        # Zeros, not empty: masked positions get probability 0, and 0 * NaN garbage would still be NaN.
        t = torch.zeros(self.n_layers, rows, self.heads, length, self.head_dim, dtype=self.dtype, device=self.device)
        if self.static:
            torch._dynamo.mark_static_address(t)
        return t

    @property
    def suffix_length(self) -> int:
        return 0 if self.suffix_k is None else self.suffix_k.shape[3]

    def reserve(self, images: int, slots: int, length: int) -> None:
        """Between calls (nothing live): at least ``images`` prefix rows, ``slots`` suffix rows of ``length``."""
        if self.prefix_k is None or self.prefix_k.shape[1] < images:
            self.prefix_k = self.prefix_v = None  # free before allocating the replacement
            self.prefix_k, self.prefix_v = self._zeros(images, self.prefix_len), self._zeros(images, self.prefix_len)
        if self.suffix_k is None or self.suffix_k.shape[1] < slots or self.suffix_length < length:
            length = max(length, self.suffix_length)
            self.suffix_k = self.suffix_v = None
            self.suffix_k, self.suffix_v = self._zeros(slots, length), self._zeros(slots, length)

    def grow_suffix(self, length: int) -> None:
        """During a call: a longer suffix, live keys/values copied once."""
        if length <= self.suffix_length:
            return
        old = self.suffix_length
        for name in ("suffix_k", "suffix_v"):
            layers = getattr(self, name)
            fresh = self._zeros(layers.shape[1], length)
            fresh[:, :, :, :old] = layers
            setattr(self, name, fresh)

    def write_prefix(self, rows: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in enumerate(caches):
            self.prefix_k[layer][rows] = k
            self.prefix_v[layer][rows] = v
