"""What the web page asks of an index, answered over one shared ``ImageIndex``.

The HTTP layer (pipeline.serve.app) only parses requests and shapes JSON; every
question about the index is answered here, through ImageIndex's public
methods, so search behaves exactly as ``captioner search`` does.

One ImageIndex, one lock: an ImageIndex is not thread-safe, and a second
connection would load its own copy of the HNSW graph (0.3 GB per 100k x 768
rows). Queries take milliseconds and a local page has one user, so
serialising them costs nothing that matters; thumbnails are made outside the
lock. So that no request can hold the lock for long, each one's queries run
under a time limit (``query_timeout``): a timer thread interrupts the DuckDB
query, which raises, and the request gets QueryTimeout (503). A request that
cannot get the lock within that time gets Busy (503). ``stop()`` interrupts
the running query and refuses new ones, so the server can stop at once.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb

from pipeline.search import Hit, ImageIndex, SearchError
from pipeline.search.contract import probes_type_has_yes_prob as has_yes_prob  # noqa: F401 - the page's old name
from pipeline.search.filters import ProbeFilter

# Deepest result a page may reach by "load more" (offset + limit).
MAX_RESULTS = 1000
DEFAULT_PAGE = 48
# A probe counts as a yes/no question when most of its answers parse as yes/no.
_BOOL_SHARE = 0.5
# Distinct answers offered as filter choices for an open (non yes/no) question
# (answers holding '=' are left out: a probe filter reads "QUESTION=ANSWER").
_CHOICES = 12
# Seconds one request's queries may run before they are interrupted.
QUERY_TIMEOUT = 10.0


class NotFound(LookupError):
    """No row with that id in the index."""


class Busy(RuntimeError):
    """The index cannot answer now (another query holds it, or the server is stopping): HTTP 503."""


class QueryTimeout(Busy):
    """The request's queries ran past the time limit and were interrupted: HTTP 503."""


def _bigint(row_id) -> int:
    """``row_id`` as an int DuckDB can bind; an id outside BIGINT is in no index: NotFound."""
    row_id = int(row_id)
    if not 0 <= row_id < 2**63:
        raise NotFound(row_id)
    return row_id


@dataclass(frozen=True)
class ProbeFacet:
    question: str
    kind: str  # "bool": filter yes/no/any; "choice": filter by one of ``answers``
    answers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"question": self.question, "kind": self.kind, "answers": list(self.answers)}


@dataclass(frozen=True)
class Page:
    hits: list[Hit]
    offset: int
    more: bool  # another page exists


@dataclass(frozen=True)
class Filters:
    """The page's filters: probe answers (bound parameters) and a yes-probability floor."""

    probes: tuple[str, ...] = ()  # "Question?=answer", as --probe takes them
    min_confidence: float | None = None  # applies to yes/no filters, when the index has yes_prob


def sql_string(text: str) -> str:
    """A SQL string literal for text that came from the index itself (never from a request)."""
    return "'" + text.replace("'", "''") + "'"


def confidence_condition(probes, known_questions, floor: float) -> str | None:
    """A --where condition: each yes/no probe filter's yes_prob at least ``floor`` sure of its answer.

    "Q?=yes" keeps rows with yes_prob >= floor, "Q?=no" rows with yes_prob <=
    1 - floor. Built only from the index's own question text (chosen by the
    request, never copied from it) and a checked float, so nothing from the
    request reaches SQL as text.
    """
    floor = float(floor)
    if not 0 < floor <= 1:
        raise SearchError(f"the confidence threshold must be in (0, 1], got {floor}")
    known = {q.lower(): q for q in known_questions}
    parts = []
    for text in probes:
        probe = ProbeFilter.parse(text)
        question = known.get(probe.question.lower())
        if question is None or probe.as_bool is None:
            continue  # unknown questions are refused by the probe filter itself; open answers have no yes_prob
        bound = f"p.yes_prob >= {floor!r}" if probe.as_bool else f"p.yes_prob <= {1 - floor!r}"
        parts.append(f"len(list_filter(probes, lambda p: p.question = {sql_string(question)} AND {bound})) > 0")
    return " AND ".join(parts) or None


