"""FAULT-INJECTION TEST DOUBLES for the crash and split-and-retry tests.

Each is the real backend (the tiny models run as usual) with one fault added
in front of it, triggered by an image of a tell-tale pixel size that a test
puts in the input on purpose:

``PoisonedCaptioner`` (backend ``poisoned``)
    ``describe`` raises for any batch holding a POISON_SIZE image, the way a
    model that chokes on one input fails the whole batch it came in; the
    size of each batch it failed is appended to ``$CAPTIONER_FAULT_DIR/poisoned_batches``.
``KillableEmbedder`` (backend ``killable``)
    on the first batch holding a VICTIM_SIZE image, writes its process id to
    ``$CAPTIONER_FAULT_DIR/victim.pid`` and waits to be killed from outside;
    once ``killed`` exists in that folder it embeds normally (the retry).
``MemoryBoundCaptioner`` (backend ``memory_bound``)
    Moondream as if on a card that holds MEMORY_IMAGES images: a bigger
    ``describe`` call raises ``torch.OutOfMemoryError``, and so does any call
    holding an OOM_SIZE image, even alone; the size of every call is kept in
    ``calls``.
``DeviceRecordingCaptioner`` (backend ``device_recording``)
    Moondream that writes the GPU Ray assigned its actor (``ray.get_gpu_ids()``
    and CUDA_VISIBLE_DEVICES) to ``$CAPTIONER_FAULT_DIR/devices/PID.json`` and
    then runs on the CPU, so a Ray with declared but absent GPUs can plan for
    them; the image count of every engine call goes to ``$CAPTIONER_FAULT_DIR/calls``.

``DeviceRecordingOcrReader`` (in place of engine ``rapidocr``, by ``register_with_ocr_recording``)
    the real RapidOCR reader that writes the device the plan gave its actor and
    the GPU Ray assigned it to ``$CAPTIONER_FAULT_DIR/ocr_devices/PID.json``,
    then reads on the CPU (the declared GPUs and onnxruntime-gpu are not there);
    while ``$CAPTIONER_FAULT_DIR/REAL_OCR_DEVICE`` exists it builds on the device
    it was given, as a real worker would.

Model stages build their backend on Ray workers, so the backends must be
registered there too: the tests' Ray runs ``register`` as its
``worker_process_setup_hook``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from pipeline.models.hf_vlm import TransformersCaptioner
from pipeline.models.moondream import Moondream2Captioner
from pipeline.models.openclip import OpenClipEmbedder
from pipeline.models.registry import register_captioner, register_embedder
from pipeline.ocr.reader import RapidOcrReader

POISON_SIZE = (37, 29)
VICTIM_SIZE = (41, 23)
OOM_SIZE = (43, 31)
MEMORY_IMAGES = 3
FAULT_DIR_ENV = "CAPTIONER_FAULT_DIR"
REAL_OCR_DEVICE = "REAL_OCR_DEVICE"


def register() -> None:
    register_captioner("poisoned", "tests.fault_doubles:PoisonedCaptioner")
    register_embedder("killable", "tests.fault_doubles:KillableEmbedder")
    register_captioner("memory_bound", "tests.fault_doubles:MemoryBoundCaptioner")
    register_captioner("device_recording", "tests.fault_doubles:DeviceRecordingCaptioner")


def register_in_this_process(patch, *, ocr_recording: bool = False) -> None:
    """The doubles in this process's registries for one fixture: ``patch`` (a MonkeyPatch) puts every
    registry it touches back afterwards, so no later test sees a double among the known backends."""
    from pipeline.models import registry
    from pipeline.ocr import reader

    patch.setattr(registry, "_CAPTIONERS", dict(registry._CAPTIONERS))
    patch.setattr(registry, "_EMBEDDERS", dict(registry._EMBEDDERS))
    patch.setattr(reader, "_ENGINES", dict(reader._ENGINES))
    (register_with_ocr_recording if ocr_recording else register)()


def register_with_ocr_recording() -> None:
    """``register``, and the OCR engine ``rapidocr`` replaced by DeviceRecordingOcrReader (this process only)."""
    from pipeline.ocr import reader

    register()
    reader._ENGINES["rapidocr"] = "tests.fault_doubles:DeviceRecordingOcrReader"


def _record_device(folder_name: str, **extra) -> None:
    import ray

    folder = Path(os.environ[FAULT_DIR_ENV]) / folder_name
    folder.mkdir(exist_ok=True)
    record = {"gpu_ids": [str(i) for i in ray.get_gpu_ids()],
              "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), **extra}  # fmt: skip
    (folder / f"{os.getpid()}.json").write_text(json.dumps(record))


class PoisonedCaptioner(TransformersCaptioner):
    def describe(self, images, questions, *, caption=True):
        if any(image.size == POISON_SIZE for image in images):
            with open(Path(os.environ[FAULT_DIR_ENV]) / "poisoned_batches", "a") as log:
                log.write(f"{len(images)}\n")
            raise RuntimeError(f"injected fault: a {POISON_SIZE[0]}x{POISON_SIZE[1]} image poisons its batch")
        return super().describe(images, questions, caption=caption)


class KillableEmbedder(OpenClipEmbedder):
    def embed_images(self, images):
        if any(image.size == VICTIM_SIZE for image in images):
            folder = Path(os.environ[FAULT_DIR_ENV])
            if not (folder / "killed").exists():
                (folder / "victim.pid").write_text(str(os.getpid()))
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # the test SIGKILLs us here
                    time.sleep(0.05)
                raise RuntimeError("injected fault: the test never killed this worker")
        return super().embed_images(images)


class MemoryBoundCaptioner(Moondream2Captioner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def describe(self, images, questions, *, caption=True):
        self.calls.append(len(images))
        if len(images) > MEMORY_IMAGES or any(getattr(image, "size", None) == OOM_SIZE for image in images):
            raise torch.OutOfMemoryError(f"injected fault: CUDA out of memory with {len(images)} images")
        return super().describe(images, questions, caption=caption)


class DeviceRecordingCaptioner(Moondream2Captioner):
    def __init__(self, ref, config, device, **kwargs):
        _record_device("devices")
        super().__init__(ref, config, "cpu", **kwargs)  # the declared GPUs are not there to allocate on

    def describe_prepared(self, inputs, questions, *, caption=True):
        with open(Path(os.environ[FAULT_DIR_ENV]) / "calls", "a") as log:
            log.write(f"{len(inputs)}\n")
        return super().describe_prepared(inputs, questions, caption=caption)


class DeviceRecordingOcrReader(RapidOcrReader):
    def __init__(self, config, threads=1, device="cpu"):
        _record_device("ocr_devices", device=device)
        real = (Path(os.environ[FAULT_DIR_ENV]) / REAL_OCR_DEVICE).exists()
        super().__init__(config, threads, device if real else "cpu")  # else the real model on the CPU that is there
