"""The labeling loop (issue 18): Label Studio tasks out, reviewed labels back, the probe report.

Label Studio's acceptance is checked with its SDK's own parser and
validators (label_studio_sdk.label_interface.LabelInterface: the labeling
config, every prediction and annotation; the application calls the same
validate_prediction when tasks are imported). Starting the application
itself takes over a minute on 2 cores (database migrations), so it is not
part of the suite: README "Labeling" says how it was checked by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from label_studio_sdk.label_interface import LabelInterface

from pipeline.search import build_index
from tests.cli import cli
from tests.labels_data import DOG, PERSON, SKY, annotate, write_set


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """(base, photos root, captions.parquet, index.duckdb, crafted items, the Parquet's rows by uri)."""
    base = tmp_path_factory.mktemp("labels")
    root, parquet, items = write_set(base)
    build_index([parquet], base / "index.duckdb")
    rows = {r["uri"]: r for r in pq.read_table(parquet).to_pylist()}
    return base, root, parquet, base / "index.duckdb", items, rows


def truth(labeled) -> dict[str, dict]:
    base, _, _, _, items, _ = labeled
    return {str(base / item["rel"]): item["truth"] for item in items}


def export_tasks(labeled, out, *args, exit_code=0):
    base, root, parquet, index, _, _ = labeled
    return cli("export", "label-studio", "--index", index, "--out", out, "--serve-url", "http://127.0.0.1:8000", *args,
               exit_code=exit_code)


def load(out: Path) -> tuple[list[dict], str]:
    return json.loads((out / "tasks.json").read_text()), (out / "labeling-config.xml").read_text()


# ---- export ------------------------------------------------------------------------------

def test_tasks_and_config_pass_label_studios_own_validation(labeled, tmp_path):
    *_, rows = labeled
    result = export_tasks(labeled, tmp_path / "ls")
    assert "wrote 40 Label Studio tasks" in result.output
    tasks, config = load(tmp_path / "ls")
    interface = LabelInterface(config)
    interface.validate()  # schema, unique names, toName targets, tag attributes
    assert {c.name for c in interface.controls} == {"caption", "probe_is_there_a_person_in_the_image", "probe_is_there_a_dog",
                                                    "probe_what_colour_is_the_sky"}
    assert len(tasks) == 40
    for task in tasks:
        assert interface.validate_task({"data": task["data"]})  # the data the config's $image needs (its own
        # prediction branch calls validate_prediction() without the prediction: checked one by one below)
        [prediction] = task["predictions"]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        row = rows[task["data"]["uri"]]
        assert task["data"]["image_id"] == row["image_id"]
        assert task["data"]["image"].startswith("http://127.0.0.1:8000/api/images/") and task["data"]["image"].endswith("/thumb?size=l")
        assert prediction["model_version"] == "tiny-test@local"
        by_name = {r["from_name"]: r for r in prediction["result"]}
        assert by_name["caption"]["value"] == {"text": [row["caption"]]}
        person = next(p for p in row["probes"] if p["question"] == PERSON)
        region = by_name["probe_is_there_a_person_in_the_image"]
        assert region["type"] == "choices" and region["value"] == {"choices": ["yes" if person["answer_bool"] else "no"]}
        expected = person["yes_prob"] if person["answer_bool"] else 1 - person["yes_prob"]
        assert region["score"] == pytest.approx(expected, abs=1e-6)
        assert by_name["probe_what_colour_is_the_sky"]["type"] == "textarea"
        assert prediction["score"] == min(r["score"] for r in prediction["result"] if "score" in r)


def test_serve_urls_name_rows_of_the_served_index(labeled, tmp_path):
    from pipeline.search import ImageIndex

    *_, index, _, _ = labeled
    export_tasks(labeled, tmp_path / "ls")
    tasks, _ = load(tmp_path / "ls")
    with ImageIndex.open(index) as idx:
        ids = dict(idx.sql("SELECT uri, id FROM image_rows").rows)
    for task in tasks:
        assert task["data"]["image"] == f"http://127.0.0.1:8000/api/images/{ids[task['data']['uri']]}/thumb?size=l"


def test_captioner_serve_answers_every_task_image_url(labeled, tmp_path):
    from urllib.parse import urlsplit

    from PIL import Image
    from starlette.testclient import TestClient

    from pipeline.search import ImageIndex
    from pipeline.serve.app import create_app
    from pipeline.serve.service import IndexService
    from pipeline.serve.thumbs import ThumbnailCache

    *_, index, _, _ = labeled
    export_tasks(labeled, tmp_path / "ls", "--sample", "3")
    tasks, _ = load(tmp_path / "ls")
    idx = ImageIndex.open(index)
    try:
        client = TestClient(create_app(IndexService(idx), ThumbnailCache(tmp_path / "thumbs")))
        for task in tasks:
            url = urlsplit(task["data"]["image"])
            response = client.get(url.path + "?" + url.query)
            assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
            with Image.open(task["data"]["uri"]) as original, Image.open(__import__("io").BytesIO(response.content)) as shown:
                assert shown.size == original.size  # small originals are shown at their own size
    finally:
        idx.close()


def test_serve_lets_only_the_named_origin_load_thumbnails_cross_origin(labeled, tmp_path):
    """Label Studio loads task images with crossorigin: without CORS its page shows "There was an issue loading URL"."""
    from starlette.testclient import TestClient

    from pipeline.search import ImageIndex
    from pipeline.serve.app import create_app
    from pipeline.serve.command import image_origins_of
    from pipeline.serve.service import IndexService
    from pipeline.serve.thumbs import ThumbnailCache

    *_, index, _, _ = labeled
    origins = image_origins_of(("http://127.0.0.1:8080/",))
    assert origins == ("http://127.0.0.1:8080",)
    idx = ImageIndex.open(index)
    try:
        client = TestClient(create_app(IndexService(idx), ThumbnailCache(tmp_path / "thumbs"), image_origins=origins))
        ls = {"Origin": "http://127.0.0.1:8080"}
        assert client.get("/api/images/1/thumb?size=l", headers=ls).headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
        assert "access-control-allow-origin" not in client.get("/api/images/1/thumb?size=l", headers={"Origin": "http://evil.test"}).headers
        assert "access-control-allow-origin" not in client.get("/api/images/1", headers=ls).headers  # images only, not the API
    finally:
        idx.close()
    with pytest.raises(Exception, match="is not an origin"):
        image_origins_of(("127.0.0.1:8080/path",))


def test_local_files_paths_are_below_the_document_root(labeled, tmp_path):
    base, root, parquet, *_ = labeled
    cli("export", "label-studio", "--from", parquet, "--out", tmp_path / "ls", "--local-files-root", base)
    tasks, _ = load(tmp_path / "ls")
    for task in tasks:
        rel = task["data"]["uri"][len(str(base)) + 1:]
        assert task["data"]["image"] == "/data/local-files/?d=" + rel.replace(" ", "%20")
    result = cli("export", "label-studio", "--from", parquet, "--out", tmp_path / "other", "--local-files-root", root / "set-a", exit_code=1)
    assert "is not under --local-files-root" in result.output and not (tmp_path / "other").exists()


def test_the_image_link_is_one_of_serve_or_local_files_and_serve_needs_the_index(labeled, tmp_path):
    base, _, parquet, index, _, _ = labeled
    result = cli("export", "label-studio", "--index", index, "--out", tmp_path / "ls", exit_code=2)
    assert "--serve-url" in result.output and "--local-files-root" in result.output
    result = cli("export", "label-studio", "--from", parquet, "--out", tmp_path / "ls", "--serve-url", "http://x:1", exit_code=2)
    assert "pass that --index instead of --from" in result.output
    result = cli("export", "txt", "--index", index, "--out", tmp_path / "t", "--sample", "3", exit_code=2)
    assert "--sample applies to label-studio" in result.output


def test_a_users_own_tasks_file_is_not_replaced_without_overwrite(labeled, tmp_path):
    out = tmp_path / "ls"
    out.mkdir()
    (out / "tasks.json").write_text("mine")
    result = export_tasks(labeled, out, exit_code=1)
    assert "--overwrite" in result.output and (out / "tasks.json").read_text() == "mine"
    assert not (out / "labeling-config.xml").exists()
    export_tasks(labeled, out, "--overwrite")
    export_tasks(labeled, out)  # now the export's own: replaced without --overwrite
    assert len(load(out)[0]) == 40


def test_sample_uncertainty_first_is_deterministic(labeled, tmp_path):
    *_, items, rows = labeled
    export_tasks(labeled, tmp_path / "a", "--sample", "8")
    export_tasks(labeled, tmp_path / "b", "--sample", "8")
    a, b = load(tmp_path / "a")[0], load(tmp_path / "b")[0]
    assert a == b and len(a) == 8

    def distance(uri):
        return min(abs(p["yes_prob"] - 0.5) for p in rows[uri]["probes"] if p["yes_prob"] is not None)

    chosen = [distance(t["data"]["uri"]) for t in a]
    rest = [distance(uri) for uri in rows if uri not in {t["data"]["uri"] for t in a}]
    assert chosen == sorted(chosen) and max(chosen) <= min(rest)


def test_sample_stratified_gives_every_probe_answer_a_share(labeled, tmp_path):
    *_, rows = labeled
    export_tasks(labeled, tmp_path / "s", "--sample", "4", "--sample-by", "stratified", "--seed", "3")
    tasks = load(tmp_path / "s")[0]
    seen = {(p["question"], p["answer_bool"]) for t in tasks for p in rows[t["data"]["uri"]]["probes"] if p["answer_bool"] is not None}
    assert seen == {(PERSON, True), (PERSON, False), (DOG, True), (DOG, False)}
    export_tasks(labeled, tmp_path / "t", "--sample", "4", "--sample-by", "stratified", "--seed", "4")
    assert load(tmp_path / "t")[0] != tasks  # another seed, another (still covering) sample


# ---- import ------------------------------------------------------------------------------

def _exported(labeled, tmp_path, **kwargs) -> Path:
    export_tasks(labeled, tmp_path / "ls")
    tasks, config = load(tmp_path / "ls")
    annotated = annotate(tasks, truth(labeled), **kwargs)
    interface = LabelInterface(config)
    for task in annotated:
        for annotation in task["annotations"]:
            assert interface.validate_annotation(annotation)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(annotated))
    return path


