"""What the web page asks of an index, answered over one shared ``ImageIndex``.

The HTTP layer (pipeline.serve.app) only parses requests and shapes JSON; every
question about the index is answered here, through ImageIndex's public
methods, so search behaves exactly as ``captioner search`` does.

One ImageIndex, one lock: an ImageIndex is not thread-safe, and a second
one would map the vector file and load its slot table again. Queries take milliseconds and a local page has one user, so
serialising them costs nothing that matters; thumbnails are made outside the
lock. So that no request can hold the lock for long, each one's queries run
under a time limit (``query_timeout``): a timer thread interrupts the DuckDB
query, which raises, and the request gets QueryTimeout (503). A request that
cannot get the lock within that time gets Busy (503). ``stop()`` interrupts
the running query and refuses new ones, so the server can stop at once.

A rebuilt index is picked up without a restart: ``captioner index`` writes a
temporary file and renames it over the old one, so the path always names a
complete index. At most once per ``reopen_every`` seconds a request compares
the file's identity (device, inode, mtime, size) with the opened one's; when it
changed, a background thread opens the new file read-only and prepares it
(facets, embedder, vector file), then swaps it in between requests. Each
request pins one :class:`OpenedIndex` for its whole answer, so an answer comes
from the old index or the new one, never both; the old one is closed (its
deleted file released) once the last request pinning it is done. A failing
reopen keeps serving the old index and logs one line.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

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
# Seconds between two looks at the index file for a rebuild (one os.stat each).
REOPEN_EVERY = 1.0


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
    index: dict = field(default_factory=dict)  # which opened index answered (OpenedIndex.facts)


FileIdentity = tuple[int, int, int, int]


def file_identity(path) -> FileIdentity | None:
    """(device, inode, mtime_ns, size) of the file at ``path``: a rename over it changes the inode; None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


@dataclass(eq=False)
class OpenedIndex:
    """One opened index file and what the page derived from it; a request pins one for its whole answer."""

    index: ImageIndex
    identity: FileIdentity | None
    generation: int  # 1 for the index the server started with, +1 per reopen
    semantic_error: str | None
    has_confidence: bool
    facets: list[ProbeFacet]
    embedder: object | None  # the loaded query embedder, handed on to the next generation when it fits
    users: int = 0  # requests pinning it now
    retired: bool = False  # replaced by a newer generation: closed when the last user is done

    def facts(self) -> dict:
        """What a response says about the index that answered it (the page shows a notice when it changes)."""
        info = self.index.info
        return {
            "generation": self.generation,
            "rows": info.rows,
            "searchable_rows": info.searchable_rows,
            "built_at": info.built_at,
        }


@dataclass(frozen=True)
class Filters:
    """The page's filters: probe answers (bound parameters) and a yes-probability floor."""

    probes: tuple[str, ...] = ()  # "Question?=answer", as --probe takes them
    min_confidence: float | None = None  # applies to yes/no filters, when the index has yes_prob
    min_score: float | None = None  # semantic / image / similar pages: the lowest cosine similarity shown
    text: str | None = None  # "with" / "without": only images in which OCR read text / read none (TEXT_FILTERS)


# The page's text filter -> its --where condition over the images view (schema v5's ``text``; null: OCR never ran).
TEXT_FILTERS = {"with": "coalesce(text, '') <> ''", "without": "coalesce(text, '') = ''"}


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


class FairLock:
    """A lock granted in arrival order, with a timeout.

    threading.Lock lets a newcomer overtake the waiters: with 32 requests
    waiting for the index, the mean wait was 0.6 s but some waited over 3 s.
    Here each waiter is woken in turn, so a wait is bounded by the queue ahead.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def acquire(self, timeout: float | None = None) -> bool:
        """True once this caller holds the lock; False when ``timeout`` seconds passed first (None: wait on)."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._mutex:
            if turn.is_set():
                return True  # handed over just as the wait ran out
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()  # handed straight to the next waiter: still held
            else:
                self._held = False


