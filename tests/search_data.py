"""Crafted captioner Parquet for the search tests: known captions, probe answers, vectors.

Rows are built by tests/rows.py (the current schema, through
schemas.output_schema + RunMetadata) as the pipeline writes them.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np

from pipeline.probes import answer_as_bool, probe_set_hash
from schemas import RunMetadata
from tests import rows, search_doubles

PERSON = "Is there a person?"
CAR = "What color is the car?"
PROBES = (PERSON, CAR)
QUOTE_CAPTION = """a sign that says "it's 5 o'clock"; DROP TABLE images; --"""

# uri -> (caption, person answer, car answer, embedding). The semantic query
# "beach" is mapped to e1 = [1, 0, 0, 0], so cosine order for it is
# cat, dog, car, people, sign (0.99, 0.8, 0.6, 0.4, 0.2).
CRAFTED = {
    "/img/cat_sofa.jpg": ("a white cat sleeping on a sofa", "no", "there is no car", [0.99, 0.141, 0, 0]),
    "/img/dog_beach.jpg": ("a brown dog running on the beach", "no", "there is no car", [0.8, 0.6, 0, 0]),
    "/img/red_car.jpg": ("a red car parked in a city street", "yes", "red", [0.6, 0, 0.8, 0]),
    "/img/people_beach.jpg": ("people walking on the beach, a sandy beach at sunset", "yes", "no car", [0.4, 0, 0, 0.9165]),
    "/img/sign.jpg": (QUOTE_CAPTION, "no", "no car", [0.2, 0.98, 0, 0]),
}
ERROR_URI = "/img/broken.jpg"
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def run_metadata(embed_model=search_doubles.SPEC, revision=search_doubles.REVISION, dim=search_doubles.DIM, probes=PROBES):
    return RunMetadata(
        caption_model="tiny-test",
        caption_revision="local",
        embed_model=embed_model,
        embed_revision=revision if embed_model else None,
        embedding_dim=dim if embed_model else None,
        probe_set_hash=probe_set_hash(tuple(probes)),
        probes=tuple(probes),
    )


def ok_row(uri, caption, answers, embedding, *, run: RunMetadata, at=T0) -> dict:
    vec = None if embedding is None else (np.asarray(embedding, np.float32) / np.linalg.norm(embedding)).tolist()
    return rows.row(
        uri, run=run, at=at, image_id=f"{abs(hash(uri)):064x}"[:64], bytes=1000, format="JPEG", width=640, height=480,
        caption=caption, embedding=vec,
        probes=[{"question": q, "answer": a, "answer_bool": answer_as_bool(q, a)} for q, a in zip(run.probes, answers)],
    )  # fmt: skip


def error_row(uri, *, run: RunMetadata, at=T0) -> dict:
    row = ok_row(uri, None, [], None, run=run, at=at)
    row.update(status="error", error_kind="truncated", error="image file is truncated", probes=None, image_id=None)
    return row


def write_rows(path, written: list[dict], run: RunMetadata) -> None:
    rows.write(path, written, run)


def crafted_rows(run=None, at=T0) -> list[dict]:
    run = run or run_metadata()
    rows = [ok_row(uri, cap, [p, c], emb, run=run, at=at) for uri, (cap, p, c, emb) in CRAFTED.items()]
    return rows + [error_row(ERROR_URI, run=run, at=at)]


def later(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)
