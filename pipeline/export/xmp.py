"""``captioner export xmp``: XMP sidecars that photo managers read.

Each sidecar (``photo.jpg.xmp`` by default, ``photo.xmp`` with
``--sidecar-name stem``) gets, as x-default language alternatives:

  dc:description                          the caption
  Iptc4xmpCore:AltTextAccessibility       the alt text (pipeline.export.alt_text): from the short caption
                                          when the run wrote two lengths, the image's legible text quoted
  Iptc4xmpCore:ExtDescrAccessibility      the caption, as the extended description, then the text
                                          read in the image in full (``Text in the image: "..."``)

plus ``captioner:MachineGenerated``, ``captioner:Generator`` (model@revision)
and ``captioner:Fields`` (which of the three captioner wrote), in captioner's
own namespace, so the text is marked as machine-generated.

An existing sidecar is read and re-serialised by exiv2 (through pyexiv2, the
``export`` extra): every other property is kept, and so are other languages
of the three fields. A field someone else wrote (not listed in
captioner:Fields) is kept unless ``overwrite``; fields captioner wrote are
updated on every export.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Iterable

from pipeline.export.alt_text import alt_text_with_text, legible_text
from pipeline.export.errors import ExportError, optional_import
from pipeline.export.rows import ExportRow
from pipeline.export.sidecars import CREATE, KEEP, UPDATE, Placement, Plan, captioned
from pipeline.export.storage import Storage

NAMESPACE = "http://ns.captioner.invalid/xmp/1.0/"
PREFIX = "captioner"
X_DEFAULT = 'lang="x-default"'
DESCRIPTION = "Xmp.dc.description"
ALT_TEXT = "Xmp.iptc.AltTextAccessibility"
EXT_DESCRIPTION = "Xmp.iptc.ExtDescrAccessibility"
TEXT_FIELDS = (DESCRIPTION, ALT_TEXT, EXT_DESCRIPTION)
MACHINE_GENERATED = f"Xmp.{PREFIX}.MachineGenerated"
GENERATOR = f"Xmp.{PREFIX}.Generator"
FIELDS = f"Xmp.{PREFIX}.Fields"
SIDECAR_NAMES = ("full", "stem")

# What exiv2 is given for a new sidecar: an empty XMP packet.
EMPTY_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    "</rdf:RDF></x:xmpmeta>\n"
    '<?xpacket end="w"?>'
).encode("utf-8")

_registered = False


def _pyexiv2():
    global _registered
    module = optional_import("pyexiv2", "captioner export xmp")
    if not _registered:
        module.set_log_level(4)  # mute exiv2's warnings on stderr; failures still raise
        try:
            module.registerNs(NAMESPACE, PREFIX)
        except Exception:  # already registered in this process
            pass
        _registered = True
    return module


def sidecar_namer(style: str):
    if style == "full":
        return lambda image_name: image_name + ".xmp"
    if style == "stem":
        return lambda image_name: posixpath.splitext(image_name)[0] + ".xmp"
    raise ExportError(f"--sidecar-name {style!r}: use full (photo.jpg.xmp) or stem (photo.xmp)")


def short(key: str) -> str:
    """'Xmp.iptc.AltTextAccessibility' -> 'Iptc4xmpCore:AltTextAccessibility' (as written in the file)."""
    group, prop = key.split(".")[1:]
    return {"dc": "dc", "iptc": "Iptc4xmpCore"}.get(group, group) + ":" + prop


def read_fields(data: bytes) -> dict:
    """Every XMP property of a sidecar, as pyexiv2 names them."""
    pyexiv2 = _pyexiv2()
    image = pyexiv2.ImageData(data)
    try:
        return image.read_xmp()
    finally:
        image.close()


def updated_sidecar(existing: bytes | None, values: dict[str, str], generator: str | None, *, overwrite: bool) -> tuple[bytes | None, list[str], list[str]]:
    """The sidecar with ``values`` (key -> x-default text) merged in.

    Returns (new bytes or None when nothing changes, fields set, fields kept).
    """
    pyexiv2 = _pyexiv2()
    image = pyexiv2.ImageData(existing if existing is not None else EMPTY_PACKET)
    try:
        current = image.read_xmp()
        ours = set(str(current.get(FIELDS, "")).replace(",", " ").split())
        changes, written, kept = {}, [], []
        for key, text in values.items():
            old = current.get(key)
            old_default = old.get(X_DEFAULT) if isinstance(old, dict) else old
            if old_default and short(key) not in ours and not overwrite:
                kept.append(short(key))
                continue
            written.append(short(key))
            if old_default != text:
                alternatives = dict(old) if isinstance(old, dict) else {}
                alternatives[X_DEFAULT] = text
                changes[key] = alternatives
        if written:
            markers = {
                MACHINE_GENERATED: "True",
                GENERATOR: generator or "unknown",
                FIELDS: ",".join(sorted(ours | set(written))),
            }
            changes.update({k: v for k, v in markers.items() if current.get(k) != v})
        if not changes:
            return None, written, kept
        image.modify_xmp(changes)
        return image.get_bytes(), written, kept
    finally:
        image.close()


def plan_xmp(rows: Iterable[ExportRow], placement: Placement, storage: Storage, *, sidecar_name: str, max_chars: int, overwrite: bool, skipped: Counter) -> list[Plan]:
    namer = sidecar_namer(sidecar_name)
    rows = list(captioned(rows, skipped))
    where = placement.locations([r.uri for r in rows], namer)
    plans = []
    for row in rows:
        location = where[row.uri]
        caption = " ".join(row.caption.split())
        # Alt text: the short caption (when written) with the image's legible text quoted; the extended
        # description: the (longer) caption and the text read in the image, in full.
        short = " ".join((row.alt_caption or "").split()) or caption
        legible = legible_text(row.text)
        extended = f'{caption} Text in the image: "{legible}"' if legible else caption
        values = {DESCRIPTION: caption, ALT_TEXT: alt_text_with_text(short, row.text, max_chars) or short,
                  EXT_DESCRIPTION: extended}
        existing = storage.read(location) if storage.exists(location) else None
        try:
            data, written, kept = updated_sidecar(existing, values, row.generator, overwrite=overwrite)
        except ExportError:
            raise
        except Exception as exc:  # exiv2 raises RuntimeError subclasses for unreadable XMP
            raise ExportError(f"{storage.display(location)} is not readable XMP ({exc}); fix or move it, then export again") from exc
        kept_note = f"keeps {', '.join(kept)} (not written by captioner; --overwrite replaces)" if kept else ""
        if existing is None:
            plans.append(Plan(row.uri, location, CREATE, data, ", ".join(written)))
        elif data is None:
            plans.append(Plan(row.uri, location, KEEP, None, "; ".join(filter(None, ["unchanged", kept_note]))))
        else:
            detail = "; ".join(filter(None, [f"sets {', '.join(written)}" if written else "", kept_note]))
            plans.append(Plan(row.uri, location, UPDATE, data, detail))
    return plans
