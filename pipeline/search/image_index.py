"""Query a search index: BM25, text-to-image, image-to-image, hybrid, SQL: the query side.

An ImageIndex holds one read-only DuckDB connection (the catalogue: rows,
BM25, SQL, filters) and the index's vector file, memory-mapped
(pipeline.search.scan answers vector queries from it). It is not
thread-safe; open one per thread (opening maps the file; nothing is copied).
The index's layout, its read-only lockdown and its feature checks are
pipeline.search.contract's; pipeline.search.index builds it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np

from pipeline.search import contract
from pipeline.search.contract import IndexInfo
from pipeline.search.errors import SearchError
from pipeline.search.filters import filter_ids_sql, filter_sql
from pipeline.search.fusion import K_RRF, reciprocal_rank_fusion

MODES = ("hybrid", "text", "semantic")
# DuckDB statement types that only read; any other type is an attempt to write or reconfigure.
_READING_STATEMENTS = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "RELATION", "CALL"})
_REFUSED_STATEMENTS = frozenset({"DROP", "ALTER"})
# Hits fetched by one point lookup each (see ImageIndex._hits); more go through one IN scan.
_POINT_LOOKUPS = 64
# The Arrow table of a filter's ids that search_hybrid's BM25 list reads (registered for one query).
_ALLOWED_IDS = "_allowed_ids"
# How deep each list goes before fusion: RRF needs more than the top k of
# each list, or an item ranked k+1 in both lists would be lost.
DEFAULT_FUSION_DEPTH = 50


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # BM25 (text), cosine similarity in [-1, 1] (semantic/image), RRF score (hybrid)
    id: int
    uri: str
    caption: str | None
    image_id: str | None
    text_rank: int | None = None  # hybrid only: rank in the BM25 list
    semantic_rank: int | None = None  # hybrid only: rank in the vector list

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SqlResult:
    columns: list[str]
    rows: list[tuple]

    def to_dicts(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


@dataclass(frozen=True)
class DuplicateMember:
    id: int
    uri: str
    caption: str | None
    similarity: float  # highest cosine similarity to another member of its group (1.0 for the same bytes)
    keep: bool = False  # the member --keep chose to keep (one per group)
    image_id: str | None = None
    bytes: int | None = None
    modified: str | None = None  # the file's mtime when recorded (schema v3+), else when it was processed


# --keep: which member of a duplicate group to keep.
KEEP_RULES = ("first", "largest", "newest")


class DuplicateGroup(list):
    """The members of one duplicate group (sorted by uri), with its ``tier``: 'exact' (all the same bytes) or 'near'."""

    def __init__(self, members, tier: str):
        super().__init__(members)
        self.tier = tier

    @property
    def kept(self) -> DuplicateMember:
        return next(m for m in self if m.keep)


class ImageIndex:
    def __init__(
        self, con: duckdb.DuckDBPyConnection, info: IndexInfo, path: Path, *, embedder=None, device="auto", embed_model=None,
        vectors=None,
    ):
        self._con = con
        self.info = info
        self.path = path
        self.device = device
        self.embed_model = embed_model
        self._embedder = None
        self.vectors = vectors  # pipeline.search.scan.VectorStore, None without embeddings
        if embedder is not None:
            self._embedder = self._checked(embedder)

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        db_path,
        read_only: bool = True,
        *,
        embedder=None,
        device: str = "auto",
        nprobe: int | None = None,
        embed_model: str | None = None,
    ) -> "ImageIndex":
        """Open an index built by ``captioner index``.

        ``embedder`` (an Embedder) is used for semantic queries; without it
        one is built on first use, on ``device``, from ``embed_model`` (a
        spec, e.g. the model's new path after moving it), else from the
        model recorded in the index (for local weights, which are recorded
        by content, the spec saved beside the indexed output). Either way it
        must be the model that built the index.
        ``nprobe``: IVF lists scanned per ANN query; None picks one by the
        list count (pipeline.search.scan.default_nprobe).
        """
        if not read_only:
            raise ValueError("ImageIndex is read-only; rebuild an index with pipeline.search.build_index")
        path = Path(os.path.expanduser(str(db_path)))
        if not path.is_file():
            raise SearchError(f"no index at {path}; build it with `captioner index PARQUET... --db {path}`")
        try:
            con = contract.attach_read_only(path)
        except duckdb.Error as exc:
            raise SearchError(f"cannot open the index {path}: {exc}") from exc
        try:
            info = contract.read_info(con, where=str(path))
            contract.check_versions(info, path)
            store = _open_vectors(con, path, info, nprobe)  # TEMP views over the file go in before lock_down
            contract.lock_down(con)  # user SQL runs on this connection
        except duckdb.Error as exc:
            con.close()
            raise SearchError(f"cannot open the index {path}: {exc}") from exc
        except BaseException:
            con.close()
            raise
        return cls(con, info, path, embedder=embedder, device=device, embed_model=embed_model, vectors=store)

    def close(self) -> None:
        self._con.close()

    def interrupt(self) -> None:
        """Stop the query running on this index's connection (from another thread); it raises, the connection stays usable."""
        self._con.interrupt()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what the index carries (pipeline.search.contract's feature checks) ----

    def has_yes_prob(self) -> bool:
        """Whether probe answers have a yes_prob field (every schema v2 index; the values may all be null)."""
        return contract.has_yes_prob(self._con)

    def yes_prob_filled(self) -> bool:
        """Whether any row has a yes_prob value."""
        return contract.yes_prob_filled(self._con)

    def _require_search_tables(self) -> None:
        if self.info.rows_only:
            raise SearchError(
                f"{self.path} holds rows only (built for an export, without BM25 or embeddings); "
                f"build a search index with `captioner index PARQUET... --db PATH`"
            )

    # -- embedder ------------------------------------------------------------

    @property
    def embedder(self):
        """The Embedder for queries: injected, or built from the index's spec on first use."""
        if self._embedder is None:
            self._embedder = self._checked(self._build_embedder())
        return self._embedder

    def _build_embedder(self):
        from pipeline.config import ConfigError
        from pipeline.models import build_embedder, resolve_embedder
        from pipeline.models.base import ModelUnavailable

        spec = self._embedder_spec()
        try:
            ref = resolve_embedder(spec)
            self._check_identity(spec, ref)  # refuse another model before loading its weights
            return build_embedder(ref, self.device)  # backends resolve "auto" themselves
        except (ConfigError, ModelUnavailable) as exc:
            raise SearchError(f"cannot load the embedder {spec!r} for this index: {exc}") from exc

    def _embedder_spec(self) -> str:
        """Where to load the query embedder from: asked for, recorded in the index, or saved beside its output."""
        from pipeline.models.identity import is_local_model

        stored = self._require_embeddings()
        if self.embed_model:
            return self.embed_model
        if not is_local_model(stored):
            return stored  # a hub model's stored id is a spec that rebuilds it
        found = _saved_spec_matching(self.info)
        if found:
            return found
        raise SearchError(
            f"this index was embedded with local weights {stored} (revision {self.info.embed_revision}); they are "
            "recorded by content, not by path, and the run config saved beside the indexed output does not lead "
            "to them any more. Pass --embed-model with the model's current location (a directory, or "
            "open_clip:NAME@/path/to/checkpoint)"
        )

    def _check_identity(self, spec: str, ref) -> None:
        from pipeline.models.identity import model_identity

        ident = model_identity(ref)
        if not ident.resolved:
            return  # a plug-in backend: only the built embedder can say who it is (see _checked)
        if (ident.model, ident.revision) != (self.info.embed_model, self.info.embed_revision):
            raise SearchError(self._mismatch(ident.model, ident.revision, None, given=spec))

    def _checked(self, embedder):
        info = self.info
        self._require_embeddings()
        theirs = (getattr(embedder, "model_id", None), getattr(embedder, "revision", None), getattr(embedder, "dim", None))
        ours = (info.embed_model, info.embed_revision, info.embedding_dim)
        if theirs != ours:
            raise SearchError(self._mismatch(*theirs))
        return embedder

    def _mismatch(self, model, revision, dim, given=None) -> str:
        info = self.info
        dim_text = f", dim {dim}" if dim is not None else ""
        what = f"{given} is {model}" if given and given != model else f"{model}"
        return (
            f"this index was built with embeddings from {info.embed_model} (revision {info.embed_revision}, dim "
            f"{info.embedding_dim}) but the query embedder {what} (revision {revision}{dim_text}); vectors from "
            "different models are not comparable. Query with the index's model, or re-run `captioner run` "
            "with --embed-model set to this one and build a new index from that output"
        )

    def _require_embeddings(self) -> str:
        self._require_search_tables()
        if not self.info.embed_model or not self.info.embedding_dim:
            raise SearchError(
                f"the index {self.path} has no embeddings (its Parquet was written without an embedder); "
                f"use --mode text, or re-run `captioner run` with --embed-model and re-index"
            )
        return self.info.embed_model

    # -- search --------------------------------------------------------------

    def search(
        self,
        query: str | None = None,
        *,
        mode: str | None = None,
        image=None,
        k: int = 10,
        where: str | None = None,
        probes: Sequence = (),
        min_score: float | None = None,
    ) -> list[Hit]:
        """The CLI's entry point: pick a mode from what was given.

        mode None means hybrid when the index has embeddings, else text. With
        ``image``: semantic mode (or no query) ranks by image similarity;
        hybrid fuses BM25 of ``query`` with image similarity. ``min_score``
        (semantic and image modes): keep only hits whose cosine is at least it.
        """
        query = (query or "").strip()
        if mode is None:
            mode = "hybrid" if self.info.embedding_dim else "text"
        if mode not in MODES:
            raise SearchError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if image is not None:
            if mode == "text":
                raise SearchError("--image searches by image similarity; it cannot be combined with --mode text")
            if mode == "semantic" and query:
                raise SearchError("--mode semantic takes QUERY or --image, not both (hybrid fuses BM25 of QUERY with --image)")
        elif not query:
            raise SearchError("give a QUERY to search for, or --image PATH")
        if min_score is not None and (mode != "semantic" and not (image is not None and not query)):
            raise SearchError(
                "--min-score thresholds cosine similarity: use it with --mode semantic or --image alone "
                "(hybrid and text scores are ranks and BM25, not comparable across queries)"
            )
        # Everything cheap is checked before the embedder (seconds of imports) loads.
        self.check_filters(where, probes)
        if image is not None:
            image = query_image(image)
            if not query:
                return self.search_image(image, k, where=where, probes=probes, min_score=min_score)
            return self.search_hybrid(query, k, where=where, probes=probes, image=image)
        if mode == "text":
            return self.search_text(query, k, where=where, probes=probes)
        if mode == "semantic":
            return self.search_semantic(query, k, where=where, probes=probes, min_score=min_score)
        return self.search_hybrid(query, k, where=where, probes=probes)

    def check_filters(self, where=None, probes=()) -> None:
        """Raise SearchError now for a --where or --probe that cannot run on this index (reads no rows)."""
        cond, params = filter_sql(where, probes, self.info.probes)
        if cond == "TRUE":
            return
        try:
            self._con.execute(f"SELECT id FROM image_rows WHERE {cond} LIMIT 0", params).fetchall()
        except duckdb.Error as exc:
            self._rollback()
            shown = f"--where {where!r}" if where is not None else "--probe"
            raise SearchError(
                f"{shown} does not run on this index: {_first_line(exc).rstrip('!.')}. The columns are listed by "
                f"`captioner sql \"DESCRIBE images\" --index {self.path}`"
            ) from exc

    def search_text(self, query: str, k: int = 10, *, where=None, probes=()) -> list[Hit]:
        """BM25 over caption + probe answers."""
        return self._hits(self._text_ranked(query, k, where, probes))

    def search_semantic(self, query_text: str, k: int = 10, *, where=None, probes=(), min_score=None) -> list[Hit]:
        """Images nearest to the query text in the index's embedding space."""
        return self.search_vector(self._embed_text(query_text), k, where=where, probes=probes, min_score=min_score)

    def search_image(self, path, k: int = 10, *, where=None, probes=(), min_score=None) -> list[Hit]:
        """Images nearest to the image at ``path`` (which is returned too, if indexed)."""
        return self.search_vector(self._embed_image(path), k, where=where, probes=probes, min_score=min_score)

    def search_similar(self, row_id: int, k: int = 10, *, where=None, probes=(), min_score=None) -> list[Hit]:
        """Images nearest to indexed row ``row_id``, from its stored embedding (nothing is re-embedded)."""
        self._require_dim()
        vector = self.vectors.vector(int(row_id)) if self.vectors is not None else None
        if vector is None:
            raise SearchError(f"row {row_id} has no embedding in this index (not an indexed image, or status error)")
        return self.search_vector(vector, k, where=where, probes=probes, min_score=min_score)

    def search_vector(self, vector, k: int = 10, *, where=None, probes=(), exact: bool = False,
                      min_score: float | None = None) -> list[Hit]:
        """Images nearest to an already computed query vector (cosine).

        ``exact`` scans every (matching) row even when the index has IVF lists
        (which are approximate). A filter is complete either way: k hits
        whenever k rows match. ``min_score`` drops hits below that cosine.
        """
        q = self._query_vector(vector)
        return self._hits(self._vector_ranked(q, k, where, probes, exact=exact, min_score=min_score))

    def search_hybrid(
        self,
        query_text: str,
        k: int = 10,
        *,
        where=None,
        probes=(),
        image=None,
        k_rrf: int = K_RRF,
        depth: int | None = None,
    ) -> list[Hit]:
        """Reciprocal-rank fusion of the BM25 list and the vector list.

        The vector list comes from ``query_text`` embedded, or from ``image``
        when given. Each list is cut at ``depth`` (default max(k, 50)) before
        fusion; the score is the RRF score.
        """
        depth = max(int(depth or DEFAULT_FUSION_DEPTH), int(k))
        vector = self._embed_image(image) if image is not None else self._embed_text(query_text)
        # The filter is evaluated once, into ids both lists read: it costs as much as either list.
        allowed = self._filter_ids(where, probes)
        text = self._text_ranked(query_text, depth, where, probes, allowed) if query_text.strip() else []
        semantic = self._vector_ranked(vector, depth, where, probes, allowed=allowed)
        fused = reciprocal_rank_fusion([[i for i, _ in text], [i for i, _ in semantic]], k_rrf=k_rrf)[: int(k)]
        hits = self._hits([(item, score) for item, score, _ in fused])
        return [
            Hit(**{**h.to_dict(), "text_rank": ranks[0], "semantic_rank": ranks[1]})
            for h, (_, _, ranks) in zip(hits, fused)
        ]

    # -- the two ranked lists --------------------------------------------------

    def _text_ranked(self, query: str, k: int, where, probes, allowed: np.ndarray | None = None
                     ) -> list[tuple[int, float]]:
        """(id, BM25) best first; ``allowed``: the filter's ids when the caller has evaluated it already."""
        if not isinstance(query, str) or not query.strip():
            raise SearchError("the text query is empty")
        self._require_search_tables()
        if allowed is None:
            cond, params = filter_sql(where, probes, self.info.probes)
        else:
            cond, params = f"id IN (SELECT id FROM {_ALLOWED_IDS})", []
        # The query is a bound parameter; fts tokenises it, so quotes and SQL
        # keywords in it are just words.
        sql = f"""
            SELECT id, score FROM (
                SELECT id, fts_main_docs.match_bm25(id, ?) AS score FROM docs
            )
            WHERE score IS NOT NULL AND {cond}
            ORDER BY score DESC, id
            LIMIT {_positive(k)}
        """
        if allowed is None:
            return self._run(sql, [query, *params])
        # The ids as an Arrow table DuckDB reads in place (a bound list would be converted value by value).
        import pyarrow as pa

        self._con.register(_ALLOWED_IDS, pa.table({"id": pa.array(allowed, pa.int64())}))
        try:
            return self._run(sql, [query])
        finally:
            self._con.unregister(_ALLOWED_IDS)

    def _vector_ranked(self, vector: np.ndarray, k: int, where, probes, exact=False,
                       min_score=None, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """(id, cosine) best first: DuckDB evaluates the filter into ids (unless ``allowed`` holds them
        already), the vector file is scanned."""
        k = _positive(k)
        self._require_dim()
        if self.vectors is None:
            return []
        if allowed is None:
            allowed = self._filter_ids(where, probes)
        return self.vectors.top_k(vector, k, allowed, exact=exact, min_score=min_score)

    def _filter_ids(self, where, probes) -> np.ndarray | None:
        """The ids of the rows passing every filter (int64), None without a filter."""
        query = filter_ids_sql(where, probes, self.info.probes)
        if query is None:
            return None
        try:
            return np.asarray(self._con.execute(*query).fetchnumpy()["id"], dtype=np.int64)
        except duckdb.Error as exc:
            self._rollback()
            raise SearchError(f"search failed: {_first_line(exc)}") from exc

    def _run(self, sql: str, params: list) -> list[tuple[int, float]]:
        try:
            return [(int(i), float(s)) for i, s in self._con.execute(sql, params).fetchall()]
        except duckdb.Error as exc:
            self._rollback()
            raise SearchError(f"search failed: {_first_line(exc)}") from exc

    def _hits(self, ranked: list[tuple[int, float]]) -> list[Hit]:
        if not ranked:
            return []
        ids = [int(i) for i, _ in ranked]
        if len(ids) <= _POINT_LOOKUPS:
            # One `id = ?` per hit: each is a pushed-down filter that reads one vector of the wide
            # columns; an IN list is only a hint to DuckDB's scan, which then reads every row's
            # uri and caption (measured: 7 ms against 16-34 ms for 10 hits at 100k rows).
            sql = " UNION ALL ".join(["SELECT id, uri, caption, image_id FROM image_rows WHERE id = ?"] * len(ids))
            rows = self._con.execute(sql, ids).fetchall()
        else:
            rows = self._con.execute(
                "SELECT id, uri, caption, image_id FROM image_rows WHERE id IN (SELECT unnest(?::BIGINT[]))", [ids]
            ).fetchall()
        by_id = {r[0]: r for r in rows}
        return [
            Hit(rank=n, score=score, id=i, uri=by_id[i][1], caption=by_id[i][2], image_id=by_id[i][3])
            for n, (i, score) in enumerate(ranked, start=1)
        ]

    # -- query vectors -------------------------------------------------------

    def _embed_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise SearchError("the query text is empty")
        return self._query_vector(self.embedder.embed_texts([text])[0])

    def _embed_image(self, image) -> np.ndarray:
        """``image``: an image file, or a PIL image (see ``query_image``)."""
        return self._query_vector(self.embedder.embed_images([query_image(image)])[0])

    def _query_vector(self, vector) -> np.ndarray:
        dim = self._require_dim()
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape != (dim,) or not np.all(np.isfinite(v)):
            raise SearchError(f"the query vector must be {dim} finite floats, got shape {v.shape}")
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            raise SearchError("the query vector is all zeros")
        return v / norm

    def _require_dim(self) -> int:
        self._require_embeddings()
        return int(self.info.embedding_dim)

    # -- near-duplicates -----------------------------------------------------

    def duplicates(self, threshold: float = 0.95, keep: str = "first") -> list[DuplicateGroup]:
        """Groups of searchable images that are the same bytes (same sha256) or whose embeddings have cosine >= threshold.

        A group is a connected component (two members may be linked only
        through a third), largest first; its tier is 'exact' when every
        member has the same bytes. ``keep`` marks one member per group:
        'first' by uri, 'largest' file (then most pixels, then first), or
        'newest' file (its recorded mtime, else when it was processed).
        Near pairs come from each row's nearest neighbours through the IVF
        lists (pipeline.search.duplicates), not from every pair.
        """
        from pipeline.search.duplicates import groups_of, near_pairs

        self._require_search_tables()
        if not 0.0 < threshold <= 1.0:
            raise SearchError(f"--threshold {threshold} must be in (0, 1]")
        if keep not in KEEP_RULES:
            raise SearchError(f"--keep {keep!r}: use one of {', '.join(KEEP_RULES)}")
        same = self._con.execute(
            "SELECT id, image_id FROM image_rows WHERE status = 'ok' AND image_id IN "
            "(SELECT image_id FROM image_rows WHERE status = 'ok' GROUP BY image_id HAVING count(*) > 1) "
            "ORDER BY image_id, id"
        ).fetchnumpy()
        same_ids, same_bytes = np.asarray(same["id"], np.int64), np.asarray(same["image_id"])
        starts = np.r_[True, same_bytes[1:] != same_bytes[:-1]] if len(same_ids) else np.zeros(0, bool)
        first_of = np.maximum.accumulate(np.where(starts, np.arange(len(same_ids)), 0)) if len(same_ids) else []
        exact_a, exact_b = same_ids[first_of], same_ids
        exact_a, exact_b = exact_a[exact_a != exact_b], exact_b[exact_a != exact_b]
        near_a = near_b = np.zeros(0, np.int64)
        near_s = np.zeros(0, np.float32)
        store = self.vectors
        if store is not None and store.live and self.info.embedding_dim:
            a, b, near_s = near_pairs(store.planes, store.inv_norms, np.flatnonzero(store.slot_ids >= 0), threshold,
                                      lists=store.lists, centroids=store.centroids)
            near_a, near_b = store.slot_ids[a], store.slot_ids[b]
        groups = groups_of(np.concatenate([exact_a, near_a]), np.concatenate([exact_b, near_b]),
                           np.concatenate([np.ones(len(exact_a)), near_s]))
        if not groups:
            return []
        wanted = [node for g in groups for node, _ in g]
        modified = "coalesce(source_mtime, processed_at)" if "source_mtime" in self._row_columns() else "processed_at"
        rows = self._con.execute(
            f"SELECT id, uri, caption, image_id, bytes, width * height, CAST({modified} AS VARCHAR) "
            "FROM image_rows WHERE id IN (SELECT unnest(?::BIGINT[]))", [wanted]
        ).fetchall()
        by_id = {r[0]: r for r in rows}
        out = []
        for group in groups:
            members = sorted(group, key=lambda m: by_id[m[0]][1])
            kept = _kept(keep, [by_id[i] for i, _ in members])
            made = [DuplicateMember(int(i), by_id[i][1], by_id[i][2], round(float(s), 6), keep=n == kept,
                                    image_id=by_id[i][3], bytes=by_id[i][4], modified=by_id[i][6])
                    for n, (i, s) in enumerate(members)]
            tier = "exact" if len({m.image_id for m in made}) == 1 else "near"
            out.append(DuplicateGroup(made, tier))
        return sorted(out, key=lambda g: (-len(g), g[0].uri))

    def _row_columns(self) -> set[str]:
        return {c for (c,) in self._con.execute(f"SELECT column_name FROM (DESCRIBE {contract.IMAGE_ROWS})").fetchall()}

    # -- SQL -------------------------------------------------------------------

    def sql(self, statement: str, params: Sequence | None = None) -> SqlResult:
        """Run one read-only SQL statement against the index.

        The connection cannot write the index file (attached READ_ONLY), has
        file access disabled and its configuration locked; TEMP tables live
        in memory and vanish with the connection. DROP and ALTER are refused
        (they could only reach the TEMP views over the vector file).
        """
        try:
            statements = self._con.extract_statements(statement)
        except duckdb.Error as exc:
            raise SearchError(f"SQL error: {_first_line(exc)}") from exc
        if len(statements) != 1:
            raise SearchError(f"give exactly one SQL statement, got {len(statements)}")
        if statements[0].type.name in _REFUSED_STATEMENTS:
            # The file is attached read-only, but the TEMP views over the vector file could be dropped.
            raise SearchError(f"SQL error (the index is read-only): {statements[0].type.name} statements are refused")
        try:
            cursor = self._con.execute(statement, list(params) if params else None)
            columns = [d[0] for d in cursor.description] if cursor.description else []
            return SqlResult(columns, cursor.fetchall() if columns else [])
        except duckdb.Error as exc:
            self._rollback()
            # The read-only hint explains a refused write; on a query it would
            # send the user looking for the wrong cause.
            hint = " (the index is read-only)" if statements[0].type.name not in _READING_STATEMENTS else ""
            raise SearchError(f"SQL error{hint}: {_first_line(exc)}") from exc

    def _rollback(self) -> None:
        # A failed statement can leave the transaction aborted; later
        # statements on this connection would fail until it is rolled back.
        try:
            self._con.execute("ROLLBACK")
        except duckdb.Error:
            pass


def _open_vectors(con, path: Path, info: IndexInfo, nprobe):
    """The VectorStore of an index (None without vectors), and the TEMP views ``images`` / ``embeddings`` over it."""
    import pyarrow as pa

    from pipeline.search import vectors
    from pipeline.search.scan import VectorStore

    if info.rows_only or not info.embedding_dim or not info.vector_file:
        return None
    dim = int(info.embedding_dim)
    planes = vectors.open_planes(contract.vector_path(path, info), path, dim=dim, slots=info.vector_slots,
                                 model=info.embed_model, revision=info.embed_revision)
    planes.will_need()
    table = con.execute(f"SELECT id, slot, norm, list FROM {contract.VECTOR_SLOTS}").fetchnumpy()
    slots = np.asarray(table["slot"], np.int64)
    if len(slots) and (slots.min() < 0 or slots.max() >= info.vector_slots):
        raise SearchError(f"the index {path} points past its vector file; {vectors.fix_for(path)}")
    slot_ids = np.full(info.vector_slots, -1, np.int64)
    slot_ids[slots] = np.asarray(table["id"], np.int64)
    inv = np.zeros(info.vector_slots, np.float32)
    norms = np.asarray(table["norm"], np.float32)
    inv[slots] = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1), 0)
    lists = centroids = None
    if info.ann:
        lists = np.full(info.vector_slots, -1, np.int32)
        lists[slots] = np.asarray(table["list"], np.int32)
        cents = con.execute(f"SELECT centroid FROM {contract.ANN_CENTROIDS} ORDER BY list").fetch_arrow_table()
        centroids = cents.column(0).combine_chunks().flatten().to_numpy().reshape(-1, dim)
    store = VectorStore(planes, slot_ids, inv, info.rows, lists=lists, centroids=centroids, nprobe=nprobe)
    # SQL reads the vectors from the files as it goes: a function joins each slot's two halves, chunk by chunk.
    con.register(contract.VECTOR_ARROW, pa.table({"id": pa.array(slot_ids), "slot": pa.array(np.arange(len(slot_ids)))}))
    con.create_function(contract.EMBEDDING_FUNCTION, _embedding_function(planes), [duckdb.sqltype("BIGINT")],
                        duckdb.array_type(duckdb.sqltype("FLOAT"), dim), type="arrow")
    from schemas import COLUMN_NAMES

    columns = ", ".join("e.embedding" if c == "embedding" else f"r.{c}" for c in COLUMN_NAMES)
    extra = ", ".join(f"r.{c}" for c in contract.VIEW_COLUMNS)
    con.execute(f"CREATE TEMP VIEW {contract.EMBEDDINGS} AS SELECT id, {contract.EMBEDDING_FUNCTION}(slot) AS embedding "
                f"FROM {contract.VECTOR_ARROW} WHERE id >= 0")
    con.execute(f"CREATE TEMP VIEW {contract.IMAGES} AS SELECT {columns}, {extra} FROM {contract.ATTACHED}.{contract.IMAGE_ROWS} AS r "
                f"LEFT JOIN {contract.EMBEDDINGS} AS e ON e.id = r.id")
    return store


def _embedding_function(planes):
    """The SQL function behind the ``embeddings`` view: slots in, their float32 vectors out (Arrow, per chunk)."""
    import pyarrow as pa

    dim, count = planes.dim, len(planes)

    def embedding_of(slots):
        slots = slots.to_numpy(zero_copy_only=False)
        if len(slots) and (slots.min() < 0 or slots.max() >= count):
            raise ValueError(f"no vector slot {int(slots.max())}: the index has {count}")
        return pa.FixedSizeListArray.from_arrays(pa.array(planes[slots].reshape(-1)), dim)

    return embedding_of


def query_image(image):
    """A query image exactly as the pipeline's decode stage would give it to the embedder.

    ``image`` is a path (or URL), or a PIL image. Paths and PIL images that
    are not RGB go through ``pipeline.decode`` (EXIF orientation, transparency
    composited on white, size guard, downscale), the decoder every indexed
    image went through; an RGB PIL image is taken as already decoded (the
    page decodes uploads with ``pipeline.decode.decode_bytes``).
    """
    import io

    from PIL import Image

    from pipeline.config import DecodeConfig
    from pipeline.decode import decode_bytes, load_image

    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        decoded = decode_bytes("query image", buffer.getvalue(), DecodeConfig())
        shown = "the query image"
    else:
        shown = f"--image {image}"
        decoded = load_image(os.path.expanduser(str(image)), DecodeConfig())
    if decoded.error_kind == "missing":
        raise SearchError(f"{shown}: no such file")
    if not decoded.ok:
        raise SearchError(f"{shown} is not a usable image: {decoded.error}")
    return decoded.image


def _saved_spec_matching(info: IndexInfo) -> str | None:
    """The embed model spec of a run config saved beside an indexed file, if it still names the index's model.

    ``captioner run`` saves its config as ``NAME.config.json`` beside a
    single-file output and as ``_captioner_config.json`` in a directory output.
    """
    import json

    from pipeline.models.identity import EMBED, model_identity

    seen = set()
    for path, *_ in info.files:
        path = Path(path)
        for candidate in (path.with_name(path.stem + ".config.json"), path.parent / "_captioner_config.json"):
            if candidate in seen or not candidate.is_file():
                continue
            seen.add(candidate)
            try:
                spec = json.loads(candidate.read_text())["embed"]["model"]
                ident = model_identity(spec, EMBED)
            except Exception:  # noqa: BLE001 - an unreadable or outdated config just does not lead anywhere
                continue
            if (ident.model, ident.revision) == (info.embed_model, info.embed_revision):
                return spec
    return None


def _kept(rule: str, rows) -> int:
    """Which of ``rows`` (id, uri, caption, image_id, bytes, pixels, modified; sorted by uri) --keep keeps."""
    if rule == "largest":
        return max(range(len(rows)), key=lambda n: (rows[n][4] or 0, rows[n][5] or 0, -n))
    if rule == "newest":
        return max(range(len(rows)), key=lambda n: (rows[n][6] or "", -n))
    return 0


def _positive(k) -> int:
    k = int(k)
    if k < 1:
        raise SearchError(f"--limit must be at least 1, got {k}")
    return k


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]
