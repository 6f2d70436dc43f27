"""The stage contract, driven without Ray (issue 8: "A test drives the stages with random batch sizes
and random error patterns and checks the merge never fails"; issue 9: preprocessing off the GPU).

decode_batch -> CaptionStage -> EmbedStage -> conform_batch are called as the Ray plan calls them,
on blocks of random sizes mixing good PNGs, truncated files, non-images and images whose CPU
preparation fails. Every block must carry exactly its stage's declared schema, so that any mix of
blocks concatenates, and each input must come out as exactly one row.
"""

from __future__ import annotations

import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import RunConfig
from pipeline.models.identity import identity_for_run
from pipeline.models.moondream.preprocess import MoondreamPreprocessor
from pipeline.models.openclip import OpenClipPreprocessor
from pipeline.models.registry import resolve_captioner, resolve_embedder
from pipeline.stages import CaptionStage, EmbedStage, StageConfig, conform_batch, decode_batch
from pipeline.stages.contract import LISTED
from schemas import STATUS_ERROR, STATUS_OK
from tests import fault_doubles
from tests.fixtures.hf_cache import use_hf_cache
from tests.fixtures.moondream_cache import local_moondream_dir

# An image of this size makes the CPU preparation fail (the monkeypatched preprocessors below).
REFUSED_SIZE = (29, 31)
PROBES = ("Is there a cat?", "What colour is it?")


@pytest.fixture(scope="module")
def moondream_dir(tmp_path_factory) -> Path:
    return local_moondream_dir(tmp_path_factory.mktemp("md") / "model")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    use_hf_cache(monkeypatch, tmp_path / "empty_cache")


@pytest.fixture
def refusing_preprocessors(monkeypatch):
    """Both real preprocessors, refusing REFUSED_SIZE images the way a model refuses an input it cannot take."""
    for cls in (MoondreamPreprocessor, OpenClipPreprocessor):
        original = cls.prepare

        def prepare(self, image, _original=original):
            if image.size == REFUSED_SIZE:
                raise ValueError(f"injected: cannot prepare a {image.size} image")
            return _original(self, image)

        monkeypatch.setattr(cls, "prepare", prepare)


def _files(folder: Path, rng: random.Random, count: int) -> list[tuple[Path, str | None]]:
    """(path, expected error kind) for a random mix of good and bad files."""
    out = []
    for i in range(count):
        kind = rng.choice(["ok", "ok", "ok", "truncated", "not_image", "refused"])
        path = folder / f"f{i:03d}.png"
        if kind == "not_image":
            path.write_bytes(b"<html>not an image</html>")
            out.append((path, "not_image"))
            continue
        size = REFUSED_SIZE if kind == "refused" else (rng.randint(16, 500), rng.randint(16, 400))
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data)
        out.append((path, {"ok": None, "refused": "preprocess"}.get(kind, kind)))
    return out


def _listed(paths: list[Path]) -> pa.Table:
    return LISTED.table({
        "uri": [str(p) for p in paths],
        "location": [str(p).encode() for p in paths],
        "size": [p.stat().st_size for p in paths],
        "source_mtime": [round(p.stat().st_mtime * 1e6) for p in paths],
    })  # fmt: skip


def _stage_config(tmp_path: Path, caption_model: str | None, embed_model: str | None, **caption_options) -> StageConfig:
    caption = dict(enabled=caption_model is not None, probes=PROBES, max_new_tokens=2, answer_max_new_tokens=2,
                   max_crops=2, batch_size=4)
    caption.update(caption_options)
    if caption_model:
        caption["model"] = caption_model
    else:
        caption.update(probes=())  # probes alone would still run the caption model
    embed = dict(enabled=embed_model is not None)
    if embed_model:
        embed["model"] = embed_model
    run = RunConfig(source=str(tmp_path), output=str(tmp_path / "out.parquet"), device="cpu",
                    caption=caption, embed=embed)
    identity = identity_for_run(
        resolve_captioner(caption_model) if caption_model else None,
        resolve_embedder(embed_model) if embed_model else None,
        PROBES if caption_model else (),
    )
    return StageConfig(run=run, identity=identity)


def _drive(stage: StageConfig, files, rng: random.Random):
    """Run every stage on random-sized blocks; return each stage's blocks."""
    captioner = CaptionStage(stage) if stage.runs_captioner else None
    embedder = EmbedStage(stage) if stage.runs_embedder else None
    blocks = {"decode": [], "caption": [], "embed": [], "conform": []}
    start = 0
    while start < len(files):
        size = rng.randint(1, 5)
        chunk = [path for path, _ in files[start : start + size]]
        start += size
        batch = decode_batch(_listed(chunk), stage=stage)
        blocks["decode"].append(batch)
        if captioner:
            batch = captioner(batch)
            blocks["caption"].append(batch)
        if embedder:
            batch = embedder(batch)
            blocks["embed"].append(batch)
        blocks["conform"].append(conform_batch(batch, stage=stage))
    return blocks


