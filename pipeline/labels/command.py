"""``captioner import label-studio`` and ``captioner report probes``: the labeling loop's way back.

Thin: open the output's rows as the exports do (pipeline.export.rows:
``--index`` or ``--from``), find the labels file (pipeline.labels.store),
hand over to the module that knows. Everything is checked before anything
is written; every user-fixable failure is a click.ClickException naming the fix.
"""

from __future__ import annotations

import json

import click

from pipeline.export.errors import ExportError
from pipeline.labels.report import DEFAULT_BINS, DEFAULT_PRECISION
from pipeline.options import DEFAULT_INDEX, index_option, storage_option

LABELS_HELP = "The human labels file. [default: beside the output: captions.labels.json for captions.parquet, DIR/_captioner_labels.json for a part-file folder]"


def _rows(index_path, parquet, storage_options):
    from pipeline.export.rows import Selection, open_rows

    if index_path and parquet:
        raise click.UsageError("give --index or --from, not both")
    return open_rows(index=None if parquet else (index_path or DEFAULT_INDEX), parquet=parquet,
                     selection=Selection(status="any"), storage_options=storage_options)


def _source_options(f):
    f = storage_option("fsspec option for a bucket output, export or labels file (repeatable), e.g. endpoint_url=...")(f)
    f = click.option("--labels", "labels_path", metavar="FILE.json", help=LABELS_HELP)(f)
    f = click.option("--from", "parquet", metavar="PARQUET", help="Read `captioner run` output instead of an index.")(f)
    return index_option(f, default=None, help=f"Index built by `captioner index`. [default: {DEFAULT_INDEX}, unless --from is given]")


@click.group("import")
def import_group() -> None:
    """Bring human labels back into captioner (beside the output; the model's rows are never changed)."""


@import_group.command("label-studio", epilog="""\b
Example:
  captioner import label-studio project-1-at-2026-01-01.json --index out/index.duckdb
\b
The export is Label Studio's Export -> JSON of a project whose tasks
`captioner export label-studio` wrote. Each annotated image's labels replace
its earlier ones (the latest submitted annotation of a task counts); images
not in this export keep theirs. Nothing is written if any task is unusable.
""")
@click.argument("export_file", metavar="EXPORT.json")
@_source_options
def import_label_studio(export_file, index_path, parquet, labels_path, storage_options) -> None:
    """Read Label Studio's JSON export as human labels of this output's images."""
    from pipeline.labels.fields import fields_for
    from pipeline.labels.label_studio import LabelStudioError, read_export
    from pipeline.labels.store import LabelsError, labels_location, merge, read_labels, write_labels
    from pipeline.storage import StorageError, read_bytes

    options = dict(storage_options or ())
    try:
        data = read_bytes(export_file, options or None)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{export_file} does not exist; pass the file Label Studio's Export -> JSON downloaded") from exc
    except (StorageError, OSError) as exc:
        raise click.ClickException(f"cannot read {export_file}: {exc}") from exc
    try:
        with _rows(index_path, parquet, options) as source:
            reading = read_export(data, export_file, fields_for(source.questions))
            known = source.image_ids()
            where = labels_location(sources=source.sources, labels=labels_path, storage_options=options or None)
        strangers = [r for r in reading.reviews if r.image_id not in known]
        if strangers:
            more = f" and {len(strangers) - 1} more" if len(strangers) > 1 else ""
            raise click.ClickException(
                f"{export_file}: the annotated image {strangers[0].uri} (image_id {strangers[0].image_id[:16]}…){more} is "
                f"not in {source.description}; import into the output the tasks were exported from (nothing was written)"
            )
        labels, added, updated = merge(read_labels(where, options or None), reading.reviews, source="label-studio")
        write_labels(where, labels, options or None)
    except (ExportError, LabelStudioError, LabelsError) as exc:
        raise click.ClickException(str(exc)) from exc
    unchanged = len(reading.reviews) - added - updated
    click.echo(
        f"imported {len(reading.reviews)} reviewed images into {where}: {added} new, {updated} updated, {unchanged} unchanged"
        + (f"; {reading.unannotated} tasks without a submitted annotation skipped" if reading.unannotated else "")
        + f"; {len(labels)} images labeled in all"
    )


