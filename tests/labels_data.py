"""A crafted labeling set: images with known model answers, yes_prob and the "true" human answers.

40 small PNGs under ``photos/``, one current-schema Parquet row each (with
schema v2+ ``yes_prob``), and ``TRUTH``: what a reviewer says for every
image. The model answers yes when ``yes_prob >= 0.5``; the truth agrees
with it mostly, less so near 0.5, so accuracy, precision, calibration and
thresholds all have something to show.
"""

from __future__ import annotations

import io
import json
import random

from PIL import Image

from tests import rows
from tests.search_data import run_metadata

PERSON = "Is there a person in the image?"
DOG = "Is there a dog?"
SKY = "What colour is the sky?"
PROBES = (PERSON, DOG, SKY)
N = 40


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, 255 - shade, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def crafted(seed: int = 7) -> list[dict]:
    """Per image: rel path, caption, yes_prob per yes/no probe, sky answer, and the human truth."""
    rng = random.Random(seed)
    out = []
    for i in range(N):
        person, dog = rng.random(), rng.random()
        # the truth: yes with probability close to yes_prob (a calibrated-ish model)
        truth = {PERSON: "yes" if rng.random() < person else "no", DOG: "yes" if rng.random() < dog ** 1.5 else "no",
                 SKY: rng.choice(["blue", "grey"])}
        out.append({
            "rel": f"photos/{'set-a' if i % 2 else 'set-b'}/img {i:02d}.png",
            "caption": f"A photo number {i}, with a {'dog' if dog >= 0.5 else 'cat'} on a lawn. The sky is clear.",
            "yes_prob": {PERSON: round(person, 3), DOG: round(dog, 3)},
            "sky": rng.choice(["blue", "grey"]),
            "truth": truth,
        })
    return out


def write_set(base) -> tuple:
    """(photos root, captions.parquet, crafted items): images and Parquet under ``base``."""
    items = crafted()
    run = run_metadata(probes=PROBES)
    written = []
    for n, item in enumerate(items):
        path = base / item["rel"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(5 * n))
        probes = []
        for q in PROBES:
            if q == SKY:
                probes.append({"question": q, "answer": item["sky"], "answer_bool": None, "yes_prob": None})
            else:
                p = item["yes_prob"][q]
                probes.append({"question": q, "answer": "yes" if p >= 0.5 else "no", "answer_bool": p >= 0.5, "yes_prob": p})
        written.append(rows.row(
            str(path), run=run, image_id=f"{n:064x}", bytes=100, format="PNG", width=16, height=12,
            caption=item["caption"], probes=probes,
        ))
    parquet = base / "captions.parquet"
    rows.write(parquet, written, run)
    return base / "photos", parquet, items


def annotate(tasks: list[dict], truth_by_uri: dict[str, dict], *, skip=(), caption_edit: str | None = None) -> list[dict]:
    """What Label Studio's Export -> JSON gives for ``tasks`` after a person labeled them with the truth.

    The shape is Label Studio's: each task with an ``id``, its ``data`` as
    imported, and ``annotations`` whose ``result`` regions are those of the
    prediction with the person's answers (the editor starts from the prediction).
    """
    out = []
    for n, task in enumerate(json.loads(json.dumps(tasks)), 1):
        task["id"] = 100 + n
        truth = truth_by_uri[task["data"]["uri"]]
        fields = task["data"]["captioner"]["fields"]
        result = [{**r, "id": f"r{n}-{i}"} for i, r in enumerate(task["predictions"][0]["result"]) if r["from_name"] == "caption"]
        if caption_edit and n == 1:
            result[0]["value"] = {"text": [caption_edit]}
        for name, question in fields.items():
            kind = "textarea" if question == SKY else "choices"
            value = {"text": [truth[question]]} if kind == "textarea" else {"choices": [truth[question]]}
            result.append({"id": f"r{n}-{name}", "from_name": name, "to_name": "image", "type": kind, "value": value, "origin": "manual"})
        task["annotations"] = [] if task["data"]["uri"] in skip else [{
            "id": 500 + n, "completed_by": 1, "was_cancelled": False, "result": result,
            "created_at": "2026-01-02T10:00:00.000000Z", "updated_at": "2026-01-02T10:00:00.000000Z",
        }]
        out.append(task)
    return out
