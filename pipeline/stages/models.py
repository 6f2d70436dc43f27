"""Model stages (Ray actors): caption + probes, and the image embedding.

The model is built once per actor in ``__init__``; ``__call__`` gets a whole
batch, runs the model on its ok rows in one call (on a GPU the caption stage
merges several batches into that call, pipeline/stages/feeder.py), and
returns the batch with its own columns added. A model failure, an
out-of-memory error included, is split down to the image that caused it
(:func:`call_with_bisection`) and becomes that image's error row.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import numpy as np
import pyarrow as pa

from pipeline.stages.config import StageConfig
from pipeline.stages.feeder import ModelFeeder, StreamFeeder
from pipeline.stages.contract import CAPTIONED, EMBEDDED, PREPARED_INPUT, STATUS_COLUMNS
from schemas import STATUS_ERROR, STATUS_OK
from schemas.errors import exception_text

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def call_with_bisection(
    fn: Callable[[list[T]], list[R]], items: list[T], on_failure: Callable[[Exception], None] | None = None
) -> list[R | Exception]:
    """Run ``fn`` on the whole list; if it raises, split and retry the halves.

    One poisoned image then costs its own row, not its whole batch: the result
    holds, per item, either fn's output or the exception it alone raised. A
    batch too big for the GPU's memory is retried the same way, at half size
    down to single images; ``on_failure`` runs after each failure, before the
    retry (it frees what the failed attempt left cached).
    """
    if not items:
        return []
    try:
        results = fn(items)
    except Exception as exc:  # noqa: BLE001 - any model failure becomes a row error
        if on_failure is not None:
            on_failure(exc)
        if len(items) == 1:
            return [exc]
        middle = len(items) // 2
        return call_with_bisection(fn, items[:middle], on_failure) + call_with_bisection(fn, items[middle:], on_failure)
    if len(results) != len(items):
        raise RuntimeError(f"model returned {len(results)} results for {len(items)} inputs")
    return list(results)


def release_gpu_memory(exc: Exception) -> None:
    """After a CUDA out-of-memory error: hand the failed attempt's cached blocks back before the smaller retry."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


class _ModelStage:
    """Shared plumbing: thread count, the ok rows' images, and error rows."""

    #: the stage name in StageConfig.columns_after
    name = ""

    def __init__(self, stage: StageConfig):
        import torch

        self.stage = stage
        # Ray gives the actor a CPU share; torch would otherwise use every core
        # and fight the decode tasks and the other model for them.
        torch.set_num_threads(stage.torch_threads)

    def _run(
        self, batch: pa.Table, on_images: Callable[[list], list], on_prepared: Callable[[list], list] | None = None
    ) -> tuple[dict, list[int], list]:
        """Run the model on the ok rows; return the batch's columns (status updated), rows, results.

        Rows carry this stage's prepared input when the decode stage made one
        (``on_prepared`` gets those bytes); otherwise ``on_images`` gets PIL
        images rebuilt from the pixels. The prepared column is consumed: the
        stage hands it on as nulls.
        """
        from PIL import Image

        columns = {name: batch.column(name) for name in batch.column_names}
        status = columns["status"].to_pylist()
        kinds, errors = columns["error_kind"].to_pylist(), columns["error"].to_pylist()
        rows = [i for i, s in enumerate(status) if s == STATUS_OK]
        prepared_name = PREPARED_INPUT[self.name]
        prepared = columns.get(prepared_name)
        items: list = []
        if on_prepared is not None and prepared is not None and all(prepared[i].is_valid for i in rows):
            fn, items = on_prepared, [prepared[i].as_py() for i in rows]
        else:
            fn = on_images
            pixels = columns["pixels"]
            widths, heights = columns["pixel_width"].to_pylist(), columns["pixel_height"].to_pylist()
            for i in rows:
                try:
                    items.append(Image.frombytes("RGB", (widths[i], heights[i]), pixels[i].as_py()))
                except ValueError as exc:  # no pixels for this model: a bug upstream, but one row's
                    items.append(exc)
        ready = [k for k, item in enumerate(items) if not isinstance(item, Exception)]
        results: list = list(items)
        for k, result in zip(ready, self._call_model(fn, [items[k] for k in ready])):
            results[k] = result
        failed = {row: result for row, result in zip(rows, results) if isinstance(result, Exception)}
        if failed:
            for row, exc in failed.items():
                status[row], kinds[row] = STATUS_ERROR, "model"
                errors[row] = exception_text(exc)
            columns.update(zip(STATUS_COLUMNS, (status, kinds, errors)))
        if prepared is not None:
            columns[prepared_name] = pa.nulls(batch.num_rows, prepared.type)
        return columns, rows, results

    def _call_model(self, fn: Callable[[list], list], items: list) -> list:
        """Per item, fn's result or the exception that item alone raised."""
        return call_with_bisection(fn, items, on_failure=release_gpu_memory)

    def _finish(self, columns: dict) -> pa.Table:
        return self.stage.columns_after(self.name).table(columns)


