"""Backends chosen by name.

Model specs are strings:

  captioners
    moondream2[@REV]                    Moondream 2 from the hub (pinned revision by default)
    moondream2:/path/to/dir             Moondream 2 weights in a local directory
    transformers:ORG/NAME[@REV]         any image-text-to-text model transformers supports natively
    transformers:/path/to/dir           the same, from a local directory
    /path/to/dir                        a local directory; the backend is read from its config.json

  embedders
    open_clip:NAME[@PRETRAINED]         an open_clip model name (e.g. ViT-SO400M-14-SigLIP-384@webli)
    open_clip:NAME@/path/to/ckpt.pt     an open_clip architecture with a local checkpoint
    open_clip:/path/to/dir              a directory with open_clip_config.json and weights
    /path/to/dir                        the same

Resolution (``resolve_*``) is pure string/filesystem work and runs on the
driver to validate the config before Ray starts; building (``build_*``) loads
weights and runs on the workers. Backend modules are imported lazily so the
CLI does not pay for torch at start-up.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import CaptionConfig, ConfigError
from pipeline.models.moondream.hub import MOONDREAM_REPO, MOONDREAM_REVISION

# backend name -> "module:Class"; tests may add entries through register_*.
_CAPTIONERS: dict[str, str] = {
    "moondream2": "pipeline.models.moondream:Moondream2Captioner",
    "transformers": "pipeline.models.hf_vlm:TransformersCaptioner",
}
_EMBEDDERS: dict[str, str] = {
    "open_clip": "pipeline.models.openclip:OpenClipEmbedder",
}


class UnknownModel(ConfigError):
    pass


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: which backend, which weights."""

    backend: str
    source: str  # hub repo id, open_clip model name, or absolute local path
    revision: str | None  # hub revision / open_clip pretrained tag / checkpoint path; None = backend default
    is_local: bool = False

    @property
    def spec(self) -> str:
        """Canonical spec string: stored in the output and enough to rebuild the model."""
        base = f"{self.backend}:{self.source}"
        return f"{base}@{self.revision}" if self.revision and not self.is_local else base


def register_captioner(name: str, target: str) -> None:
    _CAPTIONERS[name] = target


def register_embedder(name: str, target: str) -> None:
    _EMBEDDERS[name] = target


def known_captioners() -> list[str]:
    return sorted(_CAPTIONERS)


def known_embedders() -> list[str]:
    return sorted(_EMBEDDERS)


def _split_revision(text: str) -> tuple[str, str | None]:
    # A revision follows the last '@', but only when what precedes is not a path
    # fragment that itself contains '@' (rare); keep it simple and explicit.
    if "@" in text:
        head, rev = text.rsplit("@", 1)
        return head, rev or None
    return text, None


def _local_dir(text: str) -> Path | None:
    path = Path(os.path.expanduser(text))
    return path.resolve() if path.is_dir() else None


def _captioner_backend_for_dir(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise UnknownModel(
            f"{path} has no config.json, so it is not a transformers/Moondream model directory; "
            f"pass --caption-model PATH pointing at a saved model"
        )
    try:
        data = json.loads(config.read_text())
    except ValueError as exc:
        raise UnknownModel(f"{config} is not valid JSON: {exc}") from exc
    model_type = str(data.get("model_type", "")).lower()
    return "moondream2" if "moondream" in model_type else "transformers"


def resolve_captioner(spec: str) -> ModelRef:
    spec = spec.strip()
    if local := _local_dir(spec):
        return ModelRef(_captioner_backend_for_dir(local), str(local), None, is_local=True)
    if spec == "moondream2" or spec.startswith("moondream2@"):
        _, rev = _split_revision(spec)
        return ModelRef("moondream2", MOONDREAM_REPO, rev or MOONDREAM_REVISION)
    backend, sep, rest = spec.partition(":")
    if sep and backend in _CAPTIONERS and rest:
        if local := _local_dir(rest):
            return ModelRef(backend, str(local), None, is_local=True)
        source, rev = _split_revision(rest)
        if backend == "moondream2" and source != MOONDREAM_REPO and "/" not in source:
            raise UnknownModel(f"moondream2:{source} is neither a local directory nor a hub repo id")
        return ModelRef(backend, source, rev)
    raise UnknownModel(
        f"unknown caption model {spec!r}. Valid forms: moondream2[@REV], "
        + ", ".join(f"{b}:HUB_ID[@REV]" for b in known_captioners())
        + ", or a local model directory (--caption-model PATH). Known backends: "
        + ", ".join(known_captioners())
    )


def resolve_embedder(spec: str) -> ModelRef:
    spec = spec.strip()
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in _EMBEDDERS:
        if local := _local_dir(spec):
            return ModelRef("open_clip", str(local), None, is_local=True)
        raise UnknownModel(
            f"unknown embed model {spec!r}. Valid forms: "
            + ", ".join(f"{b}:NAME[@PRETRAINED]" for b in known_embedders())
            + ", open_clip:NAME@/path/to/checkpoint, or a local directory with open_clip_config.json. "
            + "Known backends: "
            + ", ".join(known_embedders())
        )
    if local := _local_dir(rest):
        return ModelRef(backend, str(local), None, is_local=True)
    name, rev = _split_revision(rest)
    if not name:
        raise UnknownModel(f"embed model {spec!r} names no model after '{backend}:'")
    return ModelRef(backend, name, rev)


def _load(target: str):
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_captioner(ref: ModelRef, config: CaptionConfig, device: str):
    """Load the captioner (on a worker). Raises ModelUnavailable when weights are missing."""
    return _load(_CAPTIONERS[ref.backend])(ref, config, device)


def build_embedder(ref: ModelRef, device: str):
    return _load(_EMBEDDERS[ref.backend])(ref, device)


def build_caption_preprocessor(ref: ModelRef, config: CaptionConfig):
    """The captioner's CPU-side preparation (no weights loaded), or None when it takes PIL images."""
    return _load(_CAPTIONERS[ref.backend]).cpu_preprocessor(ref, config)


def build_embed_preprocessor(ref: ModelRef):
    """The embedder's CPU-side preparation (no weights loaded), or None when it takes PIL images."""
    return _load(_EMBEDDERS[ref.backend]).cpu_preprocessor(ref)
