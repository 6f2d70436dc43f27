"""Where the Hugging Face cache is, and whether the hub may be asked, read at call time.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE once, when it is
first imported. A worker, a test or a long-lived process that sets them later
would otherwise look in the wrong cache; everything in captioner that looks
up the cache asks these two functions and passes ``cache_dir`` explicitly.
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub saw it at its import."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False


def hf_hub_cache() -> str:
    """The hub cache folder huggingface_hub would use if it were imported now."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


# Once the hub did not answer, it is not asked again for a while: a driver
# checking two models waits for one timeout, not one per question.
HUB_TIMEOUT_S = 10
_UNREACHABLE_FOR_S = 60.0
_unreachable: tuple[float, BaseException] | None = None


def hub_model_info(repo_id: str, revision: str | None = None):
    """``huggingface_hub.model_info`` with a timeout; raises at once while the hub was recently unreachable."""
    global _unreachable
    import time

    if _unreachable is not None and time.monotonic() - _unreachable[0] < _UNREACHABLE_FOR_S:
        raise _unreachable[1]
    from huggingface_hub import model_info

    try:
        return model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as exc:
        if _is_network_failure(exc):
            _unreachable = (time.monotonic(), exc)
        raise


def _is_network_failure(exc: BaseException) -> bool:
    """A connection or timeout failure (the hub did not answer), not an answer about one repo."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "ConnectError", "Timeout", "TimeoutError", "ConnectTimeout", "ReadTimeout",
                         "TimeoutException"})