@pytest.mark.parametrize("models", ["moondream+clip", "vlm+clip", "clip"])
def test_random_blocks_keep_their_declared_schema_and_always_merge(
    models, tmp_path, moondream_dir, tiny_vlm_dir, tiny_clip_dir, offline, refusing_preprocessors
):
    caption_model = {"moondream+clip": str(moondream_dir), "vlm+clip": str(tiny_vlm_dir), "clip": None}[models]
    stage = _stage_config(tmp_path, caption_model, str(tiny_clip_dir))
    rng = random.Random(f"stages-{models}")
    folder = tmp_path / "images"
    folder.mkdir()
    files = _files(folder, rng, 14)
    if models == "vlm+clip":
        # The transformers captioner has no CPU preprocessor: it still gets pixels, and the
        # embedder's preparation alone refuses the REFUSED_SIZE image.
        assert decode_batch(_listed([files[0][0]]), stage=stage).column("caption_input").null_count == 1

    blocks = _drive(stage, files, rng)

    for name in ("decode", "caption", "embed"):
        if not blocks[name]:
            continue  # the stage does not run in this config
        declared = stage.columns_after(name).schema
        for block in blocks[name]:
            assert block.schema.equals(declared), (name, block.schema)
        # Any mix of blocks merges, in any order, as Ray Data merges them.
        mixed = rng.sample(blocks[name], len(blocks[name]))
        assert pa.concat_tables(mixed).num_rows == sum(b.num_rows for b in blocks[name])
    if stage.runs_captioner:
        for block in blocks["caption"]:
            assert block.column("caption_input").null_count == block.num_rows  # consumed by its stage
    merged = pa.concat_tables(rng.sample(blocks["conform"], len(blocks["conform"])))
    assert len({b.schema for b in blocks["conform"]}) == 1

    rows = {row["uri"]: row for row in merged.to_pylist()}
    assert len(rows) == merged.num_rows == len(files)  # exactly one row per input
    for path, kind in files:
        row = rows[str(path)]
        assert row["error_kind"] == kind, (path.name, row["error"])
        assert row["status"] == (STATUS_OK if kind is None else STATUS_ERROR)
        if kind is None:
            assert row["embedding"] is not None and len(row["embedding"]) == stage_dim(merged)
            if stage.runs_captioner:
                assert row["caption"] is not None and len(row["probes"]) == len(PROBES)
        else:
            assert row["embedding"] is None and row["caption"] is None


def stage_dim(table: pa.Table) -> int:
    return table.schema.field("embedding").type.list_size


def test_decode_skips_pixels_only_when_every_model_prepares_its_own_input(tmp_path, moondream_dir, tiny_vlm_dir,
                                                                          tiny_clip_dir, offline):
    folder = tmp_path / "images"
    folder.mkdir()
    path = folder / "a.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    both = decode_batch(_listed([path]), stage=_stage_config(tmp_path, str(moondream_dir), str(tiny_clip_dir)))
    assert both.column("pixels")[0].as_py() == b"" and both.column("caption_input")[0].is_valid
    assert both.column("embed_input")[0].is_valid
    mixed = decode_batch(_listed([path]), stage=_stage_config(tmp_path, str(tiny_vlm_dir), str(tiny_clip_dir)))
    assert len(mixed.column("pixels")[0].as_py()) == 300 * 200 * 3 and mixed.column("embed_input")[0].is_valid


# ---- the caption actor's feeding loop and out-of-memory retries (issue 15) --------------------


