"""Schema v2: v1 plus how sure the model was and whether it was cut off.

Changes from v1 (schemas/v1.py, whose table this one is derived from):
  * probes[].yes_prob   float32, null unless the question is yes/no: the
                        model's probability of "yes" at the answer's first step
  * probes[].truncated  bool: the answer hit its token cap
  * caption_truncated   bool, right after ``caption``: the caption hit its token cap
All three are nullable; a v1 file upgraded with ``schemas.upgrade_table`` has
them null (unknown), never False.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.v1 import V1

SCHEMA_VERSION = 2

# Added to v1's probe struct, in this order.
NEW_PROBE_FIELDS = (
    pa.field("yes_prob", pa.float32()),
    pa.field("truncated", pa.bool_()),
)
# Added columns: name -> the column each follows.
NEW_COLUMNS = {
    "caption": (
        ("caption_truncated", pa.bool_(), True, "true when the caption hit its token cap (cut off); null when unknown or no caption"),
    ),
}

V2 = V1.changed(
    SCHEMA_VERSION,
    probe_fields=NEW_PROBE_FIELDS,
    columns_after=NEW_COLUMNS,
    docs={
        "schema_version": "schema version the row was written under: 2 (1 in rows upgraded from v1 files)",
        "probes": "one entry per probe question, in probe-set order: question, answer, answer_bool, "
        "yes_prob (P('yes') at the answer's first step, yes/no questions only), truncated (answer hit its token cap)",
    },
)

SCHEMA = V2  # what schemas.upgrade reads
PROBE_TYPE = V2.probe_type
COLUMN_NAMES = V2.column_names
output_schema = V2.output_schema
describe = V2.describe
