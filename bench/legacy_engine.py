"""The Moondream engine as it was before the static engine (main at a4284d2), kept for the bench only.

bench/moondream.py measures it side by side with pipeline/models/moondream/engine.py ("before" and
"after"), and tests/test_moondream_static.py checks that both give the same ids. Growing pools,
per-step index tensors built from Python lists, one host sync per token, stopping decided in Python.
Its attention (``shared_prefix_attention``) and suffix forward pass moved here from text.py unchanged.
Nothing under pipeline/ imports this file.

One ``generate`` call takes many images, each with its own list of prompts
(caption and probes), and:
1. encodes the crops of all images together (chunked by ``vision_batch_crops``);
2. admits images while the sequence cap allows: their prefixes (BOS + 729 image
   tokens) are prefilled together into a prefix pool, one row per image, and
   all their prompts are prefilled together into a suffix pool, one row per
   sequence;
3. decodes every live sequence of every admitted image in one step, each
   attending to its image's prefix row (shared, never copied per prompt) and
   its own suffix row;
4. retires a sequence as soon as it stops (EOS, or its token cap, by the
   reference's rule) and an image when its last sequence stops, compacting the
   pools by moving the last live rows into the holes; freed capacity admits the
   next images, so the batch stays full while long captions finish.
Memory is bounded by ``max_sequences`` (suffix rows) and ``max_images``
(prefix rows); both pools grow on demand up to those caps.

Stopping rule (reference ``_generate_answer``): the first token is the argmax of
the prompt's last logits; a token equal to EOS ends the sequence and is not
emitted; after ``max_tokens`` emitted tokens the next token is computed and, if
it is not EOS, the sequence is marked as having hit its cap. From the second
step on, the answer token id (3) is masked out before the argmax.
"""

from __future__ import annotations

from collections import deque
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.models.moondream.config import ANSWER_ID, BOS_ID, EOS_ID
from pipeline.models.moondream.model import MoondreamModel
from pipeline.models.moondream.preprocess import MoondreamCrops
from pipeline.models.moondream.text import matmul_fp32
from pipeline.models.moondream.vision import normalise_crops

DEFAULT_MAX_SEQUENCES = 64
# Crops per vision encoder pass: large on a GPU; small on CPU, where big activations (hundreds of MB
# per pass) measured slower per crop than passes of 8.
DEFAULT_VISION_BATCH_CROPS = {"cuda": 64, "cpu": 8}
PREFIX_PREFILL_IMAGES = 8  # images per prefix prefill pass (bounds activation memory)


@dataclass(frozen=True)
class Request:
    """One prompt about one image."""

    prompt: tuple[int, ...]
    max_tokens: int
    yes_no: bool = False  # compute the probability of "yes" at the first step
    # Test/diagnostic only: feed these ids instead of the argmax (teacher forcing) and stop after them.
    forced_ids: tuple[int, ...] | None = None
    record_logits: bool = False  # keep every step's raw logits (float32, CPU)


@dataclass(frozen=True)
class Generation:
    ids: tuple[int, ...]
    hit_cap: bool
    yes_prob: float | None = None
    logits: torch.Tensor | None = None  # (steps, vocab) when Request.record_logits


@dataclass
class _Sequence:
    image: int  # index of the image in the generate() call
    index: int  # index of the request among the image's requests
    request: Request
    limit: int = 0  # max_tokens, lowered where the context window would overflow
    filled: int = 0  # suffix cache slots holding keys/values
    ids: list[int] = field(default_factory=list)
    pending: int | None = None  # emitted token not yet fed back
    done: bool = False
    hit_cap: bool = False
    yes_prob: float | None = None
    logits: list[torch.Tensor] = field(default_factory=list)


