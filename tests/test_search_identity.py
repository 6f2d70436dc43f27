"""Search meets the models and the data as a user does.

- `captioner sql` over every column (timestamps included) works, and the
  "(the index is read-only)" hint appears only for statements that write.
- run -> index -> search --mode hybrid with every spec form of the default
  embedder (see the end-to-end tests below).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests import search_doubles
from tests.search_data import crafted_rows, run_metadata, write_rows
from tests.cli import cli as invoke

search_doubles.register()


@pytest.fixture(scope="module")
def crafted_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted_sql")
    write_rows(folder / "part-0.parquet", crafted_rows(), run_metadata())
    db = folder / "index.duckdb"
    invoke("index", folder, "--db", db)
    return db


def test_sql_select_star_returns_timestamps(crafted_db):
    out = invoke("sql", "SELECT * FROM images ORDER BY uri", "--index", crafted_db, "--json").output
    rows = json.loads(out)
    assert len(rows) == 6
    assert rows[0]["processed_at"].startswith("2024-05-01 00:00:00")
    table = invoke("sql", "SELECT uri, processed_at FROM images ORDER BY uri", "--index", crafted_db).output
    assert "2024-05-01" in table


def test_read_only_hint_only_for_writes(crafted_db):
    bad_query = invoke("sql", "SELECT no_such_column FROM images", "--index", crafted_db, exit_code=1).output
    assert "no_such_column" in bad_query and "read-only" not in bad_query
    write = invoke("sql", "DELETE FROM image_rows", "--index", crafted_db, exit_code=1).output
    assert "read-only" in write
    create = invoke("sql", "CREATE TABLE t AS SELECT 1", "--index", crafted_db, exit_code=1).output
    assert "read-only" in create


# -- run -> index -> search with every spec form of the embedder ------------------------------
#
# The embedder is a tiny open_clip architecture registered under a name with a
# pretrained tag whose weights live in a hub repo, laid out in a temporary HF
# cache with the hub switched off: the same resolution path as the default
# open_clip:ViT-SO400M-14-SigLIP-384 (tag webli, repo timm/ViT-SO400M-14-SigLIP-384).

FORMS = ["name", "name@tag", "name@checkpoint", "directory"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, starts_ray):
    """HF cache + hub-backed tiny architecture, visible to this process and to a Ray of this module's own."""
    import ray
    from huggingface_hub import constants

    from examples.tiny_models import build_tiny_open_clip
    from tests.fixtures.hf_cache import TINY_HUB_REPO, add_snapshot, register_tiny_hub_arch, use_hf_cache

    root = tmp_path_factory.mktemp("hub")
    weights = build_tiny_open_clip(root / "published", seed=3)
    shutil.copytree(weights, root / "local_clip")  # the directory form: the same weights as a local model
    with pytest.MonkeyPatch.context() as mp:
        cache = use_hf_cache(mp, root / "hf")
        assert constants.HF_HUB_OFFLINE
        add_snapshot(cache, TINY_HUB_REPO, {"open_clip_model.safetensors": weights / "open_clip_model.safetensors"})
        register_tiny_hub_arch()
        # The worker hook imports tests.fixtures.hf_cache: workers need the repository on their path.
        repo = str(Path(__file__).resolve().parents[1])
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        if ray.is_initialized():
            ray.shutdown()  # a shared Ray's workers would not know the architecture
        hook = {"worker_process_setup_hook": "tests.fixtures.hf_cache.register_tiny_hub_arch_on_import"}
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=hook)
        try:
            yield root, weights
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def photos(hub):
    from tests.fixtures.images import make_jpegs

    make_jpegs(hub[0] / "photos", 4)
    return hub[0] / "photos"


def spec_for(form: str, hub) -> str:
    from tests.fixtures.hf_cache import TINY_HUB_ARCH, TINY_HUB_TAG

    root, weights = hub
    return {
        "name": f"open_clip:{TINY_HUB_ARCH}",
        "name@tag": f"open_clip:{TINY_HUB_ARCH}@{TINY_HUB_TAG}",
        "name@checkpoint": f"open_clip:{TINY_HUB_ARCH}@{weights / 'open_clip_model.safetensors'}",
        "directory": str(root / "local_clip"),
    }[form]


