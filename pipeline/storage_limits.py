"""How long a storage call may take, and how often it is tried: the one deadline policy of pipeline.storage.

A bucket that stops answering must fail a run in bounded time, not hang it.
Every filesystem pipeline.storage opens on a remote store gets, unless the
user's --storage-option says otherwise:

- a deadline per request: ``timeout_s`` seconds to connect, and the same
  again without a byte of the answer (a large object that keeps arriving is
  never cut off);
- bounded attempts: ``attempts`` tries per call, with botocore's standard
  backoff (random, exponential, capped) in between, and no second retry loop
  on top (s3fs's own ``retries``).

``timeout_s`` and ``attempts`` are captioner's own storage options
(``--storage-option timeout_s=5 --storage-option attempts=2``); they are
read here and never passed to a backend. The README, the progress bar and
the error messages all quote :func:`describe` / :func:`waited_for_s`, so
the bound they state is the one that applies. The local filesystem has no
deadline: a local disk does not stall the way a network does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Seconds a request waits to connect, and then for each piece of the answer.
DEFAULT_TIMEOUT_S = 10.0
#: Tries per storage call (the first one included).
DEFAULT_ATTEMPTS = 3
#: botocore's standard retry mode sleeps a random time below 2**retry seconds, at most this long.
_MAX_BACKOFF_S = 20.0

TIMEOUT_OPTION = "timeout_s"
ATTEMPTS_OPTION = "attempts"
OWN_OPTIONS = (TIMEOUT_OPTION, ATTEMPTS_OPTION)


class LimitError(ValueError):
    """A ``timeout_s`` / ``attempts`` storage option that is not a positive number."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS

    @property
    def waited_for_s(self) -> float:
        """The longest one storage call can take before it fails: every attempt's connect and
        answer deadlines, plus the longest backoff between attempts."""
        backoff = sum(min(2.0**retry, _MAX_BACKOFF_S) for retry in range(self.attempts - 1))
        return self.attempts * 2 * self.timeout_s + backoff

    def describe(self) -> str:
        """The bound in words, as the README, the progress bar and errors state it."""
        tries = "once" if self.attempts == 1 else f"{self.attempts} times"
        return (
            f"each storage request times out after {_seconds(self.timeout_s)} s without an answer and is tried {tries}, "
            f"so a call fails after at most {_seconds(self.waited_for_s)} s"
        )


def _seconds(value: float) -> str:
    return f"{value:g}"


def limits_of(storage_options: dict[str, Any] | None) -> Limits:
    """The limits ``storage_options`` ask for (captioner's own keys), the defaults otherwise."""
    options = storage_options or {}
    timeout = _number(options, TIMEOUT_OPTION, float, DEFAULT_TIMEOUT_S)
    attempts = _number(options, ATTEMPTS_OPTION, int, DEFAULT_ATTEMPTS)
    return Limits(timeout_s=timeout, attempts=attempts)


def _number(options: dict, key: str, kind: type, default):
    if key not in options:
        return default
    raw = options[key]
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value <= 0:
        example = "10" if kind is float else "3"
        raise LimitError(f"--storage-option {key}={raw} is not a positive {'number' if kind is float else 'whole number'}; "
                         f"e.g. --storage-option {key}={example}")
    return value


def backend_options(protocol: str, storage_options: dict[str, Any] | None) -> tuple[dict[str, Any], Limits]:
    """The options to open a ``protocol`` filesystem with: the user's, without captioner's own keys,
    plus the deadline and attempts for the backends that take them; and the limits applied."""
    limits = limits_of(storage_options)
    options = {k: v for k, v in (storage_options or {}).items() if k not in OWN_OPTIONS}
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", limits.timeout_s)
        config.setdefault("read_timeout", limits.timeout_s)
        config.setdefault("retries", {"max_attempts": limits.attempts, "mode": "standard"})
        options["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        # gcsfs: requests_timeout is its per-request deadline; it retries a fixed, small number of times itself.
        options.setdefault("requests_timeout", limits.timeout_s)
    return options, limits


def bound_backend_retries(fs, limits: Limits) -> None:
    """Leave the attempts to botocore's bounded, backed-off loop: s3fs would otherwise retry
    every timed-out call 5 more times around it (5 x 5 attempts of a stalled read)."""
    if type(fs).__name__ == "S3FileSystem":
        fs.retries = 1
