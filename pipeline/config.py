"""One validated, typed config tree for a run.

Everything a run needs is a frozen pydantic model, type-checked and
value-checked when it is built, on the driver, before Ray starts. A YAML/JSON
config file gives the base values, CLI flags override them, and the resolved
tree (absolute paths) is saved beside the output so that it reruns from any
directory.

Types are checked strictly: YAML reads ``1e8`` as a string, and a string is
not silently taken for a number; a single string is not taken for a list of
probe questions. Probe questions from any origin go through one validator
(``pipeline.probes.validate_questions``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from pipeline.models.moondream.hub import MOONDREAM_REVISION

# Pinned, so that a saved config reruns the same release; the release is hub.py's to name.
DEFAULT_CAPTION_MODEL = f"moondream2@{MOONDREAM_REVISION}"
DEFAULT_EMBED_MODEL = "open_clip:ViT-SO400M-14-SigLIP-384"

CAPTION_LENGTHS = ("short", "normal", "long")
# Two lengths from one image encoding, e.g. "short,normal": the shorter goes to ``caption_short``.
CAPTION_LENGTH_PAIRS = tuple(f"{a},{b}" for i, a in enumerate(CAPTION_LENGTHS) for b in CAPTION_LENGTHS[i + 1:])
OCR_ENGINES = ("rapidocr",)
CAPTION_DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
)

PositiveInt = Annotated[StrictInt, Field(ge=1)]


def _one_of(choices: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return AfterValidator(check)


def _model_spec(flag: str) -> AfterValidator:
    def check(value: str) -> str:
        if not value.strip():
            raise ValueError(f"is empty; pass {flag} NAME or PATH")
        return value.strip()

    return AfterValidator(check)
# Strict floats still accept ints (``model_actor_cpus: 2``), never strings.
PositiveFloat = Annotated[float, Field(gt=0, strict=True)]


class ConfigError(ValueError):
    """A config value is invalid; the message says which and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DecodeConfig(_Section):
    # Refuse images above this many pixels before decoding them (decompression bombs).
    max_pixels: PositiveInt = 100_000_000
    # Models never need more than this; decoded images are downscaled to it so a
    # batch of 12 MP photos does not occupy gigabytes between stages.
    model_max_side: Annotated[StrictInt, Field(ge=32)] = 1024
    extensions: tuple[StrictStr, ...] = IMAGE_EXTENSIONS

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ext in value:
            if not ext.startswith("."):
                raise ValueError(f"entries start with '.', got {ext!r}")
        return tuple(ext.lower() for ext in value)


class CaptionConfig(_Section):
    # Write a caption per image. Probes are asked whenever there are any, with
    # or without a caption (``--no-caption`` keeps them; ``--no-probes`` drops them).
    enabled: StrictBool = True
    model: Annotated[StrictStr, _model_spec("--caption-model")] = DEFAULT_CAPTION_MODEL
    # One length, or two ("short,normal") written in one pass that shares the image encoding.
    length: StrictStr = "normal"
    probes: tuple[StrictStr, ...] = ()
    batch_size: PositiveInt = 8
    # None: the backend's per-length caption budget (Moondream: the reference's
    # 768 for normal/long), so captions end at end-of-sequence, not at a cut.
    max_new_tokens: PositiveInt | None = None
    answer_max_new_tokens: PositiveInt = 16
    # Moondream: local crops per image (None: the checkpoint's config.json, else
    # the reference's 12) and the weights' dtype (auto: bfloat16 on a GPU,
    # float32 on CPU, where parity is checked).
    max_crops: Annotated[StrictInt, Field(ge=1, le=12)] | None = None
    dtype: Annotated[StrictStr, _one_of(CAPTION_DTYPES)] = "auto"
    # Moondream: sequences (caption + probes of all images) decoded at once; a
    # cap on the engine's per-step memory. None: the device's default
    # (pipeline/models/moondream/defaults.py: 384 on a GPU, 64 on CPU).
    max_sequences: PositiveInt | None = None
    # Moondream: torch.compile the decode step (fullgraph=True; mode="reduce-overhead", i.e. CUDA graphs,
    # on a GPU; inductor's C++ wrapper on CPU), plus the vision encoder and the image prefix prefill; the prompt prefill stays eager.
    # Slower start (a compile per suffix-length bucket), faster steady state on GPUs.
    compile: StrictBool = False

    @field_validator("probes")
    @classmethod
    def _valid_probes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from pipeline.probes import ProbeFileError, validate_questions

        try:
            return validate_questions(list(value), "caption.probes")
        except ProbeFileError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("length")
    @classmethod
    def _valid_length(cls, value: str) -> str:
        asked = [part.strip() for part in value.split(",")]
        if len(asked) > 2 or len(set(asked)) != len(asked) or not set(asked) <= set(CAPTION_LENGTHS):
            raise ValueError(
                f"must be one of {', '.join(CAPTION_LENGTHS)} or two of them, e.g. short,normal; got {value!r}"
            )
        return ",".join(sorted(asked, key=CAPTION_LENGTHS.index))

    @property
    def lengths(self) -> tuple[str, ...]:
        """The lengths asked, shortest first."""
        return tuple(self.length.split(","))

    @property
    def main_length(self) -> str:
        """The length of ``caption``: the longer when two were asked."""
        return self.lengths[-1]

    @property
    def short_length(self) -> str | None:
        """The length of ``caption_short``, or None when one length was asked."""
        return self.lengths[0] if len(self.lengths) == 2 else None

    @property
    def runs_model(self) -> bool:
        """Whether the caption model has anything to do: a caption, probes, or both."""
        return self.enabled or bool(self.probes)


