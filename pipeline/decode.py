"""Safe image decoding: bytes in, an RGB image sized for the models (or an error) out.

Bad input never raises here: every failure becomes a ``DecodedImage`` with an
``error_kind`` from ``schemas.errors.ERROR_KINDS`` and a one-line message, which the pipeline
writes as an error row. The size guard reads the pixel size from the header and
refuses oversized images before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from pipeline.config import DecodeConfig
from pipeline.storage import is_unavailable, read_bytes
from schemas.errors import error_text

# Every error_kind, its permanence and the error-text cap live beside the schema (schemas/errors.py).

HEIF_HINT = "pip install pillow-heif (or pip install 'captioner[heif]')"

# ISO base media file brands (bytes 8-12, after "ftyp") of HEIF/AVIF stills and sequences.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
# Low-overhead ("minimized") HEIF, ISO/IEC 23008-12 amd. 2: major brand mif3
# with a 'mini' box; the codec brand ('avif', 'heic') sits in the minor-version
# field. Few decoders read it yet, so a failure to open one is a support gap.
_MINIMIZED_HEIF_BRANDS = {b"mif3", b"mini"}

# Leading bytes of image formats Pillow reads: if one of these fails to open, the
# file is a broken image rather than some other kind of file.
_IMAGE_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}

# Image.MAX_IMAGE_PIXELS is process-global; it is switched off only while a header
# is parsed, under this lock, so that our own limit (with its clearer message)
# decides instead of Pillow's.
_PIXEL_LIMIT_LOCK = threading.Lock()
_heif_registered: bool | None = None


@dataclass
class DecodedImage:
    """One input after decoding. On error ``image`` is None and ``error_kind``/``error`` say why;
    ``image_id`` and ``bytes`` are set whenever the bytes were read, ``format`` whenever the header was."""

    uri: str
    image: Image.Image | None = None
    image_id: str | None = None
    bytes: int | None = None
    format: str | None = None
    # Original pixel size after EXIF orientation, before downscaling for the models.
    width: int | None = None
    height: int | None = None
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.image is not None


class _DecodeFailure(Exception):
    """A failure already classified; carries its error_kind and message to decode_bytes."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def load_image(uri: str, config: DecodeConfig, storage_options: dict[str, Any] | None = None) -> DecodedImage:
    """Read ``uri`` and decode it; read failures become "missing" or "unreadable" results."""
    try:
        data = read_bytes(uri, storage_options)
    except FileNotFoundError:
        return _failed(DecodedImage(uri), "missing", f"file not found: {uri} (deleted or moved after listing?)")
    except PermissionError as exc:
        return _failed(DecodedImage(uri), "unreadable", f"permission denied reading {uri}: {exc.strerror or exc}")
    except Exception as exc:  # I/O and network errors of any backend: an error row, not a crashed run
        if is_unavailable(exc):
            return _failed(DecodedImage(uri), "storage", f"cannot read {uri}: the storage did not answer "
                           f"({type(exc).__name__}: {exc})")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return _failed(DecodedImage(uri), "unreadable", f"cannot read {uri}: {reason}")
    return decode_bytes(uri, data, config)


def decode_bytes(uri: str, data: bytes, config: DecodeConfig, *, reduce_early: bool = False) -> DecodedImage:
    """Decode ``data`` into an RGB image whose long side is at most ``config.model_max_side``.

    ``reduce_early`` (query images): shrink the decoded pixels by the integer
    factor the final resize would reduce by anyway, before any colour
    conversion or EXIF turn copies them at full size. The result differs from
    the pipeline's by edge rounding at most, and only for images more than 6x
    ``model_max_side``; RGB images without EXIF turns come out the same.
    """
    result = DecodedImage(uri, bytes=len(data))
    if not data:
        return _failed(result, "empty", "empty file (0 bytes)")
    result.image_id = hashlib.sha256(data).hexdigest()
    try:
        _decode_into(result, data, config, reduce_early=reduce_early)
    except _DecodeFailure as failure:
        return _failed(result, failure.kind, failure.message)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (e.g. on a GIF frame larger than the canvas), or its
        # warning when the caller runs with warnings as errors.
        return _failed(result, "too_large", f"image too large: {exc}; raise decode.max_pixels to accept it")
    except MemoryError:
        return _failed(result, "too_large", "image too large: out of memory while decoding it; lower decode.max_pixels")
    except EOFError as exc:
        return _failed(result, "truncated", f"truncated image: the data ends early ({exc or 'end of file'})")
    except Exception as exc:  # noqa: BLE001 - any other Pillow failure is a corrupt file
        if "truncated" in str(exc).lower():
            return _failed(result, "truncated", f"truncated image: {exc}")
        return _failed(result, "corrupt", f"corrupt image: {type(exc).__name__}: {exc}")
    return result


