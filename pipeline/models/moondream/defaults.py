"""The sizes that depend on the device, decided once.

The engine (its sequence cap and vision pass size), the captioner, the
config's comments and help, and the Ray plan (how many images a caption actor
keeps in flight) all ask :func:`for_device`; no other module holds a copy.

On a GPU a decode step costs about the same for 64 sequences as for 384 (it
is bound by reading the weights), so the engine holds many, and the caption
actor keeps several Ray batches in flight, twice what fills the engine's rows,
feeding their images into the running engine as rows free up
(pipeline/stages/feeder.py StreamFeeder, jobs/ray_plan.py). On
CPU a step's cost grows with its sequences and the cores are shared with the
decode tasks: small caps, one batch at a time, as measured fastest there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceDefaults:
    #: engine: sequences (caption + probes of all admitted images) decoded at once
    max_sequences: int
    #: engine: crops per vision-encoder pass (big activations measured slower per crop on CPU)
    vision_batch_crops: int
    #: caption actor: whether it merges Ray batches into engine calls and keeps two calls' worth in flight
    fill_engine: bool
    #: caption actor: the fewest images one merged engine call aims for, whatever the probe count
    min_images_per_call: int
    #: engine: decode steps between two looks at the device (harvest finished sequences, admit images).
    #: Each look is a host sync; a sequence that stops waits up to this many steps in its slot.
    harvest_every: int


GPU = DeviceDefaults(max_sequences=384, vision_batch_crops=64, fill_engine=True, min_images_per_call=64, harvest_every=8)
CPU = DeviceDefaults(max_sequences=64, vision_batch_crops=8, fill_engine=False, min_images_per_call=1, harvest_every=4)

#: Engine-fulls of images a filling caption actor keeps in flight: one decoding, one queued to join it.
CALLS_IN_FLIGHT = 2
#: At most this many Ray batches in flight per caption actor (each holds one of the actor's threads).
MAX_BATCHES_IN_FLIGHT = 64


def for_device(device) -> DeviceDefaults:
    """The defaults for a torch device, a device string ("cuda", "cuda:1", "cpu") or a kind."""
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    return GPU if kind == "cuda" else CPU


def images_per_call(defaults: DeviceDefaults, max_sequences: int | None, sequences_per_image: int) -> int:
    """Images one engine call takes to fill every sequence slot (at least ``min_images_per_call``)."""
    slots = max_sequences or defaults.max_sequences
    return max(defaults.min_images_per_call, -(-slots // max(1, sequences_per_image)))
