"""open_clip image/text embedder (CLIP, SigLIP, ...): one shared space for both.

Four sources, all loaded through open_clip's own factory, each exactly as
pipeline.models.identity resolves it (the identity this object reports):
  open_clip:NAME[@TAG]        built-in architecture + pretrained tag (first listed tag if none)
  open_clip:NAME@/path/ckpt   built-in architecture + a local checkpoint file
  open_clip:hf-hub:REPO[@REV] a hub repo in open_clip's layout, at the recorded commit
  open_clip:/path/dir         open_clip_config.json + weights (open_clip's ``local-dir:`` layout)
"""

from __future__ import annotations

import dataclasses

from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.config import ConfigError
from pipeline.models.base import Embedder, ModelUnavailable, l2_normalise, resolve_device
from pipeline.models.compat import ensure_torchvision_importable
from pipeline.models.identity import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, ModelIdentity, cached_snapshot, model_identity
from pipeline.models.registry import ModelRef

_FIX = (
    "pass --embed-model open_clip:NAME@/path/to/checkpoint or --embed-model PATH (a directory with "
    "open_clip_config.json and weights), or download the weights on a connected machine"
)


class OpenClipEmbedder(Embedder):
    def __init__(self, ref: ModelRef, device: str):
        ensure_torchvision_importable()
        import open_clip
        import torch

        self.device = resolve_device(device)
        try:
            # The one answer to "which weights": rows, the index and this object all report it.
            self.identity = model_identity(ref)
        except ConfigError as exc:
            raise ModelUnavailable(f"embed model {ref.spec}: {exc}") from exc
        self.model_id, self.revision = self.identity.model, self.identity.revision
        hint = f" (`hf download {self.identity.hub_repo}`)" if self.identity.hub_repo else ""
        precision = "fp16" if self.device.startswith("cuda") else "fp32"
        try:
            # A backend registered under another name on top of this class (a
            # plug-in, a test double) still loads open_clip weights.
            weights = self.identity if self.identity.backend == "open_clip" else model_identity(
                dataclasses.replace(ref, backend="open_clip")
            )
            name, pretrained = _open_clip_source(weights)
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


def _open_clip_source(identity: ModelIdentity) -> tuple[str, str | None]:
    """(model name, pretrained) for open_clip's factory, loading exactly the weights ``identity`` names."""
    if identity.open_clip_name and identity.open_clip_name.startswith("hf-hub:"):
        # open_clip's hf-hub: loader takes no revision; load the snapshot of
        # the recorded commit (or revision asked) as a local directory instead.
        snapshot = cached_snapshot(identity.hub_repo, identity.revision)
        if snapshot is None:
            from huggingface_hub import snapshot_download

            try:
                snapshot = snapshot_download(
                    identity.hub_repo, revision=identity.revision, allow_patterns=[OPEN_CLIP_CONFIG, *OPEN_CLIP_WEIGHTS]
                )
            except Exception as exc:  # noqa: BLE001 - offline, unreachable, gated: the caller names the fix
                raise OSError(f"{identity.hub_repo}@{identity.revision} is not in the HF cache: {exc}") from exc
        return f"local-dir:{snapshot}", None
    return identity.open_clip_name, identity.pretrained
