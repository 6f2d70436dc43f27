"""Moondream 2 sizes, prompt token ids and generation limits.

Sizes default to the official 2025-06-21 release; a checkpoint directory's
config.json may override them in its ``config`` field (``{"text": {...},
"vision": {...}}``), which is how tiny test checkpoints describe themselves.
Whatever the source, ``check_shapes`` compares the sizes with the tensors in
model.safetensors before anything is loaded, so a mismatch is one clear error
rather than a shape failure deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# Fixed by the architecture (not configurable upstream either).
ROTARY_DIMS = 32  # first 32 of each 64-dim head are rotated
ROPE_THETA = 10000.0
LAYER_NORM_EPS = 1e-5

# Prompt token ids (starmie-v1 tokenizer); the reference hard-codes them.
BOS_ID = 0
EOS_ID = 0
ANSWER_ID = 3  # <|md_reserved_2|>: ends a prompt; masked out while decoding
CAPTION_PROMPTS: Mapping[str, tuple[int, ...]] = {
    "short": (1, 32708, 2, 12492, 3),
    "normal": (1, 32708, 2, 6382, 3),
    "long": (1, 32708, 2, 4059, 3),
}
QUERY_PREFIX = (1, 15381, 2)
# reasoning=False: the reference appends the [3] suffix twice.
QUERY_SUFFIX = (3, 3)

# The reference's default token cap (caption and query alike).
REFERENCE_MAX_TOKENS = 768
# Caption budgets per length: normal and long keep the reference's cap so they
# end at EOS exactly where the reference does; a short caption is one sentence,
# so a smaller budget only bounds a degenerate loop.
CAPTION_BUDGETS: Mapping[str, int] = {"short": 256, "normal": REFERENCE_MAX_TOKENS, "long": REFERENCE_MAX_TOKENS}


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the configured sizes."""


def read_config(config_path: Path | None) -> "MoondreamConfig":
    """Official sizes, overridden by config.json's ``config`` field when there is one (json only, no
    torch: the CPU preprocess stage reads the crop geometry from here without loading weights)."""
    if config_path is None or not Path(config_path).is_file():
        return MoondreamConfig()
    try:
        data = json.loads(Path(config_path).read_text())
    except ValueError as exc:
        raise CheckpointMismatch(f"{config_path} is not valid JSON: {exc}") from exc
    overrides = data.get("config") if isinstance(data, dict) else None
    return MoondreamConfig.from_dict(overrides if isinstance(overrides, dict) else None)


@dataclass(frozen=True)
class TextConfig:
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    vocab_size: int = 51200
    max_context: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 32

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class CropGeometry:
    """How an image is cut into crops for the vision encoder (what the CPU preprocess stage needs)."""

    crop_size: int  # pixels per crop side
    patch_size: int  # pixels per patch side
    overlap_margin: int  # patches each local crop shares with its neighbours, per side
    max_crops: int  # default bound on local crops; CaptionConfig.max_crops may lower it


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_out_dim: int = 2048
    # Crop geometry (with enc_patch_size): see CropGeometry.
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4
    proj_inner_dim: int = 8192

    @property
    def grid(self) -> int:
        """Patches per crop side (27)."""
        return self.crop_size // self.enc_patch_size

    @property
    def crop_geometry(self) -> CropGeometry:
        return CropGeometry(self.crop_size, self.enc_patch_size, self.overlap_margin, self.max_crops)


