"""Search with the real tiny open_clip model: Parquet from `captioner run`, then every mode.

The tiny models are random, so which image a text query lands on means
nothing; what is checked is the plumbing: the index rebuilds the embedder from
its recorded spec, query vectors come out in the index's space (an indexed
image finds itself first), and scores equal numpy's cosine on the same rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.search import ImageIndex, SearchError, build_index
from tests.fixtures.images import make_jpegs

PROBES = ["Is there text in the image?", "What colour is the sky?"]


@pytest.fixture(scope="module")
def pipeline_output(tmp_path_factory, tiny_vlm_dir, tiny_clip_dir, ray_module):
    """Parquet written by the real pipeline (the shared local Ray) with the tiny models."""
    from pipeline.cli import main

    folder = tmp_path_factory.mktemp("search_e2e")
    make_jpegs(folder / "photos", 6)
    probes = folder / "probes.yaml"
    probes.write_text("\n".join(f"- {q}" for q in PROBES))
    out = folder / "captions.parquet"
    args = [
        "run", str(folder / "photos"), "--out", str(out), "--no-progress", "--device", "cpu",
        "--caption-model", str(tiny_vlm_dir), "--embed-model", f"open_clip:{tiny_clip_dir}",
        "--probes", str(probes),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.fixture(scope="module")
def e2e_index(pipeline_output, tmp_path_factory):
    db = tmp_path_factory.mktemp("search_e2e_db") / "index.duckdb"
    build_index([pipeline_output], db)
    with ImageIndex.open(db, device="cpu") as idx:
        yield idx


def test_every_mode_runs_on_real_pipeline_output(e2e_index, pipeline_output):
    rows = pq.read_table(pipeline_output).to_pylist()
    assert e2e_index.info.embed_model == rows[0]["embed_model"] and e2e_index.info.embedding_dim == 32

    # text: a word of one caption finds that image
    word = max(rows[0]["caption"].split(), key=len)
    assert rows[0]["uri"] in [h.uri for h in e2e_index.search_text(word, k=len(rows))]

    # semantic: scores are numpy's cosine between the embedded query and the stored rows
    query = "a photo of a cat"
    hits = e2e_index.search_semantic(query, k=len(rows))
    q = e2e_index.embedder.embed_texts([query])[0]
    by_uri = {r["uri"]: np.asarray(r["embedding"], np.float32) for r in rows}
    assert [h.score for h in hits] == pytest.approx([float(by_uri[h.uri] @ q) for h in hits], abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == len(rows)

    # image: an indexed image finds itself first
    top = e2e_index.search_image(rows[2]["uri"], k=1)[0]
    assert top.uri == rows[2]["uri"] and top.score == pytest.approx(1.0, abs=1e-4)

    # hybrid runs and returns fused scores
    assert e2e_index.search_hybrid(word, k=3)[0].score > 0


def test_real_embedder_from_another_model_is_refused(e2e_index, tiny_clip_dir, tmp_path):
    """Same architecture, different weights: the recorded identity differs, so it is refused.

    (A copy of the same weights elsewhere is the same model: identity is by content.)
    """
    from pipeline.models import build_embedder, resolve_embedder
    from examples.tiny_models import build_tiny_open_clip

    other_dir = build_tiny_open_clip(tmp_path / "other_clip", seed=1)
    other = build_embedder(resolve_embedder(f"open_clip:{other_dir}"), "cpu")
    with pytest.raises(SearchError, match="not comparable"):
        ImageIndex.open(e2e_index.path, embedder=other)