@click.group("report")
def report_group() -> None:
    """How the model's answers hold up against human labels."""


@report_group.command("probes", epilog="""\b
Examples:
  captioner report probes --index out/index.duckdb
  captioner report probes --index out/index.duckdb --precision 0.9 --plot out/probes.png
  captioner report probes --from out/captions.parquet --json > probes.json
\b
The suggested --probe "Q>=t" filter keeps the images whose yes_prob reaches
t: on the reviewed images, the most of the true yeses that still gives the
asked precision. Use it with `captioner search` and `captioner export`.
""")
@_source_options
@click.option("--precision", "asked", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_PRECISION, show_default=True,
              help="Suggest the yes_prob threshold whose selection reaches this precision of yes.")
@click.option("--bins", type=click.IntRange(2, 50), default=DEFAULT_BINS, show_default=True, help="Calibration buckets of yes_prob.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png", help="Also draw the report (reliability diagram, precision/recall by threshold) as a PNG.")
def report_probes(index_path, parquet, labels_path, storage_options, asked, bins, as_json, plot_path) -> None:
    """Accuracy, precision/recall, calibration and thresholds of every probe, against the human labels."""
    from pipeline.labels.report import make_report
    from pipeline.labels.store import LabelsError, labels_location, read_labels

    options = dict(storage_options or ())
    try:
        with _rows(index_path, parquet, options) as source:
            where = labels_location(sources=source.sources, labels=labels_path, storage_options=options or None)
            labels = read_labels(where, options or None)
            if not labels:
                raise click.ClickException(f"no human labels at {where}; label images in Label Studio and run `captioner import label-studio EXPORT.json` first (or pass --labels)")
            report = make_report(source.rows(), labels, source.questions, precision=asked, bins=bins)
    except (ExportError, LabelsError) as exc:
        raise click.ClickException(str(exc)) from exc
    if plot_path:
        _write_plot(report, plot_path, options)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else render(report))


def _write_plot(report, plot_path: str, options: dict) -> None:
    from pipeline.labels.plot import PlotUnavailable, plot_png
    from pipeline.labels.store import place_of

    try:
        data = plot_png(report)
    except PlotUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    folder, name = place_of(plot_path, options or None)
    folder.write(name, data)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render(report) -> str:
    """The report as text tables: one line per question, then each yes/no question's calibration."""
    lines = [f"{report.labeled_images} labeled images in this output"
             + (f" ({report.labels_not_in_output} labeled images are no longer in it)" if report.labels_not_in_output else "")]
    if report.caption_reviewed:
        lines.append(f"captions: {report.caption_kept} of {report.caption_reviewed} reviewed kept as written")
    lines += ["", f"{'question':<48} {'n':>5} {'accuracy':>9} {'prec(yes)':>10} {'recall':>7}  threshold"]
    for p in report.probes:
        if p.kind == "yes/no":
            t = p.threshold
            chosen = (f'--probe "{t.probe_filter}" (precision {_pct(t.precision)}, recall {_pct(t.recall)})' if t and t.threshold is not None
                      else (f"none reaches precision {t.asked_precision:g}" if p.with_yes_prob else "no yes_prob"))
            lines.append(f"{p.question[:48]:<48} {p.reviewed:>5} {_pct(p.accuracy):>9} {_pct(p.precision):>10} {_pct(p.recall):>7}  {chosen}")
        else:
            lines.append(f"{p.question[:48]:<48} {p.reviewed:>5} {_pct(p.accuracy):>9} {'(text: same answer)':>18}")
    for p in report.probes:
        if p.kind != "yes/no" or not p.with_yes_prob:
            continue
        lines += ["", f"calibration: {p.question}", f"  {'yes_prob':<13} {'n':>5} {'mean p':>7} {'said yes':>9}"]
        for b in p.calibration:
            mean = "-" if b.mean_yes_prob is None else f"{b.mean_yes_prob:.3f}"
            lines.append(f"  [{b.low:.2f}, {b.high:.2f}{']' if b.high == 1 else ')'} {b.count:>5} {mean:>7} {_pct(b.yes_rate):>9}")
    return "\n".join(lines)
