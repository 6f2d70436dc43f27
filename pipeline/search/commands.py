"""CLI commands: ``captioner index | search | sql | duplicates``.

They are plain click commands; the ``captioner`` group adds them from
``SEARCH_COMMANDS``. Every user-fixable failure is a click.ClickException
whose message says what to do.
"""

from __future__ import annotations

import functools
import json

import click

from pipeline.options import (
    DEFAULT_INDEX,
    QUERY_DEVICE_HELP,
    QUERY_EMBED_MODEL_HELP,
    device_option,
    embed_model_option,
    index_option,
    probe_option,
    query_device,
    storage_failure,
    storage_option,
)
from pipeline.search.errors import SearchError
from pipeline.search.index import DEFAULT_ANN_MIN_ROWS

DEFAULT_DB = DEFAULT_INDEX


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.lease import LeaseHeld, as_click_error

        try:
            return fn(*args, **kwargs)
        except SearchError as exc:
            raise storage_failure(exc) from exc  # exit 3 for a full disk, 1 otherwise
        except LeaseHeld as exc:  # another `captioner index` builds this --db
            raise as_click_error(exc) from exc

    return wrapper


def _json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _one_line(text, width: int) -> str:
    text = " ".join(str(text).split()) if text is not None else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _echo_table(header: list[str], rows: list[list[str]], align_right=()) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def fmt(cells):
        out = []
        for i, cell in enumerate(cells):
            last = i == len(cells) - 1
            out.append(cell if last else cell.rjust(widths[i]) if i in align_right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    click.echo(fmt(header))
    for row in rows:
        click.echo(fmt(row))


@click.command("index")
@click.argument("parquet", nargs=-1, type=click.Path())
@click.option("--db", default=DEFAULT_DB, show_default=True, type=click.Path(dir_okay=False), help="Index database to create or update.")
@click.option(
    "--ann/--no-ann",
    default=None,
    help="Force the IVF lists (approximate nearest neighbours) on or off. Default: built when there are at least "
    "--ann-min-rows embeddings; below that every vector query is an exact scan.",
)
@click.option("--ann-min-rows", default=None, type=click.IntRange(min=0), help=f"Embedding count from which IVF lists are built automatically [default: {DEFAULT_ANN_MIN_ROWS}].")
@click.option("--fresh", is_flag=True, help="Rebuild from scratch: forget the sources recorded in an existing --db, index only PARQUET, rewrite the vectors whole.")
@click.option("--mixed-probes", is_flag=True, help="Index outputs captioned with different probe sets together (refused otherwise).")
@storage_option("fsspec option for Parquet on a bucket (repeatable), e.g. endpoint_url=...; without it the endpoint and "
                "credentials come from the environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...).")
@_user_errors
def index_command(parquet, db, ann, ann_min_rows, fresh, mixed_probes, storage_options):
    """Build or update a DuckDB search index over captioner Parquet output.

    PARQUET are files or directories (searched recursively). Sources already
    recorded in --db are re-scanned too, so `captioner index --db index.duckdb`
    alone picks up new files in indexed directories. All files must come from
    one embedder and, when captioned, one probe set (see --mixed-probes).
    Nothing is rebuilt when no file changed; otherwise only the rows of new
    or changed files are read, and the rows, BM25 and vectors are updated in
    place (--fresh rebuilds everything).
    """
    from pipeline.search import index as ix

    report = ix.build_index(
        parquet,
        db,
        ann=ann,
        ann_min_rows=ix.DEFAULT_ANN_MIN_ROWS if ann_min_rows is None else ann_min_rows,
        fresh=fresh,
        mixed_probes=mixed_probes,
        storage_options=dict(storage_options or ()) or None,
    )
    info = report.info
    if report.ignored:
        shown = ", ".join(report.ignored[:5]) + (f" and {len(report.ignored) - 5} more" if len(report.ignored) > 5 else "")
        click.echo(f"ignored {len(report.ignored)} Parquet files that are not a captioner output: {shown}")
    if not report.rebuilt:
        click.echo(f"{db} is up to date ({len(info.files)} files unchanged); pass --fresh to rebuild it anyway")
        return
    embedder = (
        f"{info.embed_model} (revision {info.embed_revision}, dim {info.embedding_dim})" if info.embed_model else "none"
    )
    ann_text = f"IVF, {info.ann_lists} lists" if info.ann else "no (exact scan)"
    click.echo(
        f"indexed {len(info.files)} files into {db} in {report.seconds:.1f} s: {info.rows} rows, "
        f"{info.searchable_rows} searchable (status ok), {info.embedded_rows} with embeddings\n"
        f"embedder: {embedder}\nANN: {ann_text}\n"
        f"catalogue: {'updated in place (only the rows of new or changed files)' if report.updated else 'built whole'}; "
        f"vectors: {report.vectors_read} read from Parquet, "
        f"{'written to a new vector file' if report.vectors_rewritten else 'the rest kept in place'}; steps: "
        + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in report.timings.items())
    )
    if report.probe_sets > 1:
        click.echo(
            f"note: merged {report.probe_sets} probe sets (--mixed-probes); each image has the answers of its newest "
            f"captioning run, so a --probe filter skips images asked other questions"
        )


