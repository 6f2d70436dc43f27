"""Make torchvision importable next to a CPU-only torch.

PyPI's torchvision wheels are CUDA builds; next to the CPU torch wheel their C
extension cannot load, and torchvision's own import then fails registering a
fake kernel for ``torchvision::nms`` (an op only the extension defines).
open_clip and transformers only need torchvision's pure-Python transforms, so
when, and only when, that exact failure happens we declare the two op schemas
torchvision expects (no kernels: calling nms still fails loudly) and import
again. With a matching torch/torchvision pair this does nothing.
"""

from __future__ import annotations

import sys

_fragment = None  # keeps the schema library alive for the process lifetime


def ensure_torchvision_importable() -> None:
    global _fragment
    try:
        import torchvision  # noqa: F401

        return
    except ModuleNotFoundError:
        return  # not installed: callers that need it will say so
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
