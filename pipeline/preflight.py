"""Checks run on the driver before Ray starts, so a doomed run fails in seconds.

The expensive failure mode is a run that starts Ray, spins up actors, and only
then learns from a worker that the weights are not on this machine. Here we
ask the Hugging Face cache (honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE)
whether the weights are already present, and when they are not and the hub is
switched off, we say how to fix it.
"""

from __future__ import annotations

import os

from pipeline.config import ConfigError
from pipeline.models.registry import ModelRef


class WeightsMissing(ConfigError):
    pass


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hf_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False


def _hub_unreachable_reason(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import model_info

    try:
        model_info(repo_id, revision=revision, timeout=10)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot download from here"
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def check_caption_weights(ref: ModelRef) -> None:
    """Raise WeightsMissing when the caption model's weights can be neither found nor downloaded."""
    if ref.is_local or _in_hf_cache(ref.source, ref.revision):
        return
    why = "HF_HUB_OFFLINE is set" if hub_offline() else _hub_unreachable_reason(ref.source, ref.revision)
    if why is None:
        return  # the workers will download them
    rev = f" --revision {ref.revision}" if ref.revision else ""
    raise WeightsMissing(
        f"caption model weights {ref.source}@{ref.revision or 'main'} are not in the Hugging Face cache "
        f"and cannot be downloaded ({why}). Pass --caption-model PATH to a local model directory, "
        f"or on a connected machine run `huggingface-cli download {ref.source}{rev}` and copy the cache "
        f"(HF_HOME) here."
    )
