"""The resource plan fits the cluster it is given (no Ray needed: cluster resources are data), and on a
Ray with declared GPUs it puts one caption actor on each (the one Ray test here)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from jobs.ray_plan import RayUnavailable, plan_resources
from pipeline.config import RunConfig
from pipeline.models.moondream import defaults
from pipeline.probes import default_probes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(caption=None, **ray):
    return RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "ray": ray, "caption": caption or {}})


def test_defaults_shrink_to_fit_a_two_cpu_head():
    plan = plan_resources(config(), {"CPU": 2.0}, use_gpu=False)
    total = 2 * plan.model_actor_cpus + plan.decode_cpus + plan.conform_cpus
    assert total == pytest.approx(2.0) and plan.torch_threads == 1


def test_defaults_are_kept_where_they_fit():
    plan = plan_resources(config(), {"CPU": 16.0}, use_gpu=False)
    assert (plan.model_actor_cpus, plan.decode_cpus, plan.conform_cpus) == (1.0, 0.5, 0.25)


def test_explicit_shares_are_kept_and_a_misfit_is_refused_with_the_fix():
    with pytest.raises(RayUnavailable, match=r"needs 128.75 CPUs \(the cluster has 4\).*model_actor_cpus"):
        plan_resources(config(model_actor_cpus=64), {"CPU": 4.0}, use_gpu=False)
    plan = plan_resources(config(model_actor_cpus=1.5), {"CPU": 4.0}, use_gpu=False)
    assert plan.model_actor_cpus == 1.5 and plan.torch_threads == 2


def test_gpus_are_counted():
    with pytest.raises(RayUnavailable, match="1 GPUs"):
        plan_resources(config(), {"CPU": 8.0, "GPU": 0.5}, use_gpu=True)
    plan = plan_resources(config(), {"CPU": 8.0, "GPU": 1.0}, use_gpu=True)
    assert plan.use_gpu and plan.caption_gpus + plan.embed_gpus == 1.0  # caption and embed share the card


# ---- every GPU of a workstation, each engine full (issue 15) ------------------------------------


def test_one_caption_actor_per_gpu_each_too_big_to_share_a_card():
    plan = plan_resources(config(), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True)
    assert (plan.caption_actors, plan.embed_actors) == (4, 1)
    # Ray packs fractional shares onto the fullest card that fits them: two 0.5 shares would land on
    # one card (seen with ray.get_gpu_ids()); above a half, each caption actor has a card of its own.
    assert plan.caption_gpus > 0.5
    assert 4 * plan.caption_gpus + plan.embed_gpus <= 4.0
    assert plan_resources(config(), {"CPU": 16.0, "GPU": 4.0}, use_gpu=False).caption_actors == 1  # --device cpu
    assert plan_resources(config(caption_actors=2), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True).caption_actors == 2
    with pytest.raises(RayUnavailable, match=r"needs 6\.25 GPUs \(the cluster has 4\)"):
        plan_resources(config(caption_actors=8), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True)


# ---- OCR on the GPUs when onnxruntime-gpu is there (issue 17) --------------------------------------


def ocr_config(device="auto", run_device="auto", **ray):
    return RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "device": run_device, "ray": ray,
                                "ocr": {"enabled": True, "device": device}})  # fmt: skip


@pytest.fixture
def cuda_provider(monkeypatch):
    """Whether onnxruntime offers CUDA, as the one function that asks it answers (no onnxruntime-gpu here)."""
    from pipeline.ocr import reader

    answer = {"available": True}
    monkeypatch.setattr(reader, "cuda_provider_available", lambda: answer["available"])
    return answer


def test_with_onnxruntime_gpu_each_declared_gpu_gets_an_ocr_actor_beside_its_caption_actor(cuda_provider):
    plan = plan_resources(ocr_config(), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True)
    assert (plan.ocr_actors, plan.caption_actors, plan.embed_actors) == (4, 4, 1)
    assert plan.ocr_device == "cuda"
    # One of each per card: a second OCR share (above a half) fits on no card, and neither does a second
    # caption share on a card that holds an OCR actor; the three shares fill one card, no more.
    assert plan.ocr_gpus > 0.5 and plan.ocr_gpus + 2 * plan.caption_gpus > 1
    assert plan.ocr_gpus + plan.caption_gpus + plan.embed_gpus <= 1.0
    assert 4 * (plan.ocr_gpus + plan.caption_gpus) + plan.embed_gpus <= 4.0


def test_without_the_cuda_provider_or_told_cpu_ocr_runs_on_cpu_actors_as_before(cuda_provider):
    cuda_provider["available"] = False
    before = plan_resources(config(), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True)  # OCR off
    for plan in (plan_resources(ocr_config(), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True),
                 plan_resources(ocr_config("cpu"), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True)):  # fmt: skip
        assert (plan.ocr_actors, plan.ocr_gpus, plan.ocr_device) == (1, 0.0, "cpu")
        assert (plan.caption_gpus, plan.embed_gpus) == (before.caption_gpus, before.embed_gpus) == (0.75, 0.25)
    cuda_provider["available"] = True
    assert plan_resources(ocr_config("cpu"), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True).ocr_device == "cpu"
    # auto follows the run: --device cpu (or a cluster without GPUs) keeps OCR on CPU too.
    assert plan_resources(ocr_config(run_device="cpu"), {"CPU": 16.0, "GPU": 4.0}, use_gpu=False).ocr_device == "cpu"
    assert plan_resources(ocr_config(), {"CPU": 16.0}, use_gpu=False).ocr_device == "cpu"


def test_ocr_told_cuda_takes_the_gpus_even_for_a_cpu_run_and_is_refused_without_any(cuda_provider):
    plan = plan_resources(ocr_config("cuda", run_device="cpu"), {"CPU": 16.0, "GPU": 2.0}, use_gpu=False)
    assert (plan.ocr_device, plan.ocr_actors, plan.use_gpu) == ("cuda", 2, False)
    with pytest.raises(RayUnavailable, match=r"needs 0\.55 GPUs \(the cluster has 0\).*--ocr-device cpu"):
        plan_resources(ocr_config("cuda", run_device="cpu"), {"CPU": 16.0}, use_gpu=False)
    # Counts and shares the config sets are taken as asked.
    plan = plan_resources(ocr_config(ocr_actors=2, ocr_gpus=0.2, caption_gpus=0.6), {"CPU": 16.0, "GPU": 4.0}, True)
    assert (plan.ocr_actors, plan.ocr_gpus, plan.caption_gpus, plan.embed_gpus) == (2, 0.2, 0.6, 0.15)
    # Shares that cannot share a card (a config saved before GPU OCR: caption_gpus 0.75) are refused, not
    # left for Ray to wait on for ever.
    with pytest.raises(RayUnavailable, match=r"an OCR actor on each GPU, 0\.75 \+ 0\.55 of one card.*--ocr-device cpu"):
        plan_resources(ocr_config(caption_gpus=0.75, embed_gpus=0.25), {"CPU": 16.0, "GPU": 4.0}, use_gpu=True)


@pytest.mark.parametrize("probes", [0, 5, 20])
def test_on_a_gpu_each_caption_actor_keeps_enough_images_in_flight_to_fill_its_engine(probes):
    questions = list(default_probes())[:probes] + [f"Is there a thing number {i}?" for i in range(probes - 5)]
    plan = plan_resources(config({"probes": questions}), {"CPU": 16.0, "GPU": 1.0}, use_gpu=True)
    flow, per_image = plan.caption, 1 + probes
    in_flight = flow.batches_in_flight * flow.batch_size
    assert in_flight >= 64 and in_flight * per_image >= defaults.GPU.max_sequences
    # Half of what is in flight is one engine call; the other half waits for the next one.
    assert flow.images_per_call * 2 <= in_flight
    assert flow.images_per_call >= min(defaults.GPU.min_images_per_call, in_flight // 2)
    assert flow.batches_in_flight <= defaults.MAX_BATCHES_IN_FLIGHT


def test_on_cpu_a_caption_actor_takes_one_batch_at_a_time_as_before():
    flow = plan_resources(config({"probes": list(default_probes())}), {"CPU": 2.0}, use_gpu=False).caption
    assert (flow.batch_size, flow.batches_in_flight, flow.images_per_call) == (8, 1, None)
    # Asked for: several batches merge on CPU too (how the feeder is measured without a GPU).
    flow = plan_resources(config(caption_batches_in_flight=4), {"CPU": 2.0}, use_gpu=False).caption
    assert (flow.batches_in_flight, flow.images_per_call) == (4, 16)


def test_the_engine_sizes_come_from_the_one_table_of_device_defaults(tmp_path, monkeypatch):
    from pipeline.config import CaptionConfig
    from pipeline.models.registry import build_captioner, resolve_captioner
    from tests.fixtures.moondream_cache import local_moondream_dir

    model = local_moondream_dir(tmp_path / "md")
    monkeypatch.setattr(defaults, "CPU", defaults.DeviceDefaults(max_sequences=7, vision_batch_crops=3,
                                                                  fill_engine=False, min_images_per_call=1,
                                                                  harvest_every=2))
    engine = build_captioner(resolve_captioner(str(model)), CaptionConfig(), "cpu").engine
    assert (engine.max_sequences, engine.vision_batch_crops, engine.harvest_every) == (7, 3, 2)
    engine = build_captioner(resolve_captioner(str(model)), CaptionConfig(max_sequences=5), "cpu").engine
    assert engine.max_sequences == 5  # the config, when it says


@pytest.fixture(scope="module")
def four_gpu_ray(tmp_path_factory, starts_ray):
    """A Ray whose node declares 4 GPUs it does not have; its workers know the device-recording doubles."""
    from tests import fault_doubles
    from tests.fixtures.ray import own_ray

    fault_dir = tmp_path_factory.mktemp("devices")
    with pytest.MonkeyPatch.context() as patch:
        fault_doubles.register_in_this_process(patch, ocr_recording=True)
        with own_ray(num_gpus=4, runtime_env={
            "worker_process_setup_hook": "tests.fault_doubles.register_with_ocr_recording",
            "env_vars": {fault_doubles.FAULT_DIR_ENV: str(fault_dir), "PYTHONPATH": REPO},
        }):  # fmt: skip
            yield fault_dir


def test_four_declared_gpus_get_four_caption_actors_each_on_its_own_card(four_gpu_ray, tmp_path, monkeypatch):
    import ray.data

    from jobs.caption_job import run_job
    from jobs.ray_plan import current_plan
    from tests.fixtures.images import make_jpegs
    from tests.fixtures.moondream_cache import local_moondream_dir

    make_jpegs(tmp_path / "photos", 8, size=(64, 48))
    run = RunConfig.from_dict({
        "source": str(tmp_path / "photos"), "output": str(tmp_path / "out.parquet"), "device": "auto",
        "caption": {"model": f"device_recording:{local_moondream_dir(tmp_path / 'md')}", "probes": ["Is it red?"],
                    "max_new_tokens": 2, "answer_max_new_tokens": 2, "max_crops": 1, "batch_size": 2},
        "embed": {"enabled": False},
        "ray": {"decode_batch_size": 2},  # a block for each actor
    })  # fmt: skip
    assert current_plan(run).caption_actors == 4  # auto: the cluster has GPUs, so the plan is for CUDA
    # Every actor up before the first batch, so that each one records its card.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)

    summary = run_job(run, progress=False, echo=lambda message: None)

    assert summary.ok == summary.listed == 8
    uris = pq.read_table(tmp_path / "out.parquet", columns=["uri"]).column("uri").to_pylist()
    assert len(set(uris)) == len(uris) == 8  # one row per input
    records = [json.loads(path.read_text()) for path in (four_gpu_ray / "devices").glob("*.json")]
    assert sorted(r["gpu_ids"] for r in records) == [["0"], ["1"], ["2"], ["3"]]
    assert all(r["cuda_visible"] == r["gpu_ids"][0] for r in records)  # what torch would see as cuda:0
    calls = [int(line) for line in (four_gpu_ray / "calls").read_text().split()]
    assert sum(calls) == 8  # every image through an engine call once, from its crops made in the decode stage


def test_four_declared_gpus_with_onnxruntime_gpu_get_an_ocr_and_a_caption_actor_on_each_card(
    four_gpu_ray, tmp_path, monkeypatch
):
    import shutil

    import ray.data

    from jobs.caption_job import run_job
    from jobs.ray_plan import current_plan
    from pipeline.ocr import reader
    from tests.fixtures.images import make_jpegs
    from tests.fixtures.moondream_cache import local_moondream_dir

    for name in ("devices", "ocr_devices"):  # the module's other run wrote its own records
        shutil.rmtree(four_gpu_ray / name, ignore_errors=True)
    # The driver asks for the provider (jobs/ray_plan.py ocr_device); its answer is onnxruntime-gpu's.
    monkeypatch.setattr(reader, "cuda_provider_available", lambda: True)
    make_jpegs(tmp_path / "photos", 8, size=(64, 48))
    run = RunConfig.from_dict({
        "source": str(tmp_path / "photos"), "output": str(tmp_path / "out.parquet"), "device": "auto",
        "caption": {"model": f"device_recording:{local_moondream_dir(tmp_path / 'md')}", "probes": [],
                    "max_new_tokens": 2, "max_crops": 1, "batch_size": 2},
        "embed": {"enabled": False}, "ocr": {"enabled": True, "batch_size": 2},
        "ray": {"decode_batch_size": 2},
    })  # fmt: skip
    plan = current_plan(run)
    assert (plan.ocr_actors, plan.ocr_device, plan.caption_actors) == (4, "cuda", 4)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)

    summary = run_job(run, progress=False, echo=lambda message: None)

    assert summary.ok == summary.listed == 8
    rows = pq.read_table(tmp_path / "out.parquet", columns=["uri", "text", "ocr_model"]).to_pylist()
    assert len({r["uri"] for r in rows}) == 8 and all(r["text"] is not None for r in rows)
    assert {r["ocr_model"] for r in rows} == {"rapidocr-onnxruntime"}  # the model files' identity, any device
    for name in ("ocr_devices", "devices"):  # OCR actors started first, then the caption actors beside them
        records = [json.loads(path.read_text()) for path in (four_gpu_ray / name).glob("*.json")]
        assert sorted(r["gpu_ids"] for r in records) == [["0"], ["1"], ["2"], ["3"]], name
        assert all(r["cuda_visible"] == r["gpu_ids"][0] for r in records)
    ocr_records = [json.loads(path.read_text()) for path in (four_gpu_ray / "ocr_devices").glob("*.json")]
    assert {r["device"] for r in ocr_records} == {"cuda"}  # each told cuda by the plan


def test_a_worker_whose_onnxruntime_lacks_cuda_fails_the_run_at_its_ocr_actors_start_naming_the_fix(
    four_gpu_ray, tmp_path, monkeypatch
):
    """The driver has onnxruntime-gpu, the workers of the cluster do not: no silent CPU OCR, no row of garbage."""
    from pipeline.ocr import reader
    from tests import fault_doubles
    from tests.cli import run_cli
    from tests.fixtures.images import make_jpegs

    monkeypatch.setattr(reader, "cuda_provider_available", lambda: True)  # the driver's answer only
    make_jpegs(tmp_path / "photos", 2, size=(64, 48))
    real_device = four_gpu_ray / fault_doubles.REAL_OCR_DEVICE
    real_device.touch()
    try:
        result = run_cli(tmp_path / "photos", "--out", tmp_path / "out.parquet", "--ocr", "--no-caption",
                         "--no-probes", "--no-embed", expect_exit=1)  # fmt: skip
    finally:
        real_device.unlink()
    # click's one-line error, unwrapped from Ray's (pipeline/cli.py); Ray's own log lines may come after it.
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert error.startswith("Error: OCR on CUDA was asked for, but this worker's onnxruntime has no CUDAExecutionProvider")
    assert "pip install onnxruntime-gpu" in error and "--ocr-device cpu" in error
    assert not (tmp_path / "out.parquet").exists()
