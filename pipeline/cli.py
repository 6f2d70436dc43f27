"""The ``captioner`` command line: one command per verb, errors with the fix.

The CLI only parses flags into the config tree (pipeline.config) and hands it
to the job; nothing here knows about Ray, models or Parquet internals.
"""

from __future__ import annotations

import os
import sys

import click

from pipeline import __version__, exit_codes
from pipeline.config import (
    CAPTION_DTYPES,
    CAPTION_LENGTHS,
    CAPTION_LENGTH_PAIRS,
    DEVICES,
    ConfigError,
    RunConfig,
    load_config_file,
    load_run_config,
    with_overrides,
)
from pipeline.storage_limits import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT_S
from pipeline.options import default_note, device_option, storage_failure, storage_option

RUN_EXAMPLES = f"""
\b
Examples:
  captioner run ./photos --out captions.parquet
  captioner run ./photos --out out/ --probes my_probes.yaml --caption-length short
  captioner run ./photos --out probes.parquet --no-caption --no-embed      # probe answers only
  captioner run s3://bucket/photos --out s3://bucket/captions/ --storage-option endpoint_url=http://127.0.0.1:9000
  captioner run ./photos --out captions.parquet --caption-model ./models/moondream2 --device cuda
  captioner run ./photos --out captions.parquet --address 10.0.0.5:6379   # an existing Ray cluster
  captioner run --config captions.config.json                             # rerun a saved config

\b
Re-running into the same --out skips images already done with the same
models and probes and never duplicates a row. It retries images whose file
changed and failures that can change (missing, unreadable, model errors);
--retry-errors also retries files that were not images, truncated or too
large. Files of this source that are no longer there are recorded as gone
(index, search, page and exports stop returning them; --keep-gone keeps
them), and a file moved or renamed with the same bytes reuses its row
instead of going through the models again. Images that cannot be decoded become rows with status=error; the
exit code is non-zero only when the run itself fails: {exit_codes.FAILED} for what the message
says to fix (config, source, output, weights, Ray), {exit_codes.STORAGE_FAILED} when storage failed
under the run (a store stalled or refused, a disk filled; committed rows are
kept and the same command resumes), {exit_codes.BUSY} when another run holds the output's lease (nothing done),
{exit_codes.INTERRUPTED} for Ctrl-C and {exit_codes.TERMINATED} for SIGTERM, which keep every
committed row too.
"""

STORAGE_DEADLINE = f"timeout_s={DEFAULT_TIMEOUT_S:g}, attempts={DEFAULT_ATTEMPTS}"


def _max_crops_default_note() -> str:
    """``--max-crops`` defaults to the checkpoint's own bound unless the config sets one."""
    from pipeline.config import CaptionConfig
    from pipeline.models.moondream.config import VisionConfig

    if CaptionConfig.model_fields["max_crops"].default is not None:
        return default_note("caption.max_crops")
    return f"[default: the checkpoint's config.json, {VisionConfig().max_crops} for the official weights]"


PROBE_FILE_FIX = (
    "A probe file is a YAML (or JSON) list of distinct questions, one per item, e.g.\n"
    "  - Is there a person in the image?\n"
    "  - What is the main colour?"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="captioner")
def main() -> None:
    """Caption, probe and embed every image in a folder or bucket, then search them.

    \b
    captioner run SOURCE --out captions.parquet   caption + probes + embedding -> Parquet
    captioner index captions.parquet              build a DuckDB search index
    captioner search "a red bicycle"              full-text, semantic or hybrid search
    captioner serve --index index.duckdb          the search page in a browser
    captioner export FORMAT --out ...             alt text, XMP/.txt sidecars, training datasets, Label Studio tasks
    captioner import label-studio EXPORT.json     human labels back, beside the output
    captioner report probes                       how often each probe is right, and at what threshold
    captioner schema                              the Parquet columns and what they mean
    """