def test_import_stores_labels_beside_the_output_and_reimport_updates(labeled, tmp_path):
    base, _, parquet, index, items, _ = labeled
    labels_file = tmp_path / "labels.json"
    before = parquet.read_bytes()
    skip = {str(base / items[0]["rel"])}
    assert sorted(skip)[0] != sorted(truth(labeled))[0]  # the skipped task is not the first
    export_file = _exported(labeled, tmp_path, skip=skip, caption_edit="A person edited this caption.")
    result = cli("import", "label-studio", export_file, "--index", index, "--labels", labels_file)
    assert "39 new, 0 updated" in result.output and "1 tasks without a submitted annotation skipped" in result.output
    document = json.loads(labels_file.read_text())
    assert document["kind"] == "captioner-labels" and document["version"] == 1 and len(document["labels"]) == 39
    first = json.loads(export_file.read_text())[0]  # the task annotate() edited the caption of
    entry = next(e for e in document["labels"] if e["uri"] == first["data"]["uri"])
    assert entry["answers"] == truth(labeled)[first["data"]["uri"]] and entry["caption"] == "A person edited this caption."
    assert entry["task"] == 101 and entry["annotation"] == 501 and entry["annotator"] == "1"

    # a second review of the same images: updated in place, never duplicated
    tasks = json.loads(export_file.read_text())
    region = next(r for r in tasks[1]["annotations"][0]["result"] if r["from_name"] == "probe_is_there_a_dog")
    region["value"]["choices"] = ["no" if region["value"]["choices"] == ["yes"] else "yes"]
    tasks[1]["annotations"][0]["updated_at"] = "2026-01-03T10:00:00.000000Z"
    export_file.write_text(json.dumps(tasks))
    result = cli("import", "label-studio", export_file, "--index", index, "--labels", labels_file)
    assert "0 new, 1 updated, 38 unchanged" in result.output
    labels = json.loads(labels_file.read_text())["labels"]
    assert len(labels) == 39 and len({e["image_id"] for e in labels}) == 39
    assert parquet.read_bytes() == before  # the model's rows are untouched