class IndexService:
    def __init__(self, index: ImageIndex, *, load_embedder: bool = True, query_timeout: float = QUERY_TIMEOUT):
        self.index = index
        self._lock = threading.Lock()
        self.query_timeout = float(query_timeout)
        self._stopping = False
        self.semantic_error: str | None = None
        if not index.info.embedding_dim:
            self.semantic_error = "this index has no embeddings; only text search is available"
        elif load_embedder:
            try:
                index.embedder  # build it now: the first query should not pay for loading weights
            except SearchError as exc:
                self.semantic_error = f"semantic search is unavailable: {exc}"
        # The field exists in every schema v2 index; offer the slider only when
        # the captioner filled it (Moondream does, other backends leave it null).
        with self._lock:
            self.has_confidence = index.yes_prob_filled()
        self.facets = self._facets()
        self._load_vector_index()

    def _load_vector_index(self) -> None:
        """Run one nearest-neighbour query now: the HNSW graph loads on first use (5 s at 100k rows)."""
        if self.index.info.hnsw:
            first = self._sql("SELECT min(id) FROM embeddings").rows[0][0]
            if first is not None:
                self.index.search_similar(first, 1)

    # -- what the index offers ---------------------------------------------------

    @property
    def modes(self) -> list[str]:
        return ["text"] if self.semantic_error else ["hybrid", "text", "semantic"]

    def describe(self) -> dict:
        info = self.index.info
        return {
            "index": self.index.path.name,
            "rows": info.rows,
            "searchable_rows": info.searchable_rows,
            "embedded_rows": info.embedded_rows,
            "embed_model": info.embed_model,
            "modes": self.modes,
            "default_mode": self.modes[0],
            "semantic_error": self.semantic_error,
            "similar": bool(info.embedded_rows),  # "more like this" needs stored embeddings, not the embedder
            "probes": [f.to_dict() for f in self.facets],
            "confidence": self.has_confidence,
            "page_size": DEFAULT_PAGE,
            "max_results": MAX_RESULTS,
        }

    def _facets(self) -> list[ProbeFacet]:
        questions = self.index.info.probes
        if not questions:
            return []
        counts = {
            q: (n, bools)
            for q, n, bools in self._sql(
                "SELECT p.question, count(*), count(p.answer_bool) "
                "FROM (SELECT unnest(probes) AS p FROM image_rows WHERE status = 'ok') GROUP BY 1"
            ).rows
        }
        facets = []
        for question in questions:
            n, bools = counts.get(question, (0, 0))
            if n and bools / n > _BOOL_SHARE:
                facets.append(ProbeFacet(question, "bool"))
                continue
            answers = self._sql(
                "SELECT lower(trim(p.answer)) AS a FROM (SELECT unnest(probes) AS p FROM image_rows WHERE status = 'ok') "
                "WHERE p.question = ? AND trim(p.answer) <> '' AND NOT contains(p.answer, '=') "
                f"GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT {_CHOICES}",
                [question],
            ).rows
            facets.append(ProbeFacet(question, "choice", tuple(a for (a,) in answers)))
        return facets

    # -- searching ---------------------------------------------------------------

    def search(self, query: str, mode: str | None, offset: int, limit: int, filters: Filters) -> Page:
        mode = mode or self.modes[0]
        self._check_mode(mode)
        return self._page(offset, limit, lambda k, **f: self.index.search(query, mode=mode, k=k, **f), filters)

    def similar(self, row_id: int, offset: int, limit: int, filters: Filters) -> Page:
        """More like row ``row_id``: its stored embedding against every other (works without the embedder)."""
        self.row(row_id)  # 404 before "no embedding"
        return self._page(offset, limit, lambda k, **f: self.index.search_similar(row_id, k, **f), filters)

    def search_image(self, image, query: str, mode: str | None, offset: int, limit: int, filters: Filters) -> Page:
        """Images like an uploaded (already decoded) image; with a query in hybrid mode, fused with BM25."""
        self._check_mode("semantic")
        mode = "hybrid" if (mode or "hybrid") == "hybrid" and query.strip() else "semantic"
        query = query if mode == "hybrid" else ""
        return self._page(offset, limit, lambda k, **f: self.index.search(query, mode=mode, image=image, k=k, **f), filters)

    def _check_mode(self, mode: str) -> None:
        if mode in ("semantic", "hybrid") and self.semantic_error:
            raise SearchError(self.semantic_error)

    def _page(self, offset: int, limit: int, run, filters: Filters) -> Page:
        offset, limit = int(offset), int(limit)
        if offset < 0 or limit < 1 or offset + limit > MAX_RESULTS:
            raise SearchError(f"offset + limit must stay within 1..{MAX_RESULTS} (offset >= 0, limit >= 1)")
        where = self._confidence_where(filters)
        with self._locked():
            # One extra row says whether another page exists.
            hits = run(offset + limit + 1, where=where, probes=list(filters.probes))
        return Page(hits[offset : offset + limit], offset, len(hits) > offset + limit)

    def _confidence_where(self, filters: Filters) -> str | None:
        floor = filters.min_confidence
        if floor is None or floor <= 0:
            return None
        if not self.has_confidence:
            raise SearchError("this index has no probe probabilities (yes_prob); drop the confidence filter")
        return confidence_condition(filters.probes, self.index.info.probes, floor)

    # -- one image -----------------------------------------------------------------

    def row(self, row_id: int) -> dict:
        """Everything the image view shows about row ``row_id``; NotFound when there is none."""
        embedded = (
            "EXISTS (SELECT 1 FROM embeddings AS e WHERE e.id = r.id)" if self.index.info.embedding_dim else "false"
        )
        result = self._sql(
            "SELECT r.id, r.uri, r.image_id, r.status, r.error_kind, r.error, r.bytes, r.format, r.width, r.height, "
            "r.caption, r.probes, r.caption_model, r.embed_model, CAST(r.processed_at AS VARCHAR) AS processed_at, "
            f"{embedded} AS has_embedding FROM image_rows AS r WHERE r.id = ?",
            [_bigint(row_id)],
        )
        if not result.rows:
            raise NotFound(row_id)
        row = result.to_dicts()[0]
        row["probes"] = [dict(p) for p in row["probes"] or []]
        return row

    def source_of(self, row_id: int) -> tuple[str, str | None]:
        """(uri, image_id) of row ``row_id``: the only way the server finds a file to read."""
        rows = self._sql("SELECT uri, image_id FROM image_rows WHERE id = ?", [_bigint(row_id)]).rows
        if not rows:
            raise NotFound(row_id)
        return rows[0][0], rows[0][1]

    def _sql(self, statement: str, params=None):
        with self._locked():
            return self.index.sql(statement, params)

    # -- the lock, the time limit, stopping ----------------------------------------

    @contextmanager
    def _locked(self):
        """Hold the index for one request, its queries interrupted after ``query_timeout`` seconds."""
        if self._stopping:
            raise Busy("the server is stopping")
        if not self._lock.acquire(timeout=self.query_timeout):
            raise Busy(f"the server is busy with another query (over {self.query_timeout:g} s); try again")
        timed_out, finished = threading.Event(), threading.Event()
        state = threading.Lock()  # interrupts land only while this request still holds the index

        def watchdog():
            deadline = time.monotonic() + self.query_timeout
            while not finished.wait(0.05):
                if self._stopping or time.monotonic() >= deadline:
                    break
            else:
                return
            if not self._stopping:
                timed_out.set()
            # Again every 50 ms: an interrupt between two queries (say, while the
            # embedder runs) is a no-op, and the next query must stop too.
            while True:
                with state:
                    if finished.is_set():
                        return
                    self.index.interrupt()
                if finished.wait(0.05):
                    return

        timer = threading.Thread(target=watchdog, name="query-deadline", daemon=True)
        try:
            if self._stopping:
                raise Busy("the server is stopping")
            timer.start()
            try:
                yield
            except (SearchError, duckdb.Error) as exc:
                if self._stopping:
                    raise Busy("the server is stopping") from exc
                if timed_out.is_set():
                    raise QueryTimeout(
                        f"the query ran past the {self.query_timeout:g} s limit and was stopped; "
                        f"use fewer filters or a shorter query"
                    ) from exc
                raise
        finally:
            with state:
                finished.set()
            self._lock.release()

    def start(self) -> None:
        """Answer queries (again): the server started."""
        self._stopping = False

    def stop(self) -> None:
        """Refuse new queries and interrupt the running one (the server is shutting down)."""
        self._stopping = True
        self.index.interrupt()
