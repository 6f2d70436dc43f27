"""OCR stage (Ray actors, CPU or CUDA): the text in each image, its lines and their boxes.

The engine is built once per actor (pipeline/ocr), on the device the plan
chose (jobs/ray_plan.py ocr_device); a worker that cannot give it CUDA fails
at actor start with the fix, as a caption actor does. It reads the decoded pixels
(at most decode.model_max_side, shrunk further to ocr.max_side) one image at a
time; boxes are scaled back to the image as decoded (the row's width x
height). An image the engine fails on, or that runs past ocr.timeout_s,
becomes that row's ``ocr`` error; rows that failed earlier pass through.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from pipeline.stages.config import StageConfig
from pipeline.stages.contract import READ, STATUS_COLUMNS
from schemas import STATUS_ERROR, STATUS_OK
from schemas.errors import exception_text

log = logging.getLogger(__name__)


class OcrStage:
    name = "ocr"

    def __init__(self, stage: StageConfig, device: str = "cpu"):
        from pipeline.ocr import build_reader

        self.stage = stage
        self.reader = build_reader(stage.run.ocr, stage.torch_threads, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        columns = {name: batch.column(name) for name in batch.column_names}
        status = columns["status"].to_pylist()
        kinds, errors = columns["error_kind"].to_pylist(), columns["error"].to_pylist()
        widths, heights = columns["width"].to_pylist(), columns["height"].to_pylist()
        pixel_widths, pixel_heights = columns["pixel_width"].to_pylist(), columns["pixel_height"].to_pylist()
        pixels = columns["pixels"]
        n = batch.num_rows
        texts, lines = [None] * n, [None] * n
        for i in range(n):
            if status[i] != STATUS_OK:
                continue
            try:
                image = Image.frombytes("RGB", (pixel_widths[i], pixel_heights[i]), pixels[i].as_py())
                result = self.reader.read(image)
            except Exception as exc:  # noqa: BLE001 - one image the engine fails on (or a timeout) is its own row
                status[i], kinds[i], errors[i] = STATUS_ERROR, "ocr", exception_text(exc)
                continue
            sx, sy = (widths[i] or pixel_widths[i]) / pixel_widths[i], (heights[i] or pixel_heights[i]) / pixel_heights[i]
            texts[i] = result.text
            lines[i] = [
                {"text": line.text, "confidence": line.confidence,
                 "box": [v * (sx if k % 2 == 0 else sy) for k, v in enumerate(line.box)]}
                for line in result.lines
            ]  # fmt: skip
        columns.update(zip(STATUS_COLUMNS, (status, kinds, errors)))
        columns.update(text=texts, text_lines=lines)
        assert set(READ.names) <= set(columns)
        return self.stage.columns_after(self.name).table(columns)
