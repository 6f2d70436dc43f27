"""The run: list the source, skip what is done, process the rest, summarise.

Rows stream back from the Ray stages to this driver, which commits them as
atomic part files every ``rows_per_part`` images (``PartWriter``): the output
works the same whether or not the workers share a disk with the driver, and
a crash or Ctrl-C loses at most the rows not yet committed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa

from jobs.interrupt import CtrlC, exit_code_of
from jobs.quiet import native_stderr_filter
from jobs.ray_plan import build_dataset, current_plan, ray_session
from jobs.run_faults import WaitingNote, batch_failed, is_storage_failure, wrap_write_failure
from pipeline.config import RunConfig
from pipeline.output import OutputStore, PartWriter
from pipeline.output.lifecycle import change_rows, plan_changes
from pipeline.output.parts import parts_folder_of
from pipeline.models.identity import identity_for_run
from pipeline.preflight import preflight
from pipeline.sources import is_local, list_images, listing_covers, read_bytes, stored_uri
from pipeline.stages import StageConfig
from pipeline.stages.decode import with_preprocessors
from schemas import STATUS_OK, RunMetadata

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output: str
    listed: int
    skipped: int
    reused: int = 0  # rows copied from a file with the same bytes that left the source (moved, renamed, back)
    gone: int = 0  # files no longer in the source, recorded (status gone)
    processed: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    total_rows: int = 0
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.error_kinds.items()))
        reused = f", {self.reused} reused from files with the same bytes" if self.reused else ""
        gone = [f"gone        {self.gone} files no longer in the source, recorded"] if self.gone else []
        return [
            f"output      {self.output} ({self.total_rows} rows)",
            f"listed      {self.listed} images, {self.skipped} already done{reused}, {self.processed} processed",
            *gone,
            f"ok          {self.ok}",
            f"errors      {self.errors}" + (f" ({kinds})" if self.errors else ""),
            f"elapsed     {self.elapsed_s:.1f} s, {self.images_per_s:.2f} images/s",
        ]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; the rows committed so far are kept.

    ``committed`` counts the rows this run wrote to part files; ``where`` is
    the folder that holds them (for a single-file output, the ``.parts``
    folder that the next complete run merges into the file); ``signum`` is
    the signal that stopped it, ``exit_code`` the code to exit with.
    """

    def __init__(self, committed: int, where: str, signum: int = signal.SIGINT):
        super().__init__(committed, where)
        self.committed = committed
        self.where = where
        self.signum = signal.Signals(signum)

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.signum)

    def __str__(self) -> str:
        how = "interrupted" if self.signum == signal.SIGINT else f"stopped by {self.signum.name}"
        if not self.committed:
            return f"{how} before this run committed any row: nothing was written; run the same command again to start it"
        return (
            f"{how}: {self.committed} processed rows were committed to {self.where} and are kept; "
            "run the same command again to resume where it stopped"
        )


def parts_location(config: RunConfig) -> str:
    """Where a run's committed part files are, as the user named the output."""
    output = config.output.rstrip("/")
    return f"{parts_folder_of(output)}/" if config.single_file else f"{output}/"


def run_identity(config: RunConfig) -> RunMetadata:
    """The models and probe set every row of this run is stamped with (resolved on the driver, no weights)."""
    caption = config.caption.model if config.caption.runs_model else None
    embed = config.embed.model if config.embed.enabled else None
    identity = identity_for_run(caption, embed, tuple(config.caption.probes) if caption else ())
    if config.ocr.enabled:
        from pipeline.ocr import ocr_identity

        model, revision = ocr_identity(config.ocr.engine)
        identity = dataclasses.replace(identity, ocr_model=model, ocr_revision=revision)
    return identity


def _progress_label(config: RunConfig) -> str:
    parts = []
    if config.caption.enabled:
        parts.append("captioning")
    elif config.caption.probes:
        parts.append("probing")
    if config.embed.enabled:
        parts.append("embedding")
    if config.ocr.enabled:
        parts.append("reading text")
    return "+".join(parts)


