"""What each stage emits: column names and Arrow types, declared once.

Ray Data merges the blocks that stages return. When a stage lets Arrow infer
types from values, an all-None column comes out as ``null`` (or, through
pandas/numpy, as ``double``) in one block and ``string`` in another, and the
merge fails. So every stage returns a ``pa.Table`` built with its declared
types, whatever the batch holds. Columns that reach the Parquet file take
their type from the output schema (``schemas``); the rest are transport
columns that only travel between stages.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from schemas import output_schema

_OUTPUT = output_schema(None)


def _output(name: str) -> pa.Field:
    field = _OUTPUT.field(name)
    return pa.field(name, field.type)  # nullable between stages: errors have no values


class StageColumns:
    """An ordered set of typed columns a stage emits (on top of what it received)."""

    def __init__(self, name: str, fields: Sequence[pa.Field]):
        self.name = name
        self.fields = tuple(fields)

    def __add__(self, other: "StageColumns") -> "StageColumns":
        return StageColumns(f"{self.name}+{other.name}", self.fields + other.fields)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(self.fields)

    def table(self, columns: Mapping[str, Any]) -> pa.Table:
        """Build a table with exactly these columns and types from lists or Arrow arrays.

        A missing column is an error (a stage forgot to emit it); an all-None
        column keeps its declared type.
        """
        arrays = []
        for field in self.fields:
            if field.name not in columns:
                raise KeyError(f"stage {self.name} did not emit column {field.name!r}")
            values = columns[field.name]
            if isinstance(values, pa.ChunkedArray):
                values = values.combine_chunks()
            if isinstance(values, pa.Array):
                arrays.append(values if values.type.equals(field.type) else values.cast(field.type))
            else:
                arrays.append(pa.array(list(values), type=field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)


# ---- the stages' contracts ----------------------------------------------------

#: Listing -> decode: one row per listed file. ``location`` holds the uri's
#: exact bytes (a file name need not be UTF-8), ``uri`` its printable form;
#: ``size`` and ``source_mtime`` are what the listing said (resume compares them).
LISTED = StageColumns(
    "listed",
    [_output("uri"), pa.field("location", pa.binary()), pa.field("size", pa.int64()), _output("source_mtime")],
)

#: Decode -> models. ``pixels`` is the image downscaled for the models, raw
#: RGB bytes of ``pixel_height`` x ``pixel_width`` x 3 (empty on error, and
#: empty when every model of the run takes prepared inputs).
#: ``caption_input`` / ``embed_input``: the model-ready input a backend's CPU
#: preprocessor made (pipeline.models.base.Preprocessor), null where the
#: backend has none or the row failed; the model stage that reads one nulls it.
DECODED = StageColumns(
    "decode",
    [
        _output("uri"),
        _output("image_id"),
        _output("bytes"),
        _output("source_mtime"),
        _output("format"),
        _output("width"),
        _output("height"),
        _output("status"),
        _output("error_kind"),
        _output("error"),
        pa.field("pixels", pa.binary()),
        pa.field("pixel_width", pa.int32()),
        pa.field("pixel_height", pa.int32()),
        pa.field("caption_input", pa.large_binary()),
        pa.field("embed_input", pa.large_binary()),
    ],
)

#: The prepared-input column each model stage reads.
PREPARED_INPUT = {"caption": "caption_input", "embed": "embed_input"}

#: Caption stage: the caption and, per image, one answer per probe question.
CAPTIONED = StageColumns(
    "caption",
    [
        _output("caption"),
        _output("caption_truncated"),
        _output("caption_short"),
        pa.field("answers", pa.list_(pa.string())),
        # Per answer: P("yes") at its first step (null unless a yes/no question
        # and the backend reports it), and whether it hit its token cap.
        pa.field("yes_probs", pa.list_(pa.float32())),
        pa.field("answers_truncated", pa.list_(pa.bool_())),
    ],
)

#: OCR stage (pipeline/stages/ocr.py): the text read and its lines, boxes in decoded-image
#: pixels (the output's ``width`` x ``height``); null on rows that failed.
READ = StageColumns("ocr", [_output("text"), _output("text_lines")])

#: Embed stage: a variable-length list here, and the model's width beside it
#: (known even when every image of the batch failed); the conform step fixes
#: the list to the output's ``FLOAT[D]``.
EMBEDDED = StageColumns(
    "embed", [pa.field("embedding", pa.list_(pa.float32())), pa.field("embedding_dim", pa.int32())]
)

#: Columns a model stage may rewrite when a model fails on one image.
STATUS_COLUMNS = ("status", "error_kind", "error")