def _failed(result: DecodedImage, kind: str, message: str) -> DecodedImage:
    # Messages embed exception text, which can span lines; rows want one line.
    result.image = None
    result.error_kind = kind
    result.error = error_text(message)
    return result


def _decode_into(result: DecodedImage, data: bytes, config: DecodeConfig, *, reduce_early: bool = False) -> None:
    image = _open_header(data)
    result.format = image.format
    width, height = image.size
    pixels = width * height
    if pixels > config.max_pixels:
        raise _DecodeFailure(
            "too_large",
            f"image too large: {width}x{height} = {pixels:,} pixels is above the limit of {config.max_pixels:,}; "
            "raise decode.max_pixels to accept it",
        )
    _draft_for(image, config.model_max_side)
    image.load()  # a truncated file fails here: LOAD_TRUNCATED_IMAGES stays off
    if reduce_early:
        image = _reduced(image, config.model_max_side)
    turned = _apply_exif_orientation(image)
    # Decided from the orientation applied, not from the size before and after:
    # a near-square image drafted to a square (4000x3999 -> 500x500) turns
    # without changing size.
    result.width, result.height = (height, width) if turned else (width, height)
    image = _to_rgb(image)
    result.image = _fit(image, config.model_max_side)


def _open_header(data: bytes) -> Image.Image:
    """Parse the header only (no pixels yet); classify files Pillow does not recognise."""
    _register_heif_opener()
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise _DecodeFailure(*_identify_non_image(data)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _register_heif_opener() -> None:
    """Let Pillow open HEIC/HEIF when pillow-heif is installed; checked once per process."""
    global _heif_registered
    if _heif_registered is None:
        try:
            import pillow_heif
        except ImportError:
            _heif_registered = False
        else:
            pillow_heif.register_heif_opener()
            _heif_registered = True


def _identify_non_image(data: bytes) -> tuple[str, str]:
    """(error_kind, message) for bytes no Pillow plugin accepted."""
    head = data[:64]
    brands = _ftyp_brands(data)
    if brands & _MINIMIZED_HEIF_BRANDS:
        codec = "AVIF" if brands & _AVIF_BRANDS else "HEIC" if brands & _HEIF_BRANDS else "HEIF"
        return "unsupported_format", (
            f"{codec} image in the newer minimized HEIF form (brand mif3) cannot be decoded by this install; "
            f"convert it (e.g. to JPEG or PNG), or upgrade Pillow / {HEIF_HINT} once they read mif3"
        )
    if brands & _AVIF_BRANDS:
        if features.check("avif"):
            return "corrupt", "corrupt image: starts like an AVIF file but its header cannot be read"
        return "unsupported_format", (
            "AVIF image cannot be decoded: this Pillow was built without AVIF support; "
            "upgrade Pillow (recent wheels include it; python -m PIL.report lists what a build reads)"
        )
    if brands & _HEIF_BRANDS:
        if _heif_registered:
            return "corrupt", "corrupt image: starts like a HEIC/HEIF file but its header cannot be read"
        return "unsupported_format", f"HEIC/HEIF image cannot be decoded here; {HEIF_HINT}"
    if brands:
        return "not_image", "looks like an MP4/QuickTime video or other ISO media file, not an image"
    for magic, name in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return "corrupt", f"corrupt image: starts like a {name} file but its header cannot be read"
    text = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "not_image", "looks like HTML, not an image (an error page saved in place of the file?)"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "unsupported_format", "SVG vector image: not supported; rasterise it (e.g. to PNG) first"
    if text.startswith(b"<?xml"):
        return "not_image", "looks like XML, not an image"
    if text.startswith(b"%pdf"):
        return "not_image", "looks like a PDF document, not an image"
    if text.startswith((b"{", b"[")):
        return "not_image", "looks like JSON, not an image"
    if _looks_like_text(data[:2048]):
        return "not_image", "looks like plain text, not an image"
    return "not_image", f"not a recognised image format (starts with bytes {head[:8].hex(' ')})"


def _ftyp_brands(data: bytes) -> set[bytes]:
    """Brands of an ISO media file's leading ftyp box (major, then compatible); empty if there is none."""
    if data[4:8] != b"ftyp":
        return set()
    box_end = min(int.from_bytes(data[:4], "big"), len(data), 256)
    # Major brand at 8..12, minor version at 12..16, compatible brands after.
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, box_end - 3, 4)}
    if data[8:12] in _MINIMIZED_HEIF_BRANDS:
        brands.add(data[12:16])  # the minor version names the codec brand there
    return brands


