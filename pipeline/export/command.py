"""``captioner export FORMAT``: captions into files other tools read.

Thin: parse flags, open the rows (pipeline.export.rows), hand them to the
format's module, print a summary. Every user-fixable failure is a
click.ClickException that says what to do.
"""

from __future__ import annotations

import os

from collections import Counter

import click

from pipeline.export.alt_text import DEFAULT_MAX_CHARS
from pipeline.export.errors import ExportError
from pipeline.export.rows import STATUSES
from pipeline.export.training_text import STYLES, TrainingText
from pipeline.labels.sample import STRATEGIES as SAMPLE_STRATEGIES
from pipeline.options import DEFAULT_INDEX, index_option, probe_option, storage_option

SIDECAR_FORMATS = ("xmp", "txt")
TREE_FORMATS = ("imagefolder", "coco", "hf-dataset")
LABELING_FORMATS = ("label-studio",)
FORMATS = ("alt-text", *SIDECAR_FORMATS, *TREE_FORMATS, *LABELING_FORMATS)
# Formats whose caption text is for training: --trigger and --style apply (pipeline.export.training_text).
TRAINING_TEXT_FORMATS = ("txt", "imagefolder", "hf-dataset")

EXPORT_EPILOG = """\b
Formats:
  alt-text     --out alt.csv | alt.jsonl: uri, alt_text, caption, machine_generated, generator
  xmp          XMP sidecars (photo.jpg.xmp): dc:description and the IPTC
               AltTextAccessibility / ExtDescrAccessibility fields; other
               fields of an existing sidecar are kept
  txt          photo.txt caption sidecars (kohya / TagGUI layout)
  imagefolder  Hugging Face imagefolder: metadata.jsonl + images
  coco         COCO captions: annotations/captions.json + images/
  hf-dataset   a datasets.Dataset saved with save_to_disk (Image column)
  label-studio Label Studio tasks.json (model answers as predictions) + labeling-config.xml
\b
Rows: only status=ok rows by default (error rows have no caption or image);
--where and --probe filter exactly as in `captioner search`.
\b
Examples:
  captioner export alt-text --index out/index.duckdb --out out/alt-text.csv
  captioner export xmp --index out/index.duckdb --in-place --dry-run
  captioner export txt --from out/captions.parquet --out out/txt/
  captioner export imagefolder --index out/index.duckdb --out out/dataset --probe "Is there a person in the image?=yes"
  captioner export coco --index out/index.duckdb --out out/coco --where "width >= 512"
  captioner export hf-dataset --index out/index.duckdb --out out/hf
  captioner export txt --from out/captions.parquet --out out/txt --trigger sks --style tags
  captioner export label-studio --index out/index.duckdb --out out/review --serve-url http://127.0.0.1:8000 --sample 200
"""


