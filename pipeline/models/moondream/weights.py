"""Load an official-layout model.safetensors (+ optional config.json) into MoondreamModel.

Shapes are read from the file header and checked against the configured sizes
before any tensor is read; tensors are then read one by one, cast, and moved
straight to the target device (the model is built on the meta device, so no
random initialisation or extra copy happens).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models.moondream.config import read_config
from pipeline.models.moondream.model import MoondreamModel

KEY_PREFIX = "model."


def read_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def load_model(
    weights_path: Path, config_path: Path | None, device: str | torch.device, dtype: torch.dtype
) -> MoondreamModel:
    from safetensors import safe_open

    config = read_config(config_path)
    config.check_shapes(read_shapes(weights_path), source=str(weights_path))
    with torch.device("meta"):
        model = MoondreamModel(config)
    state = {}
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        for key in config.expected_shapes():
            state[key[len(KEY_PREFIX) :]] = f.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.text.setup_rope(device)
    return model.eval().requires_grad_(False)
