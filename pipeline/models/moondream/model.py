"""The Moondream 2 network: vision encoder/projection plus text decoder, named like the checkpoint."""

from __future__ import annotations

from torch import nn

from pipeline.models.moondream.config import MoondreamConfig
from pipeline.models.moondream.text import TextModel
from pipeline.models.moondream.vision import VisionModel


class MoondreamModel(nn.Module):
    """``state_dict()`` keys are the checkpoint's without the leading ``model.`` (region heads left out:
    detect/point are not implemented)."""

    def __init__(self, config: MoondreamConfig):
        super().__init__()
        self.config = config
        self.vision = VisionModel(config.vision)
        self.text = TextModel(config.text)