class EmbedConfig(_Section):
    enabled: StrictBool = True
    model: Annotated[StrictStr, _model_spec("--embed-model")] = DEFAULT_EMBED_MODEL
    batch_size: PositiveInt = 32


class OcrConfig(_Section):
    # Off by default: on a GPU run, OCR on CPU actors reads fewer images per second than the
    # caption model captions (README, "Text in images"), and it is a cost a user chooses.
    enabled: StrictBool = False
    engine: Annotated[StrictStr, _one_of(OCR_ENGINES)] = "rapidocr"
    # The OCR model sees the decoded pixels (at most decode.model_max_side), shrunk to this side first.
    max_side: Annotated[StrictInt, Field(ge=32)] = 1024
    # Past this many seconds on one image, that image is an ``ocr`` error row.
    timeout_s: PositiveFloat = 20.0
    # Lines read with less confidence are dropped (the model's own default is 0.5).
    min_confidence: Annotated[float, Field(ge=0, le=1, strict=True)] = 0.5
    # The most lines kept per image (a bound on the recogniser's work on a page of small print).
    max_lines: PositiveInt = 200
    batch_size: PositiveInt = 8
    # Where the OCR actors run. auto: on the GPUs when the run's models are (--device) and the installed
    # onnxruntime has the CUDA provider (onnxruntime-gpu); else on CPU. Decided once by the plan
    # (jobs/ray_plan.py ocr_device); cuda without the provider is refused before Ray starts.
    device: Annotated[StrictStr, _one_of(DEVICES)] = "auto"


class RayConfig(_Section):
    # None: start an embedded local Ray; else the address of a running cluster.
    address: StrictStr | None = None
    # None: one caption actor per GPU of the cluster on CUDA, one on CPU.
    caption_actors: PositiveInt | None = None
    embed_actors: PositiveInt = 1
    # None: one OCR actor per GPU of the cluster when OCR runs on the GPUs, one on CPU.
    ocr_actors: PositiveInt | None = None
    # Ray batches one caption actor holds at once; engine calls merge up to half
    # of the images they hold. None: the device's default (moondream/defaults.py):
    # on a GPU enough to fill the engine twice over, on CPU one.
    caption_batches_in_flight: PositiveInt | None = None
    # Logical CPUs reserved per model actor on CPU, and per decode task. None
    # (the default) lets the plan fit the cluster it is given; a number is
    # taken as asked, and a run that cannot fit is refused.
    model_actor_cpus: PositiveFloat | None = None
    decode_cpus: PositiveFloat | None = None
    # GPU share per model actor when it runs on CUDA. None (the default): the
    # plan's shares (jobs/ray_plan.py gpu_shares: caption 0.75 + embed 0.25, or
    # with OCR on the GPUs too 0.3 + 0.15 + OCR 0.55), chosen so that Ray, which
    # packs fractional shares onto the fullest card that fits, puts one caption
    # (and one OCR) actor on each card.
    caption_gpus: PositiveFloat | None = None
    embed_gpus: PositiveFloat | None = None
    ocr_gpus: PositiveFloat | None = None
    decode_batch_size: PositiveInt = 16


