"""Batched, prefix-shared greedy generation for Moondream 2, with static memory and a fixed-shape step.

One ``generate`` call takes many images, each with its own list of prompts (caption and probes), and:
1. encodes the crops of all images together (chunked by ``vision_batch_crops``);
2. admits images into free rows of the prefix pool (kv.py: allocated once, one row per image in flight,
   ``max_sequences // G`` rows for G prompts per image): their prefixes (BOS + 729 image tokens) are
   prefilled together, and all their prompts together into the image's suffix slots (one per lane);
3. decodes every slot in one fixed-shape step (step.py): tokens, positions, caps and the active mask stay
   on the device, the stopping rule is applied there, nothing is copied or compacted;
4. looks at the device once every ``harvest_every`` steps (the only host syncs of the decode loop): finished
   sequences are read out, an image row whose sequences have all stopped is free, and free rows admit the
   next images, so the batch stays full while long captions finish.

``stream(requests, images_hint)`` keeps that loop open across calls (EngineStream): the caption actor
adds images as Ray batches arrive and takes finished ones out, so the engine drains only when its input
does (pipeline/stages/feeder.py StreamFeeder).

``compile=True`` compiles the decode step with ``fullgraph=True`` (on CUDA ``mode="reduce-overhead"``:
CUDA graphs; on CPU inductor's C++ wrapper, see _compile_step), plus, as before, the vision encoder and the
prefix prefill (dynamic shapes). The prompt prefill stays eager (once per admission, not per token).
TorchDynamo's full guard check is paid only by a step whose inputs changed (a grown pool, other sizes); the
others check only the guards that tell the compiled graphs apart (``_decode_steps``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.models.moondream import step
from pipeline.models.moondream.config import BOS_ID, EOS_ID
from pipeline.models.moondream.defaults import for_device
from pipeline.models.moondream.kv import KVPools, bucket
from pipeline.models.moondream.layers import stacked_layers
from pipeline.models.moondream.model import MoondreamModel
from pipeline.models.moondream.preprocess import MoondreamCrops
from pipeline.models.moondream.vision import normalise_crops

PREFIX_PREFILL_IMAGES = 8  # images per prefix prefill pass (bounds activation memory)


@dataclass(frozen=True)
class Request:
    """One prompt about one image."""

    prompt: tuple[int, ...]
    max_tokens: int
    yes_no: bool = False  # compute the probability of "yes" at the first step


@dataclass(frozen=True)
class Generation:
    ids: tuple[int, ...]
    hit_cap: bool
    yes_prob: float | None = None


@dataclass
class Slot:
    """Host-side record of a suffix slot's sequence (its tensors live in SlotState; its position bounds in
    _Batch's arrays)."""

    image: int  # index of the image in the generate() call
    index: int  # index of the request among the image's requests
    prompt_len: int
    limit: int  # max_tokens, lowered where the context window would overflow


