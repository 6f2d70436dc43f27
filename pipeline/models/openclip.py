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
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.models.hf_cache import hf_hub_cache
from pipeline.config import ConfigError
from pipeline.models.base import (
    Embedder,
    ModelUnavailable,
    Preprocessor,
    l2_normalise,
    overrides,
    pack_array,
    resolve_device,
    unpack_array,
)
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
        # What the decode stage's OpenClipPreprocessor must have produced: checked here once, so
        # prepared inputs can never silently differ from this model's own transform.
        self.preprocess_cfg = _normalised(model.visual.preprocess_cfg)
        derived = preprocess_config(weights)
        if derived is not None and derived != self.preprocess_cfg and type(self).cpu_preprocessor(ref) is not None:
            raise ModelUnavailable(
                f"embed model {ref.spec}: the preprocessing derived without weights {derived} differs from the "
                f"model's {self.preprocess_cfg}; this is a bug in pipeline.models.openclip.preprocess_config"
            )
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

    @classmethod
    def cpu_preprocessor(cls, ref: ModelRef) -> "OpenClipPreprocessor | None":
        """open_clip's eval transform in the decode stage; a subclass that overrides embed_images sees images."""
        if overrides(cls, OpenClipEmbedder, "embed_images"):
            return None
        try:
            identity = model_identity(dataclasses.replace(ref, backend="open_clip"))
        except ConfigError:
            return None
        cfg = preprocess_config(identity)
        return OpenClipPreprocessor(cfg) if cfg is not None else None

    def embed_prepared(self, inputs: Sequence[bytes]) -> np.ndarray:
        import torch

        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        expected = (3, *self.preprocess_cfg["size"])
        arrays = []
        for data in inputs:
            array, _ = unpack_array(data)
            if array.shape != expected:
                raise ValueError(f"prepared input of shape {array.shape}, this model takes {expected}")
            arrays.append(array)
        batch = torch.from_numpy(np.stack(arrays))  # float16 from the decode stage
        return self._encode(batch.to(self.device, non_blocking=True).to(self._dtype), self.model.encode_image)

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
                    identity.hub_repo, revision=identity.revision, allow_patterns=[OPEN_CLIP_CONFIG, *OPEN_CLIP_WEIGHTS],
                    cache_dir=hf_hub_cache(),
                )
            except Exception as exc:  # noqa: BLE001 - offline, unreachable, gated: the caller names the fix
                raise OSError(f"{identity.hub_repo}@{identity.revision} is not in the HF cache: {exc}") from exc
        return f"local-dir:{snapshot}", None
    return identity.open_clip_name, identity.pretrained


# ---- the decode stage's side: open_clip's eval transform without the weights ------------


