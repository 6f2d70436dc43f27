"""The Starlette app: one page, its static files, and a small JSON API.

  GET  /                            the page (static HTML; the JS asks the API for everything)
  GET  /api/info                    index facts, search modes, probe filters
  GET  /api/search?q=&mode=         search; &probe=Question?=yes (repeatable), &confidence=0.8,
                                    &text=with|without (images in which OCR read text / none),
                                    &offset=&limit= for paging; "index" says which index answered
                                    (its generation grows when a rebuilt index file was reopened)

Every request's work is bounded: at most MAX_PROBES probe filters of
MAX_PROBE_CHARS each and a q of MAX_QUERY_CHARS (else 400); its queries are
interrupted after the service's query_timeout (503), and a request that waits
that long for the index gets 503 too.
  POST /api/search/image            body: image bytes; images like it (&q= fuses BM25 in hybrid)
  GET  /api/images/{id}             one row: caption(s), every probe answer, the text read in it, uri, size
  GET  /api/images/{id}/similar     more like this (the row's stored embedding)
  GET  /api/images/{id}/thumb?size=s|l   JPEG thumbnail, or a placeholder when the original is unusable

Files are reached only through a row id that the index holds: no request
names a path. ``{id:rowid}`` routes match digits only, so anything else (``..``,
``%2e%2e``, absolute paths) never reaches a handler; an id too large for a
BIGINT (or for Python's int parsing: 5,000 digits) is simply not in the index: 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.search import SearchError
from pipeline.serve.service import DEFAULT_PAGE, TEXT_FILTERS, Busy, Filters, IndexService, NotFound, Page
from pipeline.serve.thumbs import SIDES, ThumbnailCache

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 32 * 2**20
# Uploads read and decoded at once (a 9999x9999 PNG decodes to 300 MB of pixels
# before it is reduced); more wait up to UPLOAD_WAIT seconds, then get 503.
MAX_DECODES = 2
UPLOAD_WAIT = 10.0
# What the page sends (the dropped file's type, else octet-stream). A cross-site
# "simple" POST can send only text/plain, form or multipart types: refused (415).
UPLOAD_TYPES = ("image/", "application/octet-stream")
# What one request may ask: every limit is a 400 naming it.
MAX_PROBES = 32  # probe= filters per request
MAX_PROBE_CHARS = 500  # characters in one probe= filter
MAX_QUERY_CHARS = 2000  # characters in q=
# A thumbnail URL carries ?v=<start of image_id>; when it matches, the bytes
# behind that URL can never change, so browsers may keep them for a year.
_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
]


# Row ids are DuckDB BIGINTs.
MAX_ROW_ID = 2**63 - 1


class RowIdConvertor(Convertor):
    """Digits only; an id longer than any BIGINT converts to MAX_ROW_ID + 1 (no row has it) without parsing it."""

    regex = "[0-9]+"

    def convert(self, value: str) -> int:
        return int(value) if len(value) <= 19 else MAX_ROW_ID + 1

    def to_string(self, value: int) -> str:
        return str(int(value))


register_url_convertor("rowid", RowIdConvertor())


def host_name(header: str) -> str | None:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :] if end > 0 else None
        if rest is None or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[1:end]
    name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()) or ":" in port:
        return None
    return name


class HostGuard:
    """Refuses (400) a request whose Host header names none of ``allowed`` (a DNS-rebinding guard).

    Starlette's TrustedHostMiddleware cuts the header at the first ':', which
    turns ``[::1]:8000`` into ``[``: every request to ``--host ::1`` failed.
    """

    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = {name.strip("[]").lower() for name in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        name = host_name(header)
        if name is None or name.strip("[]") not in self.allowed and not _same_address(name, self.allowed):
            response = JSONResponse({"error": f"invalid Host header {header[:100]!r}: this server answers only to "
                                              f"{', '.join(sorted(self.allowed))}"}, status_code=400)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _same_address(name: str, allowed: set[str]) -> bool:
    """``0:0:0:0:0:0:0:1`` is ``::1``: compare addresses, not spellings."""
    import ipaddress

    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    for other in allowed:
        try:
            if ipaddress.ip_address(other) == address:
                return True
        except ValueError:
            continue
    return False


class SecurityHeaders:
    """Adds the headers above to every response (pure ASGI: no buffering)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + _SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(service: IndexService, thumbs: ThumbnailCache, *, allowed_hosts: list[str] | None = None,
               image_origins: tuple[str, ...] = ()) -> Starlette:
    """``allowed_hosts``: Host header names accepted (DNS-rebinding guard); None accepts any.

    ``image_origins``: pages of these origins (``scheme://host:port``) may load
    thumbnails cross-origin (CORS on the thumbnail route only, for the exact
    Origin sent): Label Studio loads task images with ``crossorigin``. No other
    origin, and no other route, gets a CORS header.
    """

    def cors(request: Request) -> dict:
        origin = request.headers.get("origin", "").lower()
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in image_origins else {}

    def info(request: Request):
        return JSONResponse(service.describe())

    def search(request: Request):
        params = request.query_params
        page = service.search(_query(request), params.get("mode") or None, *_paging(request), _filters(request))
        return _page_json(page)

    def similar(request: Request):
        page = service.similar(request.path_params["id"], *_paging(request), _filters(request))
        return _page_json(page)

    # A thread semaphore polled from the event loop: no loop owns it (TestClient runs a loop per request).
    decodes = threading.BoundedSemaphore(MAX_DECODES)

    async def search_image(request: Request):
        image = await _uploaded_image(request, decodes)
        params = request.query_params
        page = await run_in_threadpool(
            service.search_image, image, _query(request), params.get("mode") or None, *_paging(request), _filters(request)
        )
        return _page_json(page)

    def image(request: Request):
        return JSONResponse(service.row(request.path_params["id"]))

    def thumb(request: Request):
        side = SIDES.get(request.query_params.get("size", "s"))
        if side is None:
            raise HTTPException(400, f"size must be one of {', '.join(SIDES)}")
        uri, image_id = service.source_of(request.path_params["id"])
        made = thumbs.get(uri, image_id, side)
        if made is None:
            return FileResponse(
                STATIC / "placeholder.svg",
                media_type="image/svg+xml",
                headers={"Cache-Control": "no-store", "X-Thumbnail": "placeholder", **cors(request)},
            )
        version = request.query_params.get("v")
        headers = {
            **cors(request),
            "ETag": made.etag,
            "Cache-Control": _IMMUTABLE if version and image_id and image_id.startswith(version) else _REVALIDATE,
        }
        if made.etag in _etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        return Response(made.data, media_type="image/jpeg", headers=headers)

    def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def search_error(request: Request, exc: SearchError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    def not_found(request: Request, exc: NotFound):
        row_id = exc.args[0]
        shown = row_id if isinstance(row_id, int) and 0 <= row_id <= MAX_ROW_ID else "that large"
        return JSONResponse({"error": f"no image with id {shown} in this index"}, status_code=404)

    def busy(request: Request, exc: Busy):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/search", search),
        Route("/api/search/image", search_image, methods=["POST"]),
        Route("/api/images/{id:rowid}", image),
        Route("/api/images/{id:rowid}/similar", similar),
        Route("/api/images/{id:rowid}/thumb", thumb),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.insert(0, Middleware(HostGuard, allowed=allowed_hosts))
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.stop()  # the server is stopping: interrupt the running query, refuse new ones

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={SearchError: search_error, NotFound: not_found, Busy: busy, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.thumbs = thumbs
    return app


def _paging(request: Request) -> tuple[int, int]:
    return _int_param(request, "offset", 0), _int_param(request, "limit", DEFAULT_PAGE)


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, got {raw!r}") from None


def _query(request: Request) -> str:
    q = request.query_params.get("q", "")
    if len(q) > MAX_QUERY_CHARS:
        raise HTTPException(400, f"q is {len(q):,} characters; at most {MAX_QUERY_CHARS:,} are accepted")
    return q


def _filters(request: Request) -> Filters:
    probes = request.query_params.getlist("probe")
    if len(probes) > MAX_PROBES:
        raise HTTPException(400, f"{len(probes):,} probe filters; at most {MAX_PROBES} are accepted in one request")
    for probe in probes:
        if len(probe) > MAX_PROBE_CHARS:
            raise HTTPException(
                400, f"a probe filter of {len(probe):,} characters; at most {MAX_PROBE_CHARS} are accepted ({probe[:60]!r}...)"
            )
    raw = request.query_params.get("confidence")
    confidence = None
    if raw not in (None, ""):
        try:
            confidence = float(raw)
        except ValueError:
            raise HTTPException(400, f"confidence must be a number in (0, 1], got {raw[:40]!r}") from None
        if not (math.isfinite(confidence) and 0 < confidence <= 1):
            raise HTTPException(400, f"confidence must be a number in (0, 1] (leave it out for no threshold), got {raw[:40]!r}")
    raw = request.query_params.get("min_score")
    min_score = None
    if raw not in (None, ""):
        try:
            min_score = float(raw)
        except ValueError:
            raise HTTPException(400, f"min_score must be a cosine similarity in [-1, 1], got {raw[:40]!r}") from None
        if not (math.isfinite(min_score) and -1 <= min_score <= 1):
            raise HTTPException(400, f"min_score must be a cosine similarity in [-1, 1], got {raw[:40]!r}")
    text = request.query_params.get("text") or None
    if text is not None and text not in TEXT_FILTERS:
        raise HTTPException(400, f"text must be one of {', '.join(TEXT_FILTERS)} (leave it out for any), got {text[:40]!r}")
    return Filters(tuple(probes), confidence, min_score, text)


def _page_json(page: Page) -> JSONResponse:
    return JSONResponse(
        {
            "offset": page.offset,
            "more": page.more,
            "index": page.index,  # which index answered: the page notices a rebuild by its generation
            "hits": [
                {
                    "rank": h.rank,
                    "score": h.score,
                    "id": h.id,
                    "uri": h.uri,
                    "caption": h.caption,
                    "text_rank": h.text_rank,
                    "semantic_rank": h.semantic_rank,
                    "thumb": f"/api/images/{h.id}/thumb?size=s&v={(h.image_id or '')[:16]}",
                }
                for h in page.hits
            ],
        }
    )


# Above this many source pixels a decode's freed buffers are handed back to the OS.
_TRIM_AFTER_PIXELS = 2**22


def _decode_upload(decode_bytes, data: bytes, config):
    decoded = decode_bytes("upload", data, config, reduce_early=True)
    if (decoded.width or 0) * (decoded.height or 0) >= _TRIM_AFTER_PIXELS:
        _release_freed_memory()
    return decoded


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere).

    A 9999 x 9999 upload frees hundreds of MB of pixel buffers; glibc keeps
    them in its per-thread arenas, so two such uploads on two threads left the
    server 100 MB larger for good (measured), growing with each new arena.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


async def _uploaded_image(request: Request, decodes: threading.BoundedSemaphore):
    """The request body decoded as an image by the pipeline's own decoder (size guard, EXIF, RGB).

    Only the page's content types; at most MAX_DECODES bodies read and decoded
    at a time; pixels reduced toward the embedder's size right after decoding.
    """
    from pipeline.config import DecodeConfig
    from pipeline.decode import decode_bytes

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith(UPLOAD_TYPES[0]) and kind != UPLOAD_TYPES[1]:
        raise HTTPException(
            415, f"send the image as the body with Content-Type image/* or application/octet-stream, not {kind[:80]!r}"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"the image is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    deadline = time.monotonic() + UPLOAD_WAIT
    while not decodes.acquire(blocking=False):
        if time.monotonic() >= deadline:
            raise HTTPException(
                503, f"{MAX_DECODES} images are being decoded already; try again", headers={"Retry-After": "2"}
            )
        await asyncio.sleep(0.05)
    try:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"the image is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
        data = bytes(body)
        del body
        decoded = await run_in_threadpool(_decode_upload, decode_bytes, data, DecodeConfig())
    finally:
        decodes.release()
    if not decoded.ok:
        raise HTTPException(400, f"the dropped file is not a usable image: {decoded.error}")
    return decoded.image
