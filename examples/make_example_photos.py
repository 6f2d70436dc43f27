"""Regenerate the small example photos in examples/photos/ (they are committed).

Drawn with Pillow so the repository ships no third-party images: a few scenes
with shapes, colours and text, one EXIF-rotated photo, one PNG with alpha, and
one truncated JPEG that shows how a bad file becomes a status=error row.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def _scene(size, sky, ground, draw_fn):
    image = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size[1] * 2 // 3, size[0], size[1]], fill=ground)
    draw_fn(draw, size)
    return image


def _sun(draw, size):
    draw.ellipse([size[0] - 70, 15, size[0] - 20, 65], fill=(255, 210, 40))


def _house(draw, size):
    draw.rectangle([60, 90, 150, 160], fill=(180, 60, 50))
    draw.polygon([(50, 90), (105, 45), (160, 90)], fill=(90, 40, 30))
    draw.rectangle([95, 120, 115, 160], fill=(60, 40, 20))


def _sign(draw, size):
    draw.rectangle([40, 40, 200, 100], fill=(250, 250, 250), outline=(0, 0, 0), width=3)
    draw.text((55, 60), "OPEN 24 HOURS", fill=(200, 0, 0))


def _figure(draw, size):
    draw.ellipse([110, 50, 140, 80], fill=(230, 190, 160))
    draw.line([125, 80, 125, 130], fill=(20, 20, 120), width=8)
    draw.line([125, 130, 105, 165], fill=(20, 20, 120), width=6)
    draw.line([125, 130, 145, 165], fill=(20, 20, 120), width=6)


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name, image, **kwargs):
        path = out / name
        image.save(path, **kwargs)
        written.append(path)

    save("sunny_house.jpg", _scene((240, 180), (120, 180, 250), (70, 160, 60), lambda d, s: (_sun(d, s), _house(d, s))), quality=85)
    save("shop_sign.jpg", _scene((240, 180), (200, 200, 210), (90, 90, 90), _sign), quality=85)
    save("person_on_grass.jpg", _scene((240, 180), (150, 200, 255), (60, 150, 50), _figure), quality=85)
    save("night_sky.jpg", _scene((240, 180), (10, 10, 40), (20, 30, 20), lambda d, s: d.ellipse([30, 20, 60, 50], fill=(240, 240, 220))), quality=85)

    # Landscape pixels, EXIF says "rotate 90 degrees": decoded upright as portrait.
    rotated = _scene((240, 160), (250, 200, 150), (200, 120, 60), _sun)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated_exif.jpg", rotated, quality=85, exif=exif.tobytes())

    logo = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse([20, 20, 140, 140], fill=(30, 120, 220, 255))
    save("logo_alpha.png", logo)

    # A photo cut off mid-download: it becomes an error row, the run goes on.
    buffer = io.BytesIO()
    _scene((240, 180), (120, 180, 250), (70, 160, 60), _house).save(buffer, "JPEG", quality=85)
    broken = out / "broken_download.jpg"
    broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    written.append(broken)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "photos"
    for path in build(target):
        print(path)
