"""The one frozen object every stage is constructed with."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.stages.contract import CAPTIONED, DECODED, EMBEDDED, StageColumns
from schemas import RunMetadata


@dataclass(frozen=True)
class StageConfig:
    """Everything a stage needs: the run config and the identity rows are stamped with."""

    run: RunConfig
    identity: RunMetadata  # models, revisions and probe set; embedding_dim is filled from the data
    # torch threads per model actor: its CPU share in the resource plan, at least one.
    torch_threads: int = 1

    @property
    def runs_captioner(self) -> bool:
        return self.run.caption.runs_model

    @property
    def runs_embedder(self) -> bool:
        return self.run.embed.enabled

    def columns_after(self, stage: str) -> StageColumns:
        """The columns a batch carries once ``stage`` ("decode", "caption", "embed") is done."""
        columns = DECODED
        if stage == "decode":
            return columns
        if self.runs_captioner:
            columns = columns + CAPTIONED
        if stage == "caption":
            return columns
        if self.runs_embedder:
            columns = columns + EMBEDDED
        return columns
