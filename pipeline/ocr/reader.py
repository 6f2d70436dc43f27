"""OCR engines by name, what identifies them, and the bounded read of one image.

An engine reads one decoded PIL image and returns an :class:`OcrResult`. Each
read is bounded: the image is shrunk to ``ocr.max_side`` first, at most
``ocr.max_lines`` lines are recognised, and the recogniser works through them a
few at a time, checking ``ocr.timeout_s`` between chunks; past it the read
raises :class:`OcrTimeout` (the stage makes that image's error row). The
overshoot is one detection pass over a ``max_side`` image or one chunk of
lines, both bounded by the image size.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import OCR_ENGINES, ConfigError, OcrConfig
from pipeline.ocr.layout import joined_text, reading_order

if TYPE_CHECKING:
    from PIL import Image

# engine name -> "module:Class"; the names are pipeline.config's OCR_ENGINES.
_ENGINES = {"rapidocr": "pipeline.ocr.reader:RapidOcrReader"}
assert set(_ENGINES) == set(OCR_ENGINES)


class OcrUnavailable(ConfigError):
    """The OCR engine is not installed or its model files are missing; the message names the fix."""


#: What to do when CUDA was asked for OCR and onnxruntime cannot give it.
OCR_CUDA_FIX = "pip install onnxruntime-gpu (in place of onnxruntime), or pass --ocr-device cpu"
CUDA_PROVIDER = "CUDAExecutionProvider"


class OcrTimeout(RuntimeError):
    """One image took longer than ocr.timeout_s."""


@dataclass(frozen=True)
class OcrLine:
    text: str
    confidence: float
    box: tuple[float, ...]  # x1, y1, ... x4, y4 in the pixels of the image read


@dataclass(frozen=True)
class OcrResult:
    lines: tuple[OcrLine, ...]  # in reading order

    @property
    def text(self) -> str:
        """The lines in reading order: rows by newlines, lines of a row by spaces; '' when none."""
        return joined_text(reading_order(self.lines))


def known_engines() -> list[str]:
    return sorted(_ENGINES)


def _engine_class(name: str):
    if name not in _ENGINES:
        raise OcrUnavailable(f"unknown OCR engine {name!r}; known engines: {', '.join(known_engines())}")
    module, cls = _ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def ocr_identity(name: str) -> tuple[str, str]:
    """(ocr_model, ocr_revision) of engine ``name``, without loading it; OcrUnavailable if not installed."""
    return _engine_class(name).identity()


def build_reader(config: OcrConfig, threads: int = 1, device: str = "cpu"):
    """Load the engine (on a worker) on ``device`` ("cpu" or "cuda", the plan's decision)."""
    return _engine_class(config.engine)(config, threads, device)


def cuda_provider_available() -> bool:
    """Whether the installed onnxruntime offers CUDA (onnxruntime-gpu): the one place that asks it."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return CUDA_PROVIDER in onnxruntime.get_available_providers()


# ---- RapidOCR (PP-OCRv4 through onnxruntime) ---------------------------------------

RAPIDOCR_PACKAGE = "rapidocr-onnxruntime"
# The three models the package's config.yaml names, and the order they run in.
_RAPIDOCR_MODELS = ("Det", "Cls", "Rec")
# Lines recognised per chunk between deadline checks (the package's own rec batch).
_CHUNK = 6


def _rapidocr_package() -> Path:
    try:
        import rapidocr_onnxruntime
    except ImportError as exc:
        raise OcrUnavailable(
            f"OCR engine rapidocr needs the {RAPIDOCR_PACKAGE} package: pip install 'captioner[ocr]' "
            f"(or pip install {RAPIDOCR_PACKAGE}), or run without --ocr"
        ) from exc
    return Path(rapidocr_onnxruntime.__file__).parent


@functools.lru_cache(maxsize=None)
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RapidOcrReader:
    """RapidOCR's PP-OCRv4 detector, angle classifier and recogniser (ONNX, shipped in its wheel), on CPU or CUDA."""

    @staticmethod
    def model_files() -> dict[str, Path]:
        import yaml

        package = _rapidocr_package()
        config = yaml.safe_load((package / "config.yaml").read_text(encoding="utf-8"))
        files = {part: package / config[part]["model_path"] for part in _RAPIDOCR_MODELS}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise OcrUnavailable(f"the {RAPIDOCR_PACKAGE} install lacks its model files {missing}; reinstall it")
        return files

    @classmethod
    def identity(cls) -> tuple[str, str]:
        files = cls.model_files()
        hashes = "; ".join(f"{path.name} sha256:{_sha256(path)}" for path in files.values())
        return RAPIDOCR_PACKAGE, f"{metadata.version(RAPIDOCR_PACKAGE)}; {hashes}"

    @staticmethod
    def engine_options(config: OcrConfig, threads: int, device: str) -> dict:
        """RapidOCR's keyword arguments for this config on ``device``."""
        # Detection on the image as given (already at most max_side), never upscaled past it.
        options = dict(
            intra_op_num_threads=max(1, int(threads)), inter_op_num_threads=1, max_side_len=config.max_side,
            det_limit_type="max", det_limit_side_len=config.max_side, det_max_candidates=config.max_lines,
            text_score=config.min_confidence,
        )  # fmt: skip
        if device == "cuda":
            # Each of the three models' sessions on CUDAExecutionProvider, device_id 0 (the package's
            # fixed choice): Ray sets CUDA_VISIBLE_DEVICES to the actor's own card, which is then 0.
            options.update(det_use_cuda=True, cls_use_cuda=True, rec_use_cuda=True)
        return options

    def __init__(self, config: OcrConfig, threads: int = 1, device: str = "cpu"):
        _rapidocr_package()
        if device not in ("cpu", "cuda"):
            raise ValueError(f"OCR device must be cpu or cuda (the plan's decision), got {device!r}")
        # The driver checked the provider (preflight, plan); a worker of a cluster whose own
        # onnxruntime lacks it fails here, at actor start, as a caption actor without CUDA does.
        if device == "cuda" and not cuda_provider_available():
            raise OcrUnavailable(
                f"OCR on CUDA was asked for, but this worker's onnxruntime has no {CUDA_PROVIDER}: {OCR_CUDA_FIX}"
            )
        from rapidocr_onnxruntime import RapidOCR

        self.config = config
        self.device = device
        self.model, self.revision = self.identity()
        self.engine = RapidOCR(**self.engine_options(config, threads, device))
        if device == "cuda":
            self._check_on_cuda()

    def _check_on_cuda(self) -> None:
        """RapidOCR falls back to CPU with only a log line (e.g. when onnxruntime's build is not the GPU one);
        a run asked for CUDA fails instead, naming the fix."""
        sessions = {"Det": self.engine.text_det.infer, "Cls": self.engine.text_cls.infer,
                    "Rec": self.engine.text_rec.session}  # fmt: skip
        on_cpu = [part for part, ort in sessions.items() if ort.session.get_providers()[0] != CUDA_PROVIDER]
        if on_cpu:
            raise OcrUnavailable(
                f"OCR on CUDA was asked for, but onnxruntime put the {'/'.join(on_cpu)} model(s) on CPU "
                f"(no usable GPU or CUDA libraries on this worker): {OCR_CUDA_FIX}"
            )

    def read(self, image: "Image.Image") -> OcrResult:
        deadline = time.monotonic() + self.config.timeout_s
        width = image.width
        image = _shrunk(image.convert("RGB"), self.config.max_side)
        back = width / image.width  # boxes in the pixels of the image given, not the shrunk one
        engine = self.engine
        array = engine.load_img(image)  # RGB -> the BGR array the package expects
        raw_h, raw_w = array.shape[:2]
        array, ratio_h, ratio_w = engine.preprocess(array)
        record = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        array, record = engine.maybe_add_letterbox(array, record)
        boxes, _ = engine.auto_text_det(array)
        if boxes is None:
            return OcrResult(())
        boxes = list(boxes)[: self.config.max_lines]
        _check(deadline, self.config.timeout_s)
        crops = engine.get_crop_img_list(array, boxes)
        recognised = []
        for start in range(0, len(crops), _CHUNK):
            chunk, _, _ = engine.text_cls(crops[start : start + _CHUNK])
            texts, _ = engine.text_rec(chunk, False)
            recognised.extend(texts)
            _check(deadline, self.config.timeout_s)
        corners = engine._get_origin_points(boxes, record, raw_h, raw_w)
        lines = [
            OcrLine(str(rec[0]).strip(), float(rec[1]), tuple(float(v) * back for v in box.reshape(-1)))
            for box, rec in zip(corners, recognised)
            if float(rec[1]) >= self.config.min_confidence and str(rec[0]).strip()
        ]
        return OcrResult(tuple(line for row in reading_order(lines) for line in row))


def _shrunk(image: "Image.Image", max_side: int) -> "Image.Image":
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def _check(deadline: float, limit: float) -> None:
    if time.monotonic() > deadline:
        raise OcrTimeout(f"OCR took longer than ocr.timeout_s ({limit:g} s) on this image")
