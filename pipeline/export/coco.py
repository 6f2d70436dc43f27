"""``captioner export coco``: a COCO captions dataset.

  OUT/annotations/captions.json   {info, licenses, images, annotations}
  OUT/images/<relative path>      the images, copied (or symlinked with --link)

``images`` entries are {id, file_name (relative to OUT/images), width,
height}, plus ``text`` (what OCR read in it, lines by newlines) when OCR ran; ``annotations`` are {id, image_id, caption}, one per captioned
image: the fields pycocotools' COCO(), getImgIds/getAnnIds/loadAnns and
loadRes (caption results) use. Width and height are the image's pixel size
after EXIF orientation, as the pipeline recorded it. Files are written
through pipeline.export.storage.ExportFolder (no user's file or indexed image
is replaced).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

from pipeline import __version__
from pipeline.export.images import copied, image_rows, nothing_to_export
from pipeline.export.rows import RowSource
from pipeline.export.storage import ExportFolder, relative_paths

ANNOTATIONS = "annotations/captions.json"
IMAGES = "images"


def coco_document(source: RowSource, *, root: str | None, skipped: Counter, place=lambda uri, rel: True) -> dict:
    """The COCO JSON of the selected captioned images; ``place(uri, rel)`` puts each
    image in the export and says whether it could (an unreadable one is left out)."""
    relative = relative_paths(source.uris(), root, tree=source.tree_uris())
    images, annotations, generators = [], [], {}
    for row in image_rows(source.rows(), skipped, need_caption=True):
        image_id = len(images) + 1
        rel = relative[row.uri]
        if not place(row.uri, rel):
            continue
        image = {"id": image_id, "file_name": rel, "width": row.width, "height": row.height}
        if row.text is not None:  # schema v5: the text OCR read, one line per line ('' when none); absent when never read
            image["text"] = row.text
        images.append(image)
        annotations.append({"id": image_id, "image_id": image_id, "caption": " ".join(row.caption.split())})
        if row.generator:
            generators[row.generator] = None
    now = datetime.now(timezone.utc)
    info = {
        "description": f"Machine-generated captions from {source.description}",
        "version": "1.0",
        "year": now.year,
        "contributor": f"captioner {__version__} ({', '.join(generators) or 'unknown model'})",
        "date_created": now.isoformat(timespec="seconds"),
    }
    return {"info": info, "licenses": [], "images": images, "annotations": annotations}


def write_coco(source: RowSource, dest: ExportFolder, *, root: str | None, link: bool, skipped: Counter) -> int:
    relative = relative_paths(source.uris(), root, tree=source.tree_uris())
    rows = image_rows(source.rows(), Counter(), need_caption=True)
    dest.prepare([ANNOTATIONS, *(f"{IMAGES}/{relative[row.uri]}" for row in rows)])

    def place(uri: str, rel: str) -> bool:
        return copied(dest, uri, f"{IMAGES}/{rel}", link=link, skipped=skipped)

    document = coco_document(source, root=root, skipped=skipped, place=place)
    if not document["images"]:
        raise nothing_to_export(skipped)
    dest.write(ANNOTATIONS, json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8"))
    return len(document["images"])
