"""Moondream 2's hub identity, and where its files come from: the HF cache/hub, or a local directory.

Two hub repos make up the model, both pinned here (the one place that names them; pipeline.config
asks this module for the default spec's revision):
- ``vikhyatk/moondream2`` at a pinned revision (tag ``2025-06-21``): model.safetensors, config.json;
- ``moondream/starmie-v1``: tokenizer.json (the reference loads its tokenizer from there, not from
  moondream2, whose tokenizer files are a stale legacy set). Pinned to the commit that public
  projects pinning this release record (``STARMIE_REVISION``); not verifiable offline here.

Nothing here imports torch, so the driver can call ``check_moondream_files`` before Ray starts, nor
pipeline.config or the registry at import time, so pipeline.config can import the identity.
The cache location and offline switch are read from the environment at call time (HF_HUB_CACHE,
HF_HOME, XDG_CACHE_HOME, HF_HUB_OFFLINE), so workers and tests that set them late are honoured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.models.base import ModelUnavailable
from pipeline.models.hf_cache import hf_hub_cache, hub_offline

if TYPE_CHECKING:  # the registry imports pipeline.config, which imports this module
    from pipeline.models.registry import ModelRef

# The pinned Moondream 2 release: hub tags of vikhyatk/moondream2 are dates.
MOONDREAM_REPO = "vikhyatk/moondream2"
MOONDREAM_REVISION = "2025-06-21"
STARMIE_REPO = "moondream/starmie-v1"
STARMIE_REVISION = "35192e10a54e36eabe0a7cc57a2c1aab371cafc5"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class MoondreamFiles:
    weights: Path
    config: Path | None
    tokenizer: Path
    model_revision: str  # resolved commit of vikhyatk/moondream2, or "local"
    tokenizer_revision: str  # resolved commit of moondream/starmie-v1, or "local"


def download_command(repo: str, revision: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def download_commands(ref: ModelRef) -> list[str]:
    """The commands that put every hub file this model needs into the HF cache."""
    commands = [] if ref.is_local else [download_command(ref.source, ref.revision or MOONDREAM_REVISION)]
    return commands + [download_command(STARMIE_REPO, STARMIE_REVISION)]


def _commit_of(path: str) -> str:
    """A cached file lives at .../snapshots/<commit>/<file>; the folder name is the commit."""
    parent = Path(path).parent
    return parent.name if parent.parent.name == "snapshots" else "unknown"


def _cached(repo: str, filename: str, revision: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision, cache_dir=hf_hub_cache())
    return found if isinstance(found, str) else None


def _download(repo: str, filename: str, revision: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=revision, cache_dir=hf_hub_cache(),
                           local_files_only=hub_offline())


def _missing(ref: ModelRef, what: str, exc: Exception | None = None) -> ModelUnavailable:
    cause = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if exc else ""
    commands = " and ".join(f"`{c}`" for c in download_commands(ref))
    where = (f"{ref.source} must hold {WEIGHTS_FILE} (+ optional {CONFIG_FILE}) and the starmie-v1 "
             f"{TOKENIZER_FILE}, or the tokenizer must be in the HF cache" if ref.is_local
             else f"the HF cache ({hf_hub_cache()})")
    return ModelUnavailable(
        f"caption model {ref.spec}: {what} is not available in {where}{cause}"
        + (" and HF_HUB_OFFLINE is set" if hub_offline() and not ref.is_local else "")
        + f". On a connected machine run {commands} and copy the HF cache (HF_HOME) here, "
        "or pass --caption-model PATH to a directory holding model.safetensors, config.json and tokenizer.json."
    )


def _local_tokenizer(directory: Path) -> Path | None:
    """tokenizer.json of a local directory, if it is starmie-v1's (an official moondream2 snapshot
    also has a tokenizer.json, the legacy one, which must not be used)."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    from pipeline.models.moondream.tokenizer import is_starmie

    try:
        return path if is_starmie(Tokenizer.from_file(str(path))) else None
    except Exception:  # noqa: BLE001 - unreadable: fall back to the cached starmie-v1
        return None