class CaptionStage(_ModelStage):
    """Caption + probes. With ``images_per_call``, the actor serves several Ray batches at once (Ray Data
    runs its calls in threads, jobs/ray_plan.py) and one feeding thread owns the model: a streaming
    engine (Moondream) is kept full across the batches, images joining as rows free up, each batch
    returned when its own images are done (feeder.StreamFeeder); another captioner gets merged calls of
    up to that many images (feeder.ModelFeeder). Without, each batch is its own call."""

    name = "caption"

    def __init__(self, stage: StageConfig, images_per_call: int | None = None):
        super().__init__(stage)
        from pipeline.models import build_captioner, resolve_captioner

        config = stage.run.caption
        self.questions = tuple(config.probes)
        self.write_caption = config.enabled
        self.captioner = build_captioner(resolve_captioner(config.model), config, stage.run.device)
        self.feeder = None
        if images_per_call:
            # A streaming engine is kept full across batches; other captioners get merged calls.
            stream = getattr(self.captioner, "stream", None)
            hint = int(images_per_call)
            if stream is not None and stream(self.questions, caption=self.write_caption, images_hint=hint) is not None:
                self.feeder = StreamFeeder(
                    lambda: stream(self.questions, caption=self.write_caption, images_hint=hint),
                    super()._call_model, on_fault=release_gpu_memory,
                )
            else:
                self.feeder = ModelFeeder(images_per_call, super()._call_model)

    def _call_model(self, fn: Callable[[list], list], items: list) -> list:
        return self.feeder(fn, items) if self.feeder is not None else super()._call_model(fn, items)

    # Bound methods, so that the feeder can tell the two kinds of input apart (==) and merge like with like.
    def _describe(self, images: list) -> list:
        return self.captioner.describe(images, self.questions, caption=self.write_caption)

    def _describe_prepared(self, inputs: list) -> list:
        return self.captioner.describe_prepared(inputs, self.questions, caption=self.write_caption)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns, rows, results = self._run(batch, self._describe, self._describe_prepared)
        n = batch.num_rows
        captions, truncated, answers, yes_probs, answers_truncated, shorts = ([None] * n for _ in range(6))
        for row, result in zip(rows, results):
            if isinstance(result, Exception):
                continue
            count = len(result.answers)
            captions[row] = result.caption if self.write_caption else None
            truncated[row] = bool(result.caption_truncated) if self.write_caption else None
            shorts[row] = getattr(result, "short_caption", None) if self.write_caption else None
            answers[row] = list(result.answers)
            # Backends that do not report these leave them empty: nulls, not guesses.
            yes_probs[row] = list(result.yes_probs) if len(result.yes_probs) == count else [None] * count
            answers_truncated[row] = (
                list(result.answers_truncated) if len(result.answers_truncated) == count else [None] * count
            )
        columns.update(
            caption=captions, caption_truncated=truncated, caption_short=shorts, answers=answers,
            yes_probs=yes_probs, answers_truncated=answers_truncated,
        )  # fmt: skip
        assert set(CAPTIONED.names) <= set(columns)
        return self._finish(columns)


class EmbedStage(_ModelStage):
    name = "embed"

    def __init__(self, stage: StageConfig):
        super().__init__(stage)
        from pipeline.models import build_embedder, resolve_embedder

        self.embedder = build_embedder(resolve_embedder(stage.run.embed.model), stage.run.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns, rows, results = self._run(
            batch,
            lambda images: list(self.embedder.embed_images(images)),
            lambda inputs: list(self.embedder.embed_prepared(inputs)),
        )
        n, dim = batch.num_rows, self.embedder.dim
        matrix = np.zeros((n, dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        for row, result in zip(rows, results):
            if not isinstance(result, Exception):
                matrix[row], valid[row] = result, True
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
        columns["embedding_dim"] = [dim] * n
        columns["embedding"] = pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)), mask=pa.array(~valid))
        assert set(EMBEDDED.names) <= set(columns)
        return self._finish(columns)
