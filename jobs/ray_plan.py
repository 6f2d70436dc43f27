"""The Ray side of a run: the session, the resource plan and the dataset.

``ray_session`` joins ``--address`` or starts an embedded local Ray, quietly.
``plan_resources`` turns the config into actor counts and CPU/GPU shares that
fit the cluster it is given: values left at their defaults shrink to fit (a
2-CPU head runs the job), values set in the config are taken as asked and a
run that cannot fit is refused instead of waiting for ever. On CUDA there is
one caption actor per GPU, each on a card of its own, holding enough Ray
batches to keep its engine full (:func:`caption_flow`); OCR runs on CPU
actors, or one per GPU beside them when onnxruntime-gpu is there
(:func:`ocr_device`, :func:`gpu_shares`). ``build_dataset``
wires the stages: decode as CPU tasks, the OCR, caption and embed models as
actor pools, then the conform step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from dataclasses import dataclass

import pyarrow as pa

from jobs.session_guard import SessionGuard
from pipeline.config import RunConfig
from pipeline.models.moondream.defaults import CALLS_IN_FLIGHT, MAX_BATCHES_IN_FLIGHT, for_device, images_per_call
from pipeline.stages import CaptionStage, EmbedStage, OcrStage, StageConfig, conform_batch, decode_batch
from pipeline.stages.contract import LISTED

log = logging.getLogger(__name__)

# Defaults of the shares a config leaves unset (None), before fitting.
DEFAULT_MODEL_ACTOR_CPUS = 1.0
DEFAULT_DECODE_CPUS = 0.5
CONFORM_CPUS = 0.25
# Ray schedules fractional CPUs down to 1/10000; keep shares usable.
_MIN_SHARE = 0.05


@dataclass(frozen=True)
class GpuShares:
    """The GPU share one actor of each model stage asks Ray for, on CUDA."""

    caption: float
    embed: float
    ocr: float


# The shares a config leaves unset (ray.caption_gpus, embed_gpus, ocr_gpus). They are Ray's scheduling
# tokens, not memory limits (an engine uses the memory it needs), chosen for where Ray puts the actors:
# it packs a fractional share onto the fullest card it fits (best fit), so a stage with one actor per
# GPU stays one per card only where a second share of it cannot fit on a card that holds one.
# Without GPU OCR: a caption share above a half never shares a card, in any order; embed takes the
# rest of one card.
SHARES_WITHOUT_GPU_OCR = GpuShares(caption=0.75, embed=0.25, ocr=0.0)
# With OCR on the GPUs two stages are one per GPU, and two shares above a half cannot share a card, so
# this one leans on the order Ray Data starts actors in, upstream first (ray.data's
# build_streaming_topology): OCR, then caption, then embed. OCR 0.55, above a half: one per card.
# Caption 0.3: beside an OCR actor a second one does not fit (0.55 + 2 x 0.3 > 1): one per card too.
# Embed 0.15: the rest of one card (0.55 + 0.3 + 0.15 = 1). A restarted actor (Ray Data retries a dead
# one) fits only where the dead one was. tests/test_resource_plan.py checks each actor's card on a Ray
# with 4 declared GPUs.
SHARES_WITH_GPU_OCR = GpuShares(caption=0.3, embed=0.15, ocr=0.55)


def gpu_shares(config: RunConfig, ocr_on_gpu: bool) -> GpuShares:
    """Each stage's share: the config's where it sets one, else the table's for this run."""
    table = SHARES_WITH_GPU_OCR if ocr_on_gpu else SHARES_WITHOUT_GPU_OCR
    ray_config = config.ray
    return GpuShares(
        caption=ray_config.caption_gpus or table.caption,
        embed=ray_config.embed_gpus or table.embed,
        ocr=(ray_config.ocr_gpus or table.ocr) if ocr_on_gpu else 0.0,
    )