@click.command("export", epilog=EXPORT_EPILOG)
@click.argument("format", type=click.Choice(FORMATS))
@index_option(default=None, help=f"Index built by `captioner index`. [default: {DEFAULT_INDEX}, unless --from is given]")
@click.option("--from", "parquet", metavar="PARQUET", help="Read `captioner run` output instead of an index: a .parquet file or part-file folder, local or a bucket URL.")
@click.option("--out", help="alt-text: a .csv or .jsonl file. xmp/txt: a folder mirroring the image folders. imagefolder/coco/hf-dataset: a folder. Local or a bucket URL.")
@click.option("--in-place", is_flag=True, help="xmp/txt: write each sidecar beside its image (also on a bucket) instead of into --out.")
@click.option("--where", help="SQL boolean expression over the images view, as in `captioner search`.")
@probe_option
@click.option("--status", type=click.Choice(STATUSES), default="ok", show_default=True, help="Rows to export by status; rows without a caption (or image) are skipped by formats that need one.")
@click.option("--max-chars", type=click.IntRange(min=20), default=DEFAULT_MAX_CHARS, show_default=True, help="alt-text/xmp: longest alt text, cut on a word boundary.")
@click.option("--sidecar-name", type=click.Choice(["full", "stem"]), default="full", show_default=True, help="xmp: photo.jpg.xmp (full) or photo.xmp (stem).")
@click.option("--dry-run", is_flag=True, help="xmp/txt: list which sidecars would be created, updated or kept; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace files in --out that no captioner export wrote (or that changed since): xmp/txt: text someone wrote (a hand-edited .txt, someone's dc:description); other formats: a same-named file (image, metadata.jsonl, captions.json, .csv). Indexed images are never replaced.")
@click.option("--allow-out-in-images", "out_in_images", is_flag=True, help="imagefolder/coco/hf-dataset: write into an --out that holds indexed images (refused otherwise). An indexed image is still never replaced: one whose copy would land on another is skipped.")
@click.option("--link", is_flag=True, help="imagefolder/coco: symlink the images instead of copying them (local images and --out only).")
@click.option("--root", help="Folder (or bucket prefix) whose tree --out mirrors. [default: the deepest folder holding every image of the index or Parquet, selected or not]")
@click.option("--trigger", metavar="WORD", help="txt/imagefolder/hf-dataset: put WORD (a trigger word or prefix) first in every caption text.")
@click.option("--style", type=click.Choice(STYLES), default=None, help="txt/imagefolder/hf-dataset: the caption as written (sentence) or comma-separated tags from the yes-probes and the caption (tags). imagefolder/hf-dataset put it in a `text` column. [default: sentence]")
@click.option("--serve-url", metavar="URL", help="label-studio: tasks show the images from this `captioner serve` of the same --index, e.g. http://127.0.0.1:8000 (started with --image-origin LABEL_STUDIO_URL).")
@click.option("--local-files-root", metavar="DIR", help="label-studio: tasks show the images through Label Studio's local-files storage; DIR is its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.")
@click.option("--sample", "sample_size", type=click.IntRange(min=1), help="label-studio: write N images for review instead of all (see --sample-by).")
@click.option("--sample-by", type=click.Choice(SAMPLE_STRATEGIES), default=SAMPLE_STRATEGIES[0], show_default=True, help="label-studio: uncertainty (yes_prob nearest 0.5 first) or stratified (every probe answer gets its share).")
@click.option("--seed", type=int, default=0, show_default=True, help="label-studio: the sample for the same rows and seed is always the same.")
@storage_option("fsspec option for bucket images, Parquet and --out (repeatable), e.g. endpoint_url=...")
def export_command(format, index_path, parquet, out, in_place, where, probes, status, max_chars, sidecar_name, dry_run, overwrite, out_in_images, link, root,
                   trigger, style, serve_url, local_files_root, sample_size, sample_by, seed, storage_options):
    """Write the captions of an index (or Parquet) as FORMAT files for other tools."""
    from pipeline.export.rows import Selection, open_rows
    from pipeline.export.storage import Storage

    _check_flags(format, out=out, in_place=in_place, dry_run=dry_run, link=link, out_in_images=out_in_images, index_path=index_path, parquet=parquet)
    _check_labeling_flags(format, parquet=parquet, trigger=trigger, style=style, serve_url=serve_url,
                          local_files_root=local_files_root, sample_size=sample_size)
    text = TrainingText(trigger=trigger, style=style or "sentence") if format in TRAINING_TEXT_FORMATS else None
    labeling = dict(serve_url=serve_url, local_files_root=local_files_root, sample_size=sample_size, sample_by=sample_by, seed=seed)
    options = dict(storage_options or ())
    storage = Storage(options)
    skipped: Counter = Counter()
    try:
        with open_rows(
            index=None if parquet else (index_path or DEFAULT_INDEX),
            parquet=parquet,
            selection=Selection(where=where, probes=tuple(probes), status=status),
            storage_options=options,
        ) as source:
            if source.count() == 0:
                raise ExportError(
                    f"no row of {source.description} matches (it has {source.total()} rows; exporting status={status}"
                    + (f", --where {where!r}" if where else "") + "".join(f", --probe {p!r}" for p in probes)
                    + "); loosen the filters, or check the answers with `captioner sql`"
                )
            summary = _export(format, source, storage, out=out, in_place=in_place, root=root, link=link,
                              max_chars=max_chars, sidecar_name=sidecar_name, dry_run=dry_run,
                              overwrite=overwrite, out_in_images=out_in_images, skipped=skipped, text=text,
                              labeling=labeling)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"export failed: {exc}; check --out, the image paths and --storage-option values") from exc
    if skipped:
        summary += "; skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items()))
    click.echo(summary)


