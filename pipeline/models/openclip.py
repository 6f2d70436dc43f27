"""open_clip image/text embedder (CLIP, SigLIP, ...): one shared space for both.

Three sources, all loaded through open_clip's own factory:
  open_clip:NAME[@TAG]       built-in architecture + pretrained tag (first listed tag if none)
  open_clip:NAME@/path/ckpt  built-in architecture + a local checkpoint file
  open_clip:/path/dir        open_clip_config.json + weights (open_clip's ``local-dir:`` layout)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.models.base import Embedder, ModelUnavailable, l2_normalise, resolve_device
from pipeline.models.compat import ensure_torchvision_importable
from pipeline.models.registry import ModelRef

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_FIX = (
    "pass --embed-model open_clip:NAME@/path/to/checkpoint or --embed-model PATH (a directory with "
    "open_clip_config.json and weights), or download the weights on a connected machine"
)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.endswith(_WEIGHT_SUFFIXES)


class OpenClipEmbedder(Embedder):
    def __init__(self, ref: ModelRef, device: str):
        ensure_torchvision_importable()
        import open_clip
        import torch

        self.device = resolve_device(device)
        self.model_id = ref.spec
        name, pretrained, self.revision, hint = self._resolve(ref, open_clip)
        precision = "fp16" if self.device.startswith("cuda") else "fp32"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=self.device, precision=precision
            )
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, OSError, ValueError) as exc:
            # open_clip wraps hub download failures (offline, empty cache) in RuntimeError.
            raise ModelUnavailable(
                f"embed model {ref.spec} could not be loaded ({type(exc).__name__}: {exc}); {_FIX}{hint}"
            ) from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        # The embedding width differs by model family; asking the model is the
        # one answer that holds for all of them (and checks the tokenizer works).
        self.dim = int(self.embed_texts(["a photo"]).shape[1])

    @staticmethod
    def _resolve(ref: ModelRef, open_clip) -> tuple[str, str | None, str, str]:
        """(open_clip model name, pretrained tag or file, revision to record, download hint)."""
        if ref.is_local:
            path = Path(ref.source)
            if not (path / "open_clip_config.json").is_file():
                raise ModelUnavailable(f"{path} has no open_clip_config.json; {_FIX}")
            # open_clip silently builds random weights when the directory has none.
            if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
                raise ModelUnavailable(f"{path} has open_clip_config.json but no weights file; {_FIX}")
            return f"local-dir:{path}", None, "local", ""
        name, tag = ref.source, ref.revision
        if name.startswith("hf-hub:"):
            return name, None, tag or "main", f" (`hf download {name[len('hf-hub:'):]}`)"
        if name not in open_clip.list_models():
            raise ModelUnavailable(
                f"open_clip has no model named {name!r}; see open_clip.list_models() (e.g. ViT-B-32, "
                f"ViT-SO400M-14-SigLIP-384), or {_FIX}"
            )
        if tag and _looks_like_path(tag):
            if not Path(tag).is_file():
                raise ModelUnavailable(f"checkpoint {tag} for open_clip:{name} does not exist; {_FIX}")
            return name, tag, Path(tag).name, ""
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tag:
            if not tags:
                raise ModelUnavailable(f"open_clip:{name} has no published weights; {_FIX}")
            tag = tags[0]
        elif tag not in tags:
            raise ModelUnavailable(f"open_clip:{name} has no pretrained tag {tag!r}; known tags: {tags}")
        hub_id = (open_clip.get_pretrained_cfg(name, tag).get("hf_hub") or "").strip("/")
        return name, tag, tag, f" (`hf download {hub_id}`)" if hub_id else ""

    def _encode(self, batch, encode) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features = encode(batch.to(self.device))
        return l2_normalise(features.float().cpu().numpy())

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self._dtype)
        return self._encode(batch, self.model.encode_image)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode(self.tokenizer(list(texts)), self.model.encode_text)
