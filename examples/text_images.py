"""Images with known text, drawn with the fonts Debian ships, for the OCR tests and bench/ocr.py.

    from examples.text_images import text_image, text_set, text_free_scenes

``text_set`` is a deterministic labelled set: several fonts (DejaVu and
Liberation: fonts-dejavu-core, fonts-liberation) and sizes, rotation up to 10
degrees, plain, photo-like and low-contrast backgrounds, one line and several.
``text_free_scenes`` draws scenes with no text at all (gradients, shapes,
noise) for the false-positive rate. Not part of the installed library.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
FONTS = (
    "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf",
    "LiberationSans-Regular.ttf", "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf",
    "LiberationSansNarrow-Regular.ttf", "LiberationSerif-Italic.ttf",
)  # fmt: skip
SIZES = (18, 26, 40)
ROTATIONS = (0, -4, 6, -10, 10)
BACKGROUNDS = ("plain", "photo", "low_contrast")
# Words a sign, label or slide might hold: plain English, some capitalised, a few numbers.
WORDS = (
    "open", "closed", "sale", "exit", "bakery", "coffee", "station", "platform", "invoice", "total", "receipt",
    "market", "garden", "library", "museum", "parking", "hotel", "pharmacy", "fresh", "bread", "daily", "menu",
    "north", "south", "street", "avenue", "harbour", "welcome", "entrance", "tickets", "office", "school",
    "Monday", "Friday", "London", "Paris", "Berlin", "river", "bridge", "castle", "Zanzibar", "lighthouse",
    "2024", "1987", "42", "15:30", "No.7",
)  # fmt: skip


@dataclass(frozen=True)
class TextImage:
    name: str
    image: Image.Image
    text: str  # what is written, lines joined by "\n"
    font: str
    size: int
    rotation: int
    background: str


def font_path(name: str) -> Path:
    for folder in FONT_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"font {name} not found under {', '.join(map(str, FONT_DIRS))}; apt-get install fonts-dejavu-core fonts-liberation")


def available_fonts() -> list[str]:
    return [name for name in FONTS if any((folder / name).is_file() for folder in FONT_DIRS)]


def _photo_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Something photo-like: a two-colour gradient, soft blobs and sensor noise."""
    width, height = size
    start, end = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * 0.6 + np.linspace(0.0, 1.0, height)[:, None, None] * 0.4
    pixels = start + (end - start) * ramp
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, height / 2)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.uniform(30, 230, 3)))
    image = image.filter(ImageFilter.GaussianBlur(6))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 5, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def text_image(lines: list[str], *, font: str = "DejaVuSans.ttf", size: int = 40, rotation: int = 0,
               background: str = "plain", seed: int = 0) -> Image.Image:
    """``lines`` drawn on a background, rotated by ``rotation`` degrees; the canvas fits the text with a margin."""
    rng = np.random.default_rng(seed)
    face = ImageFont.truetype(str(font_path(font)), size)
    spacing = size // 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), "\n".join(lines), font=face, spacing=spacing)
    margin = size * 2
    canvas = (right - left + 2 * margin, bottom - top + 2 * margin)
    if background == "photo":
        image = _photo_background(canvas, rng)
        # A sign on the photo: a light panel behind dark text, as signs are.
        panel = Image.new("RGB", (right - left + size, bottom - top + size), (235, 232, 220))
        image.paste(panel, (margin - size // 2, margin - size // 2))
        ink = (25, 25, 30)
    elif background == "low_contrast":
        grey = int(rng.uniform(110, 150))
        image = Image.new("RGB", canvas, (grey, grey, grey))
        ink = (grey + 45, grey + 45, grey + 45)
    else:
        image = Image.new("RGB", canvas, (255, 255, 255))
        ink = (0, 0, 0)
    ImageDraw.Draw(image).multiline_text((margin - left, margin - top), "\n".join(lines), font=face, fill=ink,
                                         spacing=spacing)
    if rotation:
        image = image.rotate(rotation, resample=Image.BICUBIC, expand=True, fillcolor=image.getpixel((0, 0)))
    return image


def text_set(count: int = 60, seed: int = 0) -> list[TextImage]:
    """``count`` labelled images cycling through fonts, sizes, rotations, backgrounds and 1 or 3 lines."""
    rng = random.Random(seed)
    fonts = available_fonts()
    out = []
    for n in range(count):
        font, size = fonts[n % len(fonts)], SIZES[n % len(SIZES)]
        rotation, background = ROTATIONS[n % len(ROTATIONS)], BACKGROUNDS[(n // len(SIZES)) % len(BACKGROUNDS)]
        line_count = 1 if n % 2 == 0 else 3
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(line_count)]
        image = text_image(lines, font=font, size=size, rotation=rotation, background=background, seed=seed + n)
        out.append(TextImage(f"text_{n:03d}", image, "\n".join(lines), font, size, rotation, background))
    return out


def text_free_scenes(count: int = 20, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[Image.Image]:
    """Scenes with no text in them: photo-like backgrounds, some with bars, stripes and shapes (edges OCR might misread)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        image = _photo_background(size, rng)
        draw = ImageDraw.Draw(image)
        if n % 3 == 1:  # fence posts / window bars: thin vertical strokes, the classic false positive
            for x in range(20, size[0] - 20, int(rng.integers(12, 30))):
                draw.rectangle([x, size[1] // 3, x + 3, size[1] - 30], fill=(30, 30, 30))
        elif n % 3 == 2:
            for _ in range(8):
                x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
                draw.rectangle([x, y, x + rng.uniform(10, 60), y + rng.uniform(10, 60)],
                               fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
        out.append(image)
    return out