def _check_flags(format, *, out, in_place, dry_run, link, out_in_images, index_path, parquet) -> None:
    if index_path and parquet:
        raise click.UsageError("give --index or --from, not both")
    if format in SIDECAR_FORMATS:
        if bool(out) == in_place:
            raise click.UsageError(f"{format} writes sidecars into --out DIR (mirroring the image folders) or beside the images with --in-place; give one of them")
    elif in_place:
        raise click.UsageError(f"--in-place is for sidecar formats ({', '.join(SIDECAR_FORMATS)}); {format} needs --out")
    elif not out:
        raise click.UsageError(f"{format} needs --out" + (" FILE.csv or FILE.jsonl" if format == "alt-text" else " DIR"))
    if out and not in_place and format != "alt-text":
        _check_out_is_a_folder(format, out)
    if dry_run and format not in SIDECAR_FORMATS:
        raise click.UsageError(f"--dry-run lists sidecar changes; it applies to {', '.join(SIDECAR_FORMATS)}")
    if out_in_images and format not in TREE_FORMATS:
        raise click.UsageError(f"--allow-out-in-images applies to {', '.join(TREE_FORMATS)}, which write a folder of their own")
    if link and format not in ("imagefolder", "coco"):
        raise click.UsageError("--link applies to imagefolder and coco, which copy images")


def _check_labeling_flags(format, *, parquet, trigger, style, serve_url, local_files_root, sample_size) -> None:
    if (trigger is not None or style is not None) and format not in TRAINING_TEXT_FORMATS:
        raise click.UsageError(f"--trigger and --style shape training captions; they apply to {', '.join(TRAINING_TEXT_FORMATS)}")
    given = [name for name, value in (("--serve-url", serve_url), ("--local-files-root", local_files_root), ("--sample", sample_size)) if value is not None]
    if format not in LABELING_FORMATS:
        if given:
            raise click.UsageError(f"{given[0]} applies to label-studio")
        return
    from pipeline.export.label_studio import ImageLinks

    try:
        ImageLinks(serve_url=serve_url, local_files_root=local_files_root)  # one of the two, well-formed
    except ExportError as exc:
        raise click.UsageError(str(exc)) from exc
    if serve_url is not None and parquet:
        raise click.UsageError(
            "--serve-url links images by the row ids of the index `captioner serve` serves, which --from does not have; "
            "pass that --index instead of --from (or use --local-files-root)"
        )


# What a tree or sidecar format writes into its --out folder (for the message when --out names a file).
_FOLDER_CONTENTS = {
    "coco": "annotations/captions.json and images/",
    "imagefolder": "metadata.jsonl and the images",
    "hf-dataset": "a saved datasets.Dataset",
    "xmp": "sidecars mirroring the image folders",
    "txt": "sidecars mirroring the image folders",
    "label-studio": "tasks.json and labeling-config.xml",
}


def _check_out_is_a_folder(format: str, out: str) -> None:
    """Refuse an --out that names a file (an existing one, or a file name such as coco.json) for a folder format."""
    from pipeline.storage import is_local, local_path, name_of

    name = name_of(str(out))
    stem, dot, extension = name.rpartition(".")
    existing_file = is_local(out) and os.path.isfile(local_path(out))
    if not existing_file and not (dot and stem and extension.lower() in _FILE_EXTENSIONS and not str(out).endswith("/")):
        return
    folder = str(out).rstrip("/")[: -len(name)] + (stem if dot and stem else name + "-" + format)
    what = "an existing file" if existing_file else f"a .{extension} file name"
    raise click.UsageError(
        f"the --out of {format} is a folder (it gets {_FOLDER_CONTENTS[format]}), but {out} is {what}; "
        f"pass a folder: --out {folder}"
    )


