"""Label Studio: the labeling config, the tasks captioner writes, and the JSON export it reads back.

Tasks (Label Studio's import format), one per image::

    {"data": {"image": URL, "image_id": ..., "uri": ..., "captioner": {format, config, fields}},
     "predictions": [{"model_version": "moondream2@REV", "score": S, "result": [
         {"from_name": "caption", "to_name": "image", "type": "textarea", "value": {"text": [caption]}},
         {"from_name": "probe_is_there_a_person", ..., "type": "choices", "value": {"choices": ["yes"]}, "score": P},
         {"from_name": "probe_what_colour_is_the_sky", ..., "type": "textarea", "value": {"text": ["blue"]}}]}]}

A yes/no answer's ``score`` is the model's probability of that answer
(``yes_prob`` for yes, ``1 - yes_prob`` for no); the prediction's ``score``
is the lowest of them, so sorting Label Studio's data manager by prediction
score puts the least certain images first. ``data.captioner`` says which
fields the config had (pipeline.labels.fields.stamp): the import checks it.

The export Label Studio gives back (Export -> JSON) is the same tasks with
``annotations``; :func:`read_export` turns it into one :class:`Review` per
annotated image, or refuses it whole with the reason.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import quote

from pipeline.export.rows import ExportRow
from pipeline.labels.fields import CHOICE, FORMAT, IMAGE, NO, YES, Field, stamp

LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's local-files storage serves these


class LabelStudioError(ValueError):
    """A Label Studio file captioner cannot use as asked; the message says why and what to do."""


def labeling_config(fields: tuple[Field, ...]) -> str:
    """The labeling config (XML) for these fields: the image, the caption box, one control per probe."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE, value=f"${IMAGE}", zoom="true")
    for field in fields:
        ET.SubElement(view, "Header", value=field.question or "Caption")
        if field.kind == CHOICE:
            choices = ET.SubElement(view, "Choices", name=field.name, toName=IMAGE, choice="single", showInline="true")
            for value in (YES, NO):
                ET.SubElement(choices, "Choice", value=value)
        else:
            ET.SubElement(view, "TextArea", name=field.name, toName=IMAGE, editable="true", maxSubmissions="1",
                          rows="4" if field.is_caption else "1")
    ET.indent(view, space="  ")
    return ET.tostring(view, encoding="unicode") + "\n"


def task(row: ExportRow, fields: tuple[Field, ...], image_url: str) -> dict:
    """One Label Studio task for ``row``: the image, the keys the import needs, the model's answers as a prediction."""
    result, scores = [], []
    for field in fields:
        if field.is_caption:
            if row.caption:
                result.append(_region(field, {"text": [row.caption]}))
            continue
        probe = row.answer(field.question)
        if probe is None:
            continue
        if field.kind == CHOICE:
            if probe.answer_bool is None:
                continue  # the model said neither yes nor no: nothing to pre-select
            region = _region(field, {"choices": [YES if probe.answer_bool else NO]})
            if probe.yes_prob is not None:
                region["score"] = round(probe.yes_prob if probe.answer_bool else 1.0 - probe.yes_prob, 6)
                scores.append(region["score"])
            result.append(region)
        elif probe.answer:
            result.append(_region(field, {"text": [probe.answer]}))
    prediction = {"model_version": row.generator or "captioner", "result": result}
    if scores:
        prediction["score"] = min(scores)
    data = {IMAGE: image_url, "image_id": row.image_id, "uri": row.uri, "captioner": stamp(fields)}
    return {"data": data, "predictions": [prediction] if result else []}


def _region(field: Field, value: dict) -> dict:
    return {"from_name": field.name, "to_name": IMAGE, "type": field.kind, "value": value}


def serve_url(base: str, row: ExportRow) -> str:
    """The image as ``captioner serve`` shows it (its large view, 1280 px), by the row id of the served index."""
    return f"{base.rstrip('/')}/api/images/{row.id}/thumb?size=l"


def local_files_url(relative: str) -> str:
    """Label Studio's local-files URL for a path below its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
    return LOCAL_FILES_URL + quote(relative, safe="/")


# ---- reading Label Studio's export ------------------------------------------------------

@dataclass(frozen=True)
class Review:
    """One image's human labels from one annotation."""

    image_id: str
    uri: str
    caption: str | None  # the caption as the reviewer left it (None: no caption field in the result)
    answers: dict  # question -> "yes" / "no" for yes/no questions, the text otherwise
    task: int | None
    annotation: int | None
    annotator: str | None
    labeled_at: str | None


@dataclass(frozen=True)
class ExportReading:
    reviews: list[Review]
    unannotated: int  # tasks without a submitted annotation (skipped, or cancelled)


FIX_EXPORT = "in Label Studio: Export -> JSON (not JSON-MIN or CSV) of a project whose tasks `captioner export label-studio` wrote"