def test_default_labels_file_is_beside_the_parquet(labeled, tmp_path):
    base, root, _, _, _, _ = labeled
    # a copy of the set whose output lies in tmp_path, so the module's files stay as they are
    copy_root, copy_parquet, _ = write_set(tmp_path)
    export_file = tmp_path / "export.json"
    cli("export", "label-studio", "--from", copy_parquet, "--out", tmp_path / "ls", "--local-files-root", tmp_path)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    export_file.write_text(json.dumps(annotate(tasks, {str(tmp_path / i["rel"]): i["truth"] for i in write_set(tmp_path)[2]})))
    cli("import", "label-studio", export_file, "--from", copy_parquet)
    assert (tmp_path / "captions.labels.json").exists()
    build_index([copy_parquet], tmp_path / "index.duckdb")
    result = cli("report", "probes", "--index", tmp_path / "index.duckdb", "--json")  # the index finds it too
    assert json.loads(result.output)["labeled_images"] == 40


@pytest.mark.parametrize("case", ["not_in_output", "other_config", "foreign_field", "empty", "renamed_probe", "none_annotated", "not_json"])
def test_bad_exports_are_refused_whole(labeled, tmp_path, case):
    _, _, parquet, index, _, _ = labeled
    export_file = _exported(labeled, tmp_path)
    labels_file = tmp_path / "labels.json"
    cli("import", "label-studio", export_file, "--index", index, "--labels", labels_file)
    kept = labels_file.read_bytes()
    tasks = json.loads(export_file.read_text())
    if case == "not_in_output":
        tasks[5]["data"]["image_id"] = "f" * 64
        tasks[5]["data"]["uri"] = "/elsewhere/stranger.png"
        expected = "/elsewhere/stranger.png (image_id ffffffffffffffff…) is not in index"
    elif case == "other_config":
        for t in tasks:
            del t["data"]["captioner"]
        expected = "was not written by `captioner export label-studio`"
    elif case == "foreign_field":
        tasks[3]["annotations"][0]["result"].append({"from_name": "sentiment", "to_name": "image", "type": "choices", "value": {"choices": ["x"]}})
        expected = "has a result for 'sentiment', which is no field of captioner's labeling config"
    elif case == "empty":
        tasks = []
        expected = "holds no tasks"
    elif case == "renamed_probe":
        for t in tasks:
            t["data"]["captioner"]["fields"]["probe_is_there_a_dog"] = "Is there a puppy?"
            t["data"]["captioner"]["config"] = "0" * 16
        expected = "the probe question 'Is there a puppy?' of the labeled tasks is not a probe of this output"
    elif case == "none_annotated":
        for t in tasks:
            t["annotations"] = [{**t["annotations"][0], "was_cancelled": True}]
        expected = "none of its 40 tasks has a submitted annotation"
    else:
        export_file.write_text("<html>")
        expected = "is not JSON"
    if case != "not_json":
        export_file.write_text(json.dumps(tasks))
    result = cli("import", "label-studio", export_file, "--index", index, "--labels", labels_file, exit_code=1)
    assert expected in result.output
    assert labels_file.read_bytes() == kept  # nothing written, nothing lost
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".labels.json")]  # no temporary left


