"""The captioning job: list -> skip what is done -> Ray Data stages -> Parquet.

Run it through ``captioner run`` or submit it to a cluster directly:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.caption_job --config run.json

where ``run.json`` is a resolved config (``captioner run`` saves one beside
every output). Rows stream back to the driver, which commits them as atomic
part files every ``rows_per_part`` images: the output works the same whether
the workers share a disk with the driver or not, and a crash loses at most
the rows not yet committed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.config import RunConfig, load_config_file
from pipeline.models.registry import resolve_captioner, resolve_embedder
from pipeline.output import OutputStore
from pipeline.preflight import check_caption_weights
from pipeline.probes import probe_set_hash
from pipeline.sources import list_images, stored_uri
from pipeline.stages import CaptionStage, EmbedStage, StageConfig, conform_batch, decode_batch
from schemas import STATUS_OK, RunMetadata, output_schema

log = logging.getLogger(__name__)


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached; the message says how to fix it."""


@dataclass
class RunSummary:
    output: str
    listed: int
    skipped: int
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
        out = [
            f"output      {self.output} ({self.total_rows} rows)",
            f"listed      {self.listed} images, {self.skipped} already done, {self.processed} processed",
            f"ok          {self.ok}",
            f"errors      {self.errors}"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.error_kinds.items())) + ")" if self.errors else ""),
            f"elapsed     {self.elapsed_s:.1f} s, {self.images_per_s:.2f} images/s",
        ]
        return out


def run_identity(config: RunConfig) -> RunMetadata:
    """The models and probe set every row of this run is stamped with (resolved on the driver)."""
    caption = resolve_captioner(config.caption.model) if config.caption.enabled else None
    embed = resolve_embedder(config.embed.model) if config.embed.enabled else None
    probes = tuple(config.caption.probes) if caption else ()
    return RunMetadata(
        caption_model=caption.spec if caption else None,
        caption_revision=(caption.revision or "local") if caption else None,
        embed_model=embed.spec if embed else None,
        embed_revision=(embed.revision or ("local" if embed.is_local else "default")) if embed else None,
        embedding_dim=None,
        probe_set_hash=probe_set_hash(probes),
        probes=probes,
    )


def run_job(config: RunConfig, *, progress: bool = True, echo=None) -> RunSummary:
    """Run the whole job; raise only for infrastructure faults (bad images become rows)."""
    echo = echo or (lambda message: print(message, file=sys.stderr))
    started = time.monotonic()
    config = config.validate()
    identity = run_identity(config)
    if config.caption.enabled:
        check_caption_weights(resolve_captioner(config.caption.model))

    store = OutputStore(config.output, config.storage_options_dict())
    store.check_writable()
    items = list_images(
        config.source,
        extensions=config.decode.extensions,
        storage_options=config.storage_options_dict(),
        limit=config.limit,
    )
    state = store.load_state(identity, overwrite=config.overwrite)
    pending = [item for item in items if not state.is_done(stored_uri(item.uri), item.size)]
    store.save_config(config.to_json())
    summary = RunSummary(output=config.output, listed=len(items), skipped=len(items) - len(pending))
    echo(f"captioner: {len(items)} images listed, {summary.skipped} already done, {len(pending)} to process")

    schema = None
    if pending:
        stage = StageConfig(run=config, identity=identity)
        with ray_session(config):
            schema = _process(pending, stage, store, summary, progress)
    summary.total_rows = store.finalize(schema)
    summary.elapsed_s = time.monotonic() - started
    return summary


def _process(pending, stage: StageConfig, store: OutputStore, summary: RunSummary, progress: bool) -> pa.Schema | None:
    from tqdm import tqdm

    dataset = build_dataset(pending, stage)
    writer = _PartWriter(store, stage.run.rows_per_part)
    kinds: collections.Counter[str] = collections.Counter()
    bar = tqdm(total=len(pending), unit="img", desc="captioning", disable=not progress, dynamic_ncols=True)
    try:
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(table)
            statuses = table["status"].to_pylist()
            ok = sum(status == STATUS_OK for status in statuses)
            summary.ok += ok
            summary.errors += len(statuses) - ok
            kinds.update(k for k, s in zip(table["error_kind"].to_pylist(), statuses) if s != STATUS_OK)
            summary.processed += len(statuses)
            bar.set_postfix(ok=summary.ok, errors=summary.errors, refresh=False)
            bar.update(len(statuses))
    finally:
        # Rows that reached the driver are finished work: commit them even when
        # the run is being torn down, so a rerun does not redo them.
        writer.flush()
        bar.close()
    summary.error_kinds = dict(kinds)
    return writer.schema


