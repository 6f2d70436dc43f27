"""The two backend interfaces. A backend is built once per Ray actor and then
called with whole batches; it never sees files, only decoded RGB images, or
inputs its CPU-side :class:`Preprocessor` already made from them.

A backend class may offer a ``cpu_preprocessor``: built from the spec and the
config alone (no weights), it runs in the pipeline's CPU decode tasks and
turns each image into model-ready bytes (resized, cropped, normalised), so
the GPU actor only deserialises them with numpy and runs tensors
(``describe_prepared`` / ``embed_prepared``). Backends without one, and
subclasses that override the PIL entry point (test doubles, plug-ins that
inspect the images), keep receiving PIL images.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: pipeline.config imports this module (via the Moondream hub identity)
    from PIL import Image


class ModelUnavailable(RuntimeError):
    """Weights are missing or cannot be loaded; the message names the fix."""


@dataclass(frozen=True)
class Description:
    """What a captioner says about one image."""

    caption: str | None
    answers: tuple[str, ...]  # one per question, same order
    # Probability of "yes" at the answer's first step, per question; None where the question is not
    # yes/no or the backend cannot tell. Empty when the backend reports none.
    yes_probs: tuple[float | None, ...] = ()
    # Whether the caption / each answer stopped at its token cap instead of at end-of-sequence.
    caption_truncated: bool = False
    answers_truncated: tuple[bool, ...] = ()
    # The second, short caption when the config asks two lengths (CaptionConfig.short_length), else None.
    short_caption: str | None = None


class Preprocessor(ABC):
    """CPU-side preparation of one image for one backend; picklable, holds no weights."""

    @abstractmethod
    def prepare(self, image: Image.Image) -> bytes:
        """Model-ready input for ``image`` (see :func:`pack_array`); raises on an image it cannot take."""


# ---- the prepared inputs' wire format ------------------------------------------------
# magic, dtype code, ndim, number of int32 metadata values, then the shape
# (uint32 each), the metadata and the array's raw little-endian bytes. No
# pickle: the actor reads it back with numpy.frombuffer, without a copy.
_MAGIC = b"CPIN"
_DTYPES = {b"B": np.dtype(np.uint8), b"e": np.dtype("<f2"), b"f": np.dtype("<f4")}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_HEAD = struct.Struct("<4scBB")


def pack_array(array: np.ndarray, meta: Sequence[int] = ()) -> bytes:
    """Serialise ``array`` (uint8, float16 or float32) and a few ints of metadata."""
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _CODES:
        raise TypeError(f"cannot pack an array of dtype {array.dtype}; use uint8, float16 or float32")
    array = array.astype(dtype, copy=False)
    head = _HEAD.pack(_MAGIC, _CODES[dtype], array.ndim, len(meta))
    dims = struct.pack(f"<{array.ndim}I{len(meta)}i", *array.shape, *meta)
    return head + dims + array.tobytes()


def unpack_array(data: bytes | memoryview) -> tuple[np.ndarray, tuple[int, ...]]:
    """(read-only array, metadata) from :func:`pack_array`'s bytes; ValueError on anything else."""
    if len(data) < _HEAD.size:
        raise ValueError(f"prepared input of {len(data)} bytes is too short")
    magic, code, ndim, n_meta = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC or code not in _DTYPES:
        raise ValueError("not a prepared input (bad header)")
    fields = struct.unpack_from(f"<{ndim}I{n_meta}i", data, _HEAD.size)
    shape, meta = fields[:ndim], tuple(fields[ndim:])
    offset = _HEAD.size + 4 * (ndim + n_meta)
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"prepared input holds {len(data) - offset} bytes of data, its header says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape), meta


def overrides(cls: type, base: type, method: str) -> bool:
    """Whether ``cls`` replaces ``base.method`` (then it wants to see what that method receives)."""
    return getattr(cls, method) is not getattr(base, method)


class Captioner(ABC):
    #: stable id written to the ``caption_model`` column (spec that rebuilds it)
    model_id: str
    #: hub revision, or "local" for a directory
    revision: str

    @abstractmethod
    def describe(
        self, images: Sequence[Image.Image], questions: Sequence[str], *, caption: bool = True
    ) -> list[Description]:
        """Caption each image (when ``caption``) and answer every question about it.

        Backends encode each image once and reuse that encoding for every prompt.
        """

    @classmethod
    def cpu_preprocessor(cls, ref: Any, config: Any) -> Preprocessor | None:
        """The CPU-side preparation for ``ref`` (a ModelRef) and ``config`` (a CaptionConfig), or None.

        Built without loading weights; ``describe_prepared`` takes what it makes.
        """
        return None

    def describe_prepared(
        self, inputs: Sequence[bytes], questions: Sequence[str], *, caption: bool = True
    ) -> list[Description]:
        """``describe`` for inputs made by this class's ``cpu_preprocessor``."""
        raise NotImplementedError(f"{type(self).__name__} has no CPU preprocessor")


class Embedder(ABC):
    model_id: str
    revision: str
    dim: int

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, dim) float32, rows L2-normalised."""

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, rows L2-normalised, in the same space as images."""

    @classmethod
    def cpu_preprocessor(cls, ref: Any) -> Preprocessor | None:
        """The CPU-side preparation for ``ref`` (a ModelRef), built without weights, or None."""
        return None

    def embed_prepared(self, inputs: Sequence[bytes]) -> np.ndarray:
        """``embed_images`` for inputs made by this class's ``cpu_preprocessor``."""
        raise NotImplementedError(f"{type(self).__name__} has no CPU preprocessor")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible to this process, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was asked for but this worker sees no CUDA GPU; use --device auto or cpu")
    return device
