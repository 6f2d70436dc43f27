"""Model backends: captioners (caption + probe answers) and embedders, chosen by name.

The names below are looked up lazily: pipeline.config imports pipeline.models.moondream.hub (the
pinned release), which must not pull in the registry, since the registry imports pipeline.config.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Captioner": "pipeline.models.base",
    "Description": "pipeline.models.base",
    "Embedder": "pipeline.models.base",
    "ModelRef": "pipeline.models.registry",
    "UnknownModel": "pipeline.models.registry",
    "build_captioner": "pipeline.models.registry",
    "build_embedder": "pipeline.models.registry",
    "resolve_captioner": "pipeline.models.registry",
    "resolve_embedder": "pipeline.models.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
