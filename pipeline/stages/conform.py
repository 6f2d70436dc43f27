"""Conform step (CPU tasks): the last stage's batch -> a table of the output schema."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.config import StageConfig
from schemas import SCHEMA_VERSION, STATUS_OK, output_schema


def conform_batch(batch: pa.Table, *, stage: StageConfig) -> pa.Table:
    """Exactly the schema's columns and types, stamped with the run's identity."""
    from pipeline.probes import answer_as_bool

    n = batch.num_rows
    has_embedding = "embedding" in batch.column_names
    dim = int(batch.column("embedding_dim")[0].as_py()) if has_embedding and n else None
    identity = dataclasses.replace(stage.identity, embedding_dim=dim)
    schema = output_schema(dim, identity)
    ok = pc.equal(batch.column("status"), STATUS_OK).to_pylist()
    questions = list(identity.probes)

    probes: list = [None] * n
    if "answers" in batch.column_names:
        all_answers = batch.column("answers").to_pylist()
        all_yes = batch.column("yes_probs").to_pylist()
        all_cut = batch.column("answers_truncated").to_pylist()
        for i, answers in enumerate(all_answers):
            if ok[i] and answers is not None:
                probes[i] = [
                    {"question": q, "answer": a, "answer_bool": answer_as_bool(q, a), "yes_prob": p, "truncated": cut}
                    for q, a, p, cut in zip(questions, answers, all_yes[i], all_cut[i])
                ]

    def column(name: str):
        return batch.column(name) if name in batch.column_names else pa.nulls(n)

    def only_ok(values):
        return pc.if_else(pa.array(ok, pa.bool_()), values, pa.nulls(n, values.type)) if n else values

    embedding = pa.nulls(n, schema.field("embedding").type)
    if has_embedding and dim:
        vectors = only_ok(batch.column("embedding").combine_chunks())
        embedding = vectors.cast(schema.field("embedding").type)
    now = datetime.now(timezone.utc)
    data = {
        "schema_version": pa.array([SCHEMA_VERSION] * n, pa.int16()),
        "image_id": column("image_id"),
        "uri": column("uri"),
        "bytes": column("bytes"),
        "source_mtime": column("source_mtime"),
        "format": column("format"),
        "width": column("width"),
        "height": column("height"),
        "status": column("status"),
        "error_kind": column("error_kind"),
        "error": column("error"),
        "caption": only_ok(column("caption").combine_chunks()) if "caption" in batch.column_names else pa.nulls(n),
        "caption_truncated": (
            only_ok(column("caption_truncated").combine_chunks())
            if "caption_truncated" in batch.column_names else pa.nulls(n, pa.bool_())
        ),
        "caption_short": (
            only_ok(column("caption_short").combine_chunks()) if "caption_short" in batch.column_names else pa.nulls(n)
        ),
        "probes": probes,
        "text": only_ok(column("text").combine_chunks()) if "text" in batch.column_names else pa.nulls(n),
        "text_lines": (
            only_ok(column("text_lines").combine_chunks())
            if "text_lines" in batch.column_names else pa.nulls(n, schema.field("text_lines").type)
        ),
        "embedding": embedding,
        "caption_model": [identity.caption_model] * n,
        "caption_revision": [identity.caption_revision] * n,
        "embed_model": [identity.embed_model] * n,
        "embed_revision": [identity.embed_revision] * n,
        "ocr_model": [identity.ocr_model] * n,
        "ocr_revision": [identity.ocr_revision] * n,
        "probe_set_hash": [identity.probe_set_hash] * n,
        "processed_at": [now] * n,
    }
    arrays = []
    for field in schema:
        value = data[field.name]
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        arrays.append(value.cast(field.type) if isinstance(value, pa.Array) else pa.array(value, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
