"""Search over captioner output with DuckDB: BM25, vectors, hybrid, SQL.

  contract                           what an index is: format, tables, macros, lockdown, feature checks
  vectors / vector_build             the vector file beside the catalogue; writing and updating it
  scan / ann                         top-k over it: exact two-pass scans, filtered scans, IVF lists (faiss k-means)
  catalogue_update / bm25            an update re-derives only the changed rows; BM25 (fts tables) kept in place
  duplicates                         exact (same bytes) and near (nearest neighbours via the IVF lists) groups
  build_index(sources, db_path)      build side (index.py): Parquet files/dirs -> index.duckdb
  ImageIndex.open(db_path)           query side (image_index.py): read-only text, semantic, image,
                                     hybrid, sql, duplicates
  commands.SEARCH_COMMANDS           the click commands index / search / sql / duplicates

Nothing here imports torch or the model backends until a semantic query
needs the embedder.
"""

from pipeline.search.contract import IndexInfo
from pipeline.search.errors import SearchError
from pipeline.search.image_index import DuplicateGroup, DuplicateMember, Hit, ImageIndex, SqlResult
from pipeline.search.index import BuildReport, build_index

__all__ = [
    "BuildReport",
    "DuplicateGroup",
    "DuplicateMember",
    "Hit",
    "ImageIndex",
    "IndexInfo",
    "SearchError",
    "SqlResult",
    "build_index",
]
