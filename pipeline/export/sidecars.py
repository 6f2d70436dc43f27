"""Sidecar files (``photo.txt``, ``photo.jpg.xmp``): where they go, planned then written.

A sidecar export is two steps: plan every file (what it would contain, and
whether that creates, updates or keeps an existing file), then write. The
plan is what ``--dry-run`` prints, and two images that would share one
sidecar (``photo.jpg`` and ``photo.png`` -> ``photo.txt``) stop the export
before anything is written.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

from pipeline.export.errors import ExportError
from pipeline.export.rows import ExportRow
from pipeline.export.storage import Storage, relative_paths
from pipeline.storage import join_location, name_of, parent_of

CREATE, UPDATE, KEEP = "create", "update", "keep"


@dataclass(frozen=True)
class Placement:
    """Where sidecars go: beside the images (``in_place``) or mirrored under ``out``."""

    out: str | None
    in_place: bool = False
    root: str | None = None
    tree: tuple[str, ...] | None = None  # every uri of the source: the default root (storage.relative_paths)

    def __post_init__(self):
        if self.in_place == (self.out is not None):
            raise ExportError("sidecars go either into --out DIR (mirroring the source folders) or beside the images with --in-place; give one")

    def locations(self, uris: list[str], sidecar_name: Callable[[str], str]) -> dict[str, str]:
        """uri -> sidecar location; ``sidecar_name`` maps an image file name to its sidecar's."""
        if self.in_place:
            return {uri: _sibling(uri, sidecar_name) for uri in uris}
        relative = relative_paths(uris, self.root, tree=self.tree)
        return {
            uri: join_location(self.out, posixpath.join(posixpath.dirname(rel), sidecar_name(posixpath.basename(rel))))
            for uri, rel in relative.items()
        }


def _sibling(uri: str, sidecar_name: Callable[[str], str]) -> str:
    return join_location(parent_of(uri), sidecar_name(name_of(uri)))


@dataclass(frozen=True)
class Plan:
    uri: str  # the image
    location: str  # the sidecar
    action: str  # create / update / keep
    data: bytes | None  # what to write; None for keep
    detail: str = ""


def check_collisions(plans: Iterable[Plan]) -> None:
    plans = list(plans)
    counts = Counter(p.location for p in plans)
    shared = [loc for loc, n in counts.items() if n > 1]
    if shared:
        uris = [p.uri for p in plans if p.location == shared[0]]
        raise ExportError(
            f"{len(shared)} sidecar(s) would be written by more than one image, e.g. {shared[0]} for {uris}; "
            f"use --sidecar-name full (photo.jpg.xmp) for XMP, or rename the images, or narrow the export with --where"
        )


def apply(plans: list[Plan], storage: Storage, *, dry_run: bool, echo: Callable[[str], None]) -> Counter:
    """Write (or with ``dry_run`` only list) every planned sidecar; the count per action."""
    check_collisions(plans)
    counts: Counter = Counter()
    for plan in plans:
        counts[plan.action] += 1
        if dry_run:
            echo(f"{plan.action:<6}  {storage.display(plan.location)}" + (f"  ({plan.detail})" if plan.detail else ""))
        elif plan.action != KEEP:
            storage.write(plan.location, plan.data)
    return counts


def captioned(rows: Iterable[ExportRow], skipped: Counter) -> Iterable[ExportRow]:
    """The rows that have a caption; the others are counted in ``skipped``."""
    for row in rows:
        if row.caption and row.caption.strip():
            yield row
        else:
            skipped["no caption"] += 1
