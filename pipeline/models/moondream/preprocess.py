"""Image -> Moondream crops, on the CPU (numpy/PIL only, no torch).

This is the part of the model that belongs in the pipeline's CPU decode stage:
``prepare_image`` turns one RGB image into uint8 crops plus the tiling, and
the GPU actor only normalises and encodes them (``normalise_crops``).

The reference (moondream/torch/image_crops.py) does this, with the official geometry
(crop 378 px, patch 14 px, overlap margin 4 patches, up to 12 local crops):
- one global crop: the whole image resized to 378x378 (aspect ratio not kept);
- a grid of ``tiling = (rows, cols)`` local crops: the image resized to
  ``rows*266+112`` x ``cols*266+112`` and cut into 378x378 crops at a stride
  of 266, so neighbouring crops overlap by a 4-patch (56 px) margin each side;
- the grid is chosen from the image size minus the margins and ``max_crops``.
The geometry is the model's (``VisionConfig.crop_geometry``: official values, or the checkpoint's config.json),
handed to ``prepare_image`` and ``MoondreamPreprocessor`` by whoever read that config.
Resizing is Lanczos through PIL (the reference uses pyvips when it is importable;
PIL is what it uses without it, and what the parity fixtures were made with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.models.base import Preprocessor, pack_array, unpack_array
from pipeline.models.moondream.config import CropGeometry, VisionConfig

OFFICIAL_GEOMETRY = VisionConfig().crop_geometry


@dataclass(frozen=True)
class MoondreamCrops:
    """Model-ready input for one image: crops[0] is the global view, crops[1:] the tiles row by row."""

    crops: np.ndarray  # (1 + rows*cols, crop_size, crop_size, 3) uint8
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
    geometry: CropGeometry = OFFICIAL_GEOMETRY,
    *,
    max_crops: int | None = None,
) -> MoondreamCrops:
    """Global crop + overlapping local crops of one image (RGB; other modes are converted), cut with the
    model's ``geometry``; ``max_crops`` (default: the geometry's) bounds the local crops."""
    max_crops = geometry.max_crops if max_crops is None else max_crops
    crop_size, patch_size, overlap_margin = geometry.crop_size, geometry.patch_size, geometry.overlap_margin
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


# ---- the decode stage's side: crops as bytes between the CPU task and the GPU actor ----


def crops_to_bytes(prepared: MoondreamCrops) -> bytes:
    """The crops (N, crop_size, crop_size, 3) uint8 and the tiling, in the pipeline's prepared-input format."""
    return pack_array(prepared.crops, prepared.tiling)


def crops_from_bytes(data: bytes | memoryview, crop_size: int) -> MoondreamCrops:
    """Inverse of :func:`crops_to_bytes` (no copy); checks the shape against the tiling and the
    model's ``crop_size`` (crops cut for another geometry are refused, not mis-encoded)."""
    crops, meta = unpack_array(data)
    if (
        len(meta) != 2 or crops.dtype != np.uint8 or crops.ndim != 4
        or crops.shape[1:] != (crop_size, crop_size, 3) or crops.shape[0] != 1 + meta[0] * meta[1]
    ):  # fmt: skip
        raise ValueError(f"not Moondream crops: array {crops.dtype}{crops.shape}, tiling {meta}")
    return MoondreamCrops(crops, (int(meta[0]), int(meta[1])))


@dataclass(frozen=True)
class MoondreamPreprocessor(Preprocessor):
    """``prepare_image`` in the decode stage: image -> serialised crops + tiling, with the geometry of
    the model the caption stage loads (read from its config.json by ``Moondream2Captioner.cpu_preprocessor``)."""

    geometry: CropGeometry
    max_crops: int

    def prepare(self, image: Image.Image) -> bytes:
        return crops_to_bytes(prepare_image(image, self.geometry, max_crops=self.max_crops))