def _hub_tokenizer(ref: ModelRef) -> tuple[Path, str]:
    try:
        path = _download(STARMIE_REPO, TOKENIZER_FILE, STARMIE_REVISION)
    except Exception as exc:  # noqa: BLE001 - offline miss, network error, missing file: all need the same fix
        raise _missing(ref, f"{STARMIE_REPO} ({TOKENIZER_FILE} at {STARMIE_REVISION[:12]})", exc) from exc
    return Path(path), _commit_of(path)


def resolve_files(ref: ModelRef) -> MoondreamFiles:
    """Paths of the weights, config and tokenizer (downloading into the HF cache when online)."""
    if ref.is_local:
        directory = Path(ref.source)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise _missing(ref, f"{weights}")
        tokenizer = _local_tokenizer(directory)
        if tokenizer is not None:
            tokenizer_revision = "local"
        else:
            tokenizer, tokenizer_revision = _hub_tokenizer(ref)
        return MoondreamFiles(weights, config_file(ref), tokenizer, "local", tokenizer_revision)
    revision = ref.revision or MOONDREAM_REVISION
    try:
        weights = _download(ref.source, WEIGHTS_FILE, revision)
    except Exception as exc:  # noqa: BLE001
        raise _missing(ref, f"{ref.source}@{revision} ({WEIGHTS_FILE})", exc) from exc
    tokenizer, tokenizer_revision = _hub_tokenizer(ref)
    return MoondreamFiles(Path(weights), config_file(ref), tokenizer, _commit_of(weights), tokenizer_revision)


def config_file(ref: ModelRef) -> Path | None:
    """The checkpoint's config.json (sizes and crop geometry), or None where it has none: the official
    sizes apply. Only this small file is fetched, so the CPU preprocess stage can read the geometry."""
    if ref.is_local:
        path = Path(ref.source) / CONFIG_FILE
        return path if path.is_file() else None
    try:
        return Path(_download(ref.source, CONFIG_FILE, ref.revision or MOONDREAM_REVISION))
    except Exception:  # noqa: BLE001 - optional: official sizes apply
        return None


def missing_repos(ref: ModelRef) -> list[str]:
    """`hf download` commands for the repos whose files are not already on this machine (no download,
    no weights read). Empty when everything is present."""
    missing = []
    if ref.is_local:
        if not (Path(ref.source) / WEIGHTS_FILE).is_file():
            raise _missing(ref, f"{Path(ref.source) / WEIGHTS_FILE}")
        has_tokenizer = _local_tokenizer(Path(ref.source)) is not None
    else:
        revision = ref.revision or MOONDREAM_REVISION
        if _cached(ref.source, WEIGHTS_FILE, revision) is None:
            missing.append(download_command(ref.source, revision))
        has_tokenizer = False
    if not has_tokenizer and _cached(STARMIE_REPO, TOKENIZER_FILE, STARMIE_REVISION) is None:
        missing.append(download_command(STARMIE_REPO, STARMIE_REVISION))
    return missing


def check_moondream_files(ref: ModelRef) -> None:
    """Driver-side preflight: raise ModelUnavailable naming the exact `hf download` commands when
    either repo is absent from the HF cache (or the local directory is incomplete). Loads nothing."""
    missing = missing_repos(ref)
    if missing:
        raise ModelUnavailable(
            f"caption model {ref.spec} needs files that are not in the HF cache ({hf_hub_cache()})"
            + (" and HF_HUB_OFFLINE is set" if hub_offline() else "")
            + ". On a connected machine run " + " and ".join(f"`{c}`" for c in missing)
            + " and copy the HF cache (HF_HOME) here, or pass --caption-model PATH to a directory holding "
            "model.safetensors, config.json and the starmie-v1 tokenizer.json."
        )