def read_export(data: bytes, where: str, fields: tuple[Field, ...]) -> ExportReading:
    """Reviews from Label Studio's JSON export, checked against this output's fields; LabelStudioError if unusable."""
    try:
        tasks = json.loads(data)
    except ValueError as exc:
        raise LabelStudioError(f"{where} is not JSON ({exc}); {FIX_EXPORT}") from exc
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise LabelStudioError(f"{where} is not a Label Studio JSON export (a list of tasks); {FIX_EXPORT}")
    if not tasks:
        raise LabelStudioError(f"{where} holds no tasks: the project was empty when exported; import the tasks, label some, and export again")
    by_name = {f.name: f for f in fields}
    reviews, unannotated = [], 0
    for n, item in enumerate(tasks, 1):
        data_ = item.get("data") if isinstance(item.get("data"), dict) else {}
        _check_stamp(data_.get("captioner"), n, item, where, fields)
        annotation = _latest(item.get("annotations"))
        if annotation is None:
            unannotated += 1
            continue
        if not data_.get("image_id") or not data_.get("uri"):
            raise LabelStudioError(f"{where}: task {_task_name(n, item)} has no data.image_id or data.uri; {FIX_EXPORT}")
        reviews.append(_review(data_, item, annotation, by_name, n, where))
    if not reviews:
        raise LabelStudioError(f"{where}: none of its {len(tasks)} tasks has a submitted annotation; label some images in Label Studio, then export again")
    return ExportReading(reviews, unannotated)


def _task_name(n: int, item: dict) -> str:
    return f"#{n}" + (f" (id {item['id']})" if "id" in item else "")


def _check_stamp(found, n: int, item: dict, where: str, fields: tuple[Field, ...]) -> None:
    expected = stamp(fields)
    if not isinstance(found, dict) or "fields" not in found:
        raise LabelStudioError(
            f"{where}: task {_task_name(n, item)} was not written by `captioner export label-studio` (its data has no "
            f"'captioner' block): an export from another labeling config; {FIX_EXPORT}"
        )
    if found.get("format") != FORMAT:
        raise LabelStudioError(f"{where}: task {_task_name(n, item)} is of task format {found.get('format')!r}, this captioner reads {FORMAT}; export the tasks again with this captioner")
    if found.get("config") == expected["config"]:
        return
    theirs = dict(found.get("fields") or {})
    ours = expected["fields"]
    missing = [q for name, q in theirs.items() if q not in ours.values()]
    if missing:
        raise LabelStudioError(
            f"{where}: the probe question {missing[0]!r} of the labeled tasks is not a probe of this output "
            f"(its probes: {list(ours.values())}); was it renamed? Report on the output the tasks were exported from, "
            f"or export tasks of this output and label them"
        )
    raise LabelStudioError(
        f"{where}: the tasks were made for another labeling config (fields {sorted(theirs)}, this output has "
        f"{sorted(ours)}); export tasks of this output with `captioner export label-studio` and label those"
    )


def _latest(annotations) -> dict | None:
    """The most recent submitted (not cancelled) annotation, or None."""
    done = [a for a in (annotations or []) if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list)]
    if not done:
        return None
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def _review(data: dict, item: dict, annotation: dict, by_name: dict, n: int, where: str) -> Review:
    caption, answers = None, {}
    for region in annotation["result"]:
        name = region.get("from_name") if isinstance(region, dict) else None
        field = by_name.get(name)
        if field is None or region.get("to_name") != IMAGE:
            raise LabelStudioError(
                f"{where}: task {_task_name(n, item)} has a result for {name!r}, which is no field of captioner's "
                f"labeling config (fields: {sorted(by_name)}); the project's config was changed: label with the "
                f"labeling-config.xml that `captioner export label-studio` wrote"
            )
        value = region.get("value") or {}
        if field.kind == CHOICE:
            chosen = value.get("choices") or []
            if len(chosen) != 1 or chosen[0] not in (YES, NO):
                raise LabelStudioError(f"{where}: task {_task_name(n, item)}: {field.question!r} was answered {chosen!r}; the config offers one of yes / no")
            answers[field.question] = chosen[0]
        else:
            text = " ".join(" ".join(str(t) for t in value.get("text") or []).split())
            if field.is_caption:
                caption = text
            elif text:
                answers[field.question] = text
    annotator = annotation.get("completed_by")
    if isinstance(annotator, dict):
        annotator = annotator.get("email") or annotator.get("id")
    return Review(
        image_id=str(data["image_id"]), uri=str(data["uri"]), caption=caption, answers=answers,
        task=item.get("id"), annotation=annotation.get("id"),
        annotator=None if annotator is None else str(annotator),
        labeled_at=annotation.get("updated_at") or annotation.get("created_at"),
    )

