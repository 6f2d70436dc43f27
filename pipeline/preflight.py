"""Checks run on the driver before Ray starts, so a doomed run fails in seconds.

The expensive failure mode is a run that starts Ray, spins up actors, and only
then learns from a worker that the weights are not on this machine. Here we
ask the Hugging Face cache (honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE)
whether the weights are already present, and when they are not and the hub is
switched off or unreachable, we say how to fix it. Which files a model needs
comes from pipeline.models.identity, the same answer the backends load.

Local weights (a directory, a checkpoint file) are checked by
``model_identity`` itself: it cannot fingerprint what is not there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pipeline.config import ConfigError
from pipeline.models.identity import (
    CAPTION,
    EMBED,
    OPEN_CLIP_CONFIG,
    WeightsMissing,
    cached_snapshot,
    hub_offline,
    model_identity,
)
from pipeline.models.registry import ModelRef

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = [
    "PreflightFailed", "WeightsMissing", "check_weights", "check_caption_weights", "check_embed_weights",
    "device_problem", "hub_offline", "ocr_device_problem", "preflight",
]


class PreflightFailed(ConfigError):
    """The run cannot start; the message lists every problem found and each one's fix."""


def preflight(config: "RunConfig") -> None:
    """Every check that needs no Ray, cheapest first; raise one PreflightFailed listing all problems.

    The source folder and the device are checked before the weights (which
    import the model libraries and may ask the hub), and every problem is
    reported at once: a user with a missing folder and two missing models
    learns all three from one try.
    """
    problems = [p for p in (source_problem(config.source), device_problem(config.device, config.ray.address),
                            ocr_device_problem(config)) if p]
    for check, ref in (
        (check_caption_weights, config.caption.model if config.caption.runs_model else None),
        (check_embed_weights, config.embed.model if config.embed.enabled else None),
    ):
        if ref is not None:
            problems.append(_weights_problem(check, ref))
    if config.ocr.enabled:
        problems.append(_weights_problem(check_ocr_engine, config.ocr.engine))
    problems = [p for p in problems if p]
    if len(problems) == 1:
        raise PreflightFailed(problems[0])
    if problems:
        raise PreflightFailed(
            f"this run cannot start; fix these {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _weights_problem(check, ref) -> str | None:
    try:
        check(ref)
    except ConfigError as exc:  # WeightsMissing, or a spec model_identity cannot resolve
        return str(exc)
    return None


def check_ocr_engine(engine: str) -> None:
    """The OCR engine is installed with its model files (it ships them: nothing to download)."""
    from pipeline.ocr import ocr_identity

    ocr_identity(engine)


def ocr_device_problem(config: "RunConfig") -> str | None:
    """--ocr-device cuda where it cannot work: onnxruntime without CUDA here, or a local run without a GPU.

    The provider is asked of the driver's onnxruntime (why that is enough:
    jobs/ray_plan.py ocr_device); auto needs no check, it picks CPU then.
    """
    if not config.ocr.enabled or config.ocr.device != "cuda":
        return None
    from pipeline.ocr import reader

    if not reader.cuda_provider_available():
        return (
            f"--ocr-device cuda: the installed onnxruntime has no {reader.CUDA_PROVIDER} (it is the CPU build): "
            f"{reader.OCR_CUDA_FIX}, or --ocr-device auto to use a GPU only when it can"
        )
    return device_problem("cuda", config.ray.address, flag="--ocr-device")


def source_problem(source: str) -> str | None:
    """A local SOURCE that does not exist (bucket URLs are listed later, by pipeline.sources)."""
    from pipeline.storage import is_local, local_path

    if not is_local(source) or os.path.exists(local_path(source)):
        return None
    return f"source {source} does not exist; check the path (relative paths are from {os.getcwd()})"


def device_problem(device: str, address: str | None, flag: str = "--device") -> str | None:
    """``flag`` (--device) cuda on a local run where this machine has no GPU; None when fine or not knowable here.

    A run on a cluster (--address, RAY_ADDRESS) uses the cluster's GPUs,
    which Ray counts once it connects, so only a local run is checked.
    """
    if device != "cuda" or address or os.environ.get("RAY_ADDRESS"):
        return None
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else local_gpu_count()
    if gpus > 0:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f" (CUDA_VISIBLE_DEVICES={visible!r} hides them)" if visible is not None else ""
    return (
        f"{flag} cuda: no GPU was found on this machine{hidden}. Pass {flag} cpu to run on the CPU, "
        f"{flag} auto to use a GPU only when there is one, or --address HOST:PORT of a Ray cluster with GPUs"
    )


def local_gpu_count() -> int:
    """GPUs a local Ray would see on this machine, counted as Ray counts them (no torch import)."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager

        return int(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators())
    except Exception:  # noqa: BLE001 - Ray's internals moved: ask torch instead
        try:
            import torch

            return torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            return 0

_COPY_CACHE = "and copy the cache (HF_HOME) here"


def check_weights(caption: str | ModelRef | None, embed: str | ModelRef | None) -> None:
    """Check both models of a run (None: that model is not used). Raises WeightsMissing."""
    if caption is not None:
        check_caption_weights(caption)
    if embed is not None:
        check_embed_weights(embed)


def check_caption_weights(ref: str | ModelRef) -> None:
    """Raise WeightsMissing when the caption model's weights can be neither found nor downloaded."""
    ident = model_identity(ref, CAPTION)
    if ident.backend == "moondream2":
        # Two repos (weights and the starmie-v1 tokenizer), or a local directory: the engine's own check.
        from pipeline.models.base import ModelUnavailable
        from pipeline.models.moondream.hub import check_moondream_files

        try:
            check_moondream_files(ident.ref)
        except ModelUnavailable as exc:
            raise WeightsMissing(str(exc)) from exc
        return
    if ident.is_local or not ident.hub_repo:
        return
    if cached_snapshot(ident.hub_repo, ident.revision) is not None:
        return
    why = _cannot_download(ident.hub_repo, ident.hub_revision)
    if why is None:
        return  # the workers will download them
    raise WeightsMissing(
        f"caption model weights {ident.hub_repo}@{ident.hub_revision} are not in the Hugging Face cache and "
        f"cannot be downloaded ({why}). Pass --caption-model PATH to a local model directory, or on a connected "
        f"machine run `hf download {ident.hub_repo} --revision {ident.hub_revision}` {_COPY_CACHE}."
    )


def check_embed_weights(ref: str | ModelRef) -> None:
    """Raise WeightsMissing when the embed model's weights (and hub tokenizer) can be neither found nor downloaded."""
    ident = model_identity(ref, EMBED)
    if ident.is_local or not ident.hub_repo:
        return  # local weights were checked by model_identity; URL-only tags live in open_clip's own cache
    missing = []
    snapshot = cached_snapshot(ident.hub_repo, ident.revision)
    if snapshot is None or not any((snapshot / f).is_file() for f in ident.hub_files):
        missing.append(f"{' or '.join(ident.hub_files)} of {ident.hub_repo}")
    if ident.open_clip_name and ident.open_clip_name.startswith("hf-hub:"):
        if snapshot is None or not (snapshot / OPEN_CLIP_CONFIG).is_file():
            missing.append(f"{OPEN_CLIP_CONFIG} of {ident.hub_repo}")
    repos = [ident.hub_repo]
    tokenizer = _tokenizer_repo(ident)
    if tokenizer and cached_snapshot(tokenizer, "main") is None:
        missing.append(f"the tokenizer {tokenizer}")
        repos.append(tokenizer)
    if not missing:
        return
    why = _cannot_download(ident.hub_repo, ident.hub_revision)
    if why is None:
        return  # the workers will download them
    commands = " and ".join(f"`hf download {repo}`" for repo in dict.fromkeys(repos))
    raise WeightsMissing(
        f"embed model {ident.model} needs {'; '.join(missing)}, which the Hugging Face cache does not hold and "
        f"which cannot be downloaded ({why}). Pass --embed-model PATH to a local open_clip directory (open_clip_config.json + weights) or "
        f"open_clip:NAME@/path/to/checkpoint, or on a connected machine run {commands} {_COPY_CACHE}."
    )


def _tokenizer_repo(ident) -> str | None:
    """The hub repo of a built-in architecture's HF tokenizer (SigLIP models have one), if any."""
    if not ident.open_clip_name or ident.open_clip_name.startswith(("hf-hub:", "local-dir:")):
        return None
    from open_clip.factory import get_model_config  # imported already by model_identity

    config = get_model_config(ident.open_clip_name) or {}
    return (config.get("text_cfg") or {}).get("hf_tokenizer_name") or None


def _cannot_download(repo_id: str, revision: str | None) -> str | None:
    """Why ``repo_id`` cannot be downloaded from here, or None when it can."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    from pipeline.models.hf_cache import hub_model_info

    try:
        hub_model_info(repo_id, revision)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot download from here"
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