# open_clip's PreprocessCfg defaults (open_clip/transform.py). A directory model's preprocessing is
# derived from them without importing open_clip, which would bring torch, torchvision and transformers
# into every decode worker (about 3 s of CPU each); tests/test_preprocess.py checks they are still
# open_clip's, and each embed actor checks the derived config against its model's (OpenClipEmbedder).
PREPROCESS_DEFAULTS = {
    "size": 224,
    "mode": "RGB",
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


def _merge_preprocess(base: dict, overlay: dict | None) -> dict:
    """open_clip's merge_preprocess_dict: the overlay's known, non-null keys over the base."""
    merged = {k: v for k, v in base.items() if k in PREPROCESS_DEFAULTS}
    merged.update({k: v for k, v in (overlay or {}).items() if k in PREPROCESS_DEFAULTS and v is not None})
    return merged


class OpenClipPreprocessor(Preprocessor):
    """Image -> the normalised (3, H, W) float16 tensor the model's own eval transform makes.

    The two eval transforms open_clip's models use, the shortest edge resized to a square then
    centre-cropped, and squash (resized to the size), are done here with Pillow and numpy, with the
    same Pillow resize torchvision calls and the same float32 arithmetic, so the bytes are the same
    (tests/test_preprocess.py compares them) and a decode worker never imports torch. Any other
    (longest edge, a non-square shortest-edge target) goes through open_clip's own transform.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self._transform = None

    def __getstate__(self):  # the transform is rebuilt where it runs
        return {"cfg": self.cfg, "_transform": None}

    def prepare(self, image: Image.Image) -> bytes:
        image = image.convert("RGB")
        pixels = self._prepare_here(image)
        if pixels is None:
            pixels = self._open_clip_transform()(image).numpy()
        return pack_array(pixels.astype(np.float16))

    def _open_clip_transform(self):
        if self._transform is None:
            ensure_torchvision_importable()
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._transform = image_transform_v2(PreprocessCfg(**self.cfg), is_train=False)
        return self._transform

    def _prepare_here(self, image: Image.Image) -> np.ndarray | None:
        """open_clip's eval transform (torchvision's Resize, CenterCrop, ToTensor, Normalize on a PIL
        image) as float32 (3, H, W), or None for a transform left to open_clip."""
        height, width = self.cfg["size"]
        mode = self.cfg.get("resize_mode") or "shortest"
        # open_clip: bilinear when asked, else bicubic ("random" is bicubic at eval).
        resample = Image.Resampling.BILINEAR if self.cfg.get("interpolation") == "bilinear" else Image.Resampling.BICUBIC
        if mode == "squash":
            new_height, new_width = height, width
        elif mode == "shortest" and height == width:
            # torchvision's _compute_resized_output_size for a one-number size.
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = height, int(height * long / short)
            new_width, new_height = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            return None
        if (new_height, new_width) != (image.height, image.width):
            image = image.resize((new_width, new_height), resample)
        if mode == "shortest":
            top, left = int(round((new_height - height) / 2.0)), int(round((new_width - width) / 2.0))
            image = image.crop((left, top, left + width, top + height))
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        mean = np.asarray(self.cfg["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.cfg["std"], dtype=np.float32).reshape(-1, 1, 1)
        return (pixels - mean) / std


def _normalised(cfg: dict) -> dict:
    """A preprocess cfg in one spelling: size as (H, W), mean/std as float tuples."""
    size = cfg.get("size", 224)
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
    out = dict(cfg, size=size)
    for key in ("mean", "std"):
        value = out.get(key)
        if value is not None:
            out[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else (value,) * 3))
    return out


def preprocess_config(identity: ModelIdentity) -> dict | None:
    """The eval preprocessing open_clip's factory gives the model ``identity`` names, without building it.

    The factory's order: PreprocessCfg defaults, then the config of a local-dir/hf-hub model or the
    pretrained tag's cfg, then the size of the vision tower. None when the config cannot be read
    here (an hf-hub repo not in the cache): the actor then transforms PIL images itself.
    """
    base = dict(PREPROCESS_DEFAULTS)
    name = identity.open_clip_name or ""
    if name.startswith(("local-dir:", "hf-hub:")):
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:"):])
        else:
            folder = cached_snapshot(identity.hub_repo, identity.revision) or cached_snapshot(
                identity.hub_repo, identity.hub_revision or "main"
            )
        config_file = folder / OPEN_CLIP_CONFIG if folder else None
        if config_file is None or not config_file.is_file():
            return None
        data = json.loads(config_file.read_text())
        model_cfg, cfg = data.get("model_cfg") or {}, _merge_preprocess(base, data.get("preprocess_cfg"))
    else:
        ensure_torchvision_importable()
        import open_clip

        model_cfg = open_clip.get_model_config(name.replace("/", "-"))
        if model_cfg is None:
            return None
        tag_cfg = open_clip.get_pretrained_cfg(name, identity.pretrained) if identity.pretrained else {}
        cfg = _merge_preprocess(base, tag_cfg)
    vision = model_cfg.get("vision_cfg") or {}
    # The factory sets size from the built tower's image_size, which comes from vision_cfg.
    cfg["size"] = vision.get("image_size", cfg["size"])
    return _normalised(cfg)
