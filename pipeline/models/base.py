"""The two backend interfaces. A backend is built once per Ray actor and then
called with whole batches; it never sees files, only decoded RGB images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
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
