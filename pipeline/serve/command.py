"""``captioner serve``: the search page for an index, on uvicorn.

Starlette and uvicorn are imported when the command runs, not when the CLI
loads, so ``captioner --help`` stays quick.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import click

from pipeline.options import (
    QUERY_DEVICE_HELP,
    QUERY_EMBED_MODEL_HELP,
    device_option,
    embed_model_option,
    index_option,
    query_device,
    storage_option,
)
from pipeline.search.commands import _user_errors

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]

SERVE_EPILOG = """\b
Examples:
  captioner serve --index out/index.duckdb                 # http://127.0.0.1:8000/
  captioner serve --index out/index.duckdb --port 8080
  captioner serve --index index.duckdb --storage-option endpoint_url=http://127.0.0.1:9000   # images in a bucket
  captioner serve --index out/index.duckdb --image-origin http://127.0.0.1:8080   # Label Studio shows the images
\b
The page searches (hybrid, text or semantic), filters on probe answers, shows
thumbnails, every probe answer of an image, and "more like this"; drop an
image on it to search by image. Thumbnails are made from the original images
on first view and cached beside the index (INDEX.thumbs/, --thumb-cache-mb).
Only images listed in the index can be shown, by row id; the index is opened
read-only. A rebuilt index (`captioner index` into the same --db) is reopened
within about a second, without a restart; the page says it refreshed. There is no login: the server listens on loopback unless --host
says otherwise, and anyone who can reach it sees every indexed image.
"""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str) -> list[str] | None:
    """Host headers to accept: loopback names on loopback (a DNS-rebinding guard), any otherwise."""
    return list(LOOPBACK_NAMES) if is_loopback(host) else None


def image_origins_of(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--image-origin`` values as browsers send Origin: scheme://host[:port], lower case, no path."""
    from urllib.parse import urlsplit

    out = []
    for value in values:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
            raise click.BadParameter(f"{value!r} is not an origin; pass scheme://host[:port], e.g. http://127.0.0.1:8080",
                                     param_hint="'--image-origin'")
        out.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(out)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line ClickException naming --port / --host.

    Bound before anything slow loads, so a busy port fails at once rather
    than after the models load and the address was announced.
    """
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on --host {host}: {exc.strerror}; pass an address of this machine") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(
                f"port {port} on {host} is already in use (another `captioner serve`?); pass --port N for another "
                f"port, or stop what listens there"
            ) from exc
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port") from exc
    return sock


@click.command("serve", epilog=SERVE_EPILOG)
@index_option
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on; 0.0.0.0 makes the page reachable from other machines.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@device_option(QUERY_DEVICE_HELP)
@embed_model_option(QUERY_EMBED_MODEL_HELP)
@click.option("--thumb-cache", type=click.Path(file_okay=False), help="Thumbnail cache folder. [default: INDEX.thumbs beside the index]")
@click.option("--thumb-cache-mb", default=512, show_default=True, type=click.IntRange(min=0), help="Size bound of the thumbnail cache; least recently used thumbnails go first. 0: no disk cache.")
@click.option("--image-origin", "image_origins", multiple=True, metavar="ORIGIN",
              help="Let pages of ORIGIN (e.g. Label Studio at http://127.0.0.1:8080) load the thumbnails cross-origin (CORS, images only; repeatable).")
@storage_option("fsspec option for reading images from a bucket (repeatable), as for `captioner run`.")
@_user_errors
def serve(index_path, host, port, device, embed_model, thumb_cache, thumb_cache_mb, image_origins, storage_options):
    """Serve a search page for an index at http://HOST:PORT/."""
    from pathlib import Path

    import uvicorn

    from pipeline.search import ImageIndex
    from pipeline.serve.app import create_app
    from pipeline.serve.service import IndexService
    from pipeline.serve.thumbs import ThumbnailCache, default_cache_dir

    options = dict(storage_options or ())
    index = ImageIndex.open(index_path, device=query_device(device), embed_model=embed_model)
    listening = service = None
    try:
        # Hold the port while the models load; uvicorn binds it again the moment it is released.
        listening = bind(host, port)
        port = listening.getsockname()[1]
        if index.info.embedding_dim:
            click.echo(f"loading the query embedder {index.info.embed_model} ...", err=True)
        service = IndexService(index, log=lambda line: click.echo(line, err=True))
        if service.semantic_error:
            click.echo(f"warning: {service.semantic_error}", err=True)
        cache_dir = Path(thumb_cache) if thumb_cache else default_cache_dir(index.path)
        thumbs = ThumbnailCache(cache_dir, max_bytes=thumb_cache_mb * 2**20, storage_options=options or None)
        if thumbs.root is None and thumb_cache_mb:
            click.echo(f"warning: cannot write the thumbnail cache {cache_dir}; thumbnails are made on every view "
                       f"(pass --thumb-cache DIR to cache them elsewhere)", err=True)
        app = create_app(service, thumbs, allowed_hosts=allowed_hosts_for(host), image_origins=image_origins_of(image_origins))
        shown = f"[{host}]" if ":" in host else host
        click.echo(
            f"serving {index.path} ({index.info.searchable_rows:,} searchable images) at http://{shown}:{port}/  "
            f"(Ctrl-C stops)",
            err=True,
        )
        if not is_loopback(host):
            click.secho(
                f"warning: listening on {host}, not loopback: anyone who can reach port {port} on this machine can "
                f"search the index and see every indexed image; there is no login",
                err=True,
                fg="yellow",
            )
        listening.close()
        # Requests still running 2 s after SIGTERM are cancelled; the lifespan then interrupts their query.
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    finally:
        if listening is not None:
            listening.close()
        if service is not None:
            service.close()  # the index it serves now: a rebuilt one it reopened, perhaps
        index.close()