def shared_prefix_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    row_image: torch.Tensor,
    row_group: torch.Tensor,
    n_groups: int,
    suffix_visible: torch.Tensor,
) -> torch.Tensor:
    """Attention of n sequences over their image's prefix plus their own suffix.

    q (n, H, Q, d); prefix_k/v (m, H, P, d), one row per image; suffix_k/v (n, H, T, d);
    row_image (n,) which prefix row each sequence uses; row_group (n,) a distinct slot per
    sequence among those of the same image (< n_groups); suffix_visible (n or 1, 1, Q, T) bool.
    Returns (n, H, Q, d).
    """
    n, heads, n_q, head_dim = q.shape
    m, _, prefix_len, _ = prefix_k.shape
    scale = 1.0 / math.sqrt(head_dim)
    # Queries grouped by image: (m, H, groups*Q, d), empty slots stay zero.
    grouped = q.new_zeros(m, n_groups, heads, n_q, head_dim)
    grouped[row_image, row_group] = q
    grouped = grouped.permute(0, 2, 1, 3, 4).reshape(m, heads, n_groups * n_q, head_dim)
    prefix_scores = matmul_fp32(grouped, prefix_k.transpose(-1, -2))
    prefix_scores = prefix_scores.view(m, heads, n_groups, n_q, prefix_len).permute(0, 2, 1, 3, 4)
    prefix_scores = prefix_scores[row_image, row_group]  # (n, H, Q, P)
    suffix_scores = matmul_fp32(q, suffix_k.transpose(-1, -2))  # (n, H, Q, T)
    suffix_scores = suffix_scores.masked_fill(~suffix_visible, float("-inf"))
    scores = torch.cat([prefix_scores, suffix_scores], dim=-1) * scale
    probs = torch.softmax(scores, dim=-1)
    prefix_probs, suffix_probs = probs[..., :prefix_len], probs[..., prefix_len:]
    grouped_probs = probs.new_zeros(m, n_groups, heads, n_q, prefix_len)
    grouped_probs[row_image, row_group] = prefix_probs
    grouped_probs = grouped_probs.permute(0, 2, 1, 3, 4).reshape(m, heads, n_groups * n_q, prefix_len)
    prefix_out = matmul_fp32(grouped_probs, prefix_v).view(m, heads, n_groups, n_q, head_dim)
    prefix_out = prefix_out.permute(0, 2, 1, 3, 4)[row_image, row_group]
    return (prefix_out + matmul_fp32(suffix_probs, suffix_v)).to(q.dtype)


def forward_suffix(
    self,
    x: torch.Tensor,
    positions: torch.Tensor,
    write: Callable,
    prefixes: list[tuple[torch.Tensor, torch.Tensor]],
    row_image: torch.Tensor,
    row_group: torch.Tensor,
    n_groups: int,
    suffix_visible: torch.Tensor,
) -> torch.Tensor:
    """Run (n, Q, dim) suffix tokens through the decoder; ``write(layer, k, v)`` stores their keys
    and values in the sequences' suffix caches and returns those caches (n, H, T, d) to attend to.
    Returns the (n, Q, dim) hidden states before post_ln."""
    cos, sin = self.rope_cos[positions], self.rope_sin[positions]
    for i, block in enumerate(self.blocks):
        h = block.ln(x)
        q, k, v = block.attn.qkv_heads(h, cos, sin)
        suffix_k, suffix_v = write(i, k, v)
        prefix_k, prefix_v = prefixes[i]
        out = shared_prefix_attention(
            q, prefix_k, prefix_v, suffix_k, suffix_v, row_image, row_group, n_groups, suffix_visible
        )
        x = x + block.attn.merge(out) + block.mlp(h)
    return x


class _KVPool:
    """Per-layer key/value rows (rows, heads, length, head_dim); the live rows are packed at the front.
    Capacity grows by doubling, up to ``max_rows`` rows; the length grows the same way."""

    def __init__(self, n_layers: int, heads: int, head_dim: int, dtype, device, max_rows: int):
        self.shape = (heads, head_dim)
        self.dtype, self.device = dtype, device
        self.max_rows = max_rows
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.n_layers = n_layers
        self.rows = 0
        self.length = 0

    def ensure(self, rows: int, length: int, keep_length: int) -> None:
        if rows <= self.rows and length <= self.length:
            return
        # Never fewer rows than asked for (an image with more prompts than the cap still runs alone).
        new_rows = self.rows if rows <= self.rows else max(rows, min(self.max_rows, 2 * self.rows))
        new_length = self.length if length <= self.length else max(length, 2 * self.length)
        heads, head_dim = self.shape
        for store in (self.k, self.v):
            for i in range(self.n_layers):
                # Zeros, not empty: masked slots get probability 0, and 0 * NaN garbage would still be NaN.
                fresh = torch.zeros(new_rows, heads, new_length, head_dim, dtype=self.dtype, device=self.device)
                if self.rows and keep_length:
                    fresh[: self.rows, :, :keep_length] = store[i][:, :, :keep_length]
                if self.rows:
                    store[i] = fresh
                else:
                    store.append(fresh)
        self.rows, self.length = new_rows, new_length

    def move(self, sources: list[int], targets: list[int], length: int) -> None:
        if not sources:
            return
        src = torch.tensor(sources, device=self.device)
        dst = torch.tensor(targets, device=self.device)
        for store in (self.k, self.v):
            for layer in store:
                layer[dst, :, :length] = layer[src, :, :length]


