"""Moondream 2 (vikhyatk/moondream2), the default captioner, implemented natively in PyTorch.

Loads the official model.safetensors (no trust_remote_code); see SPEC notes in each module:
preprocess (CPU crops), vision, text, engine (batched prefix-shared generation), hub (files),
captioner (the backend). ``Moondream2Captioner`` is imported lazily so that the driver can use
``hub.check_moondream_files`` and ``preprocess.prepare_image`` without importing torch.
"""

from __future__ import annotations

__all__ = ["Moondream2Captioner"]


def __getattr__(name: str):
    if name == "Moondream2Captioner":
        from pipeline.models.moondream.captioner import Moondream2Captioner

        return Moondream2Captioner
    raise AttributeError(name)