# Names with these endings are files, never export folders.
_FILE_EXTENSIONS = {"json", "jsonl", "csv", "tsv", "txt", "parquet", "xmp", "zip", "tar", "gz", "arrow", "duckdb"}


def _export(format, source, storage, *, out, in_place, root, link, max_chars, sidecar_name, dry_run, overwrite, out_in_images, skipped,
            text, labeling) -> str:
    shown = storage.display(out) if out else "beside the images"
    if format == "label-studio":
        from pipeline.export.label_studio import CONFIG, TASKS, ImageLinks, write_label_studio
        from pipeline.export.storage import ExportFolder

        links = ImageLinks(serve_url=labeling["serve_url"], local_files_root=labeling["local_files_root"])
        with ExportFolder(storage, out, sources=source.tree_uris(), overwrite=overwrite, allow_in_images=None,
                          recursive=False) as dest:
            n = write_label_studio(source, dest, links=links, sample_size=labeling["sample_size"],
                                   strategy=labeling["sample_by"], seed=labeling["seed"], skipped=skipped)
        note = ("; start `captioner serve` with --image-origin LABEL_STUDIO_URL so Label Studio may load the images"
                if labeling["serve_url"] else "")
        return (f"wrote {n} Label Studio tasks to {shown} ({TASKS}; paste {CONFIG} into the project's labeling interface, "
                f"then import {TASKS}){note}")
    if format == "alt-text":
        from pipeline.export.alt_file import write_alt_text
        from pipeline.export.storage import ExportFolder
        from pipeline.storage import parent_of

        with ExportFolder(storage, parent_of(out), sources=source.tree_uris(), overwrite=overwrite, allow_in_images=None,
                          recursive=False) as dest:
            n = write_alt_text(source.rows(), out, dest, max_chars=max_chars, skipped=skipped)
        return f"wrote {n} alt texts to {shown}"
    if format in SIDECAR_FORMATS:
        from pipeline.export.sidecars import Placement, apply

        placement = Placement(out=out, in_place=in_place, root=root, tree=None if in_place else tuple(source.tree_uris()))
        if format == "xmp":
            from pipeline.export.xmp import plan_xmp

            plans = plan_xmp(source.rows(), placement, storage, sidecar_name=sidecar_name, max_chars=max_chars,
                             overwrite=overwrite, skipped=skipped)
        else:
            from pipeline.export.txt import plan_txt

            plans = plan_txt(source.rows(), placement, storage, overwrite=overwrite, skipped=skipped, text=text)
        counts = apply(plans, storage, dry_run=dry_run, echo=click.echo)
        verb = "would write" if dry_run else "wrote"
        return (f"{verb} {format} sidecars {'into ' if out else ''}{shown}: {counts['create']} created, {counts['update']} updated, "
                f"{counts['keep']} kept")
    from pipeline.export.storage import ExportFolder

    with ExportFolder(storage, out, sources=source.tree_uris(), overwrite=overwrite, allow_in_images=out_in_images) as dest:
        if format == "imagefolder":
            from pipeline.export.imagefolder import write_imagefolder

            n = write_imagefolder(source, dest, root=root, link=link, skipped=skipped, text=text)
            return f"wrote an imagefolder dataset of {n} images to {shown} (metadata.jsonl)"
        if format == "coco":
            from pipeline.export.coco import write_coco

            n = write_coco(source, dest, root=root, link=link, skipped=skipped)
            return f"wrote COCO captions for {n} images to {shown} (annotations/captions.json, images/)"
        from pipeline.export.hf_dataset import write_hf_dataset

        n = write_hf_dataset(source, dest, root=root, skipped=skipped, text=text)
        return f"saved a datasets.Dataset of {n} images to {shown} (datasets.load_from_disk reads it)"
