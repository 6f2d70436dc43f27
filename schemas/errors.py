"""Every ``error_kind`` a row can carry, whether it is permanent, and the cap on the ``error`` text.

The decoder, the stages and resume all read this one table. A kind is
*permanent* when the same bytes fail the same way on a rerun (the file itself
is bad): resume skips such rows unless the file changes or ``--retry-errors``
asks. Every other kind may go away by itself and is always retried. A kind
found in a file but not listed here (a newer captioner's) counts as
retryable.
"""

from __future__ import annotations

from types import MappingProxyType

# kind -> (permanent, meaning)
_KINDS = {
    # Reading the bytes.
    "missing": (False, "the file was listed but is gone when read"),
    "unreadable": (False, "the bytes could not be read (permission, I/O or network error)"),
    # The store, not the file: it did not answer within its deadline (pipeline.storage_limits) or
    # refused the connection. A run whose images all fail so is a storage failure (exit 3).
    "storage": (False, "the storage did not answer in time or refused the connection; a rerun retries it"),
    # Decoding them (pipeline.decode).
    "empty": (True, "zero bytes"),
    "not_image": (True, "the bytes are something else (text, HTML, PDF, unknown binary)"),
    "unsupported_format": (True, "an image format this install cannot decode (e.g. HEIC without pillow-heif)"),
    "too_large": (True, "more pixels than decode.max_pixels"),
    "truncated": (True, "the file ends before the image data does"),
    "corrupt": (True, "any other decoding failure"),
    # A model's CPU preprocessing (the decode stage) or the model itself (a model stage) failed on the image.
    # Not permanent: a fix or another model version may take it.
    "preprocess": (False, "a model's CPU preprocessor refused the decoded image"),
    "model": (False, "the model failed on this image"),
    # The OCR stage (pipeline/stages/ocr.py): its model failed, or the image took longer than ocr.timeout_s.
    "ocr": (False, "the OCR model failed on this image or ran past ocr.timeout_s"),
}

#: kind -> its one-line meaning, in the order above.
ERROR_KINDS = MappingProxyType({kind: meaning for kind, (_, meaning) in _KINDS.items()})
#: Kinds the same bytes would give again.
PERMANENT_ERROR_KINDS = frozenset(kind for kind, (permanent, _) in _KINDS.items() if permanent)
#: The longest ``error`` text a row carries.
MAX_ERROR_CHARS = 500
#: The kinds that say the storage failed, not the image: a batch of only these fails the run.
STORAGE_ERROR_KINDS = frozenset({"storage"})


def error_text(message: str) -> str:
    """``message`` as a row's ``error``: one line (exception text can span several), at most MAX_ERROR_CHARS."""
    return " ".join(str(message).split())[:MAX_ERROR_CHARS]


def exception_text(exc: BaseException) -> str:
    """An exception as a row's ``error``: its type and message, one line, capped."""
    return error_text(f"{type(exc).__name__}: {exc}")