class MoondreamEngine:
    def __init__(
        self,
        model: MoondreamModel,
        *,
        max_sequences: int | None = None,
        max_images: int | None = None,
        vision_batch_crops: int | None = None,
        yes_ids: Sequence[int] = (),
        no_ids: Sequence[int] = (),
        compile: bool = False,
        harvest_every: int | None = None,
    ):
        self.model = model
        self.config = model.config
        self.device = model.text.wte.device
        # Sizes not given are the device's (pipeline/models/moondream/defaults.py decides them).
        defaults = for_device(self.device)
        max_sequences = max_sequences or defaults.max_sequences
        vision_batch_crops = vision_batch_crops or defaults.vision_batch_crops
        self.harvest_every = harvest_every or defaults.harvest_every
        if max_sequences < 1 or vision_batch_crops < 1 or self.harvest_every < 1:
            raise ValueError("max_sequences, vision_batch_crops and harvest_every must be at least 1")
        self.dtype = model.text.wte.dtype
        self.max_sequences = max_sequences
        self.max_images = max_images or max_sequences
        self.vision_batch_crops = vision_batch_crops
        self.yes_ids = torch.tensor(list(yes_ids), dtype=torch.long, device=self.device)
        self.no_ids = torch.tensor(list(no_ids), dtype=torch.long, device=self.device)
        t = self.config.text
        self.prefix_len = self.config.prefix_len
        self.rope = step.RopeTables.build(model.text)
        # The decode step's weights, stacked once (the blocks' parameters become views of them); a parameter
        # replaced after this (model.to(...)) is not seen by this engine.
        self.layers = stacked_layers(model.text)
        self.attention = step.attention_kind(self.dtype, self.device)  # the eager prompt prefill's
        self.step_attention = step.attention_kind(self.dtype, self.device, compiled=compile)  # the decode step's
        self.pools = KVPools(t.n_layers, t.n_kv_heads, t.head_dim, self.prefix_len, self.dtype, self.device,
                             static=compile)
        self.state: step.SlotState | None = None
        self.compiled = compile
        self._encode_crops = model.vision.encode
        self._prefill_prefix = model.text.prefill_prefix
        self._step = step.decode_step
        # The inputs of the last step that ran every guard (_decode_steps), tensors held weakly: a pool
        # replaced is freed as before.
        self._checked_inputs: tuple = ()
        if compile:
            self._encode_crops = torch.compile(model.vision.encode, dynamic=True)
            self._prefill_prefix = torch.compile(model.text.prefill_prefix, dynamic=True)
            self._step = _compile_step(self.device)
            for t in self.layers.tensors():  # inputs, not parameters: CUDA graphs must not copy them per replay
                torch._dynamo.mark_static_address(t)

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

    def room(self) -> int:
        """Suffix positions the context window leaves after the image prefix."""
        return self.config.text.max_context - self.prefix_len

    @torch.inference_mode()
    def generate(
        self, images: Sequence[MoondreamCrops], requests: Sequence[Sequence[Request]]
    ) -> list[list[Generation]]:
        """For each image, one Generation per request, in order."""
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} images but {len(requests)} request lists")
        for per_image in requests:
            self._check(per_image)
        todo = [i for i in range(len(images)) if requests[i]]
        results: list[list[Generation | None]] = [[None] * len(r) for r in requests]
        if not todo:
            return results  # type: ignore[return-value]
        embeddings = self.embed_images([images[i] for i in todo])
        rows = {image: row for row, image in enumerate(todo)}

        def embed(chosen: list[int]) -> torch.Tensor:
            return embeddings[torch.tensor([rows[i] for i in chosen], device=self.device)]

        batch = _Batch(self, embed, requests, results, len(todo))
        batch.until_done(deque(todo))
        return results  # type: ignore[return-value]

    def stream(self, requests: Sequence[Request], images_hint: int) -> "EngineStream":
        """An open engine that images join as slots free up, each with these requests (see EngineStream)."""
        return EngineStream(self, requests, images_hint)

    def _check(self, requests: Sequence[Request]) -> None:
        room = self.room()
        for r in requests:
            if r.max_tokens < 1 or not r.prompt or len(r.prompt) >= room:
                raise ValueError(f"a request needs a prompt shorter than {room} tokens and max_tokens >= 1")

    # ------------------------------------------------------------------ the step and the first token
    # (a test harness overrides these two to record logits and force tokens; production runs them as is)

    def _decode(self, batch: "_Batch", length: int) -> None:
        p = self.pools
        self._step(self.model.text, self.layers, p.prefix_k, p.prefix_v, p.suffix_k, p.suffix_v, p.layer_index,
                   self.state, self.rope, slots=batch.lanes * batch.rows, lanes=batch.lanes, length=length,
                   prefix_len=self.prefix_len, kind=self.step_attention)

    def _decode_steps(self, batch: "_Batch", length: int, count: int) -> None:
        """``count`` decode steps (nothing is reallocated or resized between them). Compiled, a step whose
        inputs differ from the last fully checked step's (``_step_inputs``: other tensors, e.g. a grown pool,
        or other sizes) runs TorchDynamo's guards in full: that picks (or compiles) the graph for them.
        Every other step runs under ``skip_guard_eval_unsafe``, which still evaluates the guards that tell
        the cached graphs apart (every non-parameter tensor's shape, and each guard that has ever failed,
        e.g. the slot count or suffix length that caused a recompile) and skips the rest (the model's
        parameters': about 0.9 ms per step on CPU when every layer's were inputs, 0.06 ms now that the
        step takes stacked weights, layers.py). That is safe because such a step gets the very objects,
        with the same shapes, that a step passed every guard with, and the model, whose parameters are
        what goes unchecked, is the engine's own. (A global setting a caller changes between two calls of
        a stream, e.g. the default dtype, is not seen either; nothing in this package changes one.)"""
        if not self.compiled:
            for _ in range(count):
                self._decode(batch, length)
            return
        inputs = self._step_inputs(batch, length)
        if not _same_objects(inputs, self._checked_inputs):
            self._decode(batch, length)
            count -= 1
            # Past Dynamo's recompile limit a step runs eagerly, with no graph of its own among the cached
            # ones: then every step is fully guarded (no other graph may be taken for its inputs).
            self._checked_inputs = _held_weakly(inputs) if _below_recompile_limit() else ()
        stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if self._checked_inputs else None
        with stance or contextlib.nullcontext():
            for _ in range(count):
                self._decode(batch, length)

    def _step_inputs(self, batch: "_Batch", length: int) -> tuple:
        """What a decode step's guards look at that can change during the engine's life (the model, the rope
        tables, prefix_len and the attention kind cannot): the pool and state tensors and the sizes."""
        p = self.pools
        return (p.prefix_k, p.prefix_v, p.suffix_k, p.suffix_v, *self.state.tensors(), batch.lanes, batch.rows,
                length)

    def _first_tokens(self, batch: "_Batch", where: torch.Tensor, logits: torch.Tensor, real, limits, lengths,
                      yes_no: list[bool]) -> None:
        step.accept_first(self.state, where, logits, real, limits, lengths)
        if self.yes_ids.numel() and self.no_ids.numel() and any(yes_no):
            yes_no = torch.tensor(yes_no, device=self.device)
            probs = torch.softmax(logits.float(), dim=-1)
            yes, no = probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)
            p = yes / (yes + no).clamp_min(torch.finfo(torch.float32).tiny)
            self.state.yes_prob[where] = torch.where(yes_no, p, torch.full_like(p, float("nan")))
        else:
            self.state.yes_prob[where] = float("nan")

    def _reserve(self, images: int, slots: int, length: int, width: int) -> None:
        self.pools.reserve(images, slots, length)
        s = self.state
        if s is None or s.out.shape[0] < slots or s.out.shape[1] < width:
            self.state = step.SlotState.allocate(max(slots, 0 if s is None else s.out.shape[0]),
                                                 max(width, 0 if s is None else s.out.shape[1]), self.device)
            if self.compiled:
                for t in self.state.tensors():
                    torch._dynamo.mark_static_address(t)
        # Whatever an interrupted call left behind: no slot is live, every position in range.
        self.state.active.zero_()
        self.state.pos.zero_()


