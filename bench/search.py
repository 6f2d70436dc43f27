"""Search benchmark: synthetic captioner Parquet -> index -> what issue 16 asks, side by side.

    python bench/search.py --n 100000 --dim 768
    python bench/search.py --n 1000000 --dim 768

One run prints: the fresh build (`build_index`, per step: load, fts,
embeddings, ann, checkpoint) and the index's size against the stored float32
vectors plus the text; numpy brute-force top-10 over the same float32 matrix
in RAM against our exact scan of the mapped vector files (ratio: each call
after a pause, and back to back); filtered
semantic queries at 10% and 0.1% selectivity (complete? equal to numpy over
the matching rows?) and the probe filter (~40%); ANN (IVF) recall@10 and
latency against the exact scan; the first query after opening against a warm
one; BM25; and adding 10,000 rows with `captioner index NEW.parquet --db DB`
as a user runs it (a subprocess, end to end) against the fresh build.

Synthetic vectors are not uniform on the sphere: uniform random vectors in
768-D have no near neighbours at all, which no real embedding set looks like.
Each row here is a cluster centre (N/1000 clusters) plus low-rank
within-cluster variation (rank 64) plus a little isotropic noise, then
L2-normalised, which gives CLIP-like cosine structure (close neighbours
around 0.8-0.9, unrelated pairs near 0). Queries are fresh draws from the
same distribution, not rows of the data.
Memory: the vectors are held once in numpy (N x D x 4 bytes: 3.1 GB at
1M x 768), parked in a .npy file while the index is built; the index's
vector files are mapped, so they share the page cache with the files.

Timing the exact scan against numpy, the calls alternate query by query (on
a shared machine a ratio of medians taken minutes apart measures the
neighbours), each after a PAUSE: OpenBLAS's worker threads spin for about
0.1 s after each numpy product and take a core from whatever runs next, and
torch's do the same after ours. The line "back to back" shows what that costs
the call that runs second. A query server does not run numpy products
between queries (pipeline.search.scan avoids them), so the paused figure is
the one a user sees.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.search import ImageIndex, build_index  # noqa: E402
from schemas import PROBE_TYPE, RunMetadata, output_schema  # noqa: E402

CHUNK = 50_000
PERSON = "Is there a person?"
COLOR = "What is the main colour?"
COLORS = ["red", "green", "blue", "yellow", "black", "white", "brown", "grey", "orange", "purple"]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fu", "ge", "hi", "ju", "pe"]


class Vectors:
    """Clustered, low-rank-plus-noise unit vectors (see the module docstring)."""

    def __init__(self, n: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.dim = dim
        self.centres = _unit(rng.standard_normal((max(100, n // 1000), dim), dtype=np.float32))
        self.basis = _unit(rng.standard_normal((64, dim), dtype=np.float32))

    def draw(self, count: int) -> np.ndarray:
        rng = self.rng
        centre = self.centres[rng.integers(0, len(self.centres), count)]
        within = rng.standard_normal((count, len(self.basis)), dtype=np.float32) @ self.basis * (0.6 / 8)
        noise = rng.standard_normal((count, self.dim), dtype=np.float32) * (0.15 / np.sqrt(self.dim))
        return _unit(centre + within + noise)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vocabulary(rng, size: int = 20_000) -> np.ndarray:
    parts = rng.integers(0, len(SYLLABLES), (size * 2, 3))
    words = np.unique(["".join(SYLLABLES[i] for i in row) for row in parts])
    return rng.permutation(words)[:size]


def captions(rng, vocab: np.ndarray, count: int) -> list[str]:
    # Zipf-like word frequencies, 8-16 words a caption, like real captions.
    ranks = np.minimum(rng.zipf(1.3, (count, 16)) - 1, len(vocab) - 1)
    lengths = rng.integers(8, 17, count)
    return [" ".join(vocab[r[:k]]) for r, k in zip(ranks, lengths)]


def chunk_table(start: int, x: np.ndarray, caps: list[str], rng, schema: pa.Schema, run: RunMetadata) -> pa.Table:
    n, dim = x.shape
    person = rng.random(n) < 0.4
    colour = np.asarray(COLORS)[rng.integers(0, len(COLORS), n)]
    answers = np.empty(2 * n, dtype=object)
    answers[0::2] = np.where(person, "yes", "no")
    answers[1::2] = colour
    answer_bool = np.empty(2 * n, dtype=object)
    answer_bool[0::2] = person
    answer_bool[1::2] = None
    probes = pa.StructArray.from_arrays(
        [pa.array(np.tile([PERSON, COLOR], n)), pa.array(answers, pa.string()), pa.array(answer_bool, pa.bool_())]
        + [pa.nulls(2 * n, f.type) for f in list(PROBE_TYPE)[3:]],  # yes_prob, truncated (schema v2)
        fields=list(PROBE_TYPE),
    )
    ids = np.arange(start, start + n)

    def const(value, typ):
        return pa.array([value] * n, typ)

    columns = {
        "schema_version": const(1, pa.int16()),
        "image_id": pa.array([f"{i:064x}" for i in ids]),
        "uri": pa.array([f"/bench/img_{i:07d}.jpg" for i in ids]),
        "bytes": pa.array(rng.integers(50_000, 500_000, n)),
        "format": const("JPEG", pa.string()),
        "width": const(1024, pa.int32()),
        "height": const(768, pa.int32()),
        "status": const("ok", pa.string()),
        "error_kind": const(None, pa.string()),
        "error": const(None, pa.string()),
        "caption": pa.array(caps),
        "caption_truncated": const(None, pa.bool_()),
        "probes": pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), probes, type=schema.field("probes").type),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        "caption_model": const(run.caption_model, pa.string()),
        "caption_revision": const(run.caption_revision, pa.string()),
        "embed_model": const(run.embed_model, pa.string()),
        "embed_revision": const(run.embed_revision, pa.string()),
        "probe_set_hash": const(run.probe_set_hash, pa.string()),
        "processed_at": const(datetime(2024, 1, 1, tzinfo=timezone.utc), pa.timestamp("us", tz="UTC")),
    }
    # Columns later schemas added (source_mtime in v3, the OCR text and short caption in v5) are
    # nullable: the bench leaves them empty, as a run without those features does.
    return pa.Table.from_arrays([columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def planted_pairs(n: int, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(originals, copies): row copies[i] is a near copy of row originals[i] (copies in the second half)."""
    pairs = min(pairs, n // 2)
    copies = n // 2 + np.arange(pairs) * max(1, (n - n // 2) // max(1, pairs))
    return copies - n // 2, copies


def write_parquet(path: Path, n: int, dim: int, seed: int, pairs: int = 0):
    """Write N rows; return the (N, D) vectors, the query generator and the vocabulary.

    ``pairs`` rows of the second half are near copies (cosine about 0.99, like a re-encoded JPEG) of rows
    of the first half (:func:`planted_pairs`).
    """
    run = RunMetadata("bench", "local", "bench:synthetic", "bench", dim, "0" * 64, (PERSON, COLOR))
    schema = output_schema(dim, run)
    gen = Vectors(n, dim, seed)
    rng = np.random.default_rng(seed + 1)
    vocab = vocabulary(rng)
    x = np.empty((n, dim), dtype=np.float32)
    originals, copies = planted_pairs(n, pairs)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            x[start : start + count] = gen.draw(count)
            here = (copies >= start) & (copies < start + count)
            noise = rng.standard_normal((int(here.sum()), dim), dtype=np.float32) * (0.15 / np.sqrt(dim))
            x[copies[here]] = _unit(x[originals[here]] + noise)
            writer.write_table(chunk_table(start, x[start : start + count], captions(rng, vocab, count), rng, schema, run))
    return x, gen, vocab


def numpy_top10(x: np.ndarray, q: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    scores = x @ q if keep is None else x[keep] @ q
    top = np.argpartition(-scores, 10)[:10]
    top = top[np.argsort(-scores[top])]
    return top if keep is None else keep[top]


def recall(hits_list, truth) -> float:
    return float(np.mean([len({h.id for h in hits} & set(t.tolist())) / 10 for hits, t in zip(hits_list, truth)]))


# Seconds of idle before each alternated call: longer than OpenBLAS's and torch's threads spin after a call.
PAUSE = 0.25


def alternated(first, second, queries, pause: float = PAUSE) -> tuple[list[float], list[float], list]:
    """(first's seconds, second's seconds, second's results), query by query in turn, each call after ``pause``."""
    a, b, out = [], [], []
    for q in queries:
        time.sleep(pause)
        a.append(timed(first, q)[1])
        time.sleep(pause)
        result, seconds = timed(second, q)
        b.append(seconds)
        out.append(result)
    return a, b, out


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def ms(seconds: list[float]) -> str:
    s = sorted(seconds)
    p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
    return f"median {statistics.median(s) * 1e3:8.2f} ms   p95 {p95 * 1e3:8.2f} ms   (n={len(s)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="rows (up to 1,000,000)")
    ap.add_argument("--dim", type=int, default=768, choices=[768, 1152])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--nprobe", default="", help="comma-separated IVF nprobe values to try besides the default")
    ap.add_argument("--add", type=int, default=10_000, help="rows added by the update step")
    ap.add_argument("--pairs", type=int, default=1_000, help="near-duplicate pairs planted for `duplicates`")
    ap.add_argument("--workdir", type=Path, help="keep the Parquet and index here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if not 10 < args.n <= 1_000_000:
        ap.error("--n must be in (10, 1000000]")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="captioner-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    import os
    import subprocess

    from pipeline.search import vectors

    n, dim = args.n, args.dim
    print(f"search bench: N={n:,} D={dim} seed={args.seed}  ({os.cpu_count()} CPUs, numpy {np.__version__})")
    (x, gen, vocab), t_gen = timed(write_parquet, work / "bench.parquet", n, dim, args.seed, args.pairs)
    print(f"generate + write Parquet       {t_gen:8.1f} s")

    # Park the vectors on disk while the index builds; reload them for the numpy baseline afterwards.
    np.save(work / "vectors.npy", x)
    del x
    db = work / "index.duckdb"
    report = build_index([work / "bench.parquet"], db, fresh=True)
    t = report.timings
    steps = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
    print(f"fresh build (build_index)      {report.seconds:8.1f} s   ({steps})")
    info = report.info
    print(f"ANN                            {'IVF, %d lists' % info.ann_lists if info.ann else 'none (exact only)'}"
          f"   build (k-means + assignment) {t.get('ann', 0):.1f} s")
    vector_files = [db.with_name(name) for name in vectors.file_names(info.vector_file)]
    stored = n * dim * 4
    with ImageIndex.open(db) as idx:
        text = idx.sql("SELECT sum(strlen(text)) FROM docs").rows[0][0]
    vector_bytes = sum(path.stat().st_size for path in vector_files)
    size = db.stat().st_size + vector_bytes
    print(f"index size                     {size / 2**30:8.2f} GiB   (catalogue {db.stat().st_size / 2**30:.2f}, "
          f"vectors {vector_bytes / 2**30:.2f}); stored float32 vectors + text "
          f"{(stored + text) / 2**30:.2f} GiB: ratio {size / (stored + text):.3f}")

    x = np.load(work / "vectors.npy")
    queries = gen.draw(args.queries)
    truth, t_np = zip(*(timed(numpy_top10, x, q) for q in queries))
    print(f"numpy brute force top-10       {ms(t_np)}")

    # Every search the CLI and the page run embeds its query with open_clip first, so torch is loaded before
    # the first scan; a bare vector query here loads it up front, and the import is shown on its own.
    t0 = time.perf_counter()
    import torch  # noqa: F401
    t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = ImageIndex.open(db)
    t_open = time.perf_counter() - t0
    _, first = timed(idx.search_vector, queries[0], 10)
    warm = [timed(idx.search_vector, q, 10) for q in queries]
    t_warm = statistics.median([s for _, s in warm])
    print(f"open {t_open * 1e3:.0f} ms (import torch {t_torch * 1e3:.0f} ms before it); first query {first * 1e3:.1f} ms "
          f"vs warm median {t_warm * 1e3:.1f} ms: {first - t_warm:+.3f} s")

    # End to end (the scan plus the hits' rows from DuckDB), alternating with numpy query by query.
    t_np1, t_e2e, exact = alternated(lambda q: numpy_top10(x, q), lambda q: idx.search_vector(q, 10, exact=True), queries)
    t_exact = statistics.median(t_e2e)
    print(f"exact top-10 (search_vector)   {ms(t_e2e)}   recall vs numpy {recall(exact, truth):.3f}"
          f"   ratio to numpy, alternated {t_exact / statistics.median(t_np1):.3f}")
    # The scan alone (no hit rows fetched from DuckDB), the same way, then back to back.
    t_np2, t_scan, _ = alternated(lambda q: numpy_top10(x, q), lambda q: idx.vectors.top_k(q, 10, exact=True), queries)
    print(f"exact scan alone vs numpy, alternated: {statistics.median(t_scan) * 1e3:.1f} ms vs "
          f"{statistics.median(t_np2) * 1e3:.1f} ms: ratio {statistics.median(t_scan) / statistics.median(t_np2):.3f}")
    t_np3, t_scan3, _ = alternated(lambda q: numpy_top10(x, q), lambda q: idx.vectors.top_k(q, 10, exact=True), queries,
                                   pause=0)
    print(f"  back to back (ours right after numpy's product): {statistics.median(t_scan3) * 1e3:.1f} ms vs "
          f"{statistics.median(t_np3) * 1e3:.1f} ms: ratio {statistics.median(t_scan3) / statistics.median(t_np3):.3f}")
    if info.ann:
        t_es, t_as, _ = alternated(lambda q: idx.vectors.top_k(q, 10, exact=True), lambda q: idx.vectors.top_k(q, 10),
                                   queries)
        t_e, t_a = statistics.median(t_es), statistics.median(t_as)
        print(f"ANN scan alone vs exact scan, interleaved: {t_a * 1e3:.1f} ms vs {t_e * 1e3:.1f} ms: ratio {t_a / t_e:.3f}")

    ids = np.arange(n)
    for label, where, keep in [("10%", "id % 10 = 3", ids[ids % 10 == 3]), ("0.1%", "id % 1000 = 7", ids[ids % 1000 == 7])]:
        runs = [timed(idx.search_vector, q, 10, where=where) for q in queries]
        want = [numpy_top10(x, q, keep) for q in queries]
        complete = all(len(h) == 10 for h, _ in runs)
        t_f = statistics.median([s for _, s in runs])
        print(f"semantic + where {label:<5}        {ms([s for _, s in runs])}   complete {complete}, recall vs numpy "
              f"{recall([h for h, _ in runs], want):.3f}, ratio to exact {t_f / t_exact:.3f}")
    runs = [timed(idx.search_vector, q, 10, probes=[f"{PERSON}=yes"]) for q in queries]
    print(f"semantic + probe filter (~40%) {ms([s for _, s in runs])}   complete {all(len(h) == 10 for h, _ in runs)}")

    if info.ann:
        ann_runs = warm
        print(f"ANN top-10 (nprobe {idx.vectors.nprobe}, default) {ms([s for _, s in ann_runs])}   recall@10 "
              f"{recall([h for h, _ in ann_runs], truth):.3f}   ratio to exact {t_warm / t_exact:.3f}")
    idx.close()
    for nprobe in [int(v) for v in args.nprobe.split(",") if v]:
        with ImageIndex.open(db, nprobe=nprobe) as other:
            runs = [timed(other.search_vector, q, 10) for q in queries]
        print(f"ANN top-10 (nprobe {nprobe})        {ms([s for _, s in runs])}   recall@10 "
              f"{recall([h for h, _ in runs], truth):.3f}")

    with ImageIndex.open(db) as idx:
        words = vocab[np.random.default_rng(args.seed + 2).integers(20, 2000, (args.queries, 2))]
        t_bm25 = [timed(idx.search_text, " ".join(w), 10)[1] for w in words]
        print(f"BM25 top-10 (2-word queries)   {ms(t_bm25)}")
    del x

    # An update as a user runs it: a later run's new output file, then `captioner index NEW --db DB`.
    added = work / "added.parquet"
    write_more(added, n, args.add, dim, gen, vocab, args.seed)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", str(added), "--db", str(db)],
                          env=env, capture_output=True, text=True)
    t_update = time.perf_counter() - t0
    if done.returncode:
        print(done.stdout, done.stderr)
        return 1
    print(f"add {args.add:,} rows (captioner index, end to end) {t_update:8.1f} s = {t_update / report.seconds:.3f} "
          f"of the fresh build")
    for line in done.stdout.strip().splitlines()[-2:]:
        print("  " + line)
    check_update(db, work, added, queries, vocab, args)

    # Near-duplicates over the whole (updated) index, through the IVF lists; the planted pairs must all be found.
    with ImageIndex.open(db) as idx:
        t0 = time.perf_counter()
        groups = idx.duplicates(0.95)
        t_dup = time.perf_counter() - t0
        uris = {int(m.uri.rsplit("_", 1)[1].split(".")[0]): g for g, group in enumerate(groups) for m in group}
    originals, copies = planted_pairs(n, args.pairs)
    found = sum(1 for a, b in zip(originals.tolist(), copies.tolist()) if a in uris and uris[a] == uris.get(b))
    print(f"near-duplicates (threshold 0.95) over {n + args.add:,} rows  {t_dup:8.1f} s   {len(groups):,} groups; "
          f"planted pairs found {found:,} of {len(copies):,}")
    return 0


def check_update(db: Path, work: Path, added: Path, queries, vocab, args) -> None:
    """The updated index against a fresh build of the same files: exact vector hits and BM25 rankings."""
    fresh = work / "fresh.duckdb"
    t0 = time.perf_counter()
    build_index([work / "bench.parquet", added], fresh, fresh=True)
    t_fresh = time.perf_counter() - t0
    words = vocab[np.random.default_rng(args.seed + 4).integers(20, 2000, (20, 2))]
    with ImageIndex.open(db) as a, ImageIndex.open(fresh) as b:
        same_vectors = all(
            [(h.uri, round(h.score, 5)) for h in a.search_vector(q, 10, exact=True)]
            == [(h.uri, round(h.score, 5)) for h in b.search_vector(q, 10, exact=True)] for q in queries[:20])
        same_text = all(
            sorted((round(-h.score, 6), h.uri) for h in a.search_text(" ".join(w), 50))
            == sorted((round(-h.score, 6), h.uri) for h in b.search_text(" ".join(w), 50)) for w in words)
    print(f"updated index vs a fresh build of the same files ({t_fresh:.1f} s): exact top-10 equal {same_vectors}, "
          f"BM25 top-50 equal {same_text}")
    for path in work.glob("fresh.duckdb*"):
        path.unlink()


def write_more(path: Path, start: int, count: int, dim: int, gen: "Vectors", vocab, seed: int) -> None:
    run = RunMetadata("bench", "local", "bench:synthetic", "bench", dim, "0" * 64, (PERSON, COLOR))
    schema = output_schema(dim, run)
    rng = np.random.default_rng(seed + 3)
    with pq.ParquetWriter(path, schema) as writer:
        writer.write_table(chunk_table(start, gen.draw(count), captions(rng, vocab, count), rng, schema, run))


if __name__ == "__main__":
    raise SystemExit(main())
