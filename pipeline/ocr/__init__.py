"""Reading the text in an image: OCR engines by name, their identity, reading order.

``resolve_reader``/``ocr_identity`` run on the driver (no weights loaded);
``build_reader`` loads the model, on the OCR stage's actor
(pipeline/stages/ocr.py). Every engine returns an :class:`OcrResult`.
"""

from pipeline.ocr.reader import (
    OcrLine,
    OcrResult,
    OcrTimeout,
    OcrUnavailable,
    build_reader,
    known_engines,
    ocr_identity,
)
from pipeline.ocr.layout import reading_order

__all__ = [
    "OcrLine",
    "OcrResult",
    "OcrTimeout",
    "OcrUnavailable",
    "build_reader",
    "known_engines",
    "ocr_identity",
    "reading_order",
]