class IndexService:
    def __init__(
        self,
        index: ImageIndex,
        *,
        load_embedder: bool = True,
        query_timeout: float = QUERY_TIMEOUT,
        reopen_every: float | None = REOPEN_EVERY,
        log=None,
    ):
        """``reopen_every``: seconds between looks for a rebuilt index file (None: never reopen).

        ``log``: where the one-line notices of a reopen go (default: stderr).
        """
        self._lock = FairLock()  # one query at a time, over every opened index, in arrival order
        self._state = threading.Lock()  # guards _current, users/retired counts and _open
        self.query_timeout = float(query_timeout)
        self.reopen_every = reopen_every
        self._load_embedder = load_embedder
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stopping = False
        self._reopening = False
        self._failed_identity: FileIdentity | None = None
        self._current = self._prepare(index, file_identity(index.path), generation=1)
        self._open = [self._current]  # every opened index not yet closed (stop() interrupts them all)
        self._next_look = time.monotonic() + (reopen_every or 0)

    def _prepare(self, index: ImageIndex, identity, generation: int) -> OpenedIndex:
        """What the page needs of a just-opened index (no request sees it yet, so no lock is taken)."""
        semantic_error, embedder = None, None
        if not index.info.embedding_dim:
            semantic_error = "this index has no embeddings; only text search is available"
        elif self._load_embedder:
            try:
                embedder = index.embedder  # build it now: the first query should not pay for loading weights
            except SearchError as exc:
                semantic_error = f"semantic search is unavailable: {exc}"
        # The field exists in every schema v2 index; offer the slider only when
        # the captioner filled it (Moondream does, other backends leave it null).
        has_confidence = index.yes_prob_filled()
        facets = _facets(index)
        _load_vector_index(index)
        return OpenedIndex(index, identity, generation, semantic_error, has_confidence, facets, embedder)

    # -- the current index, and reopening a rebuilt one -------------------------------

    @property
    def index(self) -> ImageIndex:
        return self._current.index

    @property
    def semantic_error(self) -> str | None:
        return self._current.semantic_error

    @property
    def has_confidence(self) -> bool:
        return self._current.has_confidence

    @property
    def facets(self) -> list[ProbeFacet]:
        return self._current.facets

    @property
    def generation(self) -> int:
        return self._current.generation

    @contextmanager
    def _pinned(self):
        """The current OpenedIndex, kept open until this request is done with it."""
        self._look_for_rebuild()
        with self._state:
            opened = self._current
            opened.users += 1
        try:
            yield opened
        finally:
            with self._state:
                opened.users -= 1
                if opened.retired and not opened.users:
                    self._close(opened)

    def _close(self, opened: OpenedIndex) -> None:
        """Close a retired index nobody uses (under ``_state``): its file, perhaps deleted already, is released."""
        opened.index.close()
        self._open = [o for o in self._open if o is not opened]

    def _look_for_rebuild(self) -> None:
        """At most once per ``reopen_every`` s: start reopening in the background when the file changed."""
        if self.reopen_every is None or self._stopping:
            return
        now = time.monotonic()
        with self._state:
            if self._reopening or now < self._next_look:
                return
            self._next_look = now + self.reopen_every
            current = self._current
        identity = file_identity(current.index.path)
        if identity is None or identity in (current.identity, self._failed_identity):
            return  # unchanged, gone (a rebuild's rename is atomic: it comes back whole), or known bad
        with self._state:
            if self._reopening:
                return
            self._reopening = True
        threading.Thread(target=self._reopen_in_background, args=(identity,), name="index-reopen", daemon=True).start()

    def _reopen_in_background(self, identity) -> None:
        try:
            self.reopen(identity)
        finally:
            with self._state:
                self._reopening = False

    def reopen(self, identity: FileIdentity | None = None) -> bool:
        """Open the index file again and swap it in; False (one line logged) when it cannot be opened.

        The old index keeps answering meanwhile and stays in use when this fails.
        """
        old = self._current
        path = old.index.path
        identity = identity or file_identity(path)
        # Whatever goes wrong (not an index, another format, a model that will not
        # load), the old index keeps answering: one line, not a thread's traceback.
        try:
            index = _open_like(old, path)
        except Exception as exc:  # noqa: BLE001
            self._refused(identity, path, exc)
            return False
        try:
            opened = self._prepare(index, identity, old.generation + 1)
        except Exception as exc:  # noqa: BLE001
            index.close()
            self._refused(identity, path, exc)
            return False
        with self._state:
            if self._stopping:
                index.close()
                return False
            previous, self._current = self._current, opened
            self._open.append(opened)
            previous.retired = True
            if not previous.users:
                self._close(previous)
        self._failed_identity = None
        info = index.info
        self._log(f"index refreshed: {path} was rebuilt; now {info.searchable_rows:,} searchable images "
                  f"(built {info.built_at or 'at an unknown time'})")
        return True

    def _refused(self, identity, path, exc: Exception) -> None:
        self._failed_identity = identity  # not retried until the file changes again
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._log(f"warning: cannot reopen the rebuilt index {path} ({first}); still serving the one opened before")

    # -- what the index offers ---------------------------------------------------

    @property
    def modes(self) -> list[str]:
        return _modes(self._current)

    def describe(self) -> dict:
        with self._pinned() as opened:
            info = opened.index.info
            modes = _modes(opened)
            return {
                "index": opened.index.path.name,
                "rows": info.rows,
                "searchable_rows": info.searchable_rows,
                "embedded_rows": info.embedded_rows,
                "embed_model": info.embed_model,
                "built_at": info.built_at,
                "generation": opened.generation,
                "modes": modes,
                "default_mode": modes[0],
                "semantic_error": opened.semantic_error,
                "similar": bool(info.embedded_rows),  # "more like this" needs stored embeddings, not the embedder
                "probes": [f.to_dict() for f in opened.facets],
                "confidence": opened.has_confidence,
                "page_size": DEFAULT_PAGE,
                "max_results": MAX_RESULTS,
            }

    # -- searching ---------------------------------------------------------------

    def search(self, query: str, mode: str | None, offset: int, limit: int, filters: Filters) -> Page:
        with self._pinned() as opened:
            mode = mode or _modes(opened)[0]
            _check_mode(opened, mode)
            return self._page(
                opened, offset, limit, lambda k, **f: opened.index.search(query, mode=mode, k=k, **f), filters
            )

    def similar(self, row_id: int, offset: int, limit: int, filters: Filters) -> Page:
        """More like row ``row_id``: its stored embedding against every other (works without the embedder)."""
        row_id = _bigint(row_id)

        def run(k, **f):
            # In the same turn at the index as the search: one wait in its queue, not two.
            if not opened.index.sql("SELECT 1 FROM image_rows WHERE id = ?", [row_id]).rows:
                raise NotFound(row_id)  # 404 before "no embedding"
            return opened.index.search_similar(row_id, k, **f)

        with self._pinned() as opened:
            return self._page(opened, offset, limit, run, filters)

    def search_image(self, image, query: str, mode: str | None, offset: int, limit: int, filters: Filters) -> Page:
        """Images like an uploaded (already decoded) image; with a query in hybrid mode, fused with BM25."""
        with self._pinned() as opened:
            _check_mode(opened, "semantic")
            mode = "hybrid" if (mode or "hybrid") == "hybrid" and query.strip() else "semantic"
            query = query if mode == "hybrid" else ""
            return self._page(
                opened, offset, limit, lambda k, **f: opened.index.search(query, mode=mode, image=image, k=k, **f), filters
            )

    def _page(self, opened: OpenedIndex, offset: int, limit: int, run, filters: Filters) -> Page:
        offset, limit = int(offset), int(limit)
        if offset < 0 or limit < 1 or offset + limit > MAX_RESULTS:
            raise SearchError(f"offset + limit must stay within 1..{MAX_RESULTS} (offset >= 0, limit >= 1)")
        where = _confidence_where(opened, filters)
        if filters.text is not None:
            text = TEXT_FILTERS[filters.text]
            where = text if where is None else f"({where}) AND {text}"
        with self._locked(opened):
            # One extra row says whether another page exists.
            extra = {} if filters.min_score is None else {"min_score": filters.min_score}
            hits = run(offset + limit + 1, where=where, probes=list(filters.probes), **extra)
        return Page(hits[offset : offset + limit], offset, len(hits) > offset + limit, opened.facts())

    # -- one image -----------------------------------------------------------------

    def row(self, row_id: int) -> dict:
        """Everything the image view shows about row ``row_id``; NotFound when there is none."""
        with self._pinned() as opened:
            return self._row(opened, row_id)

    def _row(self, opened: OpenedIndex, row_id: int) -> dict:
        embedded = (
            "EXISTS (SELECT 1 FROM vector_slots AS e WHERE e.id = r.id)" if opened.index.info.vector_file else "false"
        )
        result = self._sql(
            opened,
            "SELECT r.id, r.uri, r.image_id, r.status, r.error_kind, r.error, r.bytes, r.format, r.width, r.height, "
            "r.caption, r.caption_short, r.probes, r.text, r.caption_model, r.embed_model, r.ocr_model, "
            "CAST(r.processed_at AS VARCHAR) AS processed_at, "
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
        with self._pinned() as opened:
            rows = self._sql(opened, "SELECT uri, image_id FROM image_rows WHERE id = ?", [_bigint(row_id)]).rows
        if not rows:
            raise NotFound(row_id)
        return rows[0][0], rows[0][1]

    def _sql(self, opened: OpenedIndex, statement: str, params=None):
        with self._locked(opened):
            return opened.index.sql(statement, params)

    # -- the lock, the time limit, stopping ----------------------------------------

    @contextmanager
    def _locked(self, opened: OpenedIndex):
        """Hold the query lock for one request, its queries interrupted after ``query_timeout`` seconds."""
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
                    opened.index.interrupt()
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
        """Refuse new queries and interrupt the running ones (the server is shutting down)."""
        self._stopping = True
        with self._state:
            for opened in self._open:
                opened.index.interrupt()

    def close(self) -> None:
        """Close every index this service still holds (after the server stopped)."""
        with self._state:
            for opened in list(self._open):
                self._close(opened)


# -- helpers over one OpenedIndex -------------------------------------------------------


def _modes(opened: OpenedIndex) -> list[str]:
    return ["text"] if opened.semantic_error else ["hybrid", "text", "semantic"]


def _check_mode(opened: OpenedIndex, mode: str) -> None:
    if mode in ("semantic", "hybrid") and opened.semantic_error:
        raise SearchError(opened.semantic_error)


def _confidence_where(opened: OpenedIndex, filters: Filters) -> str | None:
    floor = filters.min_confidence
    if floor is None or floor <= 0:
        return None
    if not opened.has_confidence:
        raise SearchError("this index has no probe probabilities (yes_prob); drop the confidence filter")
    return confidence_condition(filters.probes, opened.index.info.probes, floor)


def _open_like(old: OpenedIndex, path) -> ImageIndex:
    """The index at ``path`` opened as ``old`` was, with old's query embedder when the new index has the same model."""
    previous = old.index
    options = {"device": previous.device, "embed_model": previous.embed_model}
    if old.embedder is not None:
        try:
            return ImageIndex.open(path, embedder=old.embedder, **options)
        except SearchError:
            pass  # another model built the new index: let it load its own
    return ImageIndex.open(path, **options)


def _facets(index: ImageIndex) -> list[ProbeFacet]:
    questions = index.info.probes
    if not questions:
        return []
    counts = {
        q: (n, bools)
        for q, n, bools in index.sql(
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
        answers = index.sql(
            "SELECT lower(trim(p.answer)) AS a FROM (SELECT unnest(probes) AS p FROM image_rows WHERE status = 'ok') "
            "WHERE p.question = ? AND trim(p.answer) <> '' AND NOT contains(p.answer, '=') "
            f"GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT {_CHOICES}",
            [question],
        ).rows
        facets.append(ProbeFacet(question, "choice", tuple(a for (a,) in answers)))
    return facets


def _load_vector_index(index: ImageIndex) -> None:
    """Run one nearest-neighbour query now, so the first request finds the vector file's pages in memory."""
    if index.vectors is not None and index.vectors.live:
        first = index.sql("SELECT min(id) FROM vector_slots").rows[0][0]
        if first is not None:
            index.search_similar(first, 1)
