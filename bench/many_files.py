"""Many tiny files: a 100,000-file run lists, schedules and finishes with bounded driver memory.

    python bench/many_files.py --files 100000
    python bench/many_files.py --files 100000 --limit 20000   # the whole listing, a part of it processed
    python bench/many_files.py --files 20000 --size 320x240   # bigger pixels, same driver memory

Writes --files copies of one tiny JPEG under a temporary folder (each with a
few distinct bytes after the end-of-image marker, so every file is its own
image with its own image_id), builds the tiny open_clip model, and runs the
job in this process, which is the driver: --no-caption, embeddings into a
directory output on an embedded local Ray.

Prints files, listing time, elapsed, images/s and driver memory: the RSS
after imports, after the listing, and the peak (ru_maxrss of this process;
Ray's workers are processes of their own and not counted). A driver that
held every decoded image would grow with the file count; this one holds the
listing, the input blocks (names and sizes) and one part file's rows.
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from jobs.caption_job import run_job  # noqa: E402
from pipeline.config import IMAGE_EXTENSIONS, RunConfig  # noqa: E402
from pipeline.sources import list_images  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def write_files(folder: Path, count: int, size: tuple[int, int]) -> float:
    started = time.monotonic()
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, "JPEG", quality=80)
    tiny = buffer.getvalue()
    # 1000 files per folder: a flat folder of 100,000 is its own stress test, not this one.
    for index in range(count):
        sub = folder / f"{index // 1000:04d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{index:07d}.jpg").write_bytes(tiny + index.to_bytes(4, "big"))
    return time.monotonic() - started


def build_clip(folder: Path) -> Path:
    # In a child process, so torch and the model never count against the driver's memory.
    code = "import sys; from examples.tiny_models import build_tiny_open_clip as b; b(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, cwd=Path(__file__).resolve().parents[1])
    return folder


class PeakSampler(threading.Thread):
    """The highest RSS seen while the job runs, sampled every 0.2 s (ru_maxrss cannot be reset)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, rss_mb())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--limit", type=int, help="process only the first N files of the listing")
    parser.add_argument("--size", default="16x12", help="pixel size of every image, WxH: larger ones show "
                        "that decoded pixels are not what the driver holds (default: 16x12)")
    parser.add_argument("--rows-per-part", type=int, default=10_000)
    parser.add_argument("--decode-batch-size", type=int, default=256)
    parser.add_argument("--embed-batch-size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, help="where to write the files (default: a temporary folder, removed)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="captioner-many-"))
    try:
        source, out = workdir / "photos", workdir / "out"
        size = tuple(int(v) for v in args.size.lower().split("x"))
        write_s = write_files(source, args.files, size)
        clip = build_clip(workdir / "clip")
        baseline = rss_mb()

        started = time.monotonic()
        listed = list_images(str(source), extensions=IMAGE_EXTENSIONS)
        list_s = time.monotonic() - started
        after_listing = rss_mb()
        del listed

        config = RunConfig.from_dict(
            {
                "source": str(source),
                "output": f"{out}/",
                "device": "cpu",
                "limit": args.limit,
                "rows_per_part": args.rows_per_part,
                "caption": {"enabled": False},
                "embed": {"model": f"open_clip:{clip}", "batch_size": args.embed_batch_size},
                "ray": {"decode_batch_size": args.decode_batch_size},
            }
        )
        sampler = PeakSampler()
        sampler.start()
        summary = run_job(config, progress=False)
        sampler.stop.set()

        decoded_gb = args.files * size[0] * size[1] * 3 / 1e9
        print(f"files             {args.files} of {args.size} ({decoded_gb:.1f} GB if all were held decoded), "
              f"written in {write_s:.1f} s, listed in {list_s:.1f} s")
        print(f"processed         {summary.processed} ({summary.ok} ok, {summary.errors} errors), {summary.total_rows} rows")
        print(f"elapsed           {summary.elapsed_s:.1f} s (listing, Ray start, run, finalize)")
        print(f"images/s          {summary.images_per_s:.1f}")
        print(f"driver RSS        {baseline:.0f} MB after imports, {after_listing:.0f} MB after listing, "
              f"{sampler.peak:.0f} MB peak during the run")
        print(f"driver peak RSS   {peak_rss_mb():.0f} MB (ru_maxrss, whole process lifetime)")
        return 0 if summary.errors == 0 else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
