"""`captioner duplicates` (issue 16 item 6): exact and near tiers, --keep, nearest neighbours not all pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.search import ImageIndex, build_index
from pipeline.search import duplicates as dup
from tests import rows
from tests.cli import cli
from tests.search_data import later, ok_row, run_metadata, write_rows

DIM = 16
RUN = run_metadata(dim=DIM)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n, pairs, seed):
    """n clustered unit vectors whose last ``pairs`` rows are near copies (cosine ~0.99) of the first ``pairs``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(4, n // 50), DIM))
    x = unit(centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, DIM)))
    x[n - pairs:] = unit(x[:pairs] + 0.02 * rng.standard_normal((pairs, DIM)))
    return x


def brute_pairs(x, threshold):
    s = x @ x.T
    a, b = np.nonzero(np.triu(s, 1) >= threshold)
    return set(zip(a.tolist(), b.tolist()))


@pytest.mark.parametrize("lists", ["ivf", "temporary", "exact"])
def test_near_pairs_through_the_lists_find_the_pairs_every_pair_comparison_finds(lists, monkeypatch):
    from pipeline.search import ann

    x = planted(3000, 40, seed=1)
    inv = np.ones(len(x), np.float32)
    kwargs = {}
    if lists == "ivf":
        centroids = ann.train(x, 30)
        kwargs = {"lists": ann.assign(centroids, x), "centroids": centroids}
    elif lists == "temporary":
        monkeypatch.setattr(dup, "EXACT_ROWS", 1000)  # 3,000 rows get temporary lists
    a, b, s = dup.near_pairs(x, inv, np.arange(len(x)), 0.97, **kwargs)
    found = set(zip(a.tolist(), b.tolist()))
    truth = brute_pairs(x, 0.97)
    assert {(i, 3000 - 40 + i) for i in range(40)} <= truth
    assert found == truth
    assert np.all(s >= 0.97) and np.all(a < b)


def test_tiers_and_keep(tmp_path):
    base = np.eye(DIM, dtype=np.float32)
    same_bytes = "ab" * 32
    written = [
        # the same bytes at two paths (exact tier); the copy is the larger, newer file
        rows.row("/img/a.jpg", run=RUN, at=later(0), image_id=same_bytes, bytes=100, width=10, height=10,
                 caption="a", embedding=base[0].tolist()),
        rows.row("/img/z_copy_of_a.jpg", run=RUN, at=later(3), image_id=same_bytes, bytes=300, width=10, height=10,
                 caption="a", embedding=base[0].tolist()),
        # near tier: a re-encoded copy of b
        ok_row("/img/b.jpg", "b", ["no", "no"], base[1], run=RUN, at=later(1)),
        ok_row("/img/b_small.jpg", "b", ["no", "no"], base[1] + 0.05 * base[2], run=RUN, at=later(2)),
        ok_row("/img/c.jpg", "c", ["no", "no"], base[3], run=RUN),
    ]
    write_rows(tmp_path / "a.parquet", written, RUN)
    db = tmp_path / "index.duckdb"
    build_index([tmp_path / "a.parquet"], db)
    with ImageIndex.open(db) as idx:
        groups = idx.duplicates(0.99)
        assert [(g.tier, [m.uri for m in g]) for g in groups] == [
            ("exact", ["/img/a.jpg", "/img/z_copy_of_a.jpg"]), ("near", ["/img/b.jpg", "/img/b_small.jpg"])]
        assert [g.kept.uri for g in groups] == ["/img/a.jpg", "/img/b.jpg"]
        assert [g.kept.uri for g in idx.duplicates(0.99, keep="largest")][0] == "/img/z_copy_of_a.jpg"
        assert [g.kept.uri for g in idx.duplicates(0.99, keep="newest")] == ["/img/z_copy_of_a.jpg", "/img/b_small.jpg"]
        assert all(sum(m.keep for m in g) == 1 for g in groups)
    out = json.loads(cli("duplicates", "--index", str(db), "--threshold", "0.99", "--keep", "largest", "--json").output)
    assert [(g["tier"], g["keep"]) for g in out] == [("exact", "/img/z_copy_of_a.jpg"), ("near", "/img/b.jpg")]
    assert [m["keep"] for m in out[0]["images"]] == [False, True]
    table = cli("duplicates", "--index", str(db), "--threshold", "0.99", "--keep", "newest").output
    assert "exact; keep /img/z_copy_of_a.jpg" in table and "near; keep /img/b_small.jpg" in table


def test_an_ann_index_finds_every_planted_pair(tmp_path):
    x = planted(2000, 25, seed=3)
    write_rows(tmp_path / "a.parquet",
               [ok_row(f"/img/{i:05d}.jpg", "x", ["no", "no"], v, run=RUN) for i, v in enumerate(x)], RUN)
    db = tmp_path / "index.duckdb"
    build_index([tmp_path / "a.parquet"], db, ann=True)
    with ImageIndex.open(db) as idx:
        assert idx.vectors.ann
        groups = idx.duplicates(0.97)
    group_of = {int(m.uri[5:10]): n for n, g in enumerate(groups) for m in g}
    assert all(i in group_of and group_of.get(2000 - 25 + i) == group_of[i] for i in range(25))
    assert all(g.tier == "near" for g in groups)
