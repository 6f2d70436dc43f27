"""Exports: captions into files other tools read (``captioner export FORMAT``).

  rows.py          the selected rows, from an index or from Parquet (filters as in search)
  alt_text.py      the alt-text rules; alt_file.py writes them as CSV / JSON lines
  sidecars.py      sidecar placement and plan/dry-run/write; txt.py and xmp.py fill them
  labels.py        probe answers as dataset columns
  imagefolder.py, coco.py, hf_dataset.py   training-set layouts
  storage.py       local and bucket reads and writes (pipeline.sources underneath)
  command.py       the click command

Optional packages (pyexiv2 for XMP, datasets for hf-dataset) come with the
``export`` extra and are imported only by the format that needs them.
"""
