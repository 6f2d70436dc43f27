"""Model backends: captioners (caption + probe answers) and embedders, chosen by name."""

from pipeline.models.base import Captioner, Description, Embedder
from pipeline.models.registry import (
    ModelRef,
    UnknownModel,
    build_captioner,
    build_embedder,
    resolve_captioner,
    resolve_embedder,
)

__all__ = [
    "Captioner",
    "Description",
    "Embedder",
    "ModelRef",
    "UnknownModel",
    "build_captioner",
    "build_embedder",
    "resolve_captioner",
    "resolve_embedder",
]