def ocr_device(config: RunConfig, use_gpu: bool) -> str:
    """Where the OCR actors run, "cuda" or "cpu": decided once, here, on the driver.

    auto is CUDA when the run's models go on GPUs (``use_gpu``: --device and
    the cluster) and onnxruntime has its CUDA provider (onnxruntime-gpu);
    cuda without the provider was refused by preflight before Ray started.
    The provider is asked of the driver's onnxruntime, before any actor
    exists: an embedded Ray's workers run in the driver's environment, and a
    cluster is expected to run the driver's environment on its nodes (a
    driver without onnxruntime-gpu gets CPU OCR under auto, and is refused
    cuda: install it on the driver too). A worker that still lacks it does
    not fall back to CPU in silence: its OCR actor fails at start naming the
    fix (pipeline/ocr/reader.py), as a caption actor without CUDA does.
    """
    if not config.ocr.enabled or config.ocr.device == "cpu":
        return "cpu"
    if config.ocr.device == "cuda":
        return "cuda"
    from pipeline.ocr import reader

    return "cuda" if use_gpu and reader.cuda_provider_available() else "cpu"


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached, or the run cannot fit it; the message says how to fix it."""


@dataclass(frozen=True)
class CaptionFlow:
    """How images reach a caption actor's engine."""

    batch_size: int  # rows per Ray batch
    batches_in_flight: int  # Ray batches one actor holds at once (Ray runs its calls in that many threads)
    images_per_call: int | None  # engine calls merge batches up to this many images; None: a call per batch


@dataclass(frozen=True)
class ResourcePlan:
    use_gpu: bool
    model_actor_cpus: float
    decode_cpus: float
    conform_cpus: float
    caption_gpus: float
    embed_gpus: float
    caption_actors: int  # 0 when the caption model has nothing to do
    embed_actors: int  # 0 without embeddings
    caption: CaptionFlow
    ocr_actors: int = 0  # 0 without OCR; onnxruntime actors, model_actor_cpus each
    ocr_gpus: float = 0.0  # GPU share per OCR actor; 0: OCR on CPU

    @property
    def ocr_device(self) -> str:
        return "cuda" if self.ocr_gpus > 0 else "cpu"

    @property
    def torch_threads(self) -> int:
        return max(1, int(round(self.model_actor_cpus)))


