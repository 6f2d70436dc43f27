"""`captioner search`: the query image is decoded like a pipeline image, the query is checked before
any model loads, and a text query loads no model code at all."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.config import DecodeConfig
from pipeline.decode import decode_bytes, load_image
from pipeline.search import ImageIndex, build_index
from tests import search_doubles
from tests.search_data import crafted_rows, run_metadata, write_rows

search_doubles.register()
# The double embeds an image as the vector listed for its top-left pixel:
# white (a transparent pixel composited on white) lands on people_beach,
# the colour the transparent pixels store (blue) on sign.
WHITE, STORED = (255, 255, 255), (0, 0, 255)
search_doubles.IMAGE_VECTORS.update({WHITE: [0.4, 0, 0, 0.9165], STORED: [0.2, 0.98, 0, 0]})


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("query")
    write_rows(folder / "part-0.parquet", crafted_rows(), run_metadata())
    build_index([folder / "part-0.parquet"], folder / "index.duckdb")
    return folder / "index.duckdb"


def transparent_png() -> bytes:
    """Fully transparent pixels that store blue."""
    image = Image.new("RGBA", (40, 30), STORED + (0,))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def search_json(*args) -> list[dict]:
    result = CliRunner().invoke(main, ["search", *map(str, args), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def test_a_transparent_query_image_embeds_as_the_pipeline_and_the_page_decode_it(db, tmp_path):
    data = transparent_png()
    path = tmp_path / "query.png"
    path.write_bytes(data)
    cli = search_json("--image", path, "--index", db, "--mode", "semantic", "--limit", 3)

    pipeline_image = load_image(str(path), DecodeConfig()).image  # the decode stage's reader
    upload_image = decode_bytes("upload", data, DecodeConfig()).image  # what the page's upload handler decodes
    assert pipeline_image.getpixel((0, 0)) == WHITE == upload_image.getpixel((0, 0))
    with ImageIndex.open(db) as idx:
        pipeline_hits = [h.to_dict() for h in idx.search(image=pipeline_image, mode="semantic", k=3)]
        page_hits = [h.to_dict() for h in idx.search(image=upload_image, mode="semantic", k=3)]
    assert cli == pipeline_hits == page_hits
    assert cli[0]["uri"] == "/img/people_beach.jpg"  # composited on white, not the stored blue


def test_a_query_image_that_is_not_an_image_says_so(db, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just some text")
    result = CliRunner().invoke(main, ["search", "--image", str(path), "--index", str(db)])
    assert result.exit_code == 1 and "--image" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["search", "--image", str(tmp_path / "gone.png"), "--index", str(db)])
    assert result.exit_code == 1 and "gone.png" in result.output and "no such file" in result.output


# -- the query is checked before anything loads; text queries import no model code -----------------


def fresh_search(db, *argv) -> subprocess.CompletedProcess:
    """`captioner search ARGV` in a new interpreter; prints the model modules it imported on the last line."""
    code = f"""
        import sys
        from click.testing import CliRunner
        from tests import search_doubles
        search_doubles.register()
        from pipeline.cli import main
        result = CliRunner().invoke(main, ["search", *{list(map(str, argv))!r}, "--index", {str(db)!r}])
        print(result.output)
        print(result.exit_code)
        print(sorted(m for m in ("torch", "torchvision", "open_clip", "transformers") if m in sys.modules))
    """
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
def test_a_text_search_never_imports_torch(db):
    done = fresh_search(db, "beach", "--mode", "text")
    assert done.returncode == 0, done.stderr[-3000:]
    *output, code, modules = done.stdout.strip().splitlines()
    assert "/img/people_beach.jpg" in "\n".join(output) and code == "0"
    assert modules == "[]"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["beach", "--where", "widht > 10"], "widht"),
        (["beach", "--probe", "Is there a unicorn?=yes"], "unicorn"),
        (["beach", "--mode", "semantic", "--where", "1=1; DROP TABLE images"], "single SQL expression"),
    ],
)
def test_a_bad_filter_is_reported_before_the_embedder_loads(db, argv, says, monkeypatch):
    """Semantic and hybrid queries check --where/--probe first: the embedder is never built."""
    built = []

    def build(self):
        built.append(True)
        raise AssertionError("the embedder was loaded before the query was checked")

    monkeypatch.setattr(ImageIndex, "_build_embedder", build)
    result = CliRunner().invoke(main, ["search", *argv, "--index", str(db)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert says in result.output and not built
