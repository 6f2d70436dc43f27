"""Build tiny, randomly initialised models for trying captioner offline.

    python examples/make_tiny_models.py .tiny-models
    captioner run examples/photos --out out/captions.parquet \
        --caption-model .tiny-models/vlm --embed-model .tiny-models/clip

They load through exactly the code path a real local model takes (a
transformers save_pretrained directory; an open_clip config + weights
directory), so the whole pipeline runs for real, but their weights are random:
captions are strings of random words and embeddings carry no meaning. Use them
to check an installation, a cluster or throughput, not results.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The builders live beside this script (examples/tiny_models.py), not in the installed library.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_tiny_open_clip, build_tiny_vlm  # noqa: E402

if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".tiny-models")
    print("caption model:", build_tiny_vlm(root / "vlm"))
    print("embed model:  ", build_tiny_open_clip(root / "clip"))