def _looks_like_text(sample: bytes) -> bool:
    try:
        decoded = sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n" for ch in decoded)


def _draft_for(image: Image.Image, max_side: int) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when the models need far fewer pixels.

    libjpeg picks the largest reduction that still leaves at least the requested
    size, and its reduced decode averages in the DCT domain rather than dropping
    pixels, so no extra margin is needed; a 12 MP photo decodes ~2.5x faster.
    Other formats ignore drafts.
    """
    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 0.5:
        image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))


def _reduced(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` shrunk by the integer factor ``_fit``'s resize (reducing_gap 3) would reduce it by; EXIF kept."""
    factor = int(max(image.size) / max_side / 3.0)
    if factor < 2:
        return image
    width, height = image.size
    # In bands of rows (a multiple of the factor, so the blocks averaged are
    # the same): reduce() of RGBA/LA first converts the whole image to
    # premultiplied alpha, a second full-size copy.
    rows = factor * max(1, 2**20 // (width * factor))
    try:
        reduced = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
        for top in range(0, height, rows):
            reduced.paste(image.crop((0, top, width, min(height, top + rows))).reduce(factor), (0, top // factor))
    except ValueError:  # a mode reduce() does not take (P, 1, I;16): left to the full-size path
        return image
    reduced.info = image.info  # PNG transparency keys, EXIF orientation
    if hasattr(image, "getexif"):
        reduced.getexif().update(image.getexif())
    return reduced


# EXIF orientations that turn the image by a quarter turn (transposed or transversed).
_QUARTER_TURNS = {5, 6, 7, 8}


def _apply_exif_orientation(image: Image.Image) -> bool:
    """Turn ``image`` upright in place; True when that swapped its width and height."""
    try:
        orientation = image.getexif().get(0x0112)
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - corrupt EXIF must not cost the image; keep it as stored
        return False
    return orientation in _QUARTER_TURNS


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    # A colour key (PNG tRNS on an RGB, greyscale or 16-bit image) marks
    # transparent pixels as surely as an alpha channel does: look for it first.
    keyed = "transparency" in image.info
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa") or keyed:
        return _on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, HSV
    except ValueError as exc:
        raise _DecodeFailure("unsupported_format", f"cannot convert {mode} pixels to RGB: {exc}") from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    # Transparent areas are usually meant as background; black (what dropping
    # alpha gives) would change what the models see.
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale to 8 bits, scaled rather than clipped."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and _within(values, 0, 65535)):
        # 16-bit data (Pillow stores 16-bit TIFF/PNG as I;16 or I): full range maps to full range.
        scaled = values / 257.0
    elif image.mode == "F" and _within(values, 0.0, 1.0):
        scaled = values * 255.0
    else:
        # Unknown range: stretch what is there to 0..255.
        low, high = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    grey = np.nan_to_num(np.rint(scaled), nan=0.0).clip(0, 255).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):
        # The key is a raw sample value, so compare before scaling (two raw
        # values may scale to the same 8-bit grey).
        grey[values == key] = 255
    return Image.fromarray(grey).convert("RGB")


def _within(values: np.ndarray, low: float, high: float) -> bool:
    return values.size == 0 or (float(np.nanmin(values)) >= low and float(np.nanmax(values)) <= high)


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
