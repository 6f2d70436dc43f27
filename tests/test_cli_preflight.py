"""`captioner run` checks the cheap things first and reports every missing piece at once, before Ray.

Offline, with an empty HF cache, and any attempt to start Ray failing the test.
"""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.models.moondream.hub import MOONDREAM_REPO, MOONDREAM_REVISION
from tests.fixtures.hf_cache import use_hf_cache
from tests.fixtures.images import make_jpegs

SO400M_REPO = "timm/ViT-SO400M-14-SigLIP-384"


def run_fails(tmp_path, *args) -> str:
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["run", *map(str, args), "--out", str(out), "--no-progress"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert not out.exists()
    return result.output


def test_a_missing_folder_and_both_missing_models_are_reported_together(hf_cache, no_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    out = run_fails(tmp_path, "./photos")
    elapsed = time.monotonic() - started
    assert "photos does not exist" in out
    assert f"hf download {MOONDREAM_REPO} --revision {MOONDREAM_REVISION}" in out
    assert f"hf download {SO400M_REPO}" in out
    # the folder is the cheapest check and comes first
    assert out.index("photos does not exist") < out.index(MOONDREAM_REPO) < out.index(SO400M_REPO)
    assert elapsed < 30, elapsed


def test_cuda_without_a_gpu_says_so_before_ray(hf_cache, no_ray, tmp_path, tiny_clip_dir, monkeypatch):
    import pipeline.preflight

    monkeypatch.setattr(pipeline.preflight, "local_gpu_count", lambda: 0)  # as on a machine without one
    make_jpegs(tmp_path / "photos", 1)
    out = run_fails(tmp_path, tmp_path / "photos", "--device", "cuda", "--no-caption", "--no-probes",
                    "--embed-model", f"open_clip:{tiny_clip_dir}")
    assert "--device cuda" in out and "no GPU" in out and "--device cpu" in out
    assert "share" not in out  # not the resource-plan advice about GPU shares


def test_ocr_on_cuda_without_onnxruntime_gpu_names_the_fix_before_ray(hf_cache, no_ray, tmp_path, monkeypatch):
    from pipeline.ocr import reader

    pytest.importorskip("rapidocr_onnxruntime")
    monkeypatch.setattr(reader, "cuda_provider_available", lambda: False)  # the CPU build, as installed here
    make_jpegs(tmp_path / "photos", 1)
    out = run_fails(tmp_path, tmp_path / "photos", "--ocr", "--ocr-device", "cuda", "--no-caption", "--no-probes",
                    "--no-embed")
    assert "--ocr-device cuda" in out and "CUDAExecutionProvider" in out
    assert "pip install onnxruntime-gpu" in out and "--ocr-device cpu" in out


def test_ocr_on_cuda_with_the_provider_but_no_local_gpu_says_so(monkeypatch):
    import pipeline.preflight
    from pipeline.config import RunConfig
    from pipeline.ocr import reader
    from pipeline.preflight import ocr_device_problem

    monkeypatch.setattr(pipeline.preflight, "local_gpu_count", lambda: 0)
    monkeypatch.setattr(reader, "cuda_provider_available", lambda: True)

    def problem(ocr, address=None):
        return ocr_device_problem(RunConfig.from_dict({"source": "/p", "output": "/o.parquet", "ocr": ocr,
                                                       "ray": {"address": address}}))  # fmt: skip

    assert "--ocr-device cuda: no GPU" in problem({"enabled": True, "device": "cuda"})
    assert problem({"enabled": True, "device": "cuda"}, address="10.0.0.5:6379") is None  # the cluster's to count
    assert problem({"enabled": True, "device": "auto"}) is None  # auto picks CPU there
    assert problem({"enabled": False, "device": "cuda"}) is None


def test_cuda_on_a_remote_cluster_is_left_to_the_cluster(monkeypatch):
    """Without a local Ray the driver cannot count a cluster's GPUs; --address skips the local check."""
    from pipeline.preflight import device_problem

    import pipeline.preflight

    monkeypatch.setattr(pipeline.preflight, "local_gpu_count", lambda: 0)
    assert device_problem("cuda", "10.0.0.5:6379") is None
    assert device_problem("cpu", None) is None and device_problem("auto", None) is None
    assert "no GPU" in device_problem("cuda", None)


def test_an_unreachable_hub_is_waited_for_once_per_run(tmp_path, monkeypatch):
    """Offline flag unset but no network: the first timeout is remembered, the next model does not wait again."""
    import huggingface_hub
    import requests

    import pipeline.models.hf_cache
    from pipeline.preflight import PreflightFailed, preflight
    from pipeline.config import RunConfig

    use_hf_cache(monkeypatch, tmp_path / "hf", offline=False)
    monkeypatch.setattr(pipeline.models.hf_cache, "_unreachable", None)
    asked = []

    def unreachable(repo_id, **kwargs):
        asked.append(repo_id)
        raise requests.exceptions.ConnectTimeout(f"timed out reaching huggingface.co for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    make_jpegs(tmp_path / "photos", 1)
    config = RunConfig.from_dict({
        "source": str(tmp_path / "photos"), "output": str(tmp_path / "out.parquet"),
        "caption": {"model": "transformers:org/caption-test"}, "embed": {"model": "open_clip:hf-hub:org/clip-test"},
    })
    with pytest.raises(PreflightFailed) as caught:
        preflight(config)
    assert "org/caption-test" in str(caught.value) and "org/clip-test" in str(caught.value)
    assert str(caught.value).count("ConnectTimeout") == 2 and len(asked) == 1