def _below_recompile_limit() -> bool:
    """Whether the compiled decode step has fewer graphs cached than TorchDynamo's recompile limit (beyond
    it Dynamo stops compiling and runs the step eagerly)."""
    try:  # private API: a torch without it gets every step fully guarded, the safe side
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(step.decode_step.__code__)
        return len(entries) < torch._dynamo.config.recompile_limit
    except AttributeError:
        return False


def _held_weakly(inputs: tuple) -> tuple:
    return tuple(weakref.ref(x) if isinstance(x, torch.Tensor) else x for x in inputs)


def _same_objects(inputs: tuple, held: tuple) -> bool:
    """Whether ``inputs`` are the very tensors (still alive) and the same sizes that ``held`` (from
    _held_weakly) refers to; never compares tensors' values."""
    return len(inputs) == len(held) and all(
        isinstance(y, weakref.ref) and x is y() if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(inputs, held))


def _compile_step(device: torch.device):
    """The decode step under torch.compile, fullgraph. On CUDA mode="reduce-overhead": one CUDA graph replays
    the step's kernels. On CPU inductor's C++ wrapper (``cpp_wrapper``, for this compile only): the calls of
    the step's fused kernels and matmuls from C++, not from a Python function per step, the CPU's nearest
    thing to a graph replay (bench/moondream.py measures it; compiling takes a few minutes longer)."""
    if device.type == "cuda":
        return torch.compile(step.decode_step, fullgraph=True, mode="reduce-overhead")
    # dynamic=False: a second slot count would otherwise recompile the step with symbolic sizes, which the C++
    # wrapper passes through about a hundred host-side scalar ops per step (item, lift_fresh, ...).
    # memory_planning: the step's intermediate buffers carved out of one allocation per call; without it the
    # wrapper allocated each (about 500 per step at 24 layers, ~0.5 us each: measured 0.50 -> 0.41 ms of host
    # time per step at 8 tiny layers, bench/moondream.py's definition).
    # size_asserts off: the wrapper re-checked every input's sizes and strides on every call (13% of its own
    # time at 8 tiny layers), which the graph's guards already decided when it was picked: a step gets the
    # tensors a fully guarded step passed with (_decode_steps), whose shapes the skipped guards still check.
    return torch.compile(step.decode_step, fullgraph=True, dynamic=False,
                         options={"cpp_wrapper": True, "memory_planning": True, "size_asserts": False})


