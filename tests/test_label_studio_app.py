"""The round trip against a running Label Studio application (skipped unless one is given).

The suite cannot start Label Studio within its time (its first start runs
the database migrations: 74 s on the 2-core machine, 17 s once migrated; the
install alone is 3 minutes), so this test talks to one started by hand on
loopback, as README "Labeling with Label Studio" shows:

  CAPTIONER_LABEL_STUDIO_URL=http://127.0.0.1:8080   the server
  CAPTIONER_LABEL_STUDIO_TOKEN=...                    an API token (legacy "Token" auth)
  CAPTIONER_LABEL_STUDIO_ROOT=/data/ls-root           its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
                                                      (local-files serving enabled); the test writes its images there

It creates a project with the labeling config captioner wrote, a local-files
storage, imports the tasks (Label Studio validates every prediction), loads
an image through the URL a task names, annotates two tasks through the API,
exports the project as JSON and imports that into captioner.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from pipeline.search import build_index
from tests.cli import cli
from tests.labels_data import write_set

URL = os.environ.get("CAPTIONER_LABEL_STUDIO_URL")
TOKEN = os.environ.get("CAPTIONER_LABEL_STUDIO_TOKEN")
ROOT = os.environ.get("CAPTIONER_LABEL_STUDIO_ROOT")

pytestmark = pytest.mark.skipif(not (URL and TOKEN and ROOT), reason="no running Label Studio given (CAPTIONER_LABEL_STUDIO_URL/TOKEN/ROOT)")


def test_label_studio_takes_the_tasks_shows_the_images_and_its_export_comes_back(tmp_path):
    import httpx

    base = Path(ROOT) / f"captioner-test-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    _, parquet, items = write_set(base)
    build_index([parquet], base / "index.duckdb")
    cli("export", "label-studio", "--index", base / "index.duckdb", "--out", base / "ls", "--local-files-root", ROOT, "--sample", "6")
    tasks = json.loads((base / "ls" / "tasks.json").read_text())
    config = (base / "ls" / "labeling-config.xml").read_text()
    with httpx.Client(base_url=URL, headers={"Authorization": f"Token {TOKEN}"}, timeout=60) as ls:
        project = ls.post("/api/projects", json={"title": base.name, "label_config": config})
        assert project.status_code == 201, project.text
        pid = project.json()["id"]
        storage = ls.post("/api/storages/localfiles", json={"project": pid, "path": str(base / "photos"), "title": "photos", "use_blob_urls": False})
        assert storage.status_code == 201, storage.text
        imported = ls.post(f"/api/projects/{pid}/import", json=tasks, params={"commit_to_project": "true"})
        assert imported.status_code == 201, imported.text
        assert imported.json()["task_count"] == 6 and imported.json()["prediction_count"] == 6
        stored = ls.get("/api/tasks", params={"project": pid, "fields": "all"}).json()["tasks"]
        assert len(stored) == 6
        first = stored[0]
        image = ls.get(first["data"]["image"])
        assert image.status_code == 200 and image.content == Path(first["data"]["uri"]).read_bytes()
        for task in stored[:2]:
            [prediction] = ls.get("/api/predictions", params={"task": task["id"]}).json()
            result = [dict(r) for r in prediction["result"]]
            for region in result:
                if region["type"] == "choices":
                    region["value"] = {"choices": ["no" if region["value"]["choices"] == ["yes"] else "yes"]}  # the person disagrees
            made = ls.post(f"/api/tasks/{task['id']}/annotations", json={"result": result})
            assert made.status_code == 201, made.text
        exported = ls.get(f"/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
        assert exported.status_code == 200, exported.text
        (tmp_path / "export.json").write_bytes(exported.content)
        ls.delete(f"/api/projects/{pid}")
    labels = tmp_path / "labels.json"
    result = cli("import", "label-studio", tmp_path / "export.json", "--index", base / "index.duckdb", "--labels", labels)
    assert "imported 2 reviewed images" in result.output and "4 tasks without a submitted annotation skipped" in result.output
    report = json.loads(cli("report", "probes", "--index", base / "index.duckdb", "--labels", labels, "--json").output)
    person = report["probes"][0]
    assert person["reviewed"] == 2 and person["accuracy"] == 0.0  # every yes/no answer was flipped by the "person"
