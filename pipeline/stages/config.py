"""The one frozen object every stage is constructed with."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.stages.contract import CAPTIONED, DECODED, EMBEDDED, READ, StageColumns
from schemas import RunMetadata


@dataclass(frozen=True)
class StageConfig:
    """Everything a stage needs: the run config and the identity rows are stamped with."""

    run: RunConfig
    identity: RunMetadata  # models, revisions and probe set; embedding_dim is filled from the data
    # torch threads per model actor: its CPU share in the resource plan, at least one.
    torch_threads: int = 1
    # (caption, embed) CPU preprocessors of the decode stage, built once on the driver
    # (pipeline.stages.decode.with_preprocessors); None: each decode worker builds its own.
    preprocessors: tuple | None = None

    @property
    def runs_captioner(self) -> bool:
        return self.run.caption.runs_model

    @property
    def runs_embedder(self) -> bool:
        return self.run.embed.enabled

    @property
    def runs_ocr(self) -> bool:
        return self.run.ocr.enabled

    def columns_after(self, stage: str) -> StageColumns:
        """The columns a batch carries once ``stage`` ("decode", "ocr", "caption", "embed") is done.

        The stages run in that order; OCR first, so that an image it fails on costs no captioning.
        """
        columns = DECODED
        if stage == "decode":
            return columns
        if self.runs_ocr:
            columns = columns + READ
        if stage == "ocr":
            return columns
        if self.runs_captioner:
            columns = columns + CAPTIONED
        if stage == "caption":
            return columns
        if self.runs_embedder:
            columns = columns + EMBEDDED
        return columns
