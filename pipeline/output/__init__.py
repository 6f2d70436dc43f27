"""Where rows go: part files (parts), resume state (resume), the final merge (merge), one output (store).

Which row is current for an image is decided in one place, pipeline.rows;
resume, both merges and the search index ask it. Which files make up an
output is decided in one place, :func:`find_output_files`; the run, exports
and the index use it. All storage goes through pipeline.storage.Folder.
"""

from pipeline.output.parts import PART_GLOB, FoundOutputs, PartWriter, find_output_files, is_part_name, part_name, parts_folder_of
from pipeline.output.resume import ResumeState, RowState
from pipeline.output.store import OutputStore
from pipeline.storage import OutputError

__all__ = [
    "PART_GLOB", "FoundOutputs", "OutputError", "OutputStore", "PartWriter", "ResumeState", "RowState",
    "find_output_files", "is_part_name", "part_name", "parts_folder_of",
]  # fmt: skip
