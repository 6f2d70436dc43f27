"""The Ray Data stages: decode -> caption/probe -> embed -> conform to the schema.

Every stage takes one frozen :class:`StageConfig` and handles a whole batch
(a dict of numpy columns). Model stages are Ray actors: the model is built
once in ``__init__`` on the worker, never on the driver. A row that failed in
an earlier stage (``status == "error"``) passes through untouched, so each
input image yields exactly one output row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence, TypeVar

import numpy as np
import pyarrow as pa

from pipeline.config import RunConfig
from schemas import SCHEMA_VERSION, STATUS_ERROR, STATUS_OK, RunMetadata, output_schema

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_NO_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class StageConfig:
    """Everything a stage needs: the run config and the identity rows are stamped with."""

    run: RunConfig
    identity: RunMetadata  # models, revisions and probe set; embedding_dim is filled from the data


# ---- decode (CPU tasks) ---------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], *, stage: StageConfig) -> dict[str, np.ndarray]:
    from pipeline.decode import load_image

    options = stage.run.storage_options_dict()
    # ``location`` is the uri's exact bytes (a file name need not be UTF-8);
    # ``uri`` is its printable form, the one stored in the output.
    locations = [bytes(raw).decode("utf-8", "surrogateescape") for raw in batch["location"]]
    decoded = [load_image(location, stage.run.decode, options) for location in locations]
    return {
        "uri": np.array(batch["uri"], dtype=object),
        "image_id": np.array([d.image_id for d in decoded], dtype=object),
        "bytes": np.array([d.bytes for d in decoded], dtype=object),
        "format": np.array([d.format for d in decoded], dtype=object),
        "width": np.array([d.width for d in decoded], dtype=object),
        "height": np.array([d.height for d in decoded], dtype=object),
        "status": np.array([STATUS_OK if d.ok else STATUS_ERROR for d in decoded], dtype=object),
        "error_kind": np.array([d.error_kind for d in decoded], dtype=object),
        "error": np.array([d.error for d in decoded], dtype=object),
        "pixels": _object_array([np.asarray(d.image) if d.ok else _NO_PIXELS for d in decoded]),
    }


# ---- model stages (Ray actors) ----------------------------------------------


def call_with_bisection(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R | Exception]:
    """Run ``fn`` on the whole list; if it raises, split and retry the halves.

    One poisoned image then costs its own row, not its whole batch: the result
    holds, per item, either fn's output or the exception it alone raised.
    """
    if not items:
        return []
    try:
        results = fn(items)
    except Exception as exc:  # noqa: BLE001 - any model failure becomes a row error
        if len(items) == 1:
            return [exc]
        middle = len(items) // 2
        return call_with_bisection(fn, items[:middle]) + call_with_bisection(fn, items[middle:])
    if len(results) != len(items):
        raise RuntimeError(f"model returned {len(results)} results for {len(items)} inputs")
    return list(results)


class _ModelStage:
    """Shared plumbing: thread count, device, and applying a model to the ok rows."""

    def __init__(self, stage: StageConfig):
        import torch

        self.stage = stage
        # Ray gives the actor a CPU share; torch would otherwise use every core
        # and fight the decode tasks and the other model for them.
        torch.set_num_threads(max(1, int(round(stage.run.ray.model_actor_cpus))))

    @staticmethod
    def _ok_rows(batch: dict[str, np.ndarray]) -> list[int]:
        return [i for i, status in enumerate(batch["status"]) if status == STATUS_OK]

    @staticmethod
    def _images(batch: dict[str, np.ndarray], rows: Sequence[int]):
        from PIL import Image

        return [Image.fromarray(batch["pixels"][i]) for i in rows]

    @staticmethod
    def _mark_failed(batch: dict[str, np.ndarray], row: int, exc: Exception) -> None:
        batch["status"][row] = STATUS_ERROR
        batch["error_kind"][row] = "model"
        batch["error"][row] = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]


class CaptionStage(_ModelStage):
    def __init__(self, stage: StageConfig):
        super().__init__(stage)
        from pipeline.models import build_captioner, resolve_captioner

        config = stage.run.caption
        self.questions = tuple(config.probes)
        self.captioner = build_captioner(resolve_captioner(config.model), config, stage.run.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = _writable(batch)
        rows = self._ok_rows(batch)
        images = self._images(batch, rows)
        results = call_with_bisection(lambda imgs: self.captioner.describe(imgs, self.questions), images)
        captions = np.full(len(batch["uri"]), None, dtype=object)
        answers = np.full(len(batch["uri"]), None, dtype=object)
        for row, result in zip(rows, results):
            if isinstance(result, Exception):
                self._mark_failed(batch, row, result)
                continue
            captions[row] = result.caption
            answers[row] = json.dumps(list(result.answers))
        batch["caption"] = captions
        batch["answers_json"] = answers
        return batch


class EmbedStage(_ModelStage):
    def __init__(self, stage: StageConfig):
        super().__init__(stage)
        from pipeline.models import build_embedder, resolve_embedder

        self.embedder = build_embedder(resolve_embedder(stage.run.embed.model), stage.run.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = _writable(batch)
        rows = self._ok_rows(batch)
        images = self._images(batch, rows)
        results = call_with_bisection(lambda imgs: list(self.embedder.embed_images(imgs)), images)
        # NaN marks "no embedding"; conform turns those rows into nulls.
        vectors = np.full((len(batch["uri"]), self.embedder.dim), np.nan, dtype=np.float32)
        for row, result in zip(rows, results):
            if isinstance(result, Exception):
                self._mark_failed(batch, row, result)
            else:
                vectors[row] = result
        batch["embedding"] = vectors
        return batch


# ---- conform (CPU tasks) ---------------------------------------------------------


def conform_batch(batch: dict[str, np.ndarray], *, stage: StageConfig) -> pa.Table:
    """Turn a stage batch into a table with exactly the schema's columns and types."""
    from pipeline.probes import answer_as_bool

    n = len(batch["uri"])
    vectors = batch.get("embedding")
    dim = int(vectors.shape[1]) if vectors is not None else None
    identity = dataclasses.replace(stage.identity, embedding_dim=dim)
    schema = output_schema(dim, identity)
    ok = [status == STATUS_OK for status in batch["status"]]
    questions = list(identity.probes)

    probes = []
    answers_json = batch.get("answers_json")
    for i in range(n):
        raw = None if answers_json is None else answers_json[i]
        if not ok[i] or raw is None:
            probes.append(None)
            continue
        answers = json.loads(raw)
        probes.append(
            [{"question": q, "answer": a, "answer_bool": answer_as_bool(q, a)} for q, a in zip(questions, answers)]
        )

    if vectors is None:
        embedding = pa.nulls(n, schema.field("embedding").type)
    else:
        flat = pa.array(vectors.reshape(-1), pa.float32())
        missing = pa.array([not ok[i] or bool(np.isnan(vectors[i]).any()) for i in range(n)])
        embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=missing)

    def column(name):
        values = batch.get(name)
        return [None] * n if values is None else [_plain(v) for v in values]

    captions = column("caption")
    now = datetime.now(timezone.utc)
    data = {
        "schema_version": [SCHEMA_VERSION] * n,
        "image_id": column("image_id"),
        "uri": column("uri"),
        "bytes": column("bytes"),
        "format": column("format"),
        "width": column("width"),
        "height": column("height"),
        "status": column("status"),
        "error_kind": column("error_kind"),
        "error": column("error"),
        "caption": [c if ok[i] else None for i, c in enumerate(captions)],
        "probes": probes,
        "embedding": embedding,
        "caption_model": [identity.caption_model] * n,
        "caption_revision": [identity.caption_revision] * n,
        "embed_model": [identity.embed_model] * n,
        "embed_revision": [identity.embed_revision] * n,
        "probe_set_hash": [identity.probe_set_hash] * n,
        "processed_at": [now] * n,
    }
    arrays = [
        value if isinstance(value, pa.Array) else pa.array(value, type=schema.field(name).type)
        for name, value in data.items()
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


# ---- helpers ------------------------------------------------------------------------


def _object_array(values: list) -> np.ndarray:
    # np.array() would try to stack equal-shaped images into one 4-D array.
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _writable(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Ray hands zero-copy, read-only views; the columns we edit are copied.
    for name in ("status", "error_kind", "error"):
        batch[name] = np.array(batch[name], dtype=object)
    return batch


def _plain(value):
    """numpy scalars -> Python values, NaN/None -> None (Ray may turn None ints into NaN)."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
