"""A test harness around MoondreamEngine: per-step logits and teacher forcing, off the production path.

``TracingEngine`` is the engine run eagerly with one host look per step. For a ``Traced`` request it keeps
every step's raw logits (float32, CPU: the prompt's last logits, then one row per fed-back token) and,
with ``forced_ids``, feeds those ids instead of the argmax and stops after them, by the same rule as
the engine (the cap is checked before each forced id). Plain requests in the same call run exactly as in
production, on the same device-side stopping rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.moondream import step
from pipeline.models.moondream.engine import MoondreamEngine, Request


@dataclass(frozen=True)
class Traced:
    request: Request
    forced_ids: tuple[int, ...] | None = None
    record_logits: bool = True


@dataclass(frozen=True)
class TracedGeneration:
    ids: tuple[int, ...]
    hit_cap: bool
    yes_prob: float | None
    logits: torch.Tensor | None  # (steps, vocab) when record_logits


class TracingEngine(MoondreamEngine):
    def __init__(self, model, **kwargs):
        super().__init__(model, compile=False, **kwargs)
        self._traced: dict[tuple[int, int], Traced] = {}
        self._logits: dict[tuple[int, int], list[torch.Tensor]] = {}

    def generate(self, images, requests):
        self._traced = {(i, j): t for i, per in enumerate(requests) for j, t in enumerate(per) if isinstance(t, Traced)}
        self._logits = {key: [] for key in self._traced}
        plain = [[t.request if isinstance(t, Traced) else t for t in per] for per in requests]
        out = super().generate(images, plain)
        for (i, j), t in self._traced.items():
            g = out[i][j]
            logits = torch.stack(self._logits[(i, j)]) if t.record_logits else None
            out[i][j] = TracedGeneration(g.ids, g.hit_cap, g.yes_prob, logits)
        return out

    def _first_tokens(self, batch, where, logits, real, limits, lengths, yes_no):
        super()._first_tokens(batch, where, logits, real, limits, lengths, yes_no)
        raw = logits.float().cpu()
        for k, index in enumerate(where.tolist()):
            self._trace(batch, index, raw[k], first=True)

    def _decode(self, batch, length):
        s, p, n = self.state, self.pools, batch.lanes * batch.rows
        logits = step.decode_logits(self.model.text, self.layers, p.prefix_k, p.prefix_v, p.suffix_k, p.suffix_v,
                                    p.layer_index, s, self.rope,
                                    slots=n, lanes=batch.lanes, length=length, prefix_len=self.prefix_len,
                                    kind=self.attention)
        raw = logits.float().cpu()
        before = [t[:n].clone() for t in (s.active, s.produced, s.pos, s.tokens, s.hit_cap)]
        step.advance(s, logits, n)
        for index in range(n):
            if batch.slot[index] is None or not bool(before[0][index]):
                continue
            if self._trace(batch, index, raw[index], first=False):
                for tensor, old in zip((s.active, s.produced, s.pos, s.tokens, s.hit_cap), before):
                    tensor[index] = old[index]  # undo the argmax step for this slot: forced instead
                slot = batch.slot[index]
                self._force(index, self._traced[(slot.image, slot.index)].forced_ids, slot.limit, first=False)

    def _trace(self, batch, index: int, logits: torch.Tensor, first: bool) -> bool:
        """Record this slot's logits; force its token (first step here). True if the slot is forced."""
        slot = batch.slot[index]
        t = self._traced.get((slot.image, slot.index)) if slot else None
        if t is None:
            return False
        if t.record_logits:
            self._logits[(slot.image, slot.index)].append(logits)
        if t.forced_ids is None:
            return False
        if first:
            self._force(index, t.forced_ids, slot.limit, first=True)
        return True

    def _force(self, index: int, forced: tuple[int, ...], limit: int, first: bool) -> None:
        s = self.state
        n = 0 if first else int(s.produced[index])
        s.produced[index] = n
        if n >= len(forced):
            s.active[index] = False
            return
        if n >= limit:
            s.active[index], s.hit_cap[index] = False, True
            return
        s.out[index, n] = forced[n]
        s.tokens[index] = forced[n]
        s.produced[index] = n + 1
        s.active[index] = True
        if not first:
            s.pos[index] += 1