def caption_flow(config: RunConfig, use_gpu: bool) -> CaptionFlow:
    """Ray batches in flight per caption actor, and the engine call they merge into.

    Filling (the GPU default): one engine call takes enough images for every
    sequence slot (caption + probes per image, pipeline/models/moondream/defaults.py)
    and the actor holds CALLS_IN_FLIGHT times that, so the next call is queued
    when one ends. Otherwise one batch at a time, each its own call.
    """
    caption = config.caption
    defaults = for_device("cuda" if use_gpu else "cpu")
    batch = caption.batch_size
    asked = config.ray.caption_batches_in_flight
    if asked == 1 or (asked is None and not defaults.fill_engine):
        return CaptionFlow(batch, 1, None)
    if asked is None:
        target = images_per_call(defaults, caption.max_sequences, caption.enabled * len(caption.lengths) + len(caption.probes))
        asked = min(MAX_BATCHES_IN_FLIGHT, max(2, math.ceil(CALLS_IN_FLIGHT * target / batch)))
    return CaptionFlow(batch, asked, max(batch, asked * batch // CALLS_IN_FLIGHT))


def _actor_counts(
    config: RunConfig, cluster: dict[str, float], use_gpu: bool, ocr_on_gpu: bool
) -> tuple[int, int, int]:
    """(caption, embed, ocr) actors; an unset caption or OCR count is one per whole GPU on CUDA, one on CPU."""
    per_gpu = max(1, int(cluster.get("GPU", 0) + 1e-9))
    caption, ocr = config.ray.caption_actors, config.ray.ocr_actors
    if caption is None:
        caption = per_gpu if use_gpu else 1
    if ocr is None:
        ocr = per_gpu if ocr_on_gpu else 1
    return caption * config.caption.runs_model, config.ray.embed_actors * config.embed.enabled, ocr * config.ocr.enabled


def _cpus_needed(actors: int, actor_cpus: float, decode_cpus: float, conform_cpus: float) -> float:
    """Logical CPUs for the model actors plus one decode and one conform task."""
    return actors * actor_cpus + decode_cpus + conform_cpus


def plan_resources(config: RunConfig, cluster: dict[str, float], use_gpu: bool) -> ResourcePlan:
    """Actors and CPU/GPU shares for this run on a cluster with ``cluster`` resources (ray.cluster_resources())."""
    ray_config = config.ray
    ocr_on_gpu = ocr_device(config, use_gpu) == "cuda"
    shares = gpu_shares(config, ocr_on_gpu)
    caption_actors, embed_actors, ocr_actors = _actor_counts(config, cluster, use_gpu, ocr_on_gpu)
    actors = caption_actors + embed_actors + ocr_actors
    actor_cpus = 1.0 if use_gpu else (ray_config.model_actor_cpus or DEFAULT_MODEL_ACTOR_CPUS)
    decode_cpus = ray_config.decode_cpus or DEFAULT_DECODE_CPUS
    conform_cpus = CONFORM_CPUS
    available = cluster.get("CPU", 0.0)
    needed = _cpus_needed(actors, actor_cpus, decode_cpus, conform_cpus)
    # Shrink what the user left to us, all in proportion, until the plan fits.
    if needed > available > 0:
        fixed = 0.0
        if ray_config.model_actor_cpus is not None and not use_gpu:
            fixed += actors * actor_cpus
        if ray_config.decode_cpus is not None:
            fixed += decode_cpus
        flexible = needed - fixed
        if flexible > 0 and available > fixed:
            scale = (available - fixed) / flexible
            if ray_config.model_actor_cpus is None or use_gpu:
                actor_cpus = max(_MIN_SHARE, actor_cpus * scale)
            if ray_config.decode_cpus is None:
                decode_cpus = max(_MIN_SHARE, decode_cpus * scale)
            conform_cpus = max(_MIN_SHARE, conform_cpus * scale)
            needed = _cpus_needed(actors, actor_cpus, decode_cpus, conform_cpus)
    gpus_needed = (caption_actors * shares.caption + embed_actors * shares.embed) * use_gpu + ocr_actors * shares.ocr
    problems = []
    if available + 1e-9 < needed:
        problems.append(f"{needed:g} CPUs (the cluster has {available:g})")
    if use_gpu and caption_actors and ocr_on_gpu and shares.caption + shares.ocr > 1 + 1e-9:
        # Ray would place the OCR actors, then wait for ever for a card with room for a caption actor
        # (a config saved before GPU OCR existed carries caption_gpus 0.75).
        problems.append(f"a caption and an OCR actor on each GPU, {shares.caption:g} + {shares.ocr:g} of one card")
    if gpus_needed and cluster.get("GPU", 0) + 1e-9 < gpus_needed:
        problems.append(f"{gpus_needed:g} GPUs (the cluster has {cluster.get('GPU', 0):g})")
    if problems:
        raise RayUnavailable(
            f"this run needs {' and '.join(problems)}: {actors} model actor(s) plus decode and "
            "conform tasks. Lower ray.model_actor_cpus / ray.decode_cpus / ray.caption_gpus / ray.embed_gpus / "
            "ray.ocr_gpus or the actor counts in --config (or leave them unset to fit the cluster), pass "
            "--ocr-device cpu, or add nodes to the cluster."
        )
    return ResourcePlan(
        use_gpu=use_gpu,
        model_actor_cpus=actor_cpus,
        decode_cpus=decode_cpus,
        conform_cpus=conform_cpus,
        caption_gpus=shares.caption,
        embed_gpus=shares.embed,
        caption_actors=caption_actors,
        embed_actors=embed_actors,
        caption=caption_flow(config, use_gpu),
        ocr_actors=ocr_actors,
        ocr_gpus=shares.ocr,
    )


def current_plan(config: RunConfig) -> ResourcePlan:
    """The plan for the Ray this process is connected to."""
    import ray

    cluster = ray.cluster_resources()
    if config.device == "cpu":
        use_gpu = False
    elif config.device == "cuda":
        use_gpu = True
    else:
        use_gpu = cluster.get("GPU", 0) > 0
    return plan_resources(config, cluster, use_gpu)


# ---- the dataset ------------------------------------------------------------------


def build_dataset(pending, stage: StageConfig, plan: ResourcePlan):
    import ray.data

    config = stage.run
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's tqdm bar is the one progress bar
    dataset = ray.data.from_arrow(input_blocks(pending, config.ray.decode_batch_size))
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"stage": stage},
        batch_size=config.ray.decode_batch_size,
        batch_format="pyarrow",
        num_cpus=plan.decode_cpus,
    )
    flow = plan.caption
    model_gpus = plan.use_gpu  # caption and embed; OCR has its own device (plan.ocr_device)
    model_stages = [
        # (enabled, class, constructor kwargs, batch size, actors, GPU share (0: CPU), batches in flight per actor)
        # OCR first: an image it fails on is not captioned (and gpu_shares counts on its actors starting first).
        (stage.runs_ocr, OcrStage, {"device": plan.ocr_device}, config.ocr.batch_size, plan.ocr_actors,
         plan.ocr_gpus, 1),
        (stage.runs_captioner, CaptionStage, {"images_per_call": flow.images_per_call}, flow.batch_size,
         plan.caption_actors, plan.caption_gpus * model_gpus, flow.batches_in_flight),
        (stage.runs_embedder, EmbedStage, {}, config.embed.batch_size, plan.embed_actors,
         plan.embed_gpus * model_gpus, 1),
    ]  # fmt: skip
    for enabled, stage_class, kwargs, batch_size, actors, gpus, in_flight in model_stages:
        if enabled:
            # Fault tolerance is Ray Data's default for actor pools: an actor that
            # dies (OOM kill, lost node, segfault) is restarted and its in-flight
            # batch retried (tests/test_crash_resume.py kills one).
            resources = {"num_gpus": gpus, "num_cpus": plan.model_actor_cpus} if gpus else {
                "num_cpus": plan.model_actor_cpus
            }
            # Several batches in flight: Ray runs that many of the actor's calls in
            # threads, each its own batch, and the stage's feeder feeds their images
            # into one running engine, each call returning when its own images are
            # done (pipeline/stages/feeder.py). Threads, not an async
            # __call__: Ray Data runs an async UDF's batches 4 at a time per task
            # whatever the stage asks, so the count would not be the plan's. No
            # tasks queued beyond those: the feeder already holds the next engine
            # call, and each queued block of crops (about 5 MB an image) would
            # sit in the object store.
            threads = {"max_concurrent_calls_per_actor": in_flight, "max_tasks_in_flight_per_actor": in_flight,
                       "enable_true_multi_threading": True}  # fmt: skip
            # Ray Data hands the constructor its arguments through the object
            # store whatever the class looks like, and Ray logs an error-level
            # line for it; jobs/quiet.py keeps that one line off the terminal.
            dataset = dataset.map_batches(
                stage_class,
                fn_constructor_kwargs={"stage": stage, **kwargs},
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors, **(threads if in_flight > 1 else {})),
                **resources,
            )
    return dataset.map_batches(
        conform_batch, fn_kwargs={"stage": stage}, batch_size=None, batch_format="pyarrow", num_cpus=plan.conform_cpus
    )


