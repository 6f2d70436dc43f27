"""CPU-side preparation (issue 9, "Preprocessing off the GPU"): what the decode stage makes from an
image is what the backend would have made itself, and the bytes between them round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import CaptionConfig
from pipeline.models.base import pack_array, unpack_array
from pipeline.models.moondream.config import CropGeometry
from pipeline.models.moondream.preprocess import (
    OFFICIAL_GEOMETRY,
    MoondreamPreprocessor,
    crops_from_bytes,
    crops_to_bytes,
    prepare_image,
)
from pipeline.models.registry import (
    build_caption_preprocessor,
    build_captioner,
    build_embed_preprocessor,
    build_embedder,
    resolve_captioner,
    resolve_embedder,
)
from tests.fault_doubles import KillableEmbedder, PoisonedCaptioner
from tests.fixtures.hf_cache import use_hf_cache
from tests.fixtures.images import noise_image
from tests.fixtures.moondream_cache import local_moondream_dir


def test_pack_round_trip_and_rejects_what_is_not_a_prepared_input():
    rng = np.random.default_rng(0)
    for array, meta in [
        (rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8), (1, 2)),
        (rng.standard_normal((3, 4, 4)).astype(np.float16), ()),
        (rng.standard_normal((2,)).astype(">f4"), (-1,)),
    ]:
        back, back_meta = unpack_array(pack_array(array, meta))
        assert back.dtype == array.dtype.newbyteorder("<") and back_meta == tuple(meta)
        np.testing.assert_array_equal(back, array)
    data = pack_array(np.zeros((2, 2), np.uint8))
    for bad in (b"", b"nope" * 4, data[:-1], data + b"x"):
        with pytest.raises(ValueError):
            unpack_array(bad)
    with pytest.raises(TypeError):
        pack_array(np.zeros(2, np.int64))


def test_moondream_crops_round_trip_and_shape_check():
    crops = prepare_image(noise_image((900, 500)), max_crops=4)
    back = crops_from_bytes(crops_to_bytes(crops), OFFICIAL_GEOMETRY.crop_size)
    assert back.tiling == crops.tiling and back.n_crops == 1 + crops.tiling[0] * crops.tiling[1]
    np.testing.assert_array_equal(back.crops, crops.crops)
    with pytest.raises(ValueError, match="not Moondream crops"):
        crops_from_bytes(pack_array(crops.crops, (crops.tiling[0] + 1, crops.tiling[1])), OFFICIAL_GEOMETRY.crop_size)
    with pytest.raises(ValueError, match="not Moondream crops"):  # cut for another model's crop size
        crops_from_bytes(crops_to_bytes(crops), 280)
    assert MoondreamPreprocessor(OFFICIAL_GEOMETRY, 4).prepare(noise_image((900, 500))) == crops_to_bytes(crops)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    use_hf_cache(monkeypatch, tmp_path / "empty_cache")


def test_moondream_prepared_inputs_give_the_same_descriptions(tmp_path, offline):
    config = CaptionConfig(max_new_tokens=6, answer_max_new_tokens=3, max_crops=3)
    ref = resolve_captioner(str(local_moondream_dir(tmp_path / "md")))
    prep = build_caption_preprocessor(ref, config)
    # max_crops comes from the run's config, the geometry from the checkpoint's, without loading weights
    assert prep == MoondreamPreprocessor(OFFICIAL_GEOMETRY, 3)
    md = build_captioner(ref, config, "cpu")
    images = [noise_image((900, 500), seed=1), noise_image((200, 300), seed=2)]  # different crop counts
    questions = ["Is there a dog?"]
    assert md.describe_prepared([prep.prepare(im) for im in images], questions) == md.describe(images, questions)


def test_moondream_crop_geometry_comes_from_the_checkpoint_config(tmp_path, offline):
    """config.json's vision crop size, overlap margin and max crops are what the decode stage cuts with."""
    import json

    image = noise_image((900, 1300), seed=5)  # 900 wide, 1300 high
    ref = resolve_captioner(str(local_moondream_dir(tmp_path / "md")))
    official = crops_from_bytes(build_caption_preprocessor(ref, CaptionConfig()).prepare(image), 378)
    assert official.crops.shape == (1 + 8, 378, 378, 3) and official.tiling == (4, 2)

    config_path = tmp_path / "md" / "config.json"
    config = json.loads(config_path.read_text())
    config["config"]["vision"].update(crop_size=280, overlap_margin=2, max_crops=4)  # 20x20 patches of 14 px
    config_path.write_text(json.dumps(config))
    prep = build_caption_preprocessor(ref, CaptionConfig())
    assert prep.geometry == CropGeometry(crop_size=280, patch_size=14, overlap_margin=2, max_crops=4)
    assert prep.max_crops == 4
    smaller = crops_from_bytes(prep.prepare(image), 280)
    # 280 px crops, 16 patches (224 px) apart, at most 4: the 6x4 minimum grid shrinks to 2x1.
    assert smaller.crops.shape == (1 + 2, 280, 280, 3) and smaller.tiling == (2, 1)
    expected_global = np.asarray(image.convert("RGB").resize((280, 280), resample=Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(smaller.crops[0], expected_global)
    # The run's max_crops still lowers the checkpoint's default.
    assert build_caption_preprocessor(ref, CaptionConfig(max_crops=2)).max_crops == 2


def test_open_clip_prepared_inputs_give_the_same_embeddings(tiny_clip_dir):
    ref = resolve_embedder(str(tiny_clip_dir))
    prep = build_embed_preprocessor(ref)
    assert prep is not None
    embedder = build_embedder(ref, "cpu")
    assert prep.cfg == embedder.preprocess_cfg  # derived without weights == what open_clip's factory set
    images = [noise_image((90, 50), seed=3), noise_image((31, 77), seed=4), Image.new("L", (40, 40), 128)]
    inputs = [prep.prepare(im) for im in images]
    array, _ = unpack_array(inputs[0])
    assert array.dtype == np.float16 and array.shape == (3, *embedder.preprocess_cfg["size"])
    expected = embedder.embed_images(images)
    got = embedder.embed_prepared(inputs)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=5e-3)  # float16 transport of the normalised pixels
    np.testing.assert_allclose((got * expected).sum(1), 1.0, atol=1e-4)
    # The transform travels to decode workers by pickle: it is rebuilt there, not shipped.
    import pickle

    assert pickle.loads(pickle.dumps(prep)).prepare(images[0]) == inputs[0]


# Configs the decode stage's own transform covers (shortest edge to a square, squash) and ones it
# leaves to open_clip (longest edge, a non-square shortest-edge target): both must give open_clip's bytes.
_OPEN_CLIP_CFGS = [
    {},
    {"size": (64, 64), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    {"size": (48, 48), "interpolation": "random"},
    {"size": (384, 384), "resize_mode": "squash", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    {"size": (32, 48), "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": (40, 40), "resize_mode": "longest", "fill_color": 0},
    {"size": (32, 48), "resize_mode": "shortest"},
]


def _awkward_images() -> list[Image.Image]:
    return [
        noise_image((90, 50), seed=3), noise_image((31, 77), seed=4), noise_image((224, 224), seed=5),
        noise_image((600, 7), seed=6), noise_image((5, 5), seed=7), noise_image((383, 384), seed=8),
        Image.new("L", (40, 41), 128), noise_image((50, 60), seed=9).convert("RGBA"),
        noise_image((70, 30), seed=10).convert("P"), noise_image((33, 33), seed=11).convert("1"),
    ]


@pytest.mark.parametrize("overrides", _OPEN_CLIP_CFGS, ids=lambda cfg: "-".join(f"{k}={v}" for k, v in cfg.items()) or "defaults")
def test_open_clip_prepared_inputs_are_open_clips_own_eval_transform_bit_for_bit(overrides):
    """The decode stage prepares images without open_clip (and torch) where it can; the bytes must be
    exactly those of open_clip's own eval transform, for every image shape and mode."""
    import dataclasses

    from pipeline.models.compat import ensure_torchvision_importable
    from pipeline.models.openclip import OpenClipPreprocessor, _normalised

    ensure_torchvision_importable()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = _normalised({**dataclasses.asdict(PreprocessCfg()), **overrides})
    reference = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    prep = OpenClipPreprocessor(cfg)
    for image in _awkward_images():
        try:
            expected = reference(image.convert("RGB")).numpy().astype(np.float16)
        except ValueError:  # open_clip cannot take it (a side scaled to 0 pixels): neither can the stage
            with pytest.raises(ValueError):
                prep.prepare(image)
            continue
        got, _ = unpack_array(prep.prepare(image))
        assert got.dtype == expected.dtype and got.shape == expected.shape, (image.size, image.mode)
        assert got.tobytes() == expected.tobytes(), (image.size, image.mode, float(np.abs(got - expected).max()))


def test_open_clip_preprocess_defaults_are_open_clips():
    """A directory model's preprocessing is derived without importing open_clip, from these defaults."""
    import dataclasses

    from pipeline.models.compat import ensure_torchvision_importable
    from pipeline.models.openclip import PREPROCESS_DEFAULTS

    ensure_torchvision_importable()
    from open_clip.transform import PreprocessCfg

    assert PREPROCESS_DEFAULTS == dataclasses.asdict(PreprocessCfg())


# A decode worker: unpickles the stage it is given, decodes the photos, says what it imported.
_DECODE_WORKER = """
import json, pickle, sys
from pathlib import Path
from pipeline.stages import decode_batch
from pipeline.stages.contract import LISTED
stage = pickle.loads(Path(sys.argv[1]).read_bytes())
paths = sorted(str(p) for p in Path(sys.argv[2]).iterdir())
batch = LISTED.table({"uri": paths, "location": [p.encode() for p in paths], "size": [1] * len(paths),
                      "source_mtime": [None] * len(paths)})
out = decode_batch(batch, stage=stage)
print(json.dumps({"status": out.column("status").to_pylist(), "prepared": out.column("embed_input").is_valid().to_pylist(),
                  "imported": sorted(m for m in ("torch", "torchvision", "open_clip", "transformers") if m in sys.modules)}))
"""


def _decode_in_a_fresh_process(stage, tmp_path) -> dict:
    import json
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from tests.fixtures.images import make_jpegs

    make_jpegs(tmp_path / "photos", 2)
    (tmp_path / "stage.pickle").write_bytes(pickle.dumps(stage))
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _DECODE_WORKER, str(tmp_path / "stage.pickle"), str(tmp_path / "photos")],
                          capture_output=True, text=True, timeout=120, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["status"] == ["ok", "ok"] and result["prepared"] == [True, True]
    return result


def _embed_only_stage(tmp_path, embed_model: str):
    from pipeline.config import RunConfig
    from pipeline.stages import StageConfig

    config = RunConfig.from_dict({"source": str(tmp_path / "photos"), "output": str(tmp_path / "o.parquet"),
                                  "caption": {"enabled": False, "probes": []}, "embed": {"model": embed_model}})
    return StageConfig(run=config, identity=None)


@pytest.mark.subprocess
def test_a_decode_worker_prepares_an_open_clip_directory_model_without_torch(tiny_clip_dir, tmp_path):
    """A decode worker imports neither torch nor open_clip to prepare a directory model's inputs: in a
    Ray worker process that import is about 3 s of CPU (and some 400 MB) per run, paid beside the
    embed actor that needs them."""
    assert _decode_in_a_fresh_process(_embed_only_stage(tmp_path, str(tiny_clip_dir)), tmp_path)["imported"] == []


@pytest.mark.subprocess
def test_a_decode_worker_prepares_a_named_open_clip_model_without_torch(offline, tmp_path):
    """A named model's preprocessing comes from open_clip's own tables: the driver, which imported
    open_clip to identify the model, builds the preprocessors once and the stage carries them."""
    from pipeline.stages.decode import with_preprocessors

    stage = with_preprocessors(_embed_only_stage(tmp_path, "open_clip:ViT-SO400M-14-SigLIP-384@webli"))
    assert stage.preprocessors[1] is not None and stage.preprocessors[1].cfg["size"] == (384, 384)
    assert _decode_in_a_fresh_process(stage, tmp_path)["imported"] == []


def test_open_clip_preprocess_config_of_builtin_names_matches_the_pretrained_cfg(offline):
    from pipeline.models.identity import model_identity
    from pipeline.models.openclip import preprocess_config

    identity = model_identity(resolve_embedder("open_clip:ViT-SO400M-14-SigLIP-384@webli"))
    cfg = preprocess_config(identity)
    assert cfg["size"] == (384, 384) and cfg["mean"] == (0.5, 0.5, 0.5) and cfg["resize_mode"] == "squash"


def test_backends_that_inspect_images_keep_getting_images():
    """Subclasses overriding the PIL entry point (the fault doubles) get no preprocessor."""
    assert KillableEmbedder.cpu_preprocessor(resolve_embedder("open_clip:ViT-B-32")) is None
    assert PoisonedCaptioner.cpu_preprocessor(None, CaptionConfig()) is None
