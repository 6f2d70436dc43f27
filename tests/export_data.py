"""A small photo library with known, realistic captions, for the export tests.

Real image files (JPEG and PNG, in nested folders) and a captioner Parquet
written exactly as the pipeline writes it (tests/search_data.py rows), with
Moondream-style captions, so the alt-text rules and the filters have
something real to work on. ``write_library(root, base_uri)`` puts the
Parquet rows' uris under ``base_uri`` (a local folder or an s3:// prefix).
"""

from __future__ import annotations

import io

from PIL import Image

from tests.search_data import error_row, ok_row, run_metadata, write_rows

PERSON = "Is there a person in the image?"
SKY = "What colour is the sky?"
PROBES = (PERSON, SKY)
GENERATOR = "tiny-test@local"

# relative path -> (caption, person answer, sky answer, (width, height), image format)
LIBRARY = {
    "beach/dog.jpg": (
        "The image shows a brown dog running along a sandy beach at low tide. Waves break in the background.",
        "no", "pale blue", (64, 48), "JPEG",
    ),
    "beach/family.jpg": (
        "A picture of a family of four building a sandcastle near the water, with a red bucket and two "
        "yellow spades beside them and a striped umbrella planted in the sand behind them.",
        "yes", "clear blue", (48, 64), "JPEG",
    ),
    "city/night café street.png": (
        'In this image, we can see a busy street at night with a neon sign that says "OPEN 24 HRS". '
        "Cars pass by.",
        "yes", "dark", (40, 30), "PNG",
    ),
    "portrait.jpg": (
        "Photo of an elderly man with a white beard smiling at the camera.",
        "Yes, there is.", "not visible", (30, 40), "JPEG",
    ),
}
BROKEN = "broken.jpg"


def image_bytes(size, fmt: str, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 255 - shade, 128)).save(buffer, fmt)
    return buffer.getvalue()


def library_files() -> dict[str, bytes]:
    """relative path -> file bytes (the broken file included)."""
    files = {rel: image_bytes(size, fmt, 40 * n) for n, (rel, (_, _, _, size, fmt)) in enumerate(LIBRARY.items())}
    files[BROKEN] = files["beach/dog.jpg"][:100]
    return files


def library_rows(base_uri: str) -> list[dict]:
    run = run_metadata(probes=PROBES)
    rows = []
    for rel, (caption, person, sky, (width, height), fmt) in LIBRARY.items():
        row = ok_row(f"{base_uri}/{rel}", caption, [person, sky], [1, 0, 0, 0], run=run)
        row.update(width=width, height=height, format=fmt)
        rows.append(row)
    rows.append(error_row(f"{base_uri}/{BROKEN}", run=run))
    return rows


def write_library(root, parquet) -> None:
    """The image files under local folder ``root`` and their Parquet at ``parquet``."""
    for rel, data in library_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    write_rows(parquet, library_rows(str(root)), run_metadata(probes=PROBES))