@main.command(epilog=RUN_EXAMPLES)
@click.argument("source", required=False)
@click.option("--out", "output", help="Output: a .parquet file, or a directory (local or bucket URL) for part files. [required unless --config has it]")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML/JSON config file; flags override it.")
@click.option("--caption-model", help=f"Caption backend: moondream2[@REV], transformers:HUB_ID[@REV], or a local model directory PATH. {default_note('caption.model')}")
@click.option("--embed-model", help=f"Embedder: open_clip:NAME[@PRETRAINED], open_clip:NAME@/path/ckpt.pt, or a local open_clip directory. {default_note('embed.model')}")
@click.option("--probes", "probes_file", type=click.Path(dir_okay=False), help="YAML/JSON list of probe questions asked of every image. [default: the built-in set]")
@click.option("--caption-length", type=click.Choice(CAPTION_LENGTHS + CAPTION_LENGTH_PAIRS), help=f"Caption length, or two (e.g. short,normal) from one image encoding: the longer is `caption`, the shorter `caption_short`. {default_note('caption.length')}")
@click.option("--batch-size", type=int, help=f"Images per captioning batch. {default_note('caption.batch_size')}")
@click.option("--max-crops", type=click.IntRange(1, 12), help=f"Moondream: local crops per image, fewer is faster on large images. {_max_crops_default_note()}")
@click.option("--dtype", type=click.Choice(CAPTION_DTYPES), help=f"Moondream weights dtype; auto is bfloat16 on a GPU, float32 on CPU. {default_note('caption.dtype')}")
@click.option("--compile", "compile_model", is_flag=True, default=None, help="Moondream: torch.compile the decode step (fullgraph; CUDA graphs on a GPU), the vision encoder and the prefix prefill (slower start, faster on long GPU runs).")
@click.option("--ocr/--no-ocr", "ocr", default=None, help=f"Read the text in each image (RapidOCR, PP-OCRv4) into the text columns. {default_note('ocr.enabled')}")
@click.option("--ocr-device", type=click.Choice(DEVICES), default=None, help=f"Where OCR runs; auto picks CUDA when the models run on GPUs and onnxruntime-gpu is installed, else CPU. {default_note('ocr.device')}")
@click.option("--embed-batch-size", type=int, help=f"Images per embedding batch. {default_note('embed.batch_size')}")
@device_option("Where models run; auto picks CUDA when the cluster has GPUs.")
@click.option("--address", help="Address of a running Ray cluster (ray start --head). [default: start an embedded local Ray]")
@click.option("--limit", type=int, help="Process only the first N images of the sorted listing.")
@click.option("--no-caption", is_flag=True, help="Write no caption; the probes are still asked (add --no-probes to skip the caption model).")
@click.option("--no-probes", is_flag=True, help="Ask no probe questions.")
@click.option("--no-embed", is_flag=True, help="Skip the image embedding; captions and probes only.")
@click.option("--retry-errors", is_flag=True, help="Also retry images that failed for a permanent reason (not an image, truncated, too large). Missing, unreadable, model errors and changed files are always retried.")
@click.option("--keep-gone", is_flag=True, help=f"Keep the rows of files no longer in the source (a source pruned after captioning, or only part of the collection) instead of recording them gone. {default_note('keep_gone')}")
@click.option("--max-pixels", type=int, help=f"Refuse images larger than this many pixels (decompression-bomb guard). {default_note('decode.max_pixels')}")
@storage_option("fsspec option for bucket sources/outputs (repeatable), e.g. endpoint_url=..., anon=true; "
                f"timeout_s=SECONDS and attempts=N bound every storage call. [default: {STORAGE_DEADLINE}]")