def _pngs(folder: Path, sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(folder / f"p{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def _same_rows(out: pa.Table, expected: pa.Table) -> None:
    assert out.column("uri").to_pylist() == expected.column("uri").to_pylist()  # one row per input, in order
    for name in ("status", "error_kind", "caption", "caption_truncated", "answers", "answers_truncated"):
        assert out.column(name).to_pylist() == expected.column(name).to_pylist(), name


@pytest.mark.parametrize("sizes", [(2,) * 6, (1, 3, 5, 2, 4, 1)], ids=["batches-of-2", "mixed-sizes"])
def test_the_caption_stream_keeps_the_engine_full_across_batches_and_gives_each_its_own_rows(
    sizes, tmp_path, moondream_dir, offline, refusing_preprocessors, monkeypatch
):
    """Concurrent Ray batches (threads, as Ray Data runs one actor's calls) share one running engine:
    images of later batches join while earlier ones decode, a batch comes back while later ones are still
    in the engine, and every batch gets exactly its own rows, equal to a call of its own. Bad files of
    every kind (unreadable, not images, refused by the CPU preparation) are mixed in."""
    from pipeline.models.moondream.engine import EngineStream, _Batch

    stage = _stage_config(tmp_path, str(moondream_dir), None, max_new_tokens=9)
    (tmp_path / "images").mkdir()
    files = [path for path, _ in _files(tmp_path / "images", random.Random(f"stream-{sizes}"), sum(sizes))]
    starts = np.cumsum((0,) + sizes)
    batches = [decode_batch(_listed(files[a:b]), stage=stage) for a, b in zip(starts, starts[1:])]
    alone = [CaptionStage(stage)(batch) for batch in batches]  # one engine call per batch, as on CPU

    fed = CaptionStage(stage, images_per_call=8)
    events, started = [], threading.Event()
    advance, admit = EngineStream.advance, _Batch._admit_images

    def advanced(stream):
        out = advance(stream)
        events.append(("advance", len(stream)))
        first = not started.is_set()
        started.set()  # the later batches are sent now
        if first and len(stream):
            # Under load a later call can take longer to arrive than the first image takes to decode: the
            # engine holds here, that image still in it, until one waits in the feeder's queue (nothing takes
            # it off while this thread is in advance).
            deadline = time.monotonic() + 60
            while not fed.feeder._queue and time.monotonic() < deadline:
                time.sleep(0.01)
        return out

    def admitted(batch, rows, images):
        events.append(("admit", sum(image is not None for image in batch.row_image)))
        return admit(batch, rows, images)

    monkeypatch.setattr(EngineStream, "advance", advanced)
    monkeypatch.setattr(_Batch, "_admit_images", admitted)

    def call(k):
        out = fed(batches[k])
        events.append(("returned", k))
        return out

    with ThreadPoolExecutor(len(batches)) as threads:
        first = threads.submit(call, 0)  # the first batch starts the engine, the others arrive while it runs
        started.wait(60)
        later = [threads.submit(call, k) for k in range(1, len(batches))]
        outs = [first.result()] + [call.result() for call in later]

    for out, expected in zip(outs, alone):
        assert out.schema.equals(stage.columns_after("caption").schema)
        _same_rows(out, expected)
    assert {STATUS_OK, STATUS_ERROR} <= {s for out in outs for s in out.column("status").to_pylist()}
    # Images joined a running engine (rows were busy when they were admitted) ...
    assert any(kind == "admit" and busy > 0 for kind, busy in events), events
    # ... and a batch came back while images of later batches were still decoding.
    returned = events.index(next(e for e in events if e[0] == "returned"))
    assert any(kind == "advance" and held > 0 for kind, held in events[returned:]), events


def test_a_fault_of_the_caption_stream_retries_its_images_by_bisection_and_the_next_batch_streams(
    tmp_path, moondream_dir, offline, monkeypatch
):
    import torch

    from pipeline.models.moondream.engine import EngineStream

    stage = _stage_config(tmp_path, str(moondream_dir), None)
    paths = _pngs(tmp_path / "images", [(40 + i, 30 + i) for i in range(6)])
    batch = decode_batch(_listed(paths), stage=stage)
    expected = CaptionStage(stage)(batch)
    fed = CaptionStage(stage, images_per_call=8)
    advance, faults = EngineStream.advance, []

    def out_of_memory_once(stream):
        if not faults:
            faults.append(len(stream))
            raise torch.OutOfMemoryError("injected: out of memory in the stream")
        return advance(stream)

    monkeypatch.setattr(EngineStream, "advance", out_of_memory_once)
    _same_rows(fed(batch), expected)  # retried by generate calls: every image still has its row
    assert faults == [6]
    _same_rows(fed(batch), expected)  # a fresh stream takes the next batch


@pytest.fixture
def fault_backends(monkeypatch):
    """The fault doubles, registered through the real registry for this test only."""
    fault_doubles.register_in_this_process(monkeypatch)


@pytest.mark.parametrize("fed", [False, True], ids=["batch-per-call", "feeder"])
def test_a_batch_out_of_gpu_memory_is_retried_at_half_size_then_per_image_then_becomes_an_error_row(
    fed, tmp_path, moondream_dir, offline, fault_backends
):
    stage = _stage_config(tmp_path, f"memory_bound:{moondream_dir}", None)
    sizes = [(40 + i, 30) for i in range(8)]
    sizes[5] = fault_doubles.OOM_SIZE  # out of memory even alone
    paths = _pngs(tmp_path / "images", sizes)
    caption = CaptionStage(stage, images_per_call=8 if fed else None)

    out = caption(decode_batch(_listed(paths), stage=stage))

    # 8 (out of memory), then halves: 4 (out of memory) -> 2 + 2; 4 -> 2 (the OOM image's) -> 1 + 1; 2.
    assert caption.captioner.calls == [8, 4, 2, 2, 4, 2, 1, 1, 2]
    assert out.column("uri").to_pylist() == [str(p) for p in paths]
    rows = out.to_pylist()
    for i, row in enumerate(rows):
        if i == 5:
            assert (row["status"], row["error_kind"]) == (STATUS_ERROR, "model")
            assert "OutOfMemoryError" in row["error"] and row["caption"] is None
        else:
            assert row["status"] == STATUS_OK and row["caption"] is not None
    # The actor lives on: its next batch is captioned.
    again = caption(decode_batch(_listed(paths[:2]), stage=stage))
    assert again.column("status").to_pylist() == [STATUS_OK, STATUS_OK]
