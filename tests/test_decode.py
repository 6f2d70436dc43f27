"""pipeline.decode: every awkward input gives an RGB image or an error row, never an exception."""

from __future__ import annotations

import hashlib
import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline import decode
from pipeline.config import DecodeConfig
from pipeline.decode import decode_bytes, load_image
from schemas.errors import ERROR_KINDS
from pipeline.sources import list_images
from tests.fixtures.images import (
    CORPUS_EXPECTED,
    CORPUS_MAX_PIXELS,
    HAVE_AVIF,
    HAVE_HEIF,
    QUADRANT_COLORS,
    UPRIGHT_SIZE,
    make_jpegs,
    oriented_jpeg,
)

MAX_SIDE = 256
CONFIG = DecodeConfig(max_pixels=CORPUS_MAX_PIXELS, model_max_side=MAX_SIDE)


def decoded(corpus, name: str) -> decode.DecodedImage:
    return load_image(str(corpus[name].path), CONFIG)


def assert_close(actual, expected, tolerance: int = 3) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected)), f"{actual} is not close to {expected}"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name", sorted(CORPUS_EXPECTED))
def test_corpus_case_gives_expected_outcome(image_corpus, name):
    case = image_corpus[name]
    if name == "unreadable_chmod_000" and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root reading the file")
    result = load_image(str(case.path), CONFIG)

    assert result.error_kind == case.error_kind, result.error
    assert result.uri == str(case.path)
    if case.error_kind is None:
        assert result.ok and result.error is None
        assert result.image.mode == "RGB"
        assert (result.width, result.height) == case.size
        assert max(result.image.size) <= MAX_SIDE
        data = case.path.read_bytes()
        assert result.image_id == hashlib.sha256(data).hexdigest()
        assert result.bytes == len(data)
        assert result.format
    else:
        assert not result.ok and result.image is None
        assert result.error and "\n" not in result.error
        assert result.error_kind in ERROR_KINDS


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_image_upright(image_corpus, orientation):
    result = decoded(image_corpus, f"orientation_{orientation}")
    assert result.image.size == UPRIGHT_SIZE
    width, height = UPRIGHT_SIZE
    centres = {
        "top_left": (width // 4, height // 4),
        "top_right": (3 * width // 4, height // 4),
        "bottom_left": (width // 4, 3 * height // 4),
        "bottom_right": (3 * width // 4, 3 * height // 4),
    }
    for quadrant, point in centres.items():
        assert_close(result.image.getpixel(point), QUADRANT_COLORS[quadrant], tolerance=40)


def test_orientation_reports_original_size_of_downscaled_image():
    # Stored 2000 wide and 1000 high with orientation 6: upright it is 1000 x 2000,
    # and the JPEG draft (reduced-scale decode) must not change what is reported.
    stored = Image.new("RGB", (2000, 1000), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    result = decode_bytes("mem.jpg", buffer.getvalue(), DecodeConfig(model_max_side=1024))
    assert (result.width, result.height) == (1000, 2000)
    assert result.image.size == (512, 1024)


def test_large_jpeg_is_downscaled_keeping_aspect(tmp_path):
    [path] = make_jpegs(tmp_path, 1, size=(2000, 1000))
    result = load_image(str(path), DecodeConfig(model_max_side=300))
    assert result.ok
    assert (result.width, result.height) == (2000, 1000)
    assert result.image.size == (300, 150)


def test_cmyk_becomes_rgb(image_corpus):
    assert_close(decoded(image_corpus, "cmyk_jpeg").image.getpixel((8, 8)), (255, 0, 0), tolerance=20)


def test_alpha_is_composited_on_white(image_corpus):
    image = decoded(image_corpus, "rgba_png").image
    assert image.getpixel((4, 8)) == (255, 255, 255)  # fully transparent black shows as white
    assert_close(image.getpixel((24, 8)), (255, 127, 127), tolerance=2)


def test_palette_transparency_is_composited_on_white(image_corpus):
    image = decoded(image_corpus, "palette_transparency_png").image
    assert image.getpixel((4, 8)) == (255, 255, 255)
    assert image.getpixel((24, 8)) == (0, 0, 255)


def test_16bit_greyscale_is_scaled_not_clipped(image_corpus):
    image = decoded(image_corpus, "png_16bit").image
    assert image.getpixel((4, 4)) == (255, 255, 255)
    assert image.getpixel((12, 4)) == (128, 128, 128)
    assert image.getpixel((20, 4)) == (10, 10, 10)


@pytest.mark.parametrize(("name", "grey"), [("tiff_int32", 255), ("tiff_float", 128), ("bilevel_png", 255)])
def test_other_greyscale_modes(image_corpus, name, grey):
    assert decoded(image_corpus, name).image.getpixel((4, 4)) == (grey, grey, grey)


@pytest.mark.parametrize("name", ["animated_gif", "animated_webp"])
def test_animation_gives_first_frame(image_corpus, name):
    assert_close(decoded(image_corpus, name).image.getpixel((16, 12)), (255, 0, 0), tolerance=8)


def test_extreme_aspect_keeps_at_least_one_pixel(image_corpus):
    assert decoded(image_corpus, "wide_10000x1").image.size == (MAX_SIDE, 1)
    assert decoded(image_corpus, "tall_1x10000").image.size == (1, MAX_SIDE)


def test_too_large_message_gives_count_limit_and_setting(image_corpus):
    error = decoded(image_corpus, "bomb_png").error
    assert error.startswith("image too large")
    assert "144,000,000" in error and "10,000,000" in error and "decode.max_pixels" in error


def test_size_guard_runs_before_any_pixel_is_decoded(image_corpus, monkeypatch):
    def no_pixels(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    assert decoded(image_corpus, "bomb_png").error_kind == "too_large"
    # Its header claims 10 gigapixels over a 1x1 payload: only a header check says too_large.
    assert decoded(image_corpus, "bomb_header_png").error_kind == "too_large"


def test_pillow_own_limit_does_not_preempt_ours(monkeypatch):
    # With Pillow's limit below the image (and below ours), decoding must still
    # succeed, with no DecompressionBomb warning, and leave the global untouched.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = decode_bytes("x.jpg", oriented_jpeg(1), DecodeConfig(max_pixels=1_000_000))
    assert result.ok, result.error
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_pillow_bomb_error_during_load_is_too_large(monkeypatch):
    def bomb(self):
        raise Image.DecompressionBombError("Image size (999 pixels) exceeds limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", bomb)
    result = decode_bytes("x.jpg", oriented_jpeg(1), CONFIG)
    assert result.error_kind == "too_large"
    assert "decode.max_pixels" in result.error


def test_truncated_files_are_errors_and_global_flag_untouched(image_corpus):
    for name in ("truncated_jpeg", "truncated_png"):
        assert decoded(image_corpus, name).error_kind == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_html_message_says_what_it_is(image_corpus):
    assert "HTML" in decoded(image_corpus, "html_as_png").error


@pytest.mark.parametrize(
    ("data", "kind", "words"),
    [
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isommp41" + bytes(32), "not_image", "video"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format", "SVG"),
        (b'{"error": "not found"}', "not_image", "JSON"),
        (b"%PDF-1.4\n", "not_image", "PDF"),
        (bytes(range(0, 256, 7)) * 3, "not_image", "not a recognised image format"),
    ],
)
def test_non_images_say_what_they_look_like(data, kind, words):
    result = decode_bytes("x.jpg", data, CONFIG)
    assert result.error_kind == kind
    assert words in result.error


@pytest.mark.skipif(not HAVE_AVIF, reason="this Pillow has no AVIF support")
def test_broken_avif_with_avif_support_is_corrupt():
    data = b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf" + bytes(40)
    assert decode_bytes("x.avif", data, CONFIG).error_kind == "corrupt"


@pytest.mark.skipif(HAVE_HEIF, reason="pillow-heif is installed, so HEIC decodes")
def test_heic_without_pillow_heif_names_the_install(image_corpus):
    result = decoded(image_corpus, "heic")
    assert result.error_kind == "unsupported_format"
    assert "pip install pillow-heif" in result.error and "captioner[heif]" in result.error


def test_broken_exif_falls_back_to_stored_orientation(monkeypatch):
    def broken(*args, **kwargs):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(decode.ImageOps, "exif_transpose", broken)
    result = decode_bytes("x.jpg", oriented_jpeg(6), CONFIG)
    assert result.ok
    assert (result.width, result.height) == (UPRIGHT_SIZE[1], UPRIGHT_SIZE[0])  # as stored: not turned


def test_file_gone_after_listing_is_missing(tmp_path):
    make_jpegs(tmp_path, 2)
    items = list_images(str(tmp_path), extensions=(".jpg",))
    os.remove(items[0].uri)
    result = load_image(items[0].uri, CONFIG)
    assert result.error_kind == "missing"
    assert result.image_id is None and result.bytes is None
    assert items[0].uri in result.error
    assert load_image(items[1].uri, CONFIG).ok


def test_permission_denied_is_unreadable(monkeypatch):
    # The chmod 000 corpus case cannot show this when tests run as root.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode, "read_bytes", denied)
    result = load_image("/data/locked.jpg", CONFIG)
    assert result.error_kind == "unreadable"
    assert result.error == "permission denied reading /data/locked.jpg: Permission denied"


def test_memory_uri_is_read_through_fsspec():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/captioner-decode-test/a.jpg", oriented_jpeg(1))
    try:
        result = load_image("memory:///captioner-decode-test/a.jpg", CONFIG)
        assert result.ok and result.format == "JPEG"
        assert load_image("memory:///captioner-decode-test/gone.jpg", CONFIG).error_kind == "missing"
    finally:
        fs.rm("/captioner-decode-test", recursive=True)


def test_garbage_and_mangled_images_never_raise():
    rng = np.random.default_rng(7)
    valid = [oriented_jpeg(3), _png_bytes(), b"GIF89a" + bytes(20)]
    samples = [rng.bytes(int(n)) for n in rng.integers(1, 400, 40)]
    for data in valid:
        for _ in range(40):
            mangled = bytearray(data)
            for position in rng.integers(0, len(mangled), 6):
                mangled[position] = int(rng.integers(0, 256))
            samples.append(bytes(mangled[: int(rng.integers(1, len(mangled) + 1))]))
    for data in samples:
        result = decode_bytes("fuzz", data, CONFIG)
        assert result.ok or result.error_kind in ERROR_KINDS
        assert result.ok == (result.image is not None)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_make_jpegs_writes_distinct_images(tmp_path):
    paths = make_jpegs(tmp_path / "new", 5, size=(40, 30), seed=3)
    assert [p.name for p in paths] == [f"img_{i:06d}.jpg" for i in range(5)]
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}) == 5
    assert all(Image.open(p).size == (40, 30) for p in paths)
    assert [p.read_bytes() for p in make_jpegs(tmp_path / "again", 5, size=(40, 30), seed=3)] == [
        p.read_bytes() for p in paths
    ]


# ---- issue 8: colour-keyed transparency, near-square rotation, mif3/mini ----------


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _half_and_half(mode: str, key, other) -> Image.Image:
    """Left half is the key colour (transparent through tRNS), right half another colour."""
    image = Image.new(mode, (32, 16), key)
    image.paste(other, (16, 0, 32, 16))
    return image


def test_rgb_colour_key_transparency_is_composited_on_white():
    data = _png(_half_and_half("RGB", (0, 255, 0), (200, 10, 10)), transparency=(0, 255, 0))
    image = decode_bytes("key.png", data, CONFIG).image
    assert image.getpixel((4, 4)) == (255, 255, 255)  # the green key is background, not green
    assert image.getpixel((20, 4)) == (200, 10, 10)


def test_greyscale_colour_key_transparency_is_composited_on_white():
    data = _png(_half_and_half("L", 50, 200), transparency=50)
    image = decode_bytes("key.png", data, CONFIG).image
    assert image.getpixel((4, 4)) == (255, 255, 255)
    assert image.getpixel((20, 4)) == (200, 200, 200)


def test_16bit_colour_key_transparency_is_composited_on_white():
    values = np.full((16, 32), 1000, np.uint16)
    values[:, 16:] = 30000
    data = _png(Image.fromarray(values), transparency=1000)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_bytes("key16.png", data, CONFIG).image
    assert image.getpixel((4, 4)) == (255, 255, 255)
    assert image.getpixel((20, 4)) == (117, 117, 117)  # 30000 / 257, scaled as without a key


@pytest.mark.parametrize(("stored", "upright"), [((4000, 3999), (3999, 4000)), ((3999, 4000), (4000, 3999))])
@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_near_square_drafted_jpeg_turned_by_exif_swaps_width_and_height(stored, upright, orientation):
    # Drafted at 1/8 scale both sides round to 500: the size alone cannot tell that the image turned.
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", stored, (200, 30, 30)).save(buffer, format="JPEG", exif=exif, quality=50)
    result = decode_bytes("square.jpg", buffer.getvalue(), DecodeConfig(model_max_side=256))
    assert result.ok, result.error
    assert (result.width, result.height) == upright


@pytest.mark.parametrize("orientation", [1, 2, 3, 4])
def test_near_square_drafted_jpeg_not_turned_keeps_width_and_height(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3999), (200, 30, 30)).save(buffer, format="JPEG", exif=exif, quality=50)
    result = decode_bytes("square.jpg", buffer.getvalue(), DecodeConfig(model_max_side=256))
    assert (result.width, result.height) == (4000, 3999)


# Low-overhead ("minimized") HEIF of ISO/IEC 23008-12 amd. 2: major brand mif3,
# the codec brand in the minor-version field, then a 'mini' box instead of 'meta'.
MIF3_AVIF = b"\x00\x00\x00\x10ftypmif3avif" + b"\x00\x00\x00\x20mini" + bytes(24)
MIF3_HEIC = b"\x00\x00\x00\x14ftypmif3heicmif3" + b"\x00\x00\x00\x20mini" + bytes(24)
MINI_ONLY = b"\x00\x00\x00\x10ftypmif3\x00\x00\x00\x00" + b"\x00\x00\x00\x20mini" + bytes(24)


@pytest.mark.parametrize("data", [MIF3_AVIF, MIF3_HEIC, MINI_ONLY], ids=["mif3-avif", "mif3-heic", "mif3-mini"])
def test_minimized_heif_and_avif_are_unsupported_images_not_videos(data):
    result = decode_bytes("new.heic", data, CONFIG)
    assert result.error_kind == "unsupported_format", result.error
    assert "video" not in result.error and "HEIF" in result.error


def test_run_records_turned_near_square_size_and_mif3_as_unsupported(ray_local, tmp_path, tiny_clip_dir):
    """Items 7 and 8 as a user meets them: the rows `captioner run` writes."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from pipeline.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (4000, 3999), (90, 120, 30)).save(folder / "square.jpg", format="JPEG", exif=exif, quality=50)
    (folder / "new.heic").write_bytes(MIF3_HEIC)
    (folder / "new.avif").write_bytes(MIF3_AVIF)
    (folder / "keyed.png").write_bytes(_png(_half_and_half("RGB", (0, 255, 0), (200, 10, 10)), transparency=(0, 255, 0)))
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        main, ["run", str(folder), "--out", str(out), "--embed-model", str(tiny_clip_dir), "--no-caption", "--no-probes", "--no-progress"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(out).to_pylist()}
    assert (rows["square.jpg"]["width"], rows["square.jpg"]["height"]) == (3999, 4000)
    assert rows["new.heic"]["error_kind"] == "unsupported_format"
    assert rows["new.avif"]["error_kind"] == "unsupported_format"
    assert rows["keyed.png"]["status"] == "ok"