class MoondreamEngine:
    def __init__(
        self,
        model: MoondreamModel,
        *,
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
        max_images: int | None = None,
        vision_batch_crops: int | None = None,
        yes_ids: Sequence[int] = (),
        no_ids: Sequence[int] = (),
        compile: bool = False,
    ):
        self.model = model
        self.config = model.config
        self.device = model.text.wte.device
        if vision_batch_crops is None:
            vision_batch_crops = DEFAULT_VISION_BATCH_CROPS.get(self.device.type, 8)
        if max_sequences < 1 or vision_batch_crops < 1:
            raise ValueError("max_sequences and vision_batch_crops must be at least 1")
        self.dtype = model.text.wte.dtype
        self.max_sequences = max_sequences
        self.max_images = max_images or max_sequences
        self.vision_batch_crops = vision_batch_crops
        self.yes_ids, self.no_ids = list(yes_ids), list(no_ids)
        t = self.config.text
        self.prefix_len = self.config.prefix_len
        self._prefix = _KVPool(t.n_layers, t.n_kv_heads, t.head_dim, self.dtype, self.device, self.max_images)
        self._suffix = _KVPool(t.n_layers, t.n_kv_heads, t.head_dim, self.dtype, self.device, max_sequences)
        self._encode_crops = model.vision.encode
        self._prefill_prefix = model.text.prefill_prefix
        if compile:
            # Shapes vary with crop and image counts; the decode step stays eager (its Python
            # bookkeeping would break the graph every step).
            self._encode_crops = torch.compile(model.vision.encode, dynamic=True)
            self._prefill_prefix = torch.compile(model.text.prefill_prefix, dynamic=True)

    # ------------------------------------------------------------------ vision

    @torch.inference_mode()
    def embed_images(self, images: Sequence[MoondreamCrops]) -> torch.Tensor:
        """(n_images, 729, text dim) image embeddings; crops of several images share encoder passes."""
        out, group, group_crops = [], [], 0
        for i, image in enumerate(images):
            group.append(image)
            group_crops += image.n_crops
            if group_crops >= self.vision_batch_crops or i == len(images) - 1:
                out.append(self._embed_group(group))
                group, group_crops = [], 0
        if not out:
            return torch.empty(0, self.prefix_len - 1, self.config.text.dim, dtype=self.dtype, device=self.device)
        return torch.cat(out)

    def _embed_group(self, images: list[MoondreamCrops]) -> torch.Tensor:
        crops = torch.from_numpy(np.concatenate([im.crops for im in images]))
        if self.device.type == "cuda":
            crops = crops.pin_memory()
        crops = crops.to(self.device, non_blocking=True)
        features = []
        for start in range(0, crops.shape[0], self.vision_batch_crops):
            chunk = normalise_crops(crops[start : start + self.vision_batch_crops], self.dtype)
            features.append(self._encode_crops(chunk))
        return self.model.vision.project(torch.cat(features), [im.tiling for im in images])

    # ------------------------------------------------------------------ text

    @torch.inference_mode()
    def prefix_caches(self, embeddings: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v) of shape (n_images, heads, 730, head_dim) for (n_images, 729, dim) embeddings."""
        text = self.model.text
        bos = text.embed(torch.tensor([BOS_ID], device=self.device)).expand(embeddings.shape[0], 1, -1)
        return self._prefill_prefix(torch.cat([bos, embeddings], dim=1))

    @torch.inference_mode()
    def generate(
        self, images: Sequence[MoondreamCrops], requests: Sequence[Sequence[Request]]
    ) -> list[list[Generation]]:
        """For each image, one Generation per request, in order."""
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images but {len(requests)} request lists")
        room = self.config.text.max_context - self.prefix_len
        for per_image in requests:
            for r in per_image:
                if r.max_tokens < 1 or not r.prompt or len(r.prompt) >= room:
                    raise ValueError(f"a request needs a prompt shorter than {room} tokens and max_tokens >= 1")
        todo = [i for i in range(len(images)) if requests[i]]
        results: list[list[Generation | None]] = [[None] * len(r) for r in requests]
        if not todo:
            return results  # type: ignore[return-value]
        embeddings = self.embed_images([images[i] for i in todo])
        run = _Run(self, {image: embeddings[row] for row, image in enumerate(todo)}, requests, results)
        run.until_done(deque(todo))
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ helpers used by _Run

    def first_step_yes_prob(self, logits: torch.Tensor) -> torch.Tensor | None:
        if not self.yes_ids or not self.no_ids:
            return None
        probs = torch.softmax(logits.float(), dim=-1)
        yes = probs[:, self.yes_ids].sum(-1)
        no = probs[:, self.no_ids].sum(-1)
        return yes / (yes + no).clamp_min(torch.finfo(torch.float32).tiny)


class _Run:
    """State of one generate() call: which images and sequences are live, in which pool rows."""

    def __init__(self, engine: MoondreamEngine, embeddings, requests, results):
        self.e = engine
        self.embeddings = embeddings
        self.requests = requests
        self.results = results
        self.seqs: list[_Sequence] = []  # suffix pool row -> sequence
        self.images: list[int] = []  # prefix pool row -> image
        self._layout: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # -------------------------------------------------------------- loop

    def until_done(self, pending: deque) -> None:
        while pending or self.seqs:
            self.admit(pending)
            self.retire()
            if self.seqs:
                self.decode_step()
                self.retire()

    def admit(self, pending: deque) -> None:
        e = self.e
        free = e.max_sequences - len(self.seqs)
        waiting = sum(len(self.requests[i]) for i in pending)
        # Admit in batches (a prefill of one image at a time would waste the accelerator), but never
        # leave the decoder idle.
        if not pending or (self.seqs and free < min(waiting, max(1, e.max_sequences // 4))):
            return
        batch: list[int] = []
        while pending and len(self.images) + len(batch) < e.max_images:
            need = len(self.requests[pending[0]])
            if need > free and (self.seqs or batch):
                break
            batch.append(pending.popleft())
            free -= need
        for start in range(0, len(batch), PREFIX_PREFILL_IMAGES):
            self._admit_images(batch[start : start + PREFIX_PREFILL_IMAGES])

    def _admit_images(self, batch: list[int]) -> None:
        e, text = self.e, self.e.model.text
        # Prefixes: one pool row per image.
        caches = e.prefix_caches(torch.stack([self.embeddings.pop(i) for i in batch]))
        first_image_row = len(self.images)
        e._prefix.ensure(first_image_row + len(batch), e.prefix_len, keep_length=e.prefix_len)
        for layer, (k, v) in enumerate(caches):
            e._prefix.k[layer][first_image_row : first_image_row + len(batch)] = k
            e._prefix.v[layer][first_image_row : first_image_row + len(batch)] = v
        self.images.extend(batch)
        del caches

        # Prompts: one suffix row per sequence, prefilled together (right-padded to the longest).
        room = e.config.text.max_context - e.prefix_len
        new = [_Sequence(image, j, r, limit=min(r.max_tokens, room - len(r.prompt)))
               for image in batch for j, r in enumerate(self.requests[image])]
        first_row, n = len(self.seqs), len(new)
        lengths = [len(s.request.prompt) for s in new]
        width = max(lengths)
        filled = max([s.filled for s in self.seqs], default=0)
        e._suffix.ensure(first_row + n, width, keep_length=filled)
        tokens = torch.tensor([list(s.request.prompt) + [EOS_ID] * (width - len(s.request.prompt)) for s in new],
                              device=e.device)
        image_row = {image: first_image_row + k for k, image in enumerate(batch)}
        row_image = torch.tensor([image_row[s.image] - first_image_row for s in new], device=e.device)
        row_group = torch.tensor([s.index for s in new], device=e.device)
        n_groups = max(len(self.requests[i]) for i in batch)
        positions = (e.prefix_len + torch.arange(width, device=e.device)).expand(n, width)
        causal = torch.ones(width, width, dtype=torch.bool, device=e.device).tril().view(1, 1, width, width)
        rows = slice(first_row, first_row + n)

        def write(layer, k, v):
            e._suffix.k[layer][rows, :, :width] = k
            e._suffix.v[layer][rows, :, :width] = v
            return e._suffix.k[layer][rows, :, :width], e._suffix.v[layer][rows, :, :width]

        prefixes = [(pk[first_image_row : first_image_row + len(batch)], pv[first_image_row : first_image_row + len(batch)])
                    for pk, pv in zip(e._prefix.k, e._prefix.v)]
        hidden = forward_suffix(text, text.embed(tokens), positions, write, prefixes, row_image, row_group, n_groups,
                                     causal)
        last = torch.tensor([length - 1 for length in lengths], device=e.device)
        logits = text.logits(hidden[torch.arange(n, device=e.device), last])
        first = logits.argmax(-1).tolist()
        wants_yes = [k for k, s in enumerate(new) if s.request.yes_no]
        if wants_yes:
            probs = e.first_step_yes_prob(logits[wants_yes])
            for k, p in zip(wants_yes, probs.tolist() if probs is not None else [None] * len(wants_yes)):
                new[k].yes_prob = p
        for k, s in enumerate(new):
            s.filled = lengths[k]
            self._record(s, logits[k])
            self._accept(s, first[k])
        self.seqs.extend(new)
        self._layout = None

    def decode_step(self) -> None:
        e, text = self.e, self.e.model.text
        n = len(self.seqs)
        slots = torch.tensor([s.filled for s in self.seqs], device=e.device)
        used = max(s.filled for s in self.seqs) + 1
        e._suffix.ensure(n, used, keep_length=used - 1)
        tokens = torch.tensor([[s.pending] for s in self.seqs], device=e.device)
        rows = torch.arange(n, device=e.device)
        visible = (torch.arange(used, device=e.device).view(1, used) <= slots.view(n, 1)).view(n, 1, 1, used)

        def write(layer, k, v):
            e._suffix.k[layer][rows, :, slots] = k[:, :, 0]
            e._suffix.v[layer][rows, :, slots] = v[:, :, 0]
            return e._suffix.k[layer][:n, :, :used], e._suffix.v[layer][:n, :, :used]

        row_image, row_group, n_groups = self._decode_layout()
        m = len(self.images)
        prefixes = [(pk[:m], pv[:m]) for pk, pv in zip(e._prefix.k, e._prefix.v)]
        hidden = forward_suffix(text, text.embed(tokens), (e.prefix_len + slots).view(n, 1), write, prefixes,
                                     row_image, row_group, n_groups, visible)
        logits = text.logits(hidden[:, -1])
        for k, s in enumerate(self.seqs):
            self._record(s, logits[k])
        logits[:, ANSWER_ID] = float("-inf")
        for s, token in zip(self.seqs, logits.argmax(-1).tolist()):
            s.filled += 1
            self._accept(s, token)

    # -------------------------------------------------------------- bookkeeping

    @staticmethod
    def _record(s: _Sequence, logits: torch.Tensor) -> None:
        if s.request.record_logits:
            s.logits.append(logits.float().cpu())

    @staticmethod
    def _accept(s: _Sequence, token: int) -> None:
        forced = s.request.forced_ids
        if forced is not None:
            if len(s.ids) >= len(forced):
                s.done = True
                return
            token = forced[len(s.ids)]
        elif token == EOS_ID:
            s.done = True
            return
        if len(s.ids) >= s.limit:
            s.done, s.hit_cap = True, True
            return
        s.ids.append(token)
        s.pending = token

    def _decode_layout(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self._layout is None:
            image_row = {image: row for row, image in enumerate(self.images)}
            seen: dict[int, int] = {}
            groups = []
            for s in self.seqs:
                groups.append(seen.get(s.image, 0))
                seen[s.image] = groups[-1] + 1
            device = self.e.device
            self._layout = (
                torch.tensor([image_row[s.image] for s in self.seqs], device=device),
                torch.tensor(groups, device=device),
                max(seen.values()),
            )
        return self._layout

    def retire(self) -> None:
        dead = [row for row, s in enumerate(self.seqs) if s.done]
        if not dead:
            return
        for row in dead:
            s = self.seqs[row]
            logits = torch.stack(s.logits) if s.logits else None
            self.results[s.image][s.index] = Generation(tuple(s.ids), s.hit_cap, s.yes_prob, logits)
        used = max(s.filled for s in self.seqs) + 1
        self.seqs = self._compact(self.seqs, [s.done for s in self.seqs], self.e._suffix, used)
        live_images = {s.image for s in self.seqs}
        self.images = self._compact(self.images, [i not in live_images for i in self.images], self.e._prefix,
                                     self.e.prefix_len)
        self._layout = None

    @staticmethod
    def _compact(items: list, dead: list[bool], pool: _KVPool, length: int) -> list:
        """Drop dead rows: live rows beyond the new end move into the holes (only they are copied)."""
        n_live = len(items) - sum(dead)
        holes = [row for row in range(n_live) if dead[row]]
        movers = [row for row in range(n_live, len(items)) if not dead[row]]
        pool.move(movers, holes, length)
        items = list(items)
        for hole, mover in zip(holes, movers):
            items[hole] = items[mover]
        return items[:n_live]
