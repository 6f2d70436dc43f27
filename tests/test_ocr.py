"""OCR with the real model (RapidOCR's PP-OCRv4 weights, shipped in its wheel), driven without Ray.

The reader reads drawn text and reads nothing in a photo without text; the
reading order; the per-image bound (a timeout is that row's ``ocr`` error);
every hostile file through decode -> OCR -> conform is exactly one row; resume
redoes rows not read by this OCR model; the alt text quoting rules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from examples.text_images import text_free_scenes, text_image
from jobs.run import run_identity
from pipeline.config import ConfigError, OcrConfig, RunConfig
from pipeline.export.alt_text import MIN_QUOTED, alt_text_with_text, legible_text
from pipeline.ocr import OcrLine, OcrTimeout, build_reader, ocr_identity, reading_order
from pipeline.ocr.layout import joined_text
from pipeline.sources import stored_uri
from pipeline.stages import OcrStage, StageConfig, conform_batch, decode_batch
from pipeline.stages.contract import LISTED
from schemas import STATUS_ERROR, STATUS_OK, check_schema

pytest.importorskip("rapidocr_onnxruntime")


@pytest.fixture(scope="module")
def reader():
    return build_reader(OcrConfig(), threads=1)


def _listed(paths: list[Path]) -> pa.Table:
    return LISTED.table({
        "uri": [stored_uri(str(p)) for p in paths],
        "location": [str(p).encode("utf-8", "surrogateescape") for p in paths],
        "size": [p.stat().st_size if p.is_file() else 0 for p in paths],
        "source_mtime": [None] * len(paths),
    })  # fmt: skip


def _ocr_stage(tmp_path: Path, **ocr) -> StageConfig:
    config = RunConfig.from_dict({
        "source": str(tmp_path), "output": str(tmp_path / "out.parquet"),
        "caption": {"enabled": False}, "embed": {"enabled": False},
        "ocr": {"enabled": True, **ocr}, "decode": {"max_pixels": 50_000_000},
    })  # fmt: skip
    return StageConfig(run=config, identity=run_identity(config))


def test_the_model_reads_a_sign_in_reading_order_and_nothing_in_scenes_without_text(reader):
    sign = text_image(["ZANZIBAR BAKERY", "open daily 2024"], size=40, rotation=4, background="photo", seed=3)
    result = reader.read(sign)
    assert result.text == "ZANZIBAR BAKERY\nopen daily 2024"
    assert all(0.5 <= line.confidence <= 1 for line in result.lines) and len(result.lines) == 2
    # Boxes are in the pixels of the image given, even when the reader shrank it first.
    big = sign.resize((sign.width * 3, sign.height * 3))
    scaled = reader.read(big)
    assert scaled.text == result.text and max(scaled.lines[0].box[0::2]) > sign.width
    for scene in text_free_scenes(3, seed=1):
        assert reader.read(scene).text == ""  # no text: empty, not made-up characters


def test_identity_names_the_package_version_and_each_model_file_hash():
    model, revision = ocr_identity("rapidocr")
    assert model == "rapidocr-onnxruntime"
    version, *files = revision.split("; ")
    assert version.count(".") == 2 and len(files) == 3
    assert all(" sha256:" in f and len(f.split("sha256:")[1]) == 64 for f in files)
    with pytest.raises(ConfigError, match="known engines: rapidocr"):
        ocr_identity("nope")


def test_on_cuda_the_reader_asks_rapidocr_for_cuda_in_all_three_models_and_never_falls_back(monkeypatch):
    import rapidocr_onnxruntime

    from pipeline.ocr import OcrUnavailable, reader as ocr_reader
    from pipeline.ocr.reader import RapidOcrReader

    cpu, cuda = (RapidOcrReader.engine_options(OcrConfig(), 2, device) for device in ("cpu", "cuda"))
    assert cuda == {**cpu, "det_use_cuda": True, "cls_use_cuda": True, "rec_use_cuda": True}
    assert not any("cuda" in key for key in cpu) and cpu["intra_op_num_threads"] == 2
    # No onnxruntime-gpu: refused before the engine is built, naming the fix (an OCR actor's start error).
    monkeypatch.setattr(ocr_reader, "cuda_provider_available", lambda: False)
    with pytest.raises(OcrUnavailable, match="pip install onnxruntime-gpu.*--ocr-device cpu"):
        build_reader(OcrConfig(), 1, "cuda")
    # The provider claimed but not usable (here: the CPU build of onnxruntime): RapidOCR would fall back to
    # CPU with a log line; the reader refuses instead. The installed package did take the three flags.
    built = []

    class Recording(rapidocr_onnxruntime.RapidOCR):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            built.append(self)

    monkeypatch.setattr(rapidocr_onnxruntime, "RapidOCR", Recording)
    monkeypatch.setattr(ocr_reader, "cuda_provider_available", lambda: True)
    with pytest.raises(OcrUnavailable, match="Det/Cls/Rec model.s. on CPU.*pip install onnxruntime-gpu"):
        build_reader(OcrConfig(), 1, "cuda")
    (engine,) = built
    sessions = (engine.text_det.infer, engine.text_cls.infer, engine.text_rec.session)
    assert [ort.cfg_use_cuda for ort in sessions] == [True] * 3
    assert build_reader(OcrConfig(), 1, "cpu").device == "cpu"
    with pytest.raises(ValueError, match="cpu or cuda"):
        build_reader(OcrConfig(), 1, "auto")  # the plan decides auto; a reader is told cpu or cuda


def test_an_ocr_actor_told_cuda_without_the_provider_fails_at_start_with_the_fix(tmp_path, monkeypatch):
    from pipeline.ocr import OcrUnavailable, reader as ocr_reader

    monkeypatch.setattr(ocr_reader, "cuda_provider_available", lambda: False)
    with pytest.raises(OcrUnavailable, match="this worker's onnxruntime has no CUDAExecutionProvider"):
        OcrStage(_ocr_stage(tmp_path), device="cuda")
    assert OcrStage(_ocr_stage(tmp_path)).reader.device == "cpu"  # the default, as before


def test_reading_order_is_rows_top_to_bottom_then_left_to_right():
    def line(text, x, y, h=20, w=60):
        return OcrLine(text, 0.9, (x, y, x + w, y, x + w, y + h, x, y + h))

    # "PAID" sits slightly higher than "INVOICE", on the same row; the footer is below both.
    lines = [line("footer", 0, 100), line("PAID", 200, 4), line("INVOICE", 0, 8)]
    assert joined_text(reading_order(lines)) == "INVOICE PAID\nfooter"


def test_a_read_past_its_time_limit_is_that_rows_ocr_error_and_every_other_row_is_kept(tmp_path):
    good = tmp_path / "sign.png"
    text_image(["EXIT"], size=30).save(good)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    stage = _ocr_stage(tmp_path, timeout_s=1e-6)
    decoded = decode_batch(_listed([good, junk]), stage=stage)
    rows = conform_batch(OcrStage(stage)(decoded), stage=stage).to_pylist()
    assert [(r["status"], r["error_kind"]) for r in rows] == [(STATUS_ERROR, "ocr"), (STATUS_ERROR, "not_image")]
    assert "ocr.timeout_s" in rows[0]["error"] and rows[0]["text"] is None
    with pytest.raises(OcrTimeout):
        build_reader(OcrConfig(timeout_s=1e-6)).read(text_image(["EXIT"], size=30))


def test_every_hostile_file_with_ocr_on_is_exactly_one_row(image_corpus, tmp_path):
    stage = _ocr_stage(tmp_path)
    paths = [case.path for name, case in image_corpus.items() if name != "directory_as_jpg"]
    sign = tmp_path / "sign.png"
    text_image(["CLOSING DOWN SALE"], size=36, background="low_contrast").save(sign)
    paths.append(sign)
    ocr = OcrStage(stage)
    tables = [conform_batch(ocr(decode_batch(_listed(paths[i : i + 7]), stage=stage)), stage=stage)
              for i in range(0, len(paths), 7)]  # fmt: skip
    table = pa.concat_tables(tables)
    assert check_schema(table.schema).ocr_model == "rapidocr-onnxruntime"
    rows = table.to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(stored_uri(str(p)) for p in paths)  # one row per file
    by_uri = {r["uri"]: r for r in rows}
    for name, case in image_corpus.items():
        if name == "directory_as_jpg":
            continue
        row = by_uri[stored_uri(str(case.path))]
        if row["status"] == STATUS_OK:
            assert row["text"] is not None and row["ocr_revision"]  # read: '' when nothing there
        else:
            assert row["text"] is None and row["error_kind"] != "ocr", (name, row["error"])
    read = by_uri[str(sign)]
    assert read["text"] == "CLOSING DOWN SALE" and read["text_lines"][0]["text"] == "CLOSING DOWN SALE"
    box = read["text_lines"][0]["box"]
    assert len(box) == 8 and 0 <= min(box) and max(box[0::2]) <= read["width"] and max(box[1::2]) <= read["height"]


def test_resume_redoes_ok_rows_not_read_by_this_runs_ocr_model(tmp_path):
    from pipeline.output import OutputStore
    from tests.test_output import RUN, make_rows

    out = tmp_path / "out"
    store = OutputStore(str(out) + "/")
    store.write_part(make_rows(["/p/a.jpg"], size=100, mtime=None))
    plain, with_ocr = store.load_state(RUN, overwrite=False), None
    assert plain.is_done("/p/a.jpg", 100, digest=lambda: f"{hash('/p/a.jpg') & 0xFFFFFFFF:064x}")
    ocr_run = dataclasses.replace(RUN, ocr_model="rapidocr-onnxruntime", ocr_revision="1.4.4; x")
    with_ocr = store.load_state(ocr_run, overwrite=False)  # not refused: OCR is not in the models' signature
    assert not with_ocr.is_done("/p/a.jpg", 100, digest=lambda: f"{hash('/p/a.jpg') & 0xFFFFFFFF:064x}")


def test_caption_length_takes_one_or_two_lengths():
    from pipeline.config import CaptionConfig

    two = CaptionConfig(length="normal,short")
    assert (two.length, two.main_length, two.short_length, two.lengths) == ("short,normal", "normal", "short",
                                                                            ("short", "normal"))
    assert CaptionConfig().short_length is None and CaptionConfig().main_length == "normal"
    for bad in ("short,short", "tiny", "short,normal,long"):
        with pytest.raises(ValueError, match="two of them"):
            CaptionConfig(length=bad)


def test_alt_text_quotes_legible_text_within_the_cap():
    caption = "A bakery shop front with a striped awning."
    assert alt_text_with_text(caption, None) == caption  # never read, or nothing legible: the caption alone
    assert alt_text_with_text(caption, "") == caption and legible_text("|") is None
    assert alt_text_with_text(caption, "ZANZIBAR BAKERY\nopen daily") == (
        f'{caption} Text: "ZANZIBAR BAKERY / open daily"'
    )
    assert alt_text_with_text(None, "EXIT") == 'Text: "EXIT"'
    long_text = " ".join(["menu"] * 60)
    alt = alt_text_with_text(caption, long_text, 125)
    assert len(alt) <= 125 and alt.startswith(caption) and alt.endswith('…"')
    # A long caption is cut to leave the quote its MIN_QUOTED characters.
    long_caption = "A very long description of a street " + "with many shops " * 10 + "."
    alt = alt_text_with_text(long_caption, long_text, 125)
    quoted = alt[alt.index('Text: "') + 7 : -1]
    assert len(alt) <= 125 and len(quoted) >= MIN_QUOTED - 1 and "…" in alt.split("Text:")[0]


def test_ocr_off_plans_no_ocr_actor_and_no_ocr_columns(tmp_path):
    from jobs.ray_plan import plan_resources
    from schemas import RunMetadata

    base = {"source": str(tmp_path), "output": str(tmp_path / "o.parquet")}
    off, on = RunConfig.from_dict(base), RunConfig.from_dict({**base, "ocr": {"enabled": True}})
    assert off.ocr.enabled is False  # the default (README: why)
    assert plan_resources(off, {"CPU": 8}, False).ocr_actors == 0
    assert plan_resources(on, {"CPU": 8}, False).ocr_actors == 1
    identity = RunMetadata(None, None, None, None, None, "0" * 64)
    assert "text" not in StageConfig(run=off, identity=identity).columns_after("embed").names
    assert "text" in StageConfig(run=on, identity=identity).columns_after("ocr").names