class _PartWriter:
    def __init__(self, store: OutputStore, rows_per_part: int):
        self.store = store
        self.rows_per_part = rows_per_part
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.schema: pa.Schema | None = None

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = _schema_of(table)
        # Ray may hand back blocks without the schema's key/value metadata.
        self.buffer.append(table.select(self.schema.names).cast(self.schema))
        self.buffered += table.num_rows
        if self.buffered >= self.rows_per_part:
            rows = pa.concat_tables(self.buffer)
            while rows.num_rows >= self.rows_per_part:
                self.store.write_part(rows.slice(0, self.rows_per_part))
                rows = rows.slice(self.rows_per_part)
            self.buffer, self.buffered = [rows], rows.num_rows

    def flush(self) -> None:
        if self.buffered:
            self.store.write_part(pa.concat_tables(self.buffer))
        self.buffer, self.buffered = [], 0


def _schema_of(table: pa.Table) -> pa.Schema:
    from schemas import read_metadata

    run = read_metadata(table.schema)
    if run is None:
        raise RuntimeError("a stage returned a batch without captioner metadata; conform_batch was skipped")
    return output_schema(run.embedding_dim, run)


# ---- Ray ------------------------------------------------------------------------


def build_dataset(pending, stage: StageConfig):
    import ray.data

    config = stage.run
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's tqdm bar is the one progress bar
    use_gpu = _use_gpu(config.device)
    _check_cluster_fits(config, use_gpu)
    dataset = ray.data.from_arrow(_input_blocks(pending, config.ray.decode_batch_size))
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"stage": stage},
        batch_size=config.ray.decode_batch_size,
        num_cpus=config.ray.decode_cpus,
    )
    model_stages = [
        (config.caption.enabled, CaptionStage, config.caption.batch_size, config.ray.caption_actors, config.ray.caption_gpus),
        (config.embed.enabled, EmbedStage, config.embed.batch_size, config.ray.embed_actors, config.ray.embed_gpus),
    ]
    for enabled, stage_class, batch_size, actors, gpus in model_stages:
        if enabled:
            dataset = dataset.map_batches(
                stage_class,
                fn_constructor_kwargs={"stage": stage},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                **_model_resources(config, use_gpu, gpus),
            )
    return dataset.map_batches(conform_batch, fn_kwargs={"stage": stage}, batch_size=None, num_cpus=_CONFORM_CPUS)