class _Batch:
    """One generate() call or stream: which image holds which prefix row, which sequence which slot.

    ``requests``/``results`` are indexed by image (a list, or a dict a stream adds to); the sizes are those
    of the requests present when it starts (a stream's images all have the same requests), and
    ``embed(images)`` gives the (n, 729, dim) embeddings of the images being admitted."""

    def __init__(self, engine: MoondreamEngine, embed, requests, results, images: int):
        self.e = engine
        self.embed = embed
        self.requests = requests
        self.results = results
        live = [r for r in (requests.values() if isinstance(requests, dict) else requests) if r]
        self.group = max(len(r) for r in live)  # G: lanes (suffix slots per image row)
        # Rows: what the caps allow, or fewer for a small call (a power of two, so that a compiled step sees
        # few distinct shapes).
        cap = max(1, min(engine.max_images, engine.max_sequences // self.group))
        self.rows = min(cap, 1 << (max(1, images) - 1).bit_length())
        self.slots = self.rows * self.group  # slot j * rows + r: request j of the image in row r
        self.lanes = self.group  # lanes the next steps run: all, or only lane 0 once no other is live
        self.row_image: list[int | None] = [None] * self.rows
        self.slot: list[Slot | None] = [None] * self.slots
        # The same facts as arrays, so that a harvest period's bookkeeping is a few numpy calls, not a Python
        # pass over every slot: which slots hold a live sequence, an upper bound of the suffix positions each
        # has written (host arithmetic, no sync) and where its cap ends (prompt length + token cap).
        self.live = np.zeros(self.slots, dtype=bool)
        self.bound = np.zeros(self.slots, dtype=np.int64)
        self.end = np.zeros(self.slots, dtype=np.int64)
        room = engine.room()
        limits = [self.limits(per_image) for per_image in live]
        self.prompt_width = max(len(r.prompt) for per_image in live for r in per_image)
        longest = max(len(r.prompt) + lim for per_image, lims in zip(live, limits) for r, lim in zip(per_image, lims))
        self.length_cap = bucket(longest, room)
        self.out_width = max(lim for lims in limits for lim in lims) + 1
        first = min(self.length_cap, bucket(self.prompt_width + engine.harvest_every, room))
        engine._reserve(self.rows, self.slots, first, self.out_width)

    def limits(self, requests: Sequence[Request]) -> list[int]:
        """Token caps, lowered where the context window would overflow."""
        return [min(r.max_tokens, self.e.room() - len(r.prompt)) for r in requests]

    # -------------------------------------------------------------- loop

    def until_done(self, pending: deque) -> None:
        while self.advance(pending) is not None:
            pass

    def advance(self, pending: deque) -> list[int] | None:
        """Admit what fits, decode ``harvest_every`` steps, harvest: the images finished (None when idle)."""
        e = self.e
        self.admit(pending)
        if all(image is None for image in self.row_image):
            return None
        self.lanes = self.group if self.live[self.rows :].any() else 1
        self.bound = np.minimum(self.bound + e.harvest_every, self.end)  # after this period's steps
        length = bucket(int(self.bound[self.live].max()), self.length_cap)
        e.pools.grow_suffix(length)
        e._decode_steps(self, length, e.harvest_every)
        return self.harvest()

    def admit(self, pending: deque) -> None:
        free = [row for row, image in enumerate(self.row_image) if image is None]
        # Admit in batches (a prefill of one image at a time would waste the accelerator), but never
        # leave the decoder idle.
        busy = len(free) < self.rows
        if not pending or not free or (busy and len(free) < min(len(pending), max(1, self.rows // 4))):
            return
        chosen = free[: len(pending)]
        for start in range(0, len(chosen), PREFIX_PREFILL_IMAGES):
            rows = chosen[start : start + PREFIX_PREFILL_IMAGES]
            self._admit_images(rows, [pending.popleft() for _ in rows])

    def _admit_images(self, rows: list[int], images: list[int]) -> None:
        e, text, g = self.e, self.e.model.text, self.group
        device = e.device
        caches = e.prefix_caches(self.embed(images))
        row_index = torch.tensor(rows, device=device)
        e.pools.write_prefix(row_index, caches)
        for row, image in zip(rows, images):
            self.row_image[row] = image

        # Prompts: one slot per lane (an image with fewer prompts leaves the rest empty), prefilled together,
        # right-padded to the longest prompt of the call; keys/values go straight into the image's slots.
        width, n = self.prompt_width, len(rows) * g
        tokens, lengths, limits, real, yes_no, where = [], [], [], [], [], []
        for j in range(g):  # request-major, like the pool: the prefill's attention groups the same way
            for row, image in zip(rows, images):
                where.append(j * self.rows + row)
                if j < len(self.requests[image]):
                    r, limit = self.requests[image][j], self.limits(self.requests[image])[j]
                    k = j * self.rows + row
                    self.slot[k] = Slot(image, j, len(r.prompt), limit)
                    self.live[k], self.bound[k], self.end[k] = True, len(r.prompt), len(r.prompt) + limit
                    prompt = list(r.prompt)
                else:
                    r, limit, prompt = None, 1, [EOS_ID]
                tokens.append(prompt + [EOS_ID] * (width - len(prompt)))
                lengths.append(len(prompt))
                limits.append(limit)
                real.append(r is not None)
                yes_no.append(bool(r and r.yes_no))
        slot_index = torch.tensor(where, device=device)
        e.pools.grow_suffix(bucket(width, self.length_cap))
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = step.additive(causal, e.dtype).view(1, 1, width, width)

        def write(layer, k, v):
            e.pools.suffix_k[layer][slot_index, :, :width] = k
            e.pools.suffix_v[layer][slot_index, :, :width] = v
            return k, v

        prefix_k, prefix_v = [k for k, _ in caches], [v for _, v in caches]
        del caches
        positions = (e.prefix_len + torch.arange(width, device=device)).expand(n, width)
        hidden = step.run_suffix(text, torch.tensor(tokens, device=device), positions, prefix_k, prefix_v, write,
                                 mask, g, e.attention)
        lengths_t = torch.tensor(lengths, device=device)
        logits = text.logits(hidden[torch.arange(n, device=device), lengths_t - 1])
        e._first_tokens(self, slot_index, logits, torch.tensor(real, device=device),
                        torch.tensor(limits, device=device), lengths_t, yes_no)

    def harvest(self) -> list[int]:
        """The decode loop's one look at the device (one transfer): which slots stopped, their ids, cap flags
        and yes-probabilities; rows whose sequences all stopped are freed, their images returned."""
        s, n, width = self.e.state, self.slots, self.out_width
        bits = s.yes_prob[:n].view(torch.int32).long()  # float32 carried bit for bit in the same transfer
        flat = torch.cat([s.active[:n].long(), s.produced[:n], s.hit_cap[:n].long(), bits,
                          s.out[:n, :width].reshape(-1)]).cpu().numpy()
        active, produced, hit_cap = flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n]
        yes_probs = flat[3 * n : 4 * n].astype(np.int32).view(np.float32)
        ids = flat[4 * n :].reshape(n, width)
        stopped = np.flatnonzero(self.live & (active == 0))  # only these are visited
        # Read out as Python lists in one call per field: the loop then touches no numpy scalar.
        unasked = np.isnan(yes_probs[stopped]).tolist()
        for k, row, n_ids, cap, p, nan in zip(stopped.tolist(), ids[stopped].tolist(), produced[stopped].tolist(),
                                              hit_cap[stopped].astype(bool).tolist(), yes_probs[stopped].tolist(),
                                              unasked):
            slot = self.slot[k]
            self.results[slot.image][slot.index] = Generation(tuple(row[:n_ids]), cap, None if nan else p)
            self.slot[k] = None
        self.live[stopped] = False
        idle_rows = ~self.live.reshape(self.group, self.rows).any(0)  # slot j*M + r is lane j of row r
        done = []
        for row in np.flatnonzero(idle_rows).tolist():
            if self.row_image[row] is not None:
                done.append(self.row_image[row])
                self.row_image[row] = None
        return done


class EngineStream:
    """An engine kept full across calls: images join as rows free up, finished ones leave, nothing drains.

    Every image gets the same ``requests`` (the caption and the probes). ``add`` queues an image (host-side
    crops; it is encoded when admitted, a vision pass per admitted group); ``advance`` admits queued images
    into free rows, decodes ``harvest_every`` steps and returns the images finished since, as (key,
    generations). Rows: enough for ``images_hint`` images, up to the engine's caps. One stream at a time per
    engine: a ``generate`` call (or a new stream) reuses the engine's memory, and this stream is then over.
    If ``advance`` raises (out of memory, say) the stream is broken: its images are for the caller to retry.
    """

    def __init__(self, engine: MoondreamEngine, requests: Sequence[Request], images_hint: int):
        if not requests:
            raise ValueError("a stream needs at least one request per image")
        engine._check(requests)
        self.e = engine
        self._requests = tuple(requests)
        self._crops: dict[int, MoondreamCrops] = {}
        self._keys: dict[int, object] = {}
        self._pending: deque[int] = deque()
        self._batch: _Batch | None = None
        self._hint = max(1, images_hint)
        self._next = 0

    def add(self, key, crops: MoondreamCrops) -> None:
        image, self._next = self._next, self._next + 1
        self._crops[image], self._keys[image] = crops, key
        self._pending.append(image)

    def __len__(self) -> int:
        """Images queued or decoding."""
        return len(self._keys)

    @torch.inference_mode()
    def advance(self) -> list[tuple[object, list[Generation]]]:
        if self._batch is None and self._pending:
            # Sized by the same requests as every image; the dicts grow as images are admitted.
            self._batch = _Batch(self.e, self._embed, {-1: self._requests}, {}, self._hint)
            del self._batch.requests[-1]
        if self._batch is None:
            return []
        for image in self._pending:
            if image not in self._batch.requests:
                self._batch.requests[image] = self._requests
                self._batch.results[image] = [None] * len(self._requests)
        done = self._batch.advance(self._pending) or []
        out = []
        for image in done:
            out.append((self._keys.pop(image), self._batch.results.pop(image)))
            del self._batch.requests[image]
        return out

    def _embed(self, images: list[int]) -> torch.Tensor:
        return self.e.embed_images([self._crops.pop(i) for i in images])
