"""Reading the text in an image: OCR engines by name, their identity, reading order.

``ocr_identity`` and ``cuda_provider_available`` run on the driver (no weights loaded);
``build_reader`` loads the model, on the OCR stage's actor
(pipeline/stages/ocr.py). Every engine returns an :class:`OcrResult`.
"""

from pipeline.ocr.reader import (
    OCR_CUDA_FIX,
    OcrLine,
    OcrResult,
    OcrTimeout,
    OcrUnavailable,
    build_reader,
    cuda_provider_available,
    known_engines,
    ocr_identity,
)
from pipeline.ocr.layout import reading_order

__all__ = [
    "OCR_CUDA_FIX",
    "OcrLine",
    "OcrResult",
    "OcrTimeout",
    "OcrUnavailable",
    "build_reader",
    "cuda_provider_available",
    "known_engines",
    "ocr_identity",
    "reading_order",
]
