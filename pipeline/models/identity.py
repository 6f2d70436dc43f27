"""Model identity, decided in one place.

``model_identity(spec, kind)`` answers "which weights does this spec mean?"
on the driver, without loading them. Everything that records or compares a
model asks it: the run stamps rows with it (``identity_for_run``), resume and
the index compare the stamped strings, the backends report it as their
``model_id``/``revision``, and search compares the index's stamp with the
answer for the query embedder.

What is stored:

  ``model``     a stable string, the same for every spelling of one model:
                  hub      BACKEND:REPO@REV          (moondream2:vikhyatk/moondream2@2025-06-21)
                  open_clip open_clip:NAME@TAG       (the default tag filled in for a bare NAME)
                           open_clip:hf-hub:REPO@REV (REV defaults to main)
                  local    BACKEND:local, or open_clip:NAME@local for a checkpoint file
  ``revision``  hub: the commit the revision resolves to in the HF cache (or
                on the hub when it is reachable), else the revision/tag asked;
                local: ``sha256:...``, a fingerprint of the weight files' content.

A local model is named by content, never by path: moving or copying the
directory keeps its identity (so an output resumes), and changing the
weights in place changes it (so it does not).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.models.hf_cache import hf_hub_cache, hub_offline
from pipeline.config import ConfigError
from pipeline.models.registry import ModelRef, UnknownModel, resolve_captioner, resolve_embedder

CAPTION = "caption"
EMBED = "embed"
LOCAL = "local"
# Backends whose non-local specs are Hugging Face repos loaded through from_pretrained.
_HUB_BACKENDS = ("moondream2", "transformers")

# open_clip file names (open_clip.constants): weights as safetensors or a
# pickle, and the config of an hf-hub / local-dir model.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class WeightsMissing(ConfigError):
    """A model's weights are not where its spec says; the message names the fix."""


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is (compared) and how to load it (not compared)."""

    kind: str  # "caption" | "embed"
    backend: str  # registry backend name
    model: str  # stored in caption_model / embed_model
    revision: str  # stored in caption_revision / embed_revision
    # -- how to load it; two spellings of one model differ here and only here --
    ref: ModelRef = field(compare=False)
    hub_repo: str | None = field(default=None, compare=False)  # HF repo holding the weights
    hub_revision: str | None = field(default=None, compare=False)  # revision asked of hub_repo
    open_clip_name: str | None = field(default=None, compare=False)  # name for open_clip.create_model
    pretrained: str | None = field(default=None, compare=False)  # open_clip tag or checkpoint file
    hub_files: tuple[str, ...] = field(default=(), compare=False)  # weight files open_clip fetches, in preference order

    @property
    def is_local(self) -> bool:
        return self.revision.startswith("sha256:")

    @property
    def resolved(self) -> bool:
        """False for a backend registered from outside (plug-in, test double): its spec is all that is known."""
        return self.backend == "open_clip" or self.backend in _HUB_BACKENDS

    def describe(self) -> str:
        return f"{self.model} (revision {self.revision})"


def model_identity(spec: str | ModelRef, kind: str | None = None) -> ModelIdentity:
    """Resolve a model spec (or an already resolved ModelRef) to its identity, without loading weights.

    ``kind`` is "caption" or "embed"; it is needed for a spec string and
    implied by a ModelRef's backend. Raises ConfigError (UnknownModel,
    WeightsMissing) for a spec that names nothing usable.
    """
    ref = _ref(spec, kind)
    if ref.backend == "open_clip":
        return _open_clip_identity(ref)
    kind = kind or (EMBED if _is_embedder_backend(ref.backend) else CAPTION)
    if ref.is_local:
        return ModelIdentity(kind, ref.backend, f"{ref.backend}:{LOCAL}", content_fingerprint(Path(ref.source)), ref)
    if ref.backend not in _HUB_BACKENDS:
        # A backend registered by someone else (a plug-in, a test double): its spec is all we know.
        return ModelIdentity(kind, ref.backend, ref.spec, ref.revision or "default", ref)
    asked = ref.revision or "main"
    revision = hub_commit(ref.source, asked) or asked
    if ref.backend == "moondream2":
        revision += _moondream_tokenizer_suffix()
    return ModelIdentity(
        kind, ref.backend, f"{ref.backend}:{ref.source}@{asked}", revision, ref,
        hub_repo=ref.source, hub_revision=asked,
    )  # fmt: skip


def _moondream_tokenizer_suffix() -> str:
    """Moondream 2 reads its tokenizer from a second repo: its commit is part of what was run."""
    from pipeline.models.moondream.hub import STARMIE_REPO, STARMIE_REVISION

    return f"; tokenizer {STARMIE_REPO}@{hub_commit(STARMIE_REPO, STARMIE_REVISION) or STARMIE_REVISION}"


def identity_for_run(caption: str | ModelRef | None, embed: str | ModelRef | None, probes: Sequence[str]):
    """The RunMetadata every row of a run is stamped with (embedding_dim is filled in from the data)."""
    from pipeline.probes import probe_set_hash
    from schemas import RunMetadata

    cap = model_identity(caption, CAPTION) if caption is not None else None
    emb = model_identity(embed, EMBED) if embed is not None else None
    probes = tuple(probes)
    return RunMetadata(
        caption_model=cap.model if cap else None,
        caption_revision=cap.revision if cap else None,
        embed_model=emb.model if emb else None,
        embed_revision=emb.revision if emb else None,
        embedding_dim=None,
        probe_set_hash=probe_set_hash(probes),
        probes=probes,
    )


def is_local_model(model: str | None) -> bool:
    """Whether a stored model string names local weights (which say nothing about where they are now)."""
    return bool(model) and (model.endswith(f":{LOCAL}") or model.endswith(f"@{LOCAL}"))


# ---- resolution ---------------------------------------------------------------


def _ref(spec: str | ModelRef, kind: str | None) -> ModelRef:
    if isinstance(spec, ModelRef):
        return spec
    if kind == CAPTION:
        return resolve_captioner(spec)
    if kind == EMBED:
        return resolve_embedder(spec)
    raise ValueError(f"kind must be {CAPTION!r} or {EMBED!r} for a spec string, got {kind!r}")


def _is_embedder_backend(backend: str) -> bool:
    from pipeline.models.registry import known_embedders

    return backend in known_embedders()


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.sep in text or text.endswith(WEIGHT_SUFFIXES)


def _open_clip_identity(ref: ModelRef) -> ModelIdentity:
    if ref.is_local:
        path = Path(ref.source)
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise WeightsMissing(
                f"{path} has no {OPEN_CLIP_CONFIG}, so it is not an open_clip model directory; pass --embed-model "
                f"PATH to a directory with {OPEN_CLIP_CONFIG} and weights, or open_clip:NAME@/path/to/checkpoint"
            )
        if not any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
            # open_clip would silently build random weights from the config alone.
            raise WeightsMissing(
                f"{path} has {OPEN_CLIP_CONFIG} but no weights file ({', '.join(OPEN_CLIP_WEIGHTS)}); copy the "
                "weights next to it, or pass --embed-model PATH to a complete directory"
            )
        return ModelIdentity(EMBED, "open_clip", f"open_clip:{LOCAL}", content_fingerprint(path), ref, open_clip_name=f"local-dir:{path}")

    name, tag = ref.source, ref.revision
    if name.startswith("hf-hub:"):
        repo, asked = name[len("hf-hub:"):].strip("/"), tag or "main"
        return ModelIdentity(
            EMBED, "open_clip", f"open_clip:hf-hub:{repo}@{asked}", hub_commit(repo, asked) or asked, ref,
            hub_repo=repo, hub_revision=asked, open_clip_name=f"hf-hub:{repo}", hub_files=OPEN_CLIP_WEIGHTS,
        )  # fmt: skip
    if _looks_like_path(name):
        raise WeightsMissing(
            f"open_clip:{name}: no such directory. Pass --embed-model PATH to a directory with {OPEN_CLIP_CONFIG} "
            "and weights, or open_clip:NAME@/path/to/checkpoint"
        )
    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise UnknownModel(
            f"open_clip has no model named {name!r}; e.g. ViT-SO400M-14-SigLIP-384, ViT-B-32 "
            "(see `python -c 'import open_clip; print(open_clip.list_models())'`), or pass "
            "open_clip:NAME@/path/to/checkpoint or a local directory"
        )
    if tag and _looks_like_path(tag):
        checkpoint = Path(os.path.expanduser(tag)).resolve()
        if not checkpoint.is_file():
            raise WeightsMissing(
                f"checkpoint {tag} for open_clip:{name} does not exist; pass open_clip:{name}@/path/to/checkpoint "
                "with an existing file"
            )
        return ModelIdentity(
            EMBED, "open_clip", f"open_clip:{name}@{LOCAL}", content_fingerprint(checkpoint), ref,
            open_clip_name=name, pretrained=str(checkpoint),
        )  # fmt: skip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tag:
        if not tags:
            raise WeightsMissing(f"open_clip:{name} has no published weights; pass open_clip:{name}@/path/to/checkpoint")
        # open_clip itself has no default (pretrained=None builds random
        # weights); the first tag it lists is the one its docs lead with.
        tag = tags[0]
    tag = tag.lower().replace("-", "_")  # open_clip's own tag normalisation
    if tag not in tags:
        raise UnknownModel(f"open_clip:{name} has no pretrained tag {tag!r}; known tags: {', '.join(tags) or 'none'}")
    cfg = open_clip.get_pretrained_cfg(name, tag)
    repo, files = _hub_location(cfg.get("hf_hub") or "")
    model = f"open_clip:{name}@{tag}"
    if not repo:  # a tag served from a plain URL: open_clip's own cache, no commit to record
        return ModelIdentity(EMBED, "open_clip", model, tag, ref, open_clip_name=name, pretrained=tag)
    # open_clip downloads these tags from the repo's default branch.
    return ModelIdentity(
        EMBED, "open_clip", model, hub_commit(repo, "main") or tag, ref,
        hub_repo=repo, hub_revision="main", open_clip_name=name, pretrained=tag, hub_files=files,
    )  # fmt: skip


def _hub_location(hf_hub: str) -> tuple[str | None, tuple[str, ...]]:
    """(repo id, weight file names in open_clip's order of preference) of a pretrained cfg's ``hf_hub``.

    open_clip writes ``org/name/`` for the default file names and
    ``org/name/file.bin`` for one file, and tries a .safetensors twin first.
    """
    if not hf_hub:
        return None, ()
    repo, filename = os.path.split(hf_hub)
    if not filename:
        return repo, OPEN_CLIP_WEIGHTS
    if filename.endswith((".bin", ".pth")):
        return repo, (filename[:-4] + ".safetensors", filename)
    return repo, (filename,)


def _open_clip():
    from pipeline.models.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    return open_clip


# ---- the HF cache -------------------------------------------------------------------


def cached_snapshot(repo_id: str, revision: str) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in the HF cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=hf_hub_cache()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def hub_commit(repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` resolves to: from the HF cache, else from the hub when it is reachable."""
    if _COMMIT.fullmatch(revision):
        return revision
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None:
        return snapshot.name
    if hub_offline():
        return None
    try:
        from pipeline.models.hf_cache import hub_model_info

        return hub_model_info(repo_id, revision).sha
    except Exception:  # noqa: BLE001 - unreachable, unknown or gated: no commit to record
        return None


# ---- content fingerprint ------------------------------------------------------------

# Files up to this size are hashed whole (configs, tokenizers, tiny models).
_WHOLE_FILE_LIMIT = 8 << 20
_EDGE = 1 << 20  # bytes hashed at each end of a large file
_SAMPLES = 32  # evenly spaced blocks hashed in between
_SAMPLE = 64 << 10


def content_fingerprint(path: Path) -> str:
    """``sha256:<hex>`` over a model file or directory's content; its location plays no part.

    Why not a full hash: weights are gigabytes, and the fingerprint is taken
    on every run and every search start; hashing 4 GB costs seconds. Each
    large file contributes its size, its first and last MiB (a safetensors
    header lists every tensor's name, shape and offset) and 32 blocks spread
    over the rest. A retrained or fine-tuned model changes nearly every
    tensor, so it changes the fingerprint; only an edit of a few bytes that
    keeps the size and misses every sampled block would go unnoticed.
    Directory entries are named relative to the directory; hidden entries
    (``.cache`` of ``hf download --local-dir``, ``.git``) and ``__pycache__``
    are skipped. A single file is named by content alone, so renaming it
    keeps its identity.
    """
    path = Path(os.path.expanduser(str(path))).resolve()
    digest = hashlib.sha256()
    if path.is_file():
        files = [(path, "")]
    elif path.is_dir():
        files = [(p, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*")) if _counts(p, path)]
    else:
        raise WeightsMissing(f"{path} does not exist")
    for file, name in files:
        size = file.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        digest.update(_file_digest(file, size))
    return "sha256:" + digest.hexdigest()[:32]


def _counts(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in parts)


def _file_digest(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.digest()
        h.update(f.read(_EDGE))
        step = (size - 2 * _EDGE) // (_SAMPLES + 1)
        for n in range(1, _SAMPLES + 1):
            f.seek(_EDGE + n * step)
            h.update(f.read(_SAMPLE))
        f.seek(size - _EDGE)
        h.update(f.read(_EDGE))
    return h.digest()