@dataclass(frozen=True)
class MoondreamConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()

    @property
    def prefix_len(self) -> int:
        """BOS + one token per vision patch of the global crop (730)."""
        return 1 + self.vision.grid**2

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> "MoondreamConfig":
        """Official sizes overridden by config.json's ``config`` field; unknown keys are ignored
        (``prefix_attn``, ``group_size``, ``region`` and ``tokenizer`` only matter to features we do not use)."""
        config = config or {}

        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (values or {}).items() if k in names})

        made = cls(build(TextConfig, config.get("text")), build(VisionConfig, config.get("vision")))
        made.validate()
        return made

    def validate(self) -> None:
        t, v = self.text, self.vision
        if t.dim % t.n_heads:
            raise CheckpointMismatch(f"text dim {t.dim} does not split into {t.n_heads} heads")
        if t.n_kv_heads != t.n_heads:  # Moondream 2 has none; grouped-query attention is not implemented
            raise CheckpointMismatch(f"n_kv_heads {t.n_kv_heads} != n_heads {t.n_heads} is not supported")
        if t.head_dim < ROTARY_DIMS:
            raise CheckpointMismatch(f"text head dim {t.head_dim} is below the {ROTARY_DIMS} rotary dims")
        if v.enc_dim % v.enc_n_heads:
            raise CheckpointMismatch(f"vision dim {v.enc_dim} does not split into {v.enc_n_heads} heads")
        if v.crop_size % v.enc_patch_size or v.grid <= 2 * v.overlap_margin:
            raise CheckpointMismatch(f"crop size {v.crop_size} / patch {v.enc_patch_size} / margin {v.overlap_margin}")
        if max(max(p) for p in CAPTION_PROMPTS.values()) >= t.vocab_size:
            raise CheckpointMismatch(f"vocab_size {t.vocab_size} does not cover the prompt token ids")
        if v.proj_out_dim != t.dim:
            raise CheckpointMismatch(f"vision proj_out_dim {v.proj_out_dim} must equal text dim {t.dim}")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this implementation loads (official key names), with its shape."""
        t, v = self.text, self.vision
        patch_dim = v.in_channels * v.enc_patch_size**2
        qkv_dim = t.dim + 2 * t.n_kv_heads * t.head_dim
        shapes: dict[str, tuple[int, ...]] = {}

        def linear(name, n_in, n_out):
            shapes[f"{name}.weight"] = (n_out, n_in)
            shapes[f"{name}.bias"] = (n_out,)

        def norm(name, n):
            shapes[f"{name}.weight"] = (n,)
            shapes[f"{name}.bias"] = (n,)

        linear("model.vision.patch_emb", patch_dim, v.enc_dim)
        shapes["model.vision.pos_emb"] = (1, v.grid**2, v.enc_dim)
        for i in range(v.enc_n_layers):
            b = f"model.vision.blocks.{i}"
            norm(f"{b}.ln1", v.enc_dim)
            linear(f"{b}.attn.qkv", v.enc_dim, 3 * v.enc_dim)
            linear(f"{b}.attn.proj", v.enc_dim, v.enc_dim)
            norm(f"{b}.ln2", v.enc_dim)
            linear(f"{b}.mlp.fc1", v.enc_dim, v.enc_ff_dim)
            linear(f"{b}.mlp.fc2", v.enc_ff_dim, v.enc_dim)
        norm("model.vision.post_ln", v.enc_dim)
        linear("model.vision.proj_mlp.fc1", 2 * v.enc_dim, v.proj_inner_dim)
        linear("model.vision.proj_mlp.fc2", v.proj_inner_dim, v.proj_out_dim)
        shapes["model.text.wte"] = (t.vocab_size, t.dim)
        for i in range(t.n_layers):
            b = f"model.text.blocks.{i}"
            norm(f"{b}.ln", t.dim)
            linear(f"{b}.attn.qkv", t.dim, qkv_dim)
            linear(f"{b}.attn.proj", t.dim, t.dim)
            linear(f"{b}.mlp.fc1", t.dim, t.ff_dim)
            linear(f"{b}.mlp.fc2", t.ff_dim, t.dim)
        norm("model.text.post_ln", t.dim)
        linear("model.text.lm_head", t.dim, t.vocab_size)
        return shapes

    def check_shapes(self, actual: Mapping[str, tuple[int, ...]], source: str) -> None:
        """Raise CheckpointMismatch naming the first differences between ``actual`` and these sizes."""
        expected = self.expected_shapes()
        missing = [k for k in expected if k not in actual]
        wrong = [f"{k} is {list(actual[k])}, expected {list(s)}" for k, s in expected.items()
                 if k in actual and tuple(actual[k]) != s]
        # model.region.* (detect/point heads) is in the official file but unused here.
        unknown = [k for k in actual if k not in expected and not k.startswith("model.region.")]
        if not (missing or wrong or unknown):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shapes differ (e.g. {'; '.join(wrong[:3])})")
        if unknown:
            parts.append(f"{len(unknown)} unexpected tensors (e.g. {', '.join(unknown[:3])})")
        raise CheckpointMismatch(
            f"{source} is not a Moondream 2 checkpoint of the configured sizes: {'; '.join(parts)}. "
            "The official vikhyatk/moondream2 model.safetensors matches the default sizes; a smaller checkpoint "
            "must describe its sizes in config.json's \"config\" field ({\"text\": {...}, \"vision\": {...}})."
        )