def run_embed_only(photos, out, spec):
    args = ["run", photos, "--out", out, "--no-caption", "--no-probes", "--device", "cpu", "--embed-model", spec, "--no-progress"]
    return invoke(*args)


@pytest.fixture(scope="module")
def indexed(hub, photos):
    """form -> (output, index db). Three embed-only runs: open_clip:NAME@TAG names the same model as
    open_clip:NAME, so its run into that output must resume with nothing to do (no Ray needed)."""
    out = {}
    for form in FORMS:
        folder = hub[0] / ("name" if form == "name@tag" else form)
        result = run_embed_only(photos, folder / "captions.parquet", spec_for(form, hub))
        if form == "name@tag":
            assert "4 already done, 0 to process" in result.output
        invoke("index", folder / "captions.parquet", "--db", folder / "index.duckdb")
        out[form] = (folder / "captions.parquet", folder / "index.duckdb")
    return out


def search(db, *extra, exit_code=0):
    result = invoke("search", "a photo", "--mode", "hybrid", "--index", db, "--json", "--device", "cpu", *extra, exit_code=exit_code)
    return json.loads(result.output) if exit_code == 0 else result.output


def stamped(output):
    import pyarrow.parquet as pq

    from schemas import read_metadata

    return read_metadata(pq.read_schema(output))


@pytest.mark.parametrize("form", FORMS)
def test_every_spec_form_of_the_embedder_is_accepted_by_search(indexed, hub, form):
    from pipeline.models.identity import model_identity

    output, db = indexed[form]
    ident = model_identity(spec_for(form, hub), "embed")
    run = stamped(output)
    assert (run.embed_model, run.embed_revision) == (ident.model, ident.revision)
    hits = search(db)
    assert len(hits) == 4 and all(h["semantic_rank"] for h in hits)
    # the same model, named as the run named it, is accepted explicitly too
    assert len(search(db, "--embed-model", spec_for(form, hub))) == 4


def test_name_and_its_default_tag_are_one_model_with_the_cached_commit(indexed, hub):
    from tests.fixtures.hf_cache import TINY_HUB_ARCH, TINY_HUB_TAG

    bare, tagged = stamped(indexed["name"][0]), stamped(indexed["name@tag"][0])
    assert bare.embed_model == tagged.embed_model == f"open_clip:{TINY_HUB_ARCH}@{TINY_HUB_TAG}"
    assert bare.embed_revision == tagged.embed_revision and len(bare.embed_revision) == 40
    assert len(search(indexed["name"][1], "--embed-model", spec_for("name@tag", hub))) == 4


def test_a_checkpoint_and_a_directory_with_the_same_weights_differ_from_the_hub_model(indexed, hub):
    # same bytes, but the hub model is named by repo commit and the local ones by content: no silent mixing
    out = search(indexed["name"][1], "--embed-model", spec_for("directory", hub), exit_code=1)
    assert "not comparable" in out


def test_a_different_embedder_is_refused(indexed, hub, tmp_path):
    from examples.tiny_models import build_tiny_open_clip

    other = build_tiny_open_clip(tmp_path / "other", seed=11)
    for form in FORMS:
        out = search(indexed[form][1], "--embed-model", str(other), exit_code=1)
        assert "not comparable" in out, form


def test_moving_a_local_model_keeps_resume_and_search(indexed, hub, tmp_path):
    output, db = indexed["directory"]
    moved = tmp_path / "moved" / "clip-renamed"
    shutil.move(hub[0] / "local_clip", moved)  # the run's saved config no longer leads to the model
    assert "--embed-model" in search(db, exit_code=1)
    assert len(search(db, "--embed-model", str(moved))) == 4
    rerun = run_embed_only(hub[0] / "photos", output, str(moved))
    assert "4 already done, 0 to process" in rerun.output
    assert len(search(db)) == 4  # the rerun saved the new location beside the output
