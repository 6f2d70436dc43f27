"""One validated config tree for a run.

Everything a run needs is a frozen dataclass, checked on the driver before Ray
starts (``RunConfig.validate``). A YAML/JSON config file gives the base values,
CLI flags override them, and the resolved tree is saved beside the output.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The pinned Moondream 2 release: hub tags of vikhyatk/moondream2 are dates.
MOONDREAM_REPO = "vikhyatk/moondream2"
MOONDREAM_REVISION = "2025-06-21"
DEFAULT_CAPTION_MODEL = f"moondream2@{MOONDREAM_REVISION}"
DEFAULT_EMBED_MODEL = "open_clip:ViT-SO400M-14-SigLIP-384"

CAPTION_LENGTHS = ("short", "normal", "long")
CAPTION_DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
)


class ConfigError(ValueError):
    """A config value is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class DecodeConfig:
    # Refuse images above this many pixels before decoding them (decompression bombs).
    max_pixels: int = 100_000_000
    # Models never need more than this; decoded images are downscaled to it so a
    # batch of 12 MP photos does not occupy gigabytes between stages.
    model_max_side: int = 1024
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    def validate(self) -> None:
        if self.max_pixels < 1:
            raise ConfigError(f"decode.max_pixels must be positive, got {self.max_pixels}")
        if self.model_max_side < 32:
            raise ConfigError(f"decode.model_max_side must be at least 32, got {self.model_max_side}")
        for ext in self.extensions:
            if not ext.startswith("."):
                raise ConfigError(f"decode.extensions entries start with '.', got {ext!r}")


@dataclass(frozen=True)
class CaptionConfig:
    enabled: bool = True
    model: str = DEFAULT_CAPTION_MODEL
    length: str = "normal"
    probes: tuple[str, ...] = ()
    batch_size: int = 8
    # None: the backend's per-length caption budget (Moondream: the reference's 768 for normal/long),
    # so captions end at end-of-sequence rather than at an arbitrary cut.
    max_new_tokens: int | None = None
    answer_max_new_tokens: int = 16
    # Moondream: local crops per image (the reference's 12) and weights dtype (auto: bf16 on GPU, fp32 on CPU).
    max_crops: int = 12
    dtype: str = "auto"

    def validate(self) -> None:
        if self.length not in CAPTION_LENGTHS:
            raise ConfigError(f"caption.length must be one of {', '.join(CAPTION_LENGTHS)}, got {self.length!r}")
        for name in ("batch_size", "answer_max_new_tokens", "max_crops"):
            if getattr(self, name) < 1:
                raise ConfigError(f"caption.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"caption.max_new_tokens must be at least 1 (or unset), got {self.max_new_tokens}")
        if self.dtype not in CAPTION_DTYPES:
            raise ConfigError(f"caption.dtype must be one of {', '.join(CAPTION_DTYPES)}, got {self.dtype!r}")
        if not self.model:
            raise ConfigError("caption.model is empty; pass --caption-model NAME or PATH")


@dataclass(frozen=True)
class EmbedConfig:
    enabled: bool = True
    model: str = DEFAULT_EMBED_MODEL
    batch_size: int = 32

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"embed.batch_size must be at least 1, got {self.batch_size}")
        if not self.model:
            raise ConfigError("embed.model is empty; pass --embed-model NAME or PATH")


@dataclass(frozen=True)
class RayConfig:
    # None: start an embedded local Ray; else the address of a running cluster.
    address: str | None = None
    caption_actors: int = 1
    embed_actors: int = 1
    # CPUs reserved per model actor when running on CPU, and per decode task.
    model_actor_cpus: float = 1.0
    decode_cpus: float = 0.5
    # GPU share per model actor when running on CUDA (caption and embed share a card).
    caption_gpus: float = 0.5
    embed_gpus: float = 0.5
    decode_batch_size: int = 16

    def validate(self) -> None:
        for name in ("caption_actors", "embed_actors", "decode_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ray.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("model_actor_cpus", "decode_cpus", "caption_gpus", "embed_gpus"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ray.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class RunConfig:
    source: str
    output: str
    device: str = "auto"
    limit: int | None = None
    overwrite: bool = False
    # Rows are committed to the output every this many images, so a crash loses
    # at most one part's worth of work.
    rows_per_part: int = 1000
    storage_options: tuple[tuple[str, str], ...] = ()
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "RunConfig":
        if not self.source:
            raise ConfigError("no source given: captioner run SOURCE --out PATH")
        if not self.output:
            raise ConfigError("no output given: pass --out captions.parquet (a file) or --out DIR/ (part files)")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.rows_per_part < 1:
            raise ConfigError(f"rows_per_part must be at least 1, got {self.rows_per_part}")
        if not self.caption.enabled and not self.embed.enabled:
            raise ConfigError("both --no-caption and --no-embed given: there would be nothing to compute")
        for part in (self.decode, self.caption, self.embed, self.ray):
            part.validate()
        return self

    @property
    def single_file(self) -> bool:
        return self.output.rstrip().lower().endswith(".parquet")

    def storage_options_dict(self) -> dict[str, str]:
        return dict(self.storage_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _build(cls, data, "config")


def _build(cls, data: Any, where: str):
    """Build a (nested) frozen dataclass from plain data, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(value, dict) and name == "storage_options":
            kwargs[name] = tuple(sorted((str(k), str(v)) for k, v in value.items()))
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted-key overrides such as ``{"caption.length": "short"}``; None values are skipped."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in nested.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **top)