def _input_blocks(pending, batch_size: int, max_blocks: int = 2000) -> list[pa.Table]:
    # Many small blocks let decode tasks run in parallel from the first image;
    # the cap keeps a million-image run from creating a million tiny objects.
    rows = max(batch_size, -(-len(pending) // max_blocks))
    return [
        pa.table(
            {
                "uri": [stored_uri(i.uri) for i in chunk],
                "location": pa.array([i.uri.encode("utf-8", "surrogateescape") for i in chunk], pa.binary()),
                "size": pa.array([i.size for i in chunk], pa.int64()),
            }
        )
        for chunk in (pending[start : start + rows] for start in range(0, len(pending), rows))
    ]


def _model_resources(config: RunConfig, use_gpu: bool, gpus: float) -> dict:
    # Fault tolerance is Ray Data's default for actor pools: an actor that dies
    # (OOM kill, lost node, segfault) is restarted and its in-flight batch
    # retried (max_restarts=-1, max_task_retries=-1; tests/test_crash_resume.py
    # kills one). Ray 2.60 deprecates every way of changing those two, so a
    # batch that kills its actor on every try is retried until interrupted.
    if use_gpu:
        return {"num_gpus": gpus, "num_cpus": 1}
    return {"num_cpus": config.ray.model_actor_cpus}


_CONFORM_CPUS = 0.25


def _check_cluster_fits(config: RunConfig, use_gpu: bool) -> None:
    """Refuse a run whose actors would leave no room for decode tasks: Ray would wait forever."""
    import ray

    actors = _model_actor_count(config)
    gpus_needed = (
        config.caption.enabled * config.ray.caption_actors * config.ray.caption_gpus
        + config.embed.enabled * config.ray.embed_actors * config.ray.embed_gpus
    )
    cpus_needed = _cpus_needed(config, use_gpu)
    available = ray.cluster_resources()
    problems = []
    if available.get("CPU", 0) < cpus_needed:
        problems.append(f"{cpus_needed:g} CPUs (the cluster has {available.get('CPU', 0):g})")
    if use_gpu and available.get("GPU", 0) < gpus_needed:
        problems.append(f"{gpus_needed:g} GPUs (the cluster has {available.get('GPU', 0):g})")
    if problems:
        raise RayUnavailable(
            f"this run needs {' and '.join(problems)}: {actors} model actor(s) plus decode and conform tasks. "
            "Lower ray.model_actor_cpus / ray.caption_gpus / ray.embed_gpus or the actor counts in --config, "
            "or add nodes to the cluster."
        )


def _model_actor_count(config: RunConfig) -> int:
    return config.caption.enabled * config.ray.caption_actors + config.embed.enabled * config.ray.embed_actors


def _cpus_needed(config: RunConfig, use_gpu: bool) -> float:
    """Logical CPUs for the model actors plus one decode and one conform task."""
    per_actor = 1 if use_gpu else config.ray.model_actor_cpus
    return _model_actor_count(config) * per_actor + config.ray.decode_cpus + _CONFORM_CPUS


def _use_gpu(device: str) -> bool:
    import ray

    if device == "cpu":
        return False
    if device == "cuda":
        return True
    return ray.cluster_resources().get("GPU", 0) > 0


class ray_session:
    """Connect to ``--address`` or start an embedded local Ray; shut down only what we started."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.started = False

    def __enter__(self):
        import ray

        if ray.is_initialized():
            return self
        address = self.config.ray.address or os.environ.get("RAY_ADDRESS")
        debug = bool(os.environ.get("CAPTIONER_DEBUG"))
        # Ray's start-up and Ray Data's per-dataset INFO lines would bury the
        # progress bar; CAPTIONER_DEBUG=1 brings them and worker output back.
        kwargs = {
            "include_dashboard": False,
            "log_to_driver": debug,
            "logging_level": logging.INFO if debug else logging.WARNING,
        }
        if not debug:
            # Read when ray.data is first imported, which happens after this.
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local" always starts a fresh instance, never joins a cluster
                # that happens to run on this machine.
                ray.init(address="local", num_cpus=_local_cpus(self.config), **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises several types for the same fault
            where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
            fix = "check the address (ray status on the head node) or drop --address to run locally" if address else (
                "see the Ray logs under /tmp/ray"
            )
            raise RayUnavailable(f"could not start or reach {where}: {exc}. Fix: {fix}.") from exc
        self.started = True
        return self

    def __exit__(self, *exc_info):
        if self.started:
            import ray

            ray.shutdown()
        return False


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at ``address``.

    ray.init retries an unreachable GCS for ever (a warning every few seconds),
    so a mistyped address would hang the run instead of failing it.
    """
    if address in ("auto", "local"):
        return  # ray.init resolves these itself and fails fast
    # host:port (the GCS) or ray://host:port (Ray Client); other forms are left to ray.init.
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}. Fix: check the host "
            "and port (`ray status` on the head node shows them; the GCS listens on 6379 and Ray Client on "
            "10001 by default), or drop --address and unset RAY_ADDRESS to run on an embedded local Ray."
        ) from exc


def _local_cpus(config: RunConfig) -> int:
    # Ray counts logical CPUs: the model actors must fit beside at least a
    # couple of decode tasks or the pipeline stalls, even on a 2-core laptop.
    needed = _cpus_needed(config, use_gpu=False) + config.ray.decode_cpus + _CONFORM_CPUS
    return max(os.cpu_count() or 1, int(needed + 0.999))


# ---- `python -m jobs.caption_job` (ray job submit) --------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a captioner job from a resolved config file.")
    parser.add_argument("--config", required=True, help="a resolved run config (JSON/YAML), e.g. captions.config.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = RunConfig.from_dict(load_config_file(Path(args.config)))
    summary = run_job(config, progress=not args.no_progress)
    print("\n".join(summary.lines()))
    print(json.dumps(dataclasses.asdict(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