SEARCH_EPILOG = """\b
--where takes a SQL boolean expression, by design, evaluated per row of the
`images` view (all schema columns, e.g. status, width, height, format, bytes,
caption, caption_truncated, probes, embed_model, processed_at). Helpers:
probe_bool(probes, 'Question?'), probe_answer(probes, 'Question?') and
probe_yes_prob(probes, 'Question?') (null for schema v1 rows).
It must be one expression (no ';'), and it runs on a read-only connection
with file access disabled.
\b
Examples:
  captioner search "dog on a beach" --index index.duckdb
  captioner search "red car" --mode text --where "width >= 1024" --json
  captioner search --image query.jpg --probe "Is there a person?=no"
  captioner search "shop sign" --probe "Is there text in the image?>0.8"
"""


@click.command("search", epilog=SEARCH_EPILOG)
@click.argument("query", required=False)
@index_option
@click.option(
    "--mode",
    type=click.Choice(["hybrid", "text", "semantic"]),
    default=None,
    help="text: BM25 over captions and probe answers; semantic: the query embedded with the index's model; "
    "hybrid: reciprocal-rank fusion of both [default: hybrid, or text for an index without embeddings].",
)
@click.option("--image", type=click.Path(dir_okay=False), help="Find images similar to this image (with QUERY and hybrid mode: fused with BM25 of QUERY).")
@click.option("--where", help="SQL boolean expression over the images view (see below).")
@probe_option
@click.option("--limit", default=10, show_default=True, type=click.IntRange(1, 10_000), help="Number of results.")
@_json_option
@device_option(QUERY_DEVICE_HELP)
@embed_model_option(QUERY_EMBED_MODEL_HELP)
@click.option(
    "--min-score",
    default=None,
    type=click.FloatRange(-1, 1),
    help="Semantic and --image searches: only hits whose cosine similarity to the query is at least this.",
)
@click.option(
    "--nprobe",
    default=None,
    type=click.IntRange(min=1),
    help="IVF lists scanned per query on an index with ANN (higher: better recall, slower) "
    "[default: 1/128 of the lists, at least 8].",
)
@_user_errors
def search_command(query, index_path, mode, image, where, probes, limit, as_json, device, embed_model, min_score, nprobe):
    """Search the index for QUERY (or --image) and print the best matches.

    Scores: cosine similarity (-1..1) in semantic and image searches, BM25 in
    text searches, and in hybrid searches the reciprocal-rank-fusion score
    sum(1 / (60 + rank)) over the two lists (about 0.033 at most).
    """
    from pipeline.search.image_index import ImageIndex

    with ImageIndex.open(index_path, device=query_device(device), nprobe=nprobe, embed_model=embed_model) as idx:
        hits = idx.search(query, mode=mode, image=image, k=limit, where=where, probes=probes, min_score=min_score)
    if as_json:
        _echo_json([h.to_dict() for h in hits])
        return
    if not hits:
        click.echo("no matches", err=True)
        return
    rows = [[str(h.rank), f"{h.score:.4f}", h.uri, _one_line(h.caption, 100)] for h in hits]
    _echo_table(["rank", "score", "path", "caption"], rows, align_right=(0, 1))


@click.command("sql")
@click.argument("statement")
@index_option
@_json_option
@_user_errors
def sql_command(statement, index_path, as_json):
    """Run one read-only SQL STATEMENT against the index.

    \b
    Tables and views: images (every row; error rows included), image_rows,
    embeddings (id, embedding), docs (id, text), index_meta (key, value).
    Example: captioner sql "SELECT status, count(*) FROM images GROUP BY ALL"
    """
    from pipeline.search.image_index import ImageIndex

    with ImageIndex.open(index_path) as idx:
        result = idx.sql(statement)
    if as_json:
        _echo_json(result.to_dicts())
        return
    if not result.columns:
        return
    rows = [[_one_line(v, 80) if v is not None else "NULL" for v in row] for row in result.rows]
    _echo_table(result.columns, rows)


@click.command("duplicates")
@index_option
@click.option("--threshold", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Minimum cosine similarity between embeddings.")
@click.option("--keep", "keep", type=click.Choice(["first", "largest", "newest"]), default="first", show_default=True,
              help="Which member of each group to keep: first by path, the largest file, or the newest file.")
@_json_option
@_user_errors
def duplicates_command(index_path, threshold, keep, as_json):
    """List groups of duplicate images: the same bytes (tier exact) or embeddings at cosine >= --threshold (near).

    Groups are connected: A~B and B~C put A, B, C in one group. Near pairs
    come from each image's nearest neighbours through the index's IVF lists
    (about 2 minutes for 1M images on 2 cores), not from every pair. One
    member of each group is marked keep (--keep); the others are the copies.
    """
    from pipeline.search.image_index import ImageIndex

    with ImageIndex.open(index_path) as idx:
        groups = idx.duplicates(threshold, keep=keep)
    if as_json:
        _echo_json([{"size": len(g), "tier": g.tier, "keep": g.kept.uri, "images": [vars(m) for m in g]}
                    for g in groups])
        return
    if not groups:
        click.echo(f"no near-duplicates (nor copies of the same bytes) at threshold {threshold}", err=True)
        return
    for n, group in enumerate(groups, start=1):
        click.echo(f"group {n} ({len(group)} images, {group.tier}; keep {group.kept.uri})")
        for m in group:
            mark = "keep" if m.keep else "    "
            click.echo(f"  {mark}  {m.similarity:.4f}  {m.uri}  {_one_line(m.caption, 80)}".rstrip())


SEARCH_COMMANDS = [index_command, search_command, sql_command, duplicates_command]
