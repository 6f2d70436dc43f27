"""The error-kind vocabulary (schemas/errors.py) against what the code really emits.

Rows are produced from the hostile image corpus, an empty and a vanished
file (the decoder), an image a model's CPU preparation refuses and a model
that fails (the stages), all without Ray; every error_kind they carry must
be in the vocabulary, and resume must treat each as its permanence says.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DecodeConfig
from pipeline.decode import load_image
from pipeline.models.openclip import OpenClipEmbedder, OpenClipPreprocessor
from pipeline.output import OutputStore
from pipeline.stages import EmbedStage, conform_batch, decode_batch
from schemas import STATUS_ERROR
from schemas.errors import ERROR_KINDS, MAX_ERROR_CHARS, PERMANENT_ERROR_KINDS
from tests import rows
from tests.fixtures.images import CORPUS_MAX_PIXELS
from tests.test_output import RUN
from tests.test_stages import _listed, _stage_config

REFUSED_SIZE = (29, 31)


def _png(path, size, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_every_kind_the_decoder_gives_is_in_the_vocabulary_and_permanent_ones_repeat(image_corpus, tmp_path):
    config = DecodeConfig(max_pixels=CORPUS_MAX_PIXELS)
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = [case.path for case in image_corpus.values()] + [tmp_path / "empty.jpg", tmp_path / "vanished.jpg"]
    seen = set()
    for path in paths:
        result = load_image(str(path), config)
        if result.ok:
            continue
        seen.add(result.error_kind)
        assert result.error_kind in ERROR_KINDS, (path.name, result.error_kind)
        assert result.error and len(result.error) <= MAX_ERROR_CHARS and "\n" not in result.error
        if result.error_kind in PERMANENT_ERROR_KINDS:  # the same bytes fail the same way again
            assert load_image(str(path), config).error_kind == result.error_kind
    assert {"missing", "empty", "not_image", "truncated", "too_large", "corrupt"} <= seen


@pytest.fixture
def refusing_clip(monkeypatch):
    """open_clip's CPU preprocessor refuses REFUSED_SIZE images, with a message longer than a row's error may be."""
    prepare = OpenClipPreprocessor.prepare

    def refusing(self, image):
        if image.size == REFUSED_SIZE:
            raise ValueError("injected: cannot prepare\n" + "x" * 2000)
        return prepare(self, image)

    monkeypatch.setattr(OpenClipPreprocessor, "prepare", refusing)


def _stage_rows(stage, paths):
    table = conform_batch(EmbedStage(stage)(decode_batch(_listed(paths), stage=stage)), stage=stage)
    return {row["uri"]: row for row in table.to_pylist()}


def _check(row):
    assert row["status"] == STATUS_ERROR and row["error_kind"] in ERROR_KINDS, row
    assert len(row["error"]) <= MAX_ERROR_CHARS and "\n" not in row["error"]


def test_every_kind_the_stages_give_is_in_the_vocabulary(tmp_path, tiny_clip_dir, refusing_clip, monkeypatch):
    stage = _stage_config(tmp_path, None, str(tiny_clip_dir))
    folder = tmp_path / "images"
    folder.mkdir()
    good, refused = _png(folder / "good.png", (40, 30)), _png(folder / "refused.png", REFUSED_SIZE, seed=1)
    (folder / "text.png").write_text("not an image")
    out = _stage_rows(stage, [good, refused, folder / "text.png"])
    assert out[str(good)]["error_kind"] is None
    assert out[str(refused)]["error_kind"] == "preprocess" and out[str(folder / "text.png")]["error_kind"] == "not_image"
    _check(out[str(refused)]), _check(out[str(folder / "text.png")])

    def failing(self, inputs):
        raise RuntimeError("injected model failure\n" + "y" * 2000)

    monkeypatch.setattr(OpenClipEmbedder, "embed_prepared", failing)
    out = _stage_rows(stage, [good])
    assert out[str(good)]["error_kind"] == "model"
    _check(out[str(good)])


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_resume_skips_a_kind_exactly_when_it_is_permanent(kind, tmp_path):
    store = OutputStore(str(tmp_path / "out.parquet"))
    mtime = datetime(2025, 1, 1, tzinfo=timezone.utc)
    row = rows.row("/p/x.jpg", run=RUN, status=STATUS_ERROR, error_kind=kind, error="e", bytes=10,
                   source_mtime=mtime, image_id="a" * 64)
    store.write_part(rows.table([row], RUN))
    state = store.load_state(RUN, overwrite=False)
    assert state.is_done("/p/x.jpg", 10, mtime.timestamp()) == (kind in PERMANENT_ERROR_KINDS)
    assert not state.is_done("/p/x.jpg", 10, mtime.timestamp(), retry_errors=True)