@click.option("--overwrite", is_flag=True, help="Replace an existing output made with other models or probes instead of refusing.")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
def run(source, output, config_file, probes_file, storage_options, no_caption, no_probes, no_embed, no_progress, **flags) -> None:
    """Caption, probe and embed every image under SOURCE into Parquet.

    SOURCE is a local folder (searched recursively), a single image, or an
    fsspec URL such as s3://bucket/prefix or gs://bucket/prefix. SOURCE and
    --out may come from --config instead (e.g. the config a run saved beside
    its output: `captioner run --config captions.config.json` reruns it).
    """
    from jobs.caption_job import RayUnavailable, run_job
    from jobs.run import RunInterrupted
    from pipeline.lease import LeaseHeld, as_click_error
    from pipeline.probes import ProbeFileError, default_probes, load_probes
    from pipeline.storage import StorageError

    try:
        config = _run_config(source, output, config_file, probes_file, storage_options, no_caption, no_probes, no_embed, flags)
        summary = run_job(config, progress=not no_progress, echo=lambda m: click.echo(m, err=True))
    except RunInterrupted as exc:
        click.echo(f"\ncaptioner: {exc}", err=True)
        sys.exit(exc.exit_code)
    except LeaseHeld as exc:
        raise as_click_error(exc) from exc
    except ProbeFileError as exc:
        raise click.ClickException(f"{exc}. {PROBE_FILE_FIX}") from exc
    except StorageError as exc:
        raise storage_failure(exc) from exc
    except (ConfigError, RayUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:
        _raise_model_unavailable(exc)
        raise
    click.echo("\n".join(summary.lines()))


def _run_config(source, output, config_file, probes_file, storage_options, no_caption, no_probes, no_embed, flags) -> RunConfig:
    """The config file (its paths relative to its folder), then the flags (relative to here)."""
    from pipeline.probes import default_probes, load_probes

    top = {key: _cwd_path(value) for key, value in (("source", source), ("output", output)) if value}
    file_data = load_config_file(config_file) if config_file else {}
    for key, usage in (("source", "SOURCE"), ("output", "--out PATH")):
        if key not in top and key not in file_data:
            raise ConfigError(f"no {key} given: pass {usage} (or set {key} in --config)")
    if config_file:
        base = load_run_config(config_file, **top)
        probes_in_file = "probes" in (file_data.get("caption") or {})
    else:
        base = RunConfig.from_dict(top)
        probes_in_file = False
    if no_probes:
        probes = ()
    elif probes_file:
        probes = load_probes(probes_file)
    else:
        probes = None if probes_in_file else default_probes()
    return with_overrides(
        base,
        {
            "device": flags["device"],
            "limit": flags["limit"],
            "overwrite": True if flags["overwrite"] else None,
            "retry_errors": True if flags["retry_errors"] else None,
            "keep_gone": True if flags["keep_gone"] else None,
            "storage_options": storage_options,
            "caption.model": flags["caption_model"],
            "caption.length": flags["caption_length"],
            "caption.batch_size": flags["batch_size"],
            "caption.max_crops": flags["max_crops"],
            "caption.dtype": flags["dtype"],
            "caption.compile": flags["compile_model"],
            "caption.probes": probes,
            "caption.enabled": False if no_caption else None,
            "embed.model": flags["embed_model"],
            "embed.batch_size": flags["embed_batch_size"],
            "embed.enabled": False if no_embed else None,
            "decode.max_pixels": flags["max_pixels"],
            "ocr.enabled": flags["ocr"],
            "ocr.device": flags["ocr_device"],
            "ray.address": flags["address"],
        },
    )


def _cwd_path(text: str) -> str:
    """A local path made absolute against the current directory (a trailing '/' kept); URLs as given."""
    if "://" in text:
        return text
    absolute = os.path.abspath(os.path.expanduser(text))
    return absolute + "/" if text.endswith(("/", os.sep)) else absolute


def _raise_model_unavailable(exc: BaseException) -> None:
    """Weights that fail to load on a worker arrive wrapped in Ray errors; unwrap the fix."""
    text = str(exc)
    for marker in ("ModelUnavailable", "OcrUnavailable"):
        if marker in text:
            tail = text[text.rindex(marker) + len(marker):].lstrip(": ").strip().splitlines()
            raise click.ClickException(tail[0] if tail else text) from exc


@main.command()
@click.option("--dim", type=int, help="Embedding width to show for the embedding column (e.g. 1152 for SigLIP SO400M).")
def schema(dim: int | None) -> None:
    """Print the Parquet schema: every column, its type and meaning."""
    from schemas import describe

    click.echo(describe(dim))


def _add_search_commands() -> None:
    try:
        from pipeline.search.commands import SEARCH_COMMANDS
    except ImportError:  # pragma: no cover - search layer not installed
        return
    for command in SEARCH_COMMANDS:
        main.add_command(command)


_add_search_commands()
from pipeline.serve.command import serve  # noqa: E402 - starlette/uvicorn load only when it runs

main.add_command(serve)

from pipeline.export.command import export_command  # noqa: E402 - pyexiv2/datasets load only when a format needs them

main.add_command(export_command)

from pipeline.labels.command import import_group, report_group  # noqa: E402 - matplotlib loads only for --plot

main.add_command(import_group)
main.add_command(report_group)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
