"""Image -> Moondream crops, on the CPU (numpy/PIL only, no torch).

This is the part of the model that belongs in the pipeline's CPU decode stage:
``prepare_image`` turns one RGB image into uint8 crops plus the tiling, and
the GPU actor only normalises and encodes them (``normalise_crops``).

The reference (moondream/torch/image_crops.py) does this:
- one global crop: the whole image resized to 378x378 (aspect ratio not kept);
- a grid of ``tiling = (rows, cols)`` local crops: the image resized to
  ``rows*266+112`` x ``cols*266+112`` and cut into 378x378 crops at a stride
  of 266, so neighbouring crops overlap by a 4-patch (56 px) margin each side;
- the grid is chosen from the image size minus the margins and ``max_crops``.
Resizing is Lanczos through PIL (the reference uses pyvips when it is importable;
PIL is what it uses without it, and what the parity fixtures were made with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_SIZE = 378
PATCH_SIZE = 14
OVERLAP_MARGIN = 4  # patches
DEFAULT_MAX_CROPS = 12


@dataclass(frozen=True)
class MoondreamCrops:
    """Model-ready input for one image: crops[0] is the global view, crops[1:] the tiles row by row."""

    crops: np.ndarray  # (1 + rows*cols, 378, 378, 3) uint8
    tiling: tuple[int, int]  # (rows, cols)

    @property
    def n_crops(self) -> int:
        return int(self.crops.shape[0])


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of local crops for an image of ``height`` x ``width`` usable pixels."""
    if height <= window or width <= window:
        return (1, 1)
    min_rows, min_cols = math.ceil(height / window), math.ceil(width / window)
    if min_rows * min_cols > max_crops:
        # Too large even at the minimum: shrink both sides in proportion.
        ratio = math.sqrt(max_crops / (min_rows * min_cols))
        return (max(1, math.floor(min_rows * ratio)), max(1, math.floor(min_cols * ratio)))
    # The grid whose aspect ratio follows the image's and whose area is about max_crops.
    rows = max(math.floor(math.sqrt(max_crops * height / width)), min_rows)
    cols = max(math.floor(math.sqrt(max_crops * width / height)), min_cols)
    if rows * cols > max_crops:
        if cols > rows:
            cols = math.floor(max_crops / rows)
        else:
            rows = math.floor(max_crops / cols)
    return (max(1, rows), max(1, cols))


def prepare_image(
    image: Image.Image | np.ndarray,
    max_crops: int = DEFAULT_MAX_CROPS,
    overlap_margin: int = OVERLAP_MARGIN,
    crop_size: int = CROP_SIZE,
    patch_size: int = PATCH_SIZE,
) -> MoondreamCrops:
    """Global crop + overlapping local crops of one image (RGB; other modes are converted)."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be at least 1, got {max_crops}")
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"))
    else:
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    margin = overlap_margin * patch_size
    window = (crop_size // patch_size - 2 * overlap_margin) * patch_size
    rows, cols = select_tiling(height - 2 * margin, width - 2 * margin, window, max_crops)

    crops = np.zeros((1 + rows * cols, crop_size, crop_size, 3), dtype=np.uint8)
    source = Image.fromarray(pixels)
    crops[0] = np.asarray(source.resize((crop_size, crop_size), resample=Image.Resampling.LANCZOS))
    target_h, target_w = rows * window + 2 * margin, cols * window + 2 * margin
    tiled = np.asarray(source.resize((target_w, target_h), resample=Image.Resampling.LANCZOS))
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * window, c * window
            # The resized image is exactly covered, so every tile is a full crop; clip anyway
            # (zeros fill the rest, as in the reference).
            tile = tiled[y0 : y0 + crop_size, x0 : x0 + crop_size]
            crops[1 + r * cols + c, : tile.shape[0], : tile.shape[1]] = tile
    return MoondreamCrops(crops, (rows, cols))
