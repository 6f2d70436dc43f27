"""The Moondream 2 captioner backend: official weights, our own engine, no remote code."""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from pipeline.config import CaptionConfig
from pipeline.probes import is_yes_no_question
from pipeline.models.base import Captioner, Description, ModelUnavailable, overrides, resolve_device
from pipeline.models.moondream.config import (
    CAPTION_BUDGETS,
    CAPTION_PROMPTS,
    QUERY_PREFIX,
    QUERY_SUFFIX,
    CheckpointMismatch,
    CropGeometry,
    read_config,
)
from pipeline.models.moondream.hub import MoondreamFiles, config_file, resolve_files
from pipeline.models.moondream.preprocess import (
    MoondreamCrops,
    MoondreamPreprocessor,
    crops_from_bytes,
    prepare_image,
)
from pipeline.models.registry import ModelRef

DTYPES = ("auto", "bfloat16", "float32")

def resolve_dtype(name: str, device: str):
    """auto: bfloat16 on a GPU (the reference's dtype), float32 on CPU (faster there without bf16
    matrix units, and what parity is checked in)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def crop_count(config: CaptionConfig, geometry: CropGeometry) -> int:
    """config.max_crops when set, else the model's own default (the reference's 12)."""
    return int(getattr(config, "max_crops", None) or geometry.max_crops)


def caption_budget(config: CaptionConfig) -> int:
    """config.max_new_tokens when set, else the per-length budget (the reference's 768 for normal/long)."""
    explicit = getattr(config, "max_new_tokens", None)
    return int(explicit) if explicit else CAPTION_BUDGETS[_main_length(config)]


def _main_length(config) -> str:
    return getattr(config, "main_length", None) or config.length


def _short_length(config) -> str | None:
    return getattr(config, "short_length", None)


class Moondream2Captioner(Captioner):
    def __init__(
        self,
        ref: ModelRef,
        config: CaptionConfig,
        device: str,
        *,
        dtype: str | None = None,
        max_crops: int | None = None,
        max_sequences: int | None = None,
        compile: bool = False,
    ):
        from pipeline.models.moondream.defaults import for_device
        from pipeline.models.moondream.engine import MoondreamEngine
        from pipeline.models.moondream.tokenizer import NO_WORDS, YES_WORDS, MoondreamTokenizer, NotStarmieTokenizer
        from pipeline.models.moondream.weights import load_model

        from pipeline.models.identity import model_identity

        self.config = config
        # The one answer to "which model": rows, the index and this object report it.
        identity = model_identity(ref, "caption")
        self.model_id, self.revision = identity.model, identity.revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype or getattr(config, "dtype", "auto"), self.device)
        self.files: MoondreamFiles = resolve_files(ref)
        self.model_commit = self.files.model_revision
        self.tokenizer_commit = self.files.tokenizer_revision
        try:
            self.tokenizer = MoondreamTokenizer(self.files.tokenizer)
            model = load_model(self.files.weights, self.files.config, self.device, self.dtype)
        except (CheckpointMismatch, NotStarmieTokenizer, OSError) as exc:
            raise ModelUnavailable(f"caption model {ref.spec} could not be loaded: {exc}") from exc
        # The crop geometry is the loaded model's (its config.json), as in cpu_preprocessor.
        self.geometry: CropGeometry = model.config.vision.crop_geometry
        self.max_crops = int(max_crops or crop_count(config, self.geometry))
        device_defaults = for_device(self.device)  # the one owner of the engine's sizes per device
        self.engine = MoondreamEngine(
            model,
            max_sequences=max_sequences or getattr(config, "max_sequences", None) or device_defaults.max_sequences,
            vision_batch_crops=device_defaults.vision_batch_crops,
            yes_ids=self.tokenizer.single_token_ids(YES_WORDS),
            no_ids=self.tokenizer.single_token_ids(NO_WORDS),
            compile=compile or bool(getattr(config, "compile", False)),
        )
        self.caption_max_tokens = caption_budget(config)
        self.answer_max_tokens = int(config.answer_max_new_tokens)

    @classmethod
    def cpu_preprocessor(cls, ref: ModelRef, config: CaptionConfig) -> MoondreamPreprocessor | None:
        """Crops and tiling made in the decode stage; a subclass that overrides describe sees images instead."""
        if overrides(cls, Moondream2Captioner, "describe"):
            return None
        # config.json only (no weights): the geometry the caption stage's model will have.
        geometry = read_config(config_file(ref)).vision.crop_geometry
        return MoondreamPreprocessor(geometry, crop_count(config, geometry))

    # CPU side, for callers outside the pipeline; the pipeline uses cpu_preprocessor in its decode stage.
    def prepare(self, image: Image.Image) -> MoondreamCrops:
        return prepare_image(image, self.geometry, max_crops=self.max_crops)

    def describe_prepared(
        self, inputs: Sequence[bytes], questions: Sequence[str], *, caption: bool = True
    ) -> list[Description]:
        crop_size = self.geometry.crop_size
        return self.describe([crops_from_bytes(data, crop_size) for data in inputs], questions, caption=caption)

    def requests(self, questions: Sequence[str], caption: bool):
        from pipeline.models.moondream.engine import Request

        out = []
        if caption:
            out.append(Request(CAPTION_PROMPTS[_main_length(self.config)], self.caption_max_tokens))
            # A second length is one more request on the same image prefix, like a probe: no second encoding.
            if short := _short_length(self.config):
                out.append(Request(CAPTION_PROMPTS[short], min(self.caption_max_tokens, CAPTION_BUDGETS[short])))
        for q in questions:
            prompt = QUERY_PREFIX + tuple(self.tokenizer.encode(q)) + QUERY_SUFFIX
            out.append(Request(prompt, self.answer_max_tokens, yes_no=is_yes_no_question(q)))
        return out

    def describe(
        self,
        images: Sequence[Image.Image | MoondreamCrops],
        questions: Sequence[str],
        *,
        caption: bool = True,
    ) -> list[Description]:
        """Images may be PIL images or crops already made by ``prepare``/``prepare_image``."""
        prepared = [im if isinstance(im, MoondreamCrops) else self.prepare(im) for im in images]
        per_image = self.requests(questions, caption)
        generations = self.engine.generate(prepared, [per_image] * len(prepared))
        return [self._description(gens, caption) for gens in generations]

    def _description(self, gens, caption: bool) -> Description:
        """One image's generations (caption, the short caption when asked, then the probes) as a Description."""
        captions = (1 + bool(_short_length(self.config))) if caption else 0
        cap = gens[0] if caption else None
        short = gens[1] if captions == 2 else None
        answers = gens[captions:]
        return Description(
            caption=self.tokenizer.decode(cap.ids).strip() if cap else None,
            answers=tuple(self.tokenizer.decode(g.ids).strip() for g in answers),
            yes_probs=tuple(g.yes_prob for g in answers),
            caption_truncated=bool(cap and cap.hit_cap),
            answers_truncated=tuple(g.hit_cap for g in answers),
            short_caption=self.tokenizer.decode(short.ids).strip() if short else None,
        )

    def stream(self, questions: Sequence[str], *, caption: bool = True, images_hint: int = 1):
        """A DescriptionStream over the running engine, or None where a subclass replaces describe or
        describe_prepared (it wants to see the calls) or there is nothing to ask."""
        if overrides(type(self), Moondream2Captioner, "describe") or overrides(
            type(self), Moondream2Captioner, "describe_prepared"
        ):
            return None
        requests = self.requests(questions, caption)
        return DescriptionStream(self, requests, caption, images_hint) if requests else None


class DescriptionStream:
    """Images join the running engine one by one (prepared bytes, PIL images or crops) and leave as
    Descriptions when done, in whatever order they finish (engine.EngineStream)."""

    def __init__(self, captioner: Moondream2Captioner, requests, caption: bool, images_hint: int):
        self.captioner, self.caption = captioner, caption
        self.engine_stream = captioner.engine.stream(requests, images_hint)

    def add(self, key, item) -> None:
        """Raises (a per-image fault: bytes that are not crops) before anything is queued."""
        c = self.captioner
        if isinstance(item, (bytes, bytearray, memoryview)):
            crops = crops_from_bytes(item, c.geometry.crop_size)
        elif isinstance(item, MoondreamCrops):
            crops = item
        else:
            crops = c.prepare(item)
        self.engine_stream.add(key, crops)

    def __len__(self) -> int:
        return len(self.engine_stream)

    def advance(self) -> list:
        """(key, Description) of the images finished by this round of decode steps."""
        return [(key, self.captioner._description(gens, self.caption)) for key, gens in self.engine_stream.advance()]