# ---- report ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reported(labeled, tmp_path_factory):
    """(report JSON at precision 0.9, labels file, plot path) after importing the truth for every image."""
    base, _, _, index, _, _ = labeled
    tmp = tmp_path_factory.mktemp("report")
    export = cli("export", "label-studio", "--index", index, "--out", tmp / "ls", "--serve-url", "http://127.0.0.1:8000")
    assert "wrote 40" in export.output
    tasks = json.loads((tmp / "ls" / "tasks.json").read_text())
    (tmp / "export.json").write_text(json.dumps(annotate(tasks, truth(labeled))))
    labels_file = tmp / "labels.json"
    cli("import", "label-studio", tmp / "export.json", "--index", index, "--labels", labels_file)
    result = cli("report", "probes", "--index", index, "--labels", labels_file, "--precision", "0.9", "--json", "--plot", tmp / "probes.png")
    return json.loads(result.output), labels_file, tmp / "probes.png"


def _truth_and_scores(labeled, question):
    *_, items, rows = labeled
    base = labeled[0]
    y_true, y_pred, y_prob = [], [], []
    for item in items:
        probe = next(p for p in rows[str(base / item["rel"])]["probes"] if p["question"] == question)
        y_true.append(item["truth"][question] == "yes")
        y_pred.append(probe["answer_bool"])
        y_prob.append(probe["yes_prob"])
    return y_true, y_pred, y_prob


