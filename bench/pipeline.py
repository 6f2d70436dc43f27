"""Pipeline throughput against a plain single-process loop doing the same work.

    python bench/pipeline.py --images 200
    python bench/pipeline.py --images 1000 --size 640x480 --device cuda

Both sides list the same JPEGs, decode them with pipeline.decode, caption them
plus the default probes with the tiny VLM, embed them with the tiny open_clip
model, and write Parquet. The pipeline side is `captioner run` (run_job on an
embedded local Ray, start-up included); the loop side is the obvious script
one would write without Ray. Printed: images/s of each and their ratio, and
the pipeline's fixed cost, measured on its own: Ray's start and stop (an
empty session), and a whole one-image run (Ray, one caption and one embed
actor loading their models, the first batch). The steady-state ratio leaves
that fixed cost out of the pipeline's time.

The tiny models make model time small, so this measures what the pipeline
itself costs or saves (decode parallelism, Ray overhead), not GPU throughput.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# The repo root instead of bench/: Ray puts the driver's script folder on its
# workers' path when the driver has it, and there this file would shadow the
# pipeline package ("'pipeline' is not a package").
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.config import CaptionConfig, DecodeConfig, EmbedConfig, RunConfig  # noqa: E402
from pipeline.models import build_captioner, build_embedder, resolve_captioner, resolve_embedder  # noqa: E402
from examples.tiny_models import build_tiny_open_clip, build_tiny_vlm  # noqa: E402
from pipeline.probes import default_probes  # noqa: E402
from examples.synthetic_photos import make_jpegs  # noqa: E402


def plain_loop(photos: Path, out: Path, config: RunConfig) -> float:
    """The single-process baseline: same decode, same models, same batch sizes."""
    from pipeline.decode import load_image
    from pipeline.sources import list_images

    started = time.perf_counter()
    captioner = build_captioner(resolve_captioner(config.caption.model), config.caption, config.device)
    embedder = build_embedder(resolve_embedder(config.embed.model), config.device)
    items = list_images(str(photos), extensions=config.decode.extensions)
    rows = []
    batch = config.caption.batch_size
    for start in range(0, len(items), batch):
        decoded = [load_image(item.uri, config.decode) for item in items[start : start + batch]]
        good = [d for d in decoded if d.ok]
        descriptions = captioner.describe([d.image for d in good], config.caption.probes)
        vectors = embedder.embed_images([d.image for d in good])
        for d, description, vector in zip(good, descriptions, vectors):
            rows.append({"uri": d.uri, "image_id": d.image_id, "caption": description.caption,
                         "answers": list(description.answers), "embedding": vector.tolist()})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return time.perf_counter() - started


def ray_pipeline(config: RunConfig) -> float:
    from jobs.caption_job import run_job

    started = time.perf_counter()
    summary = run_job(config, progress=False, echo=lambda message: None)
    elapsed = time.perf_counter() - started
    assert summary.ok == summary.listed, summary.lines()
    return elapsed


def ray_start_stop(config: RunConfig) -> float:
    from jobs.ray_plan import ray_session

    started = time.perf_counter()
    with ray_session(config):
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root / "photos", args.images, size=(width, height))
        vlm, clip = build_tiny_vlm(root / "vlm"), build_tiny_open_clip(root / "clip")
        config = RunConfig(
            source=str(root / "photos"),
            output=str(root / "pipeline.parquet"),
            device=args.device,
            decode=DecodeConfig(),
            caption=CaptionConfig(model=str(vlm), probes=default_probes(), batch_size=args.batch_size),
            embed=EmbedConfig(model=str(clip), batch_size=args.batch_size),
        )

        loop_s = plain_loop(root / "photos", root / "loop.parquet", config)
        pipeline_s = ray_pipeline(config)
        ray_s = ray_start_stop(config)
        one = config.model_copy(update={"limit": 1, "output": str(root / "one.parquet")})
        one_s = ray_pipeline(one)

    n = args.images
    print(f"images: {n} JPEGs {width}x{height}, caption + {len(config.caption.probes)} probes + embedding, "
          f"tiny models, device {args.device}, batch {args.batch_size}")
    print(f"plain single-process loop : {loop_s:7.2f} s  {n / loop_s:8.2f} images/s")
    print(f"captioner run (local Ray) : {pipeline_s:7.2f} s  {n / pipeline_s:8.2f} images/s  (Ray start-up included)")
    print(f"ratio pipeline/loop images/s: {loop_s / pipeline_s:.2f}x")
    print(f"fixed cost: Ray start+stop {ray_s:.2f} s; a 1-image run {one_s:.2f} s "
          f"(Ray, actor start + model load, first batch, shutdown)")
    steady = max(pipeline_s - one_s, 1e-9)
    print(f"steady-state ratio (pipeline less the 1-image run's cost): {(loop_s * (n - 1) / n) / steady:.2f}x")


if __name__ == "__main__":
    main()