def run_job(config: RunConfig, *, progress: bool = True, echo=None) -> RunSummary:
    """Run the whole job; raise only for infrastructure faults (bad images become rows).

    Ctrl-C raises :class:`RunInterrupted`, whose message says what was kept.
    """
    committed = [0]
    try:
        return _run(config, progress, echo or (lambda message: print(message, file=sys.stderr)), committed)
    except KeyboardInterrupt as exc:
        # Before Ray (listing, resume state) or after it (the final merge):
        # parts committed by this run stay where they are.
        raise RunInterrupted(committed[0], parts_location(config), getattr(exc, "signum", signal.SIGINT)) from None


def _run(config: RunConfig, progress: bool, echo, committed: list[int]) -> RunSummary:
    started = time.monotonic()
    # A missing source, GPU or weights fail here, all at once, in seconds, not on a worker after Ray started.
    preflight(config)
    identity = run_identity(config)

    store = OutputStore(config.output, config.storage_options_dict())
    store.check_writable()
    # One writer per output: a second run is refused (naming the first) before it lists anything.
    lease = store.take_lease("captioner run")
    try:
        return _run_leased(config, progress, echo, committed, store, identity, lease, started)
    finally:
        lease.release()


def _run_leased(config: RunConfig, progress: bool, echo, committed: list[int], store: OutputStore,
                identity: RunMetadata, lease, started: float) -> RunSummary:
    items = list_images(
        config.source,
        extensions=config.decode.extensions,
        storage_options=config.storage_options_dict(),
        limit=config.limit,
    )
    state = store.load_state(identity, overwrite=config.overwrite)
    storage_options = config.storage_options_dict()
    pending = [
        item for item in items
        if not state.is_done(stored_uri(item.uri), item.size, item.mtime, retry_errors=config.retry_errors,
                             digest=functools.partial(_sha256_of, item.uri, storage_options))
    ]
    summary = RunSummary(output=config.output, listed=len(items), skipped=len(items) - len(pending))
    # Files that left the source, and pending files that are one of them moved (pipeline.output.lifecycle).
    changes = plan_changes(
        items, pending, state,
        covers=listing_covers(config.source, extensions=config.decode.extensions),
        digest=functools.partial(_sha256_of, storage_options=storage_options),
        # An empty listing is likelier a failed mount or a wrong prefix than an emptied collection.
        record_gone=not config.keep_gone and config.limit is None and bool(items),
    )
    pending = changes.pending
    summary.reused, summary.gone = len(changes.reused), len(changes.gone)
    store.save_config(config.to_json())
    if not items:
        kept = "; recorded nothing as gone (an empty listing is more often a failed mount than an emptied folder)" if state.current else ""
        echo(f"captioner: no images found under {config.source} (extensions: {' '.join(config.decode.extensions)}){kept}")
    if items or changes.gone:
        echo(f"captioner: {len(items)} images listed, {summary.skipped} already done, {len(pending)} to process"
             + (f", {summary.reused} reused (same bytes as a file no longer there)" if summary.reused else "")
             + (f", {summary.gone} gone from the source (recorded)" if summary.gone else ""))

    schema = _commit_changes(store, state, changes, identity, summary, config)
    copied = committed[0] = summary.reused + summary.gone  # kept whatever happens next
    if pending:
        # From here on a Ctrl-C only sets a flag, acted on where nothing is
        # half done: after ray.init, between batches, never inside a commit
        # or ray.shutdown (jobs/interrupt.py).
        ctrl_c = CtrlC()
        try:
            with ctrl_c, ray_session(config), native_stderr_filter():
                ctrl_c.reclaim()
                ctrl_c.check()
                plan = current_plan(config)
                stage = with_preprocessors(StageConfig(run=config, identity=identity, torch_threads=plan.torch_threads))
                schema = _process(build_dataset(pending, stage, plan), store, summary, config, progress, ctrl_c) or schema
        finally:
            # _process committed every row that reached the driver, interrupted or not.
            committed[0] = copied + summary.processed
        # A stop that landed after the last batch (its commit, Ray's shutdown) is still a stop:
        # the merge is left to the rerun, and the exit code tells the supervisor it was obeyed.
        ctrl_c.check()
    lease.check()  # never merge over the rows of a run that took the output over
    try:
        summary.total_rows = store.finalize(schema, run=identity)
    except Exception as exc:
        # A full disk (or a store gone) during the merge: the parts stay where they are for the rerun.
        raise wrap_write_failure(exc, doing="merge the rows into", output=config.output, committed=summary.processed,
                                 where=parts_location(config), storage_options=storage_options) from exc
    summary.elapsed_s = time.monotonic() - started
    return summary


