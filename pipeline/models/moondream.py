"""Moondream 2 (vikhyatk/moondream2), the default captioner.

Moondream ships its own inference code (trust_remote_code) with a 2025 API:
``encode_image(img)`` runs the vision encoder and pre-fills the text model's
KV cache with the image, and ``caption(enc, length=...)`` / ``query(enc, q)``
accept that encoding. We encode each image once and reuse it for the caption
and every probe, which is most of the cost of a probe. Its API is one image
at a time, so a batch is a loop; throughput comes from several actors.
"""

from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from pipeline.config import CaptionConfig
from pipeline.models.base import Captioner, Description, ModelUnavailable, resolve_device
from pipeline.models.compat import ensure_torchvision_importable
from pipeline.models.registry import ModelRef


def _unavailable(ref: ModelRef, exc: Exception) -> ModelUnavailable:
    if ref.is_local:
        fix = (
            f"{ref.source} must be a complete Moondream 2 snapshot (config.json, model weights and its "
            "*.py files); pass --caption-model PATH to such a directory"
        )
    else:
        fix = (
            f"Moondream 2 ({ref.source} at revision {ref.revision}) is not in the HF cache (HF_HOME) and "
            "cannot be downloaded here. Pass --caption-model PATH to a local copy, or download it on a "
            f"connected machine with `hf download {ref.source} --revision {ref.revision}` (`huggingface-cli "
            "download` before huggingface_hub 1.0) and copy the HF cache (or a --local-dir copy) over"
        )
    return ModelUnavailable(f"caption model {ref.spec} could not be loaded ({type(exc).__name__}: {exc}). {fix}")


def load_moondream(ref: ModelRef, device: str) -> Any:
    """The Moondream model object (remote code) on ``device``; ModelUnavailable when weights are missing."""
    ensure_torchvision_importable()
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": True}
    if not ref.is_local:
        kwargs["revision"] = ref.revision
    try:
        # HF_HUB_OFFLINE and the HF cache are honoured by from_pretrained itself.
        model = AutoModelForCausalLM.from_pretrained(ref.source, **kwargs)
    except (OSError, ValueError) as exc:  # offline with an empty cache, missing files, not a Moondream dir
        raise _unavailable(ref, exc) from exc
    return model.to(device).eval()


class Moondream2Captioner(Captioner):
    def __init__(self, ref: ModelRef, config: CaptionConfig, device: str, *, model: Any = None):
        """``model`` replaces the loaded weights (tests inject a stand-in; nothing else should)."""
        self.config = config
        self.model_id = ref.spec
        self.revision = ref.revision or "local"
        self.model = model if model is not None else load_moondream(ref, resolve_device(device))
        # Greedy decoding (temperature 0): Moondream samples by default, and a
        # batch pipeline must give the same text when rerun.
        self._caption_settings = {"max_tokens": config.max_new_tokens, "temperature": 0.0}
        self._answer_settings = {"max_tokens": config.answer_max_new_tokens, "temperature": 0.0}

    def describe(
        self, images: Sequence[Image.Image], questions: Sequence[str], *, caption: bool = True
    ) -> list[Description]:
        import torch

        out = []
        with torch.inference_mode():
            for image in images:
                encoded = self.model.encode_image(image)
                text = None
                if caption:
                    result = self.model.caption(encoded, length=self.config.length, settings=self._caption_settings)
                    text = result["caption"].strip()
                answers = tuple(
                    self.model.query(encoded, q, settings=self._answer_settings)["answer"].strip() for q in questions
                )
                out.append(Description(text, answers))
        return out
