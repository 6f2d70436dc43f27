"""Click options shared by several ``captioner`` commands, declared once.

``--storage-option``, ``--index``, ``--device`` and ``--embed-model`` mean the
same thing wherever they appear, so they are built here and every command
module imports them from here (none imports ``pipeline.cli`` back). Help texts
show defaults read from where they are decided (``pipeline.config``), not
restated, so they cannot drift from what a run does.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from pipeline.config import DEVICES, RunConfig

# The search index every command that reads one opens unless told otherwise.
DEFAULT_INDEX = "index.duckdb"


def config_default(key: str) -> Any:
    """The default of a dotted RunConfig key (``"caption.batch_size"``), read from the pydantic model."""
    *sections, name = key.split(".")
    model = RunConfig
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].default


def default_note(key: str, extra: str = "") -> str:
    """``[default: VALUE]`` for a config key, as click prints it."""
    return f"[default: {config_default(key)}{extra}]"


def storage_failure(exc: BaseException) -> click.ClickException:
    """A StorageError (or SearchError caused by one) as click's one-line error; exit status 3
    (pipeline.exit_codes.STORAGE_FAILED) when the storage itself failed, 1 otherwise."""
    from pipeline import exit_codes

    error = click.ClickException(str(exc))
    cause = exc
    while cause is not None:
        if getattr(cause, "outage", False):
            error.exit_code = exit_codes.STORAGE_FAILED
            break
        cause = cause.__cause__
    return error


def parse_storage_options(values: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    """``KEY=VALUE`` strings as sorted pairs; None when none were given."""
    if not values:
        return None
    pairs = []
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="'--storage-option'")
        pairs.append((key.strip(), val))
    return tuple(sorted(pairs))


def _storage_callback(ctx, param, values):
    return parse_storage_options(values)


def storage_option(help: str) -> Callable:
    """``--storage-option KEY=VALUE`` (repeatable), parsed at parse time into sorted pairs or None."""
    return click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", callback=_storage_callback,
        help=help,
    )


def index_option(fn=None, *, default: str | None = DEFAULT_INDEX, help: str = "Index database built by `captioner index`."):
    """``--index PATH`` to an index database (default index.duckdb)."""
    def decorate(f):
        return click.option(
            "--index", "index_path", default=default, show_default=default is not None,
            type=click.Path(dir_okay=False), help=help,
        )(f)

    return decorate(fn) if fn is not None else decorate


def device_option(help: str) -> Callable:
    """``--device`` from the config's vocabulary (pipeline.config.DEVICES); a typo is a usage error."""
    return click.option(
        "--device", type=click.Choice(DEVICES), default=None,
        help=f"{help} {default_note('device')}",
    )


def query_device(device: str | None) -> str:
    """The device a query embedder runs on when --device was not given: the run's default."""
    return device or config_default("device")


def embed_model_option(help: str) -> Callable:
    return click.option("--embed-model", help=help)


QUERY_EMBED_MODEL_HELP = (
    "Load the query embedder from here (same forms as `captioner run --embed-model`), e.g. after moving a "
    "local model. It must be the model that built the index. [default: the model recorded in the index]"
)
QUERY_DEVICE_HELP = "Where to run the query embedder; auto picks CUDA when this machine has a GPU."

PROBE_HELP = (
    'Keep images whose probe answer matches, e.g. "Is there a person?=yes" (yes/no compare the parsed boolean; '
    'other answers case-insensitively), or whose probability of "yes" passes a threshold: '
    '"Is there text in the image?>0.8" (also >=, <, <=; P from 0 to 1). Rows without a probability (files from '
    "schema v1, questions that are not yes/no) never pass a threshold. Repeatable; all must hold."
)


def probe_option(fn):
    """``--probe "QUESTION=ANSWER|QUESTION>P"`` (repeatable), as pipeline.search.filters reads it."""
    return click.option("--probe", "probes", multiple=True, metavar='"QUESTION=ANSWER|QUESTION>P"', help=PROBE_HELP)(fn)