class RunConfig(_Section):
    source: StrictStr
    output: StrictStr
    device: Annotated[StrictStr, _one_of(DEVICES)] = "auto"
    limit: Annotated[StrictInt, Field(ge=0)] | None = None
    overwrite: StrictBool = False
    # Rerun files that failed for a permanent reason (not an image, truncated...).
    retry_errors: StrictBool = False
    # Keep the rows of files no longer in the source (a source pruned after captioning, or
    # only part of the collection) instead of recording them gone (pipeline.output.lifecycle).
    keep_gone: StrictBool = False
    # Rows are committed to the output every this many images, so a crash loses
    # at most one part's worth of work.
    rows_per_part: PositiveInt = 1000
    storage_options: tuple[tuple[StrictStr, StrictStr], ...] = ()
    decode: DecodeConfig = DecodeConfig()
    caption: CaptionConfig = CaptionConfig()
    embed: EmbedConfig = EmbedConfig()
    ocr: OcrConfig = OcrConfig()
    ray: RayConfig = RayConfig()

    @field_validator("storage_options", mode="before")
    @classmethod
    def _options_mapping(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted((str(k), str(v)) for k, v in value.items()))
        return value

    @field_validator("source")
    @classmethod
    def _has_source(cls, value: str) -> str:
        if not value:
            raise ValueError("is empty: captioner run SOURCE --out PATH")
        return value

    @field_validator("output")
    @classmethod
    def _has_output(cls, value: str) -> str:
        if not value:
            raise ValueError("is empty: pass --out captions.parquet (a file) or --out DIR/ (part files)")
        return value

    @model_validator(mode="after")
    def _something_to_compute(self) -> "RunConfig":
        if not self.caption.runs_model and not self.embed.enabled and not self.ocr.enabled:
            raise ValueError(
                "there would be nothing to compute: no caption, no probes, no embedding and no OCR "
                "(drop --no-caption, --no-probes or --no-embed, or add --ocr)"
            )
        return self

    @property
    def single_file(self) -> bool:
        return self.output.rstrip().lower().endswith(".parquet")

    def storage_options_dict(self) -> dict[str, str]:
        return dict(self.storage_options)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> "RunConfig":
        """Build and check a config; relative local paths are taken relative to ``base_dir`` (default: cwd)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from None
        return absolute_paths(config, base_dir)


def _explain(exc: ValidationError) -> str:
    """One line per problem, naming the dotted key and, for strings that look like numbers, the fix."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if not isinstance(part, int) or len(error["loc"]) == 1)
        where = where or "config"
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if error["type"] == "extra_forbidden":
            message = f"unknown key; valid keys here: {', '.join(_keys_at(error['loc'][:-1]))}"
        elif isinstance(value, str) and error["type"].startswith(("int", "float")):
            message += f", got the string {value!r}"
            if _looks_numeric(value):
                message += " (YAML reads forms like 1e8 as text: write the digits, e.g. 100000000)"
        elif error["type"] in ("tuple_type", "list_type") and isinstance(value, str):
            message = f"must be a list, got the single string {value!r}; write it as a YAML list (- item)"
        elif value is not None and "type" in error["type"] and not isinstance(value, (dict, list)):
            message += f", got {type(value).__name__} {value!r}"
        lines.append(f"{where}: {message}")
    return "invalid config: " + "; ".join(lines)


def _keys_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ---- paths ---------------------------------------------------------------------


def _is_url(text: str) -> bool:
    return "://" in text


def _absolute(text: str, base: Path) -> str:
    # normpath, not resolve: keep the path the user named (a symlinked model
    # folder stays the link), only anchored.
    path = Path(os.path.expanduser(text))
    return os.path.normpath(path if path.is_absolute() else base / path)


def _absolute_model(spec: str, base: Path) -> str:
    """Make the local-path parts of a model spec absolute; hub names are left alone."""
    def exists(text: str) -> bool:
        return bool(text) and not _is_url(text) and Path(_absolute(text, base)).exists()

    if exists(spec):
        return _absolute(spec, base)
    backend, sep, rest = spec.partition(":")
    if sep and not _is_url(spec):
        if exists(rest):
            return f"{backend}:{_absolute(rest, base)}"
        name, at, tail = rest.rpartition("@")
        if at and exists(tail):
            return f"{backend}:{name}@{_absolute(tail, base)}"
    return spec


def absolute_paths(config: RunConfig, base_dir: str | Path | None = None) -> RunConfig:
    """The same config with local source, output and model paths made absolute."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    trailing = "/" if config.output.endswith(("/", os.sep)) else ""
    updates = {
        "source": config.source if _is_url(config.source) else _absolute(config.source, base),
        "output": config.output if _is_url(config.output) else _absolute(config.output, base) + trailing,
    }
    caption = config.caption.model_copy(update={"model": _absolute_model(config.caption.model, base)})
    embed = config.embed.model_copy(update={"model": _absolute_model(config.embed.model, base)})
    return config.model_copy(update={**updates, "caption": caption, "embed": embed})


# ---- files and overrides ----------------------------------------------------------


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


def load_run_config(path: str | Path, **top: Any) -> RunConfig:
    """A config file as a RunConfig; its relative paths are relative to the file's folder."""
    path = Path(path)
    data = {**load_config_file(path), **top}
    return RunConfig.from_dict(data, base_dir=path.resolve().parent)


def with_overrides(config: RunConfig, overrides: dict[str, Any], *, base_dir: str | Path | None = None) -> RunConfig:
    """Apply dotted-key overrides such as ``{"caption.length": "short"}`` and check the result.

    None values are skipped. Relative paths among the overrides are taken
    relative to ``base_dir`` (default: the current directory).
    """
    data = config.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        target = data
        *sections, name = key.split(".")
        for section in sections:
            target = target[section]
        target[name] = list(value) if isinstance(value, tuple) else value
    # Paths already in ``config`` are absolute, so resolving again changes only the overrides.
    return RunConfig.from_dict(data, base_dir=base_dir)
