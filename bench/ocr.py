"""OCR quality and speed with real weights, on images whose text is known.

    python bench/ocr.py                 # 60 generated images, RapidOCR's test files, 30 text-free scenes
    python bench/ocr.py --count 120 --threads 2

Three sets, each read by the pipeline's own reader (pipeline.ocr, the same
config the OCR stage gets) and, side by side in the same run, by Debian's
Tesseract when its ``tesseract`` binary is installed:

  * generated: text drawn with the fonts Debian ships (examples/text_images.py):
    several fonts and sizes, rotation up to 10 degrees, plain, photo-like and
    low-contrast backgrounds, one line and three;
  * external: RapidOCR's own test images with the first line its test suite
    asserts (bench/rapidocr_test_files/, Apache-2.0);
  * text-free: the example photos without text (examples/photos, the shop sign
    left out) and generated scenes with bars and shapes.

Printed per set and engine: character error rate (edit distance / length of
the expected text, both with whitespace collapsed, case kept), word recall
(expected words, case-folded, found among the words read), images/s on this
CPU with ``--threads`` onnxruntime threads, and on the text-free set the
false-positive rate (images where any letter or digit was read). The
generated set is also broken down by background, size and rotation.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from PIL import Image, ImageOps  # noqa: E402

from examples.text_images import text_free_scenes, text_set  # noqa: E402
from pipeline.config import OcrConfig  # noqa: E402
from pipeline.ocr import build_reader, ocr_identity  # noqa: E402

EXTERNAL = _HERE / "rapidocr_test_files"
PHOTOS = _HERE.parent / "examples" / "photos"
PHOTOS_WITH_TEXT = {"shop_sign.jpg"}


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def flat(text: str) -> str:
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return re.findall(r"[\w:.]+", text.lower())


def word_recall(expected: str, read: str) -> tuple[int, int]:
    found = words(read)
    hits = 0
    for word in words(expected):
        if word in found:
            found.remove(word)
            hits += 1
    return hits, len(words(expected))


class Rapid:
    name = "rapidocr"

    def __init__(self, threads: int):
        self.reader = build_reader(OcrConfig(), threads)

    def read(self, image: Image.Image) -> str:
        return self.reader.read(image).text


class Tesseract:
    name = "tesseract"

    def __init__(self, threads: int):
        self.env = {"OMP_THREAD_LIMIT": str(threads), "PATH": "/usr/bin:/bin"}

    @staticmethod
    def available() -> bool:
        return shutil.which("tesseract") is not None

    def read(self, image: Image.Image) -> str:
        import io

        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG")
        out = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "3", "-l", "eng"], input=buffer.getvalue(),
                             capture_output=True, env=self.env, check=False)
        return "\n".join(line for line in out.stdout.decode("utf-8", "replace").splitlines() if line.strip())


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def measure(engine, items, *, first_only: bool = False) -> dict:
    """items: (name, image, expected, tags). CER, word recall, images/s, and per-tag CER."""
    errors = chars = hits = total = 0
    by_tag = defaultdict(lambda: [0, 0])
    started = time.perf_counter()
    reads = []
    for name, image, expected, tags in items:
        reads.append(engine.read(image))
    elapsed = time.perf_counter() - started
    for (name, image, expected, tags), read in zip(items, reads):
        got = flat(first_line(read) if first_only else read)
        want = flat(expected)
        distance = edit_distance(want, got)
        errors, chars = errors + distance, chars + len(want)
        h, t = word_recall(want, got)
        hits, total = hits + h, total + t
        for tag in tags:
            by_tag[tag][0] += distance
            by_tag[tag][1] += len(want)
    return {
        "cer": errors / max(1, chars), "word_recall": hits / max(1, total), "images_per_s": len(items) / elapsed,
        "by_tag": {tag: e / max(1, c) for tag, (e, c) in sorted(by_tag.items())}, "reads": reads,
    }


def false_positives(engine, images) -> tuple[float, float, list[str]]:
    started = time.perf_counter()
    reads = [engine.read(image) for image in images]
    elapsed = time.perf_counter() - started
    hallucinated = [r for r in reads if any(ch.isalnum() for ch in r)]
    return len(hallucinated) / max(1, len(images)), len(images) / elapsed, hallucinated


def external_items() -> list:
    expected = json.loads((EXTERNAL / "expected.json").read_text(encoding="utf-8"))
    items = []
    for name, text in expected.items():
        if text:
            image = ImageOps.exif_transpose(Image.open(EXTERNAL / name))
            items.append((name, image.convert("RGB") if image.mode != "RGBA" else _on_white(image), text, ()))
    return items


def _on_white(image: Image.Image) -> Image.Image:
    # As pipeline.decode does: transparency on white.
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background


def text_free_items(count: int) -> list[Image.Image]:
    photos = []
    for path in sorted(PHOTOS.iterdir()):
        if path.name in PHOTOS_WITH_TEXT:
            continue
        try:
            image = Image.open(path)
            image.load()
        except Exception:  # noqa: BLE001 - the examples include a broken download on purpose
            continue
        photos.append(_on_white(image) if image.mode == "RGBA" else ImageOps.exif_transpose(image).convert("RGB"))
    empty = ImageOps.exif_transpose(Image.open(EXTERNAL / "empty_black.jpg")).convert("RGB")
    return photos + [empty] + text_free_scenes(count, seed=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=60, help="generated images with text")
    parser.add_argument("--scenes", type=int, default=30, help="generated text-free scenes")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (an OCR actor's CPU share)")
    args = parser.parse_args()

    generated = [
        (t.name, t.image, t.text, (f"bg={t.background}", f"size={t.size}", f"rot={abs(t.rotation)}",
                                   "lines=1" if "\n" not in t.text else "lines=3"))
        for t in text_set(args.count)
    ]
    external = external_items()
    free = text_free_items(args.scenes)
    engines = [Rapid(args.threads)]
    if Tesseract.available():
        engines.append(Tesseract(args.threads))
    model, revision = ocr_identity("rapidocr")
    print(f"rapidocr: {model} {revision.split(';')[0]}; {args.threads} thread(s)")
    if len(engines) == 1:
        print("tesseract: not installed (apt-get install tesseract-ocr to compare)")
    # Warm-up: onnxruntime's first run pays for graph optimisation.
    for engine in engines:
        engine.read(generated[0][1])

    print(f"\n{'set':<22}{'engine':<11}{'CER':>7}{'word recall':>13}{'images/s':>10}")
    results = {}
    for engine in engines:
        results[engine.name] = measure(engine, generated)
        ext = measure(engine, external, first_only=True)
        fpr, free_rate, hallucinated = false_positives(engine, free)
        results[engine.name + "_fp"] = (fpr, hallucinated)
        r = results[engine.name]
        print(f"{'generated (%d)' % len(generated):<22}{engine.name:<11}{r['cer']:>7.3f}{r['word_recall']:>13.3f}{r['images_per_s']:>10.2f}")
        print(f"{'external (%d)' % len(external):<22}{engine.name:<11}{ext['cer']:>7.3f}{ext['word_recall']:>13.3f}{ext['images_per_s']:>10.2f}")
        print(f"{'text-free (%d)' % len(free):<22}{engine.name:<11}{'false positives %.3f' % fpr:>30}{free_rate:>10.2f}")
    print("\ngenerated set, CER by condition:")
    tags = sorted(results[engines[0].name]["by_tag"])
    print(f"  {'condition':<18}" + "".join(f"{e.name:>11}" for e in engines))
    for tag in tags:
        print(f"  {tag:<18}" + "".join(f"{results[e.name]['by_tag'][tag]:>11.3f}" for e in engines))
    for engine in engines:
        fpr, hallucinated = results[engine.name + "_fp"]
        if hallucinated:
            print(f"\n{engine.name} read text in text-free images: {[h[:40] for h in hallucinated]}")
    if len(engines) == 2:
        a, b = (results[e.name] for e in engines)
        print(f"\nratios on the generated set (rapidocr / tesseract): CER {a['cer'] / max(b['cer'], 1e-9):.2f}, "
              f"word recall {a['word_recall'] / max(b['word_recall'], 1e-9):.2f}, "
              f"images/s {a['images_per_s'] / b['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