def input_blocks(pending, batch_size: int, max_blocks: int = 2000) -> list[pa.Table]:
    """The listing as Arrow blocks of the LISTED contract.

    Many small blocks let decode tasks run in parallel from the first image;
    the cap keeps a million-image run from creating a million tiny objects.
    """
    from pipeline.sources import mtime_micros, stored_uri

    rows = max(batch_size, -(-len(pending) // max_blocks))
    return [
        LISTED.table(
            {
                "uri": [stored_uri(i.uri) for i in chunk],
                "location": [i.uri.encode("utf-8", "surrogateescape") for i in chunk],
                "size": [i.size for i in chunk],
                "source_mtime": [mtime_micros(i.mtime) for i in chunk],
            }
        )
        for chunk in (pending[start : start + rows] for start in range(0, len(pending), rows))
    ]


# ---- the session ------------------------------------------------------------------


def _quiet_ray_loggers() -> None:
    # Warnings Ray logs on every healthy run: token auth being on (it is, and
    # should be), and Ray Data's progress bars being off (ours is on).
    for name in ("ray._private.authentication", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


# What an embedded Ray is started with beyond Ray's defaults; a joined cluster keeps its own settings.
EMBEDDED_SYSTEM_CONFIG = {
    # Ray kills a worker idle for 1 s once the node has more workers than CPUs, which a small machine
    # always has during a run (each model actor, and each of Ray Data's own actors, is a worker): on
    # 2 cores the decode worker went while the models ran, and the conform task then waited for a new
    # worker to start, import and connect (about 1 s, and 1 s of CPU). The embedded Ray ends with the
    # run, so its idle workers may as well wait for the run's next task.
    "idle_worker_killing_time_threshold_ms": 60_000,
}


class ray_session:
    """Connect to ``--address`` or start an embedded local Ray; shut down only what we started."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.started = False
        self._guard: SessionGuard | None = None

    def __enter__(self):
        import ray

        debug = bool(os.environ.get("CAPTIONER_DEBUG"))
        if not debug:
            # Read when ray.data is first imported, which happens after this.
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
            _quiet_ray_loggers()
        if ray.is_initialized():
            return self
        address = self.config.ray.address or os.environ.get("RAY_ADDRESS")
        # Ray's start-up and Ray Data's per-dataset INFO lines would bury the
        # progress bar; CAPTIONER_DEBUG=1 brings them and worker output back.
        kwargs = {
            "include_dashboard": False,
            "log_to_driver": debug,
            "logging_level": logging.INFO if debug else logging.WARNING,
        }
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # Every process of the embedded Ray goes with the run, even a
                # killed one (jobs/session_guard.py); a cluster's never.
                self._guard = SessionGuard().start()
                # "local" always starts a fresh instance, never joins a cluster
                # that happens to run on this machine.
                ray.init(address="local", _system_config=EMBEDDED_SYSTEM_CONFIG, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises several types for the same fault
            self._stop_guard()
            raise RayUnavailable(_explain_init_failure(exc, address)) from exc
        self.started = True
        return self

    def __exit__(self, exc_type, exc, tb):
        with _quiet_teardown(enabled=exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            try:
                if self.started:
                    import ray

                    ray.shutdown()
                    _no_second_ray()
            finally:
                self._stop_guard()
        return False

    def _stop_guard(self) -> None:
        if self._guard is not None:
            self._guard.stop()
            self._guard = None


def _no_second_ray() -> None:
    """Stop Ray's auto-init from starting a fresh local Ray after ours is shut down.

    Any Ray API called later in this process (a Ray Data object reporting
    metrics as it is collected) would otherwise start one, dashboard agent and
    all, with nobody left to stop it. An explicit ray.init still works.
    """
    from ray._private import auto_init_hook

    if hasattr(auto_init_hook, "enable_auto_connect"):
        auto_init_hook.enable_auto_connect = False


# Ray Data's executor and its iterator's prefetch threads (ray/data/_internal).
_RAY_DATA_THREADS = ("StreamingExecutor", "map_tp_filling_worker", "map_tp_transforming_worker")


@contextlib.contextmanager
def _quiet_teardown(enabled: bool, executor_wait_s: float = 10.0):
    """After a Ctrl-C: let Ray Data's executor stop, and keep the errors of the tasks it abandoned quiet.

    The interrupted iterator asks the executor thread to stop but waits only
    2 s for it; on a loaded machine it is still scheduling when ray.shutdown
    runs, and every task it dropped would be reported as an "Unhandled error"
    with a traceback. The user asked for the stop: none of that is news.
    """
    if not enabled:
        yield
        return
    import threading

    deadline = time.monotonic() + executor_wait_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith(_RAY_DATA_THREADS):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    saved_env = os.environ.get("RAY_IGNORE_UNHANDLED_ERRORS")
    os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if saved_env is None:
            os.environ.pop("RAY_IGNORE_UNHANDLED_ERRORS", None)
        else:
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = saved_env


def _explain_init_failure(exc: Exception, address: str | None) -> str:
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
    text = str(exc).split(". Ensure")[0]
    if type(exc).__name__ == "AuthenticationError" or "authentication" in text.lower():
        fix = (
            "the cluster uses token authentication: copy its token (`ray get-auth-token` on the head node) into "
            "~/.ray/auth_token here, or set RAY_AUTH_TOKEN"
        )
    elif address:
        fix = "check the address (ray status on the head node) or drop --address to run locally"
    else:
        fix = "see the Ray logs under /tmp/ray"
    return f"could not start or reach {where}: {type(exc).__name__}: {text}. Fix: {fix}."


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
