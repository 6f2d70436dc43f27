"""Decode stage (CPU tasks): bytes -> model-ready inputs, or an error row.

Each image is decoded once (EXIF, RGB, size guard) and then handed to the CPU
preprocessor of each model backend that has one (Moondream's crops, open_clip's
normalised tensor), so the GPU actors only deserialise arrays and run tensors.
Models without a preprocessor get the decoded RGB pixels, as before; when
every model of the run has one, the pixels are not carried at all.
"""

from __future__ import annotations

import dataclasses
import logging

import pyarrow as pa

from pipeline.stages.config import StageConfig
from pipeline.stages.contract import DECODED
from schemas import STATUS_ERROR, STATUS_OK
from schemas.errors import STORAGE_ERROR_KINDS, error_text, exception_text

log = logging.getLogger(__name__)

# Built once per worker process and run config, when the driver sent none.
_PREPROCESSORS: dict[str, tuple] = {}


def preprocessors(stage: StageConfig) -> tuple:
    """(caption preprocessor | None, embed preprocessor | None) for this run: the driver's, else built
    here once per process."""
    if stage.preprocessors is not None:
        return stage.preprocessors
    key = stage.run.model_dump_json()
    if key not in _PREPROCESSORS:
        _PREPROCESSORS[key] = (_build(stage, "caption"), _build(stage, "embed"))
    return _PREPROCESSORS[key]


def with_preprocessors(stage: StageConfig) -> StageConfig:
    """The stage carrying its CPU preprocessors, built here, once (on the driver), for every decode task.

    Building one reads the model's configuration, never its weights. For a named open_clip model
    (the default SigLIP) that is open_clip's own tables, and importing open_clip brings torch,
    torchvision and transformers: the driver has them already (it identified the model), where each
    decode worker process would pay about 3 s of CPU for them. The preprocessors travel by pickle
    without anything built from torch (OpenClipPreprocessor rebuilds what it needs where it runs).
    """
    return dataclasses.replace(stage, preprocessors=(_build(stage, "caption"), _build(stage, "embed")))


def _build(stage: StageConfig, which: str):
    from pipeline.models.registry import (
        build_caption_preprocessor,
        build_embed_preprocessor,
        resolve_captioner,
        resolve_embedder,
    )

    try:
        if which == "caption" and stage.runs_captioner:
            config = stage.run.caption
            return build_caption_preprocessor(resolve_captioner(config.model), config)
        if which == "embed" and stage.runs_embedder:
            return build_embed_preprocessor(resolve_embedder(stage.run.embed.model))
    except Exception as exc:  # noqa: BLE001 - the model stage then prepares from pixels, as without one
        log.warning("no CPU preprocessing for the %s model (%s: %s); its actor will prepare images", which,
                    type(exc).__name__, exc)
    return None


# Storage found down by this worker process: (protocol, options) -> (until when, the failed read).
# Ray hands a process many small blocks; without this each would wait out the deadline again.
_STORAGE_DOWN: dict[tuple, tuple[float, object]] = {}


def _load_all(locations: list[str], stage: StageConfig, options: dict) -> list:
    """Each location read and decoded. Once the storage failed (after its deadline and retries,
    pipeline.storage_limits), reads from it are not tried again for as long as one call may wait:
    each would wait as long again, and the driver ends the run on a batch of such rows."""
    import time

    from pipeline.decode import DecodedImage, load_image
    from pipeline.storage import protocol_of, storage_limits_of

    decoded = []
    for location in locations:
        key = (protocol_of(location), tuple(sorted(options.items())))
        down = _STORAGE_DOWN.get(key)
        if down is not None and time.monotonic() < down[0]:
            failed = down[1]
            decoded.append(DecodedImage(location, error_kind="storage",
                                        error=error_text(f"not read: the storage failed on {failed.uri} ({failed.error})")))
            continue
        result = load_image(location, stage.run.decode, options)
        if result.error_kind in STORAGE_ERROR_KINDS:
            _STORAGE_DOWN[key] = (time.monotonic() + storage_limits_of(options).waited_for_s, result)
        decoded.append(result)
    return decoded


def decode_batch(batch: pa.Table, *, stage: StageConfig) -> pa.Table:
    from pipeline.decode import load_image

    caption_prep, embed_prep = preprocessors(stage)
    # Pixels only travel to a model that prepares images itself.
    needs_pixels = (stage.runs_captioner and caption_prep is None) or (stage.runs_embedder and embed_prep is None)
    needs_pixels = needs_pixels or stage.runs_ocr  # the OCR stage reads the decoded pixels
    keep_pixels = needs_pixels or not (stage.runs_captioner or stage.runs_embedder)

    options = stage.run.storage_options_dict()
    locations = [raw.decode("utf-8", "surrogateescape") for raw in batch.column("location").to_pylist()]
    decoded = _load_all(locations, stage, options)
    n = len(decoded)
    status = [STATUS_OK if d.ok else STATUS_ERROR for d in decoded]
    kinds, errors = [d.error_kind for d in decoded], [d.error for d in decoded]
    pixels, widths, heights = [b""] * n, [0] * n, [0] * n
    caption_inputs, embed_inputs = [None] * n, [None] * n
    for i, d in enumerate(decoded):
        if not d.ok:
            continue
        image = d.image.convert("RGB")
        try:
            if caption_prep is not None:
                caption_inputs[i] = caption_prep.prepare(image)
            if embed_prep is not None:
                embed_inputs[i] = embed_prep.prepare(image)
        except Exception as exc:  # noqa: BLE001 - one image the model cannot take is its own error row
            status[i], kinds[i] = STATUS_ERROR, "preprocess"
            errors[i] = exception_text(exc)
            caption_inputs[i] = embed_inputs[i] = None
            continue
        if keep_pixels:
            pixels[i], widths[i], heights[i] = image.tobytes(), image.width, image.height
    return DECODED.table(
        {
            "uri": batch.column("uri"),
            "image_id": [d.image_id for d in decoded],
            "bytes": [d.bytes for d in decoded],
            "source_mtime": batch.column("source_mtime"),
            "format": [d.format for d in decoded],
            "width": [d.width for d in decoded],
            "height": [d.height for d in decoded],
            "status": status,
            "error_kind": kinds,
            "error": errors,
            "pixels": pixels,
            "pixel_width": widths,
            "pixel_height": heights,
            "caption_input": caption_inputs,
            "embed_input": embed_inputs,
        }
    )