def _process(dataset, store: OutputStore, summary: RunSummary, config: RunConfig, progress: bool,
             ctrl_c: CtrlC) -> pa.Schema | None:
    from tqdm import tqdm

    writer = PartWriter(store, config.rows_per_part)
    kinds: collections.Counter[str] = collections.Counter()
    bar = tqdm(total=summary.listed - summary.skipped - summary.reused, unit="img", desc=_progress_label(config),
               disable=not progress, dynamic_ncols=True, leave=False)
    batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    waiting = WaitingNote(bar, config.storage_options_dict(), remote=not (is_local(config.source) and is_local(config.output)))
    waiting.start()
    try:
        while True:
            # The only place a Ctrl-C lands at once: waiting for Ray, with
            # every row received so far already handed to the writer.
            with ctrl_c.interruptible():
                table = next(batches, None)
            waiting.arrived()
            if table is None:
                break
            _commit(writer, table, summary, config)
            statuses = table["status"].to_pylist()
            ok = sum(status == STATUS_OK for status in statuses)
            summary.ok += ok
            summary.errors += len(statuses) - ok
            kinds.update(k for k, s in zip(table["error_kind"].to_pylist(), statuses) if s != STATUS_OK)
            summary.processed += len(statuses)
            bar.set_postfix(ok=summary.ok, errors=summary.errors, refresh=False)
            bar.update(len(statuses))
            if is_storage_failure(table):  # the store is down: every other read would wait as long
                raise batch_failed(table, config.source, summary.processed, parts_location(config),
                                   config.storage_options_dict())
    finally:
        # Rows that reached the driver are finished work: commit them even when
        # the run is being torn down, so a rerun does not redo them.
        waiting.stop()
        bar.close()
        try:
            _commit(writer, None, summary, config)
        finally:
            # Close Ray Data's iterator while Ray is up: left to the garbage
            # collector, it reports its metrics after ray.shutdown, which starts
            # a second Ray (agents and all) as the process exits.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    summary.error_kinds = dict(kinds)
    return writer.schema


def _commit_changes(store: OutputStore, state, changes, identity: RunMetadata, summary: RunSummary,
                    config: RunConfig) -> pa.Schema | None:
    """Commit the gone and reused rows (before the stages run: they need no Ray); their schema, None if none."""
    writer = PartWriter(store, config.rows_per_part)
    for rows in change_rows(store.fs, state, changes, identity, cache_bytes=store.merge_cache_bytes,
                            chunk_rows=config.rows_per_part):
        _commit(writer, rows, summary, config)
    _commit(writer, None, summary, config)
    return writer.schema


def _commit(writer: PartWriter, table: pa.Table | None, summary: RunSummary, config: RunConfig) -> None:
    """Hand ``table`` to the writer (None: flush); a full disk or a failed store becomes one line."""
    try:
        writer.add(table) if table is not None else writer.flush()
    except Exception as exc:
        raise wrap_write_failure(exc, doing="commit rows to", output=config.output, committed=writer.committed,
                                 where=parts_location(config), storage_options=config.storage_options_dict()) from exc


def _sha256_of(uri: str, storage_options: dict | None) -> str | None:
    """The sha256 of a listed file's bytes now (resume's check when size and mtime cannot tell); None if unreadable."""
    try:
        return hashlib.sha256(read_bytes(uri, storage_options)).hexdigest()
    except Exception:  # noqa: BLE001 - unreadable now: not done; the run makes its error row
        return None
