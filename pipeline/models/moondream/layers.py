"""The text blocks' weights stacked over the layers, for the decode step: a handful of tensors, not ~10 per layer.

A decode step's fixed cost grows with the tensors it is handed: TorchDynamo checks and the compiled
graph's wrapper takes in, size-checks and releases each one per call (sampled on CPU at 8 tiny layers:
over a third of the compiled wrapper's time went to its 128 inputs). Stacked, the 24 layers' 240
parameters are 7 tensors, and the step indexes them by layer inside the graph, where a view is free.

Each block is ``x + proj(attn(ln(x))) + fc2(gelu(fc1(ln(x))))``: qkv and fc1 read the same ln(x), so
they are one GEMM over ``w_in`` ((qkv + ff) x dim), and proj and fc2 add into the same residual, so they
are one GEMM of ``[attention out, gelu(fc1 out)]`` over ``w_out`` (dim x (dim + ff)): two GEMMs per layer
instead of four (fewer, larger kernels on any device; the same products, summed in another order).

No weight is copied for good: each block's parameters become views of the stacks (their values are
unchanged, so the eager paths and the checkpoint's names are untouched), and the stacks are built once
per model. Replacing a parameter later (``model.to(...)``, a load with ``assign=True``) breaks that
sharing; ``stacked_layers`` notices and stacks again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.moondream.text import TextModel


@dataclass(frozen=True)
class StackedLayers:
    ln_w: torch.Tensor  # (L, dim)
    ln_b: torch.Tensor  # (L, dim)
    w_in: torch.Tensor  # (L, qkv_out + ff, dim): rows [qkv | fc1]
    b_in: torch.Tensor  # (L, qkv_out + ff)
    w_out: torch.Tensor  # (L, dim, dim + ff): columns [proj | fc2]
    b_proj: torch.Tensor  # (L, dim)
    b_fc2: torch.Tensor  # (L, dim)
    # The two weight stacks transposed (views), as the GEMMs take them: one select per layer, not two.
    w_in_t: torch.Tensor  # (L, dim, qkv_out + ff)
    w_out_t: torch.Tensor  # (L, dim + ff, dim)

    def tensors(self) -> list[torch.Tensor]:
        """What the decode step reads."""
        return [self.ln_w, self.ln_b, self.w_in_t, self.b_in, self.w_out_t, self.b_proj, self.b_fc2]


# Each stack: its field, the block parameters it holds (indices into _block_parameters' lists) and the
# dimension of a layer's slice they are concatenated along (None: one parameter per layer).
_KINDS = (("ln_w", (0,), None), ("ln_b", (1,), None), ("w_in", (2, 4), 0), ("b_in", (3, 5), 0),
          ("w_out", (6, 8), 1), ("b_proj", (7,), None), ("b_fc2", (9,), None))


def _block_parameters(text: TextModel) -> list[list[torch.nn.Parameter]]:
    return [[b.ln.weight, b.ln.bias, b.attn.qkv.weight, b.attn.qkv.bias, b.mlp.fc1.weight, b.mlp.fc1.bias,
             b.attn.proj.weight, b.attn.proj.bias, b.mlp.fc2.weight, b.mlp.fc2.bias] for b in text.blocks]


def _parts(stack: torch.Tensor, layer: int, sizes: list[int], cat_dim: int | None) -> list[torch.Tensor]:
    """The views of one layer's slice of ``stack`` that its parameters are, in order."""
    if cat_dim is None:
        return [stack[layer]]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [stack[layer].narrow(cat_dim, start, size) for start, size in zip(starts, sizes)]


def _same_view(p: torch.Tensor, view: torch.Tensor) -> bool:
    return (p.data_ptr(), p.shape, p.stride(), p.dtype, p.device) == (
        view.data_ptr(), view.shape, view.stride(), view.dtype, view.device)


def _shares(stack: StackedLayers, text: TextModel) -> bool:
    """Whether every block parameter is still its view of ``stack``."""
    for layer, params in enumerate(_block_parameters(text)):
        for field, indices, cat_dim in _KINDS:
            sizes = [params[k].shape[cat_dim] for k in indices] if cat_dim is not None else []
            views = _parts(getattr(stack, field), layer, sizes, cat_dim)
            if not all(_same_view(params[k], view) for k, view in zip(indices, views)):
                return False
    return True


def stacked_layers(text: TextModel) -> StackedLayers:
    """The model's stacks, built on first use (and again if a parameter was replaced since)."""
    stack = getattr(text, "_stacked_layers", None)
    if stack is not None and _shares(stack, text):
        return stack
    params = _block_parameters(text)
    built = {}
    with torch.no_grad():
        # One kind at a time, each layer copied into its slice and its parameters re-pointed at once, so
        # the originals can go as the stack fills: the transient extra memory is about one stack.
        for field, indices, cat_dim in _KINDS:
            first = [params[0][k] for k in indices]
            sizes = [t.shape[cat_dim] for t in first] if cat_dim is not None else []
            shape = list(first[0].shape)
            if cat_dim is not None:
                shape[cat_dim] = sum(sizes)
            built[field] = torch.empty(len(params), *shape, dtype=first[0].dtype, device=first[0].device)
            for layer, layer_params in enumerate(params):
                for k, view in zip(indices, _parts(built[field], layer, sizes, cat_dim)):
                    view.copy_(layer_params[k])
                    layer_params[k].data = view
    stack = StackedLayers(**built, w_in_t=built["w_in"].transpose(1, 2), w_out_t=built["w_out"].transpose(1, 2))
    object.__setattr__(text, "_stacked_layers", stack)  # a plain attribute: not in state_dict()
    return stack