@pytest.mark.parametrize("question", [PERSON, DOG])
def test_report_figures_equal_sklearns(labeled, reported, question):
    import numpy as np
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import accuracy_score, precision_recall_curve, precision_score, recall_score

    report, _, _ = reported
    probe = next(p for p in report["probes"] if p["question"] == question)
    y_true, y_pred, y_prob = _truth_and_scores(labeled, question)
    assert probe["reviewed"] == 40 and probe["kind"] == "yes/no"
    assert probe["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert probe["precision"] == pytest.approx(precision_score(y_true, y_pred))
    assert probe["recall"] == pytest.approx(recall_score(y_true, y_pred))
    prob_true, prob_pred = calibration_curve(y_true, y_prob, n_bins=10, strategy="uniform")
    filled = [b for b in probe["calibration"] if b["count"]]
    assert [b["yes_rate"] for b in filled] == pytest.approx(list(prob_true))
    assert [b["mean_yes_prob"] for b in filled] == pytest.approx(list(prob_pred))
    assert sum(b["count"] for b in probe["calibration"]) == 40 and len(probe["calibration"]) == 10
    precision, recall, thresholds = precision_recall_curve(y_true, y_prob)
    reaching = [(t, p, r) for t, p, r in zip(thresholds, precision[:-1], recall[:-1]) if p >= 0.9]
    t, p, r = min(reaching)
    chosen = probe["threshold"]
    assert chosen["threshold"] == pytest.approx(t) and chosen["precision"] == pytest.approx(p) and chosen["recall"] == pytest.approx(r)
    # the threshold reaches the asked precision on the set, computed from scratch
    kept = [truth for truth, prob in zip(y_true, y_prob) if prob >= chosen["threshold"]]
    assert sum(kept) / len(kept) >= 0.9 and np.isclose(sum(kept) / sum(y_true), chosen["recall"])


def test_the_suggested_filter_selects_what_the_threshold_does(labeled, reported, tmp_path):
    *_, index, _, rows = labeled
    report, _, _ = reported
    chosen = next(p for p in report["probes"] if p["question"] == PERSON)["threshold"]
    out = tmp_path / "alt.jsonl"
    cli("export", "alt-text", "--index", index, "--out", out, "--probe", chosen["probe_filter"])
    exported = len(out.read_text().splitlines())
    assert exported == chosen["selected"]  # every image was reviewed here


def test_open_questions_and_captions_are_reported_as_agreement(labeled, reported):
    *_, items, rows = labeled
    base = labeled[0]
    report, _, _ = reported
    sky = next(p for p in report["probes"] if p["question"] == SKY)
    same = sum(next(p for p in rows[str(base / i["rel"])]["probes"] if p["question"] == SKY)["answer"] == i["truth"][SKY] for i in items)
    assert sky["kind"] == "text" and sky["reviewed"] == 40 and sky["accuracy"] == pytest.approx(same / 40)
    assert report["caption_reviewed"] == 40 and report["caption_kept"] == 40


def test_report_table_and_plot(labeled, reported):
    _, _, _, index, _, _ = labeled
    _, labels_file, plot = reported
    result = cli("report", "probes", "--index", index, "--labels", labels_file, "--precision", "0.9")
    assert "40 labeled images in this output" in result.output
    assert f'--probe "{PERSON}>=' in result.output and "calibration: Is there a dog?" in result.output
    from PIL import Image

    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] >= 600


