"""The Ray Data stages: decode -> OCR -> caption/probe -> embed -> conform to the schema.

Every stage takes one frozen :class:`StageConfig` and handles a whole batch,
an Arrow table in and an Arrow table out, typed by its declared columns
(:mod:`pipeline.stages.contract`). Model stages are Ray actors: the model is
built once in ``__init__`` on the worker, never on the driver. A row that
failed in an earlier stage passes through untouched, so each input image
yields exactly one output row.
"""

from pipeline.stages.config import StageConfig
from pipeline.stages.conform import conform_batch
from pipeline.stages.decode import decode_batch
from pipeline.stages.models import CaptionStage, EmbedStage, call_with_bisection
from pipeline.stages.ocr import OcrStage

__all__ = ["StageConfig", "CaptionStage", "EmbedStage", "OcrStage", "call_with_bisection", "conform_batch", "decode_batch"]
