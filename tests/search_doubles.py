"""TEST DOUBLE for the search tests: an Embedder that looks vectors up in tables.

Not a model. Semantic search tests need query vectors whose nearest images are
known in advance; this embedder returns exactly the vectors a test put in
``TEXT_VECTORS`` / ``IMAGE_VECTORS``. Registered as backend ``searchtest`` by
the tests only, so an index built from Parquet whose embed_model is
``searchtest:map`` rebuilds it through the normal registry path.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.models.base import Embedder, l2_normalise

BACKEND = "searchtest"
SPEC = "searchtest:map"
REVISION = "test"
DIM = 4

# text -> vector; texts not listed get a fixed pseudo-random vector from their hash
TEXT_VECTORS: dict[str, list[float]] = {}
# (r, g, b) of the image's top-left pixel -> vector
IMAGE_VECTORS: dict[tuple[int, int, int], list[float]] = {}


def register() -> None:
    from pipeline.models.registry import register_embedder

    register_embedder(BACKEND, "tests.search_doubles:MapEmbedder")


class MapEmbedder(Embedder):
    def __init__(self, ref, device):
        self.model_id = ref.spec
        self.revision = REVISION
        self.dim = DIM

    def embed_texts(self, texts):
        return l2_normalise(np.array([TEXT_VECTORS.get(t) or _hashed(t) for t in texts], dtype=np.float32))

    def embed_images(self, images):
        rows = [IMAGE_VECTORS.get(im.convert("RGB").getpixel((0, 0))) or _hashed(repr(im.size)) for im in images]
        return l2_normalise(np.array(rows, dtype=np.float32))


def _hashed(text: str) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=DIM).tolist()
