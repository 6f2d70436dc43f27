"""Synthetic JPEGs (smooth gradients plus a little noise) for the tests and the benchmarks.

    from examples.synthetic_photos import make_jpegs

Not part of the installed library, and importable without the tests package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(directory: Path, count: int, size=(64, 48), seed=0) -> list[Path]:
    """Write ``count`` distinct JPEGs (smooth gradients plus a little noise) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * 0.5 + np.linspace(0.0, 1.0, height)[:, None, None] * 0.5
    paths = []
    for index in range(count):
        start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = start + (end - start) * ramp + rng.normal(0, 6, (height, width, 3))
        path = directory / f"img_{index:06d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths
