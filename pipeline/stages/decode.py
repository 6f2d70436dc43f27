"""Decode stage (CPU tasks): bytes -> RGB pixels for the models, or an error row."""

from __future__ import annotations

import pyarrow as pa

from pipeline.stages.config import StageConfig
from pipeline.stages.contract import DECODED
from schemas import STATUS_ERROR, STATUS_OK


def decode_batch(batch: pa.Table, *, stage: StageConfig) -> pa.Table:
    from pipeline.decode import load_image

    options = stage.run.storage_options_dict()
    locations = [raw.decode("utf-8", "surrogateescape") for raw in batch.column("location").to_pylist()]
    decoded = [load_image(location, stage.run.decode, options) for location in locations]
    pixels = [d.image.convert("RGB") if d.ok else None for d in decoded]
    return DECODED.table(
        {
            "uri": batch.column("uri"),
            "image_id": [d.image_id for d in decoded],
            "bytes": [d.bytes for d in decoded],
            "format": [d.format for d in decoded],
            "width": [d.width for d in decoded],
            "height": [d.height for d in decoded],
            "status": [STATUS_OK if d.ok else STATUS_ERROR for d in decoded],
            "error_kind": [d.error_kind for d in decoded],
            "error": [d.error for d in decoded],
            "pixels": [image.tobytes() if image else b"" for image in pixels],
            "pixel_width": [image.width if image else 0 for image in pixels],
            "pixel_height": [image.height if image else 0 for image in pixels],
        }
    )
