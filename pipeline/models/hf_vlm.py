"""Any image-text-to-text model that transformers supports natively (LLaVA, Qwen-VL, ...).

Captions and probe answers are produced by real batched ``generate`` calls:
every (image, prompt) pair of a batch goes through one left-padded greedy
generate per kind (captions, then answers, which have different token
budgets), split only when a batch would exceed ``max_sequences``.

Unlike Moondream, a generic transformers model gives no handle on an image
encoding that could be reused across prompts, so the vision tower runs once
per (image, prompt) pair; preprocessing is shared by the processor call.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from pipeline.config import CaptionConfig, ConfigError
from pipeline.models.base import Captioner, Description, ModelUnavailable, resolve_device
from pipeline.models.compat import ensure_torchvision_importable
from pipeline.models.identity import CAPTION, model_identity
from pipeline.models.registry import ModelRef

# Caption budget when caption.max_new_tokens is unset.
DEFAULT_CAPTION_TOKENS = 64

CAPTION_PROMPTS = {
    "short": "Write a short, one-sentence caption for this image.",
    "normal": "Describe this image.",
    "long": "Describe this image in detail.",
}


def _missing_weights(ref: ModelRef, exc: Exception) -> ModelUnavailable:
    if ref.is_local:
        fix = f"check that {ref.source} holds a complete save_pretrained() model and processor"
    else:
        rev = f" --revision {ref.revision}" if ref.revision else ""
        fix = (
            "pass --caption-model PATH to a local model directory, or download the weights on a "
            f"connected machine with `hf download {ref.source}{rev}` and copy the HF cache (HF_HOME) here"
        )
    return ModelUnavailable(f"caption model {ref.spec} could not be loaded ({type(exc).__name__}: {exc}); {fix}")


class TransformersCaptioner(Captioner):
    #: upper bound on sequences per generate call, to bound activation memory
    max_sequences = 32

    def __init__(self, ref: ModelRef, config: CaptionConfig, device: str):
        ensure_torchvision_importable()
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        try:
            # The one answer to "which weights": rows and this object report the same identity.
            identity = model_identity(ref, CAPTION)
        except ConfigError as exc:
            raise ModelUnavailable(f"caption model {ref.spec}: {exc}") from exc
        self.model_id, self.revision = identity.model, identity.revision
        # Load the recorded commit when there is one, so the weights are the ones the rows name.
        revision = None if identity.is_local else identity.revision
        self.device = resolve_device(device)
        dtype = torch.float32
        if self.device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            # from_pretrained resolves hub ids through the HF cache and honours
            # HF_HUB_OFFLINE itself; a local directory is read as is.
            self.processor = AutoProcessor.from_pretrained(ref.source, revision=revision)
            self.model = AutoModelForImageTextToText.from_pretrained(ref.source, revision=revision, dtype=dtype)
        except OSError as exc:  # missing files, offline with an empty cache, gated repo
            raise _missing_weights(ref, exc) from exc
        except ValueError as exc:  # a config transformers cannot map to an image-text-to-text class
            raise ModelUnavailable(
                f"{ref.spec} is not an image-text-to-text model transformers supports natively ({exc}); "
                "pass --caption-model moondream2 or a supported model (e.g. a LLaVA or Qwen2-VL directory)"
            ) from exc
        self.model.to(self.device).eval()
        self.dtype = dtype
        tokenizer = self.processor.tokenizer
        # Decoder-only generation needs the padding on the left, so that every
        # row's prompt ends where its new tokens start.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._pad_id = tokenizer.pad_token_id
        self._prompts: dict[str, str] = {}

    def _prompt(self, text: str) -> str:
        """The model's chat template around one image and ``text`` (cached: probes repeat per image)."""
        if text not in self._prompts:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            if getattr(self.processor, "chat_template", None):
                prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:  # old checkpoints without a template: the image token, then the text
                prompt = f"{getattr(self.processor, 'image_token', '<image>')}\n{text}"
            self._prompts[text] = prompt
        return self._prompts[text]

    def _generate(self, images: list[Image.Image], texts: list[str], max_new_tokens: int) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(texts), self.max_sequences):
            chunk_images = images[start : start + self.max_sequences]
            chunk_texts = [self._prompt(t) for t in texts[start : start + self.max_sequences]]
            inputs = self.processor(
                images=[[im] for im in chunk_images], text=chunk_texts, return_tensors="pt", padding=True
            ).to(self.device, dtype=self.dtype)  # dtype only touches floating tensors (pixel values)
            with torch.inference_mode():
                generated = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=self._pad_id
                )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            out.extend(t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True))
        return out

    def describe(
        self, images: Sequence[Image.Image], questions: Sequence[str], *, caption: bool = True
    ) -> list[Description]:
        images = list(images)
        captions: list[str | None] = [None] * len(images)
        if caption and images:
            prompt = CAPTION_PROMPTS[getattr(self.config, "main_length", self.config.length)]
            captions = list(self._generate(images, [prompt] * len(images), self.config.max_new_tokens or DEFAULT_CAPTION_TOKENS))
        answers: list[str] = []
        if questions and images:
            # image-major order: the answers of image i are one contiguous slice
            pair_images = [im for im in images for _ in questions]
            pair_texts = [q for _ in images for q in questions]
            answers = self._generate(pair_images, pair_texts, self.config.answer_max_new_tokens)
        n = len(questions)
        return [Description(captions[i], tuple(answers[i * n : (i + 1) * n])) for i in range(len(images))]