def test_report_without_labels_says_how_to_get_them(labeled, tmp_path):
    *_, index, _, _ = labeled
    result = cli("report", "probes", "--index", index, "--labels", tmp_path / "none.json", exit_code=1)
    assert "captioner import label-studio" in result.output


# ---- training captions: --trigger and --style ---------------------------------------------

def test_txt_with_a_trigger_word_and_tags(labeled, tmp_path):
    base, root, parquet, _, items, rows = labeled
    cli("export", "txt", "--from", parquet, "--out", tmp_path / "txt", "--trigger", "sks", "--style", "tags")
    item = items[0]
    text = (tmp_path / "txt" / item["rel"][len("photos/"):]).with_suffix(".txt").read_text()
    expected = ["sks"] + [tag for q, tag in ((PERSON, "person"), (DOG, "dog")) if item["yes_prob"][q] >= 0.5]
    expected += [f"a photo number 0", f"with a {'dog' if item['yes_prob'][DOG] >= 0.5 else 'cat'} on a lawn", "the sky is clear"]
    assert text == ", ".join(dict.fromkeys(expected))
    cli("export", "txt", "--from", parquet, "--out", tmp_path / "plain", "--trigger", "sks")
    plain = (tmp_path / "plain" / item["rel"][len("photos/"):]).with_suffix(".txt").read_text()
    assert plain == "sks " + item["caption"]


def test_imagefolder_gets_a_text_column_only_when_asked(labeled, tmp_path):
    _, _, _, index, _, rows = labeled
    cli("export", "imagefolder", "--index", index, "--out", tmp_path / "a")
    first = json.loads((tmp_path / "a" / "metadata.jsonl").read_text().splitlines()[0])
    assert "text" not in first
    cli("export", "imagefolder", "--index", index, "--out", tmp_path / "b", "--style", "tags")
    records = [json.loads(line) for line in (tmp_path / "b" / "metadata.jsonl").read_text().splitlines()]
    assert all(r["text"].endswith("the sky is clear") and r["caption"].startswith("A photo number") for r in records)


def test_trigger_and_style_apply_to_training_formats_only(labeled, tmp_path):
    *_, index, _, _ = labeled
    result = cli("export", "coco", "--index", index, "--out", tmp_path / "c", "--trigger", "sks", exit_code=2)
    assert "--trigger and --style shape training captions" in result.output


def test_question_tags():
    from pipeline.export.training_text import question_tag

    assert question_tag("Is there a person in the image?") == "person"
    assert question_tag("Does the image contain a red car?") == "red car"
    assert question_tag("Is this a screenshot?") == "screenshot"
    assert question_tag("Are there any animals?") == "animals"
    assert question_tag("Is the photo taken outdoors?") == "taken outdoors"


def test_hf_dataset_text_column_has_the_trigger(labeled, tmp_path):
    import datasets

    _, _, parquet, _, _, _ = labeled
    cli("export", "hf-dataset", "--from", parquet, "--out", tmp_path / "hf", "--trigger", "sks")
    dataset = datasets.load_from_disk(str(tmp_path / "hf"))
    assert dataset.num_rows == 40 and all(t == "sks " + c for t, c in zip(dataset["text"], dataset["caption"]))
