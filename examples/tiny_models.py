"""Tiny, randomly initialised models built entirely offline (examples/make_tiny_models.py; the tests' fixtures).

Not part of the installed library: a tool for trying captioner without a
model hub, and for the tests and benchmarks, which need real model objects
that go through the same loading code a user's downloaded model does (save_pretrained directories, open_clip
config + weights), but no hub is reachable and real weights are gigabytes.
These builders make a ~250 kB VLM and a ~3 MB open_clip model in well under a
second (once torch/transformers are imported). Their output is gibberish but
deterministic for a seed, which is all tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.models.compat import ensure_torchvision_importable

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
TINY_CLIP_DIM = 32

# Training text for the tiny tokenizer: words a captioner and its probes use,
# so prompts tokenize into known words rather than <unk>.
_CORPUS = """
a photo of a cat sitting on a sofa next to a dog. the dog is brown and the cat is white.
describe this image in detail. write a short caption for the image. write a long and detailed
description of the picture. is there a person in the image? are there any animals? is it day or
night? what colour is the car? how many people are there? yes no maybe one two three four five many.
the picture shows a street with cars, trees, buildings, a red bus and people walking in the rain.
a plate of food on a wooden table with a cup of coffee, a knife, a fork and a glass of water.
a mountain landscape with snow, a blue sky, clouds, a lake and green grass in the summer sun.
question answer user assistant image text screenshot document chart diagram logo drawing painting
indoor outdoor beach city forest road sign window door room kitchen bedroom office computer phone.
user: assistant: "quoted" (brackets) - it's; wow!
"""

# Minimal chat template in the shape transformers' multimodal processors expect:
# content is a list of {"type": "image"} / {"type": "text", "text": ...} parts.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
    # Whole lower-cased words, no subwords: random generations decode to real
    # words separated by spaces ("cat road snow the"), which keeps captions
    # readable in examples and searchable by the full-text index. Words outside
    # the corpus encode as <unk>, which is fine for a random model.
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )


def build_tiny_vlm(directory: Path, seed: int = 0) -> Path:
    """Save a tiny LLaVA (CLIP vision tower + Llama text model) and its processor."""
    ensure_torchvision_importable()
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    # Random init would make the logits almost flat; scaling the LM head makes
    # greedy decoding pick clear winners, so outputs do not flip on float noise
    # between batched and unbatched runs.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)

    image_processor = LlavaImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)
    return directory


def tiny_open_clip_config(vision: dict | None = None) -> dict:
    """An open_clip model config: 2-layer ViT on 32x32 images, 2-layer text transformer, 32-d embeddings.

    vocab_size and context_length match open_clip's bundled CLIP BPE tokenizer
    (49408 tokens, 77 positions), so the default tokenizer works with no download.
    ``vision`` overrides keys of the vision tower's config (see :data:`PACED_VISION`).
    """
    return {
        "embed_dim": TINY_CLIP_DIM,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": PATCH_SIZE,
                       **(vision or {})},
        # width 16: the 49408-row token embedding dominates the file size (~3 MB).
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
    }


# A vision tower that costs ~40 ms an image on one core of a 2-core CI machine: a
# run over 100 images lasts seconds after its first rows arrive, not the ~0.1 s
# of the tiny one, so a test can stop or kill it with most of the work ahead.
PACED_VISION = {"image_size": 224, "layers": 12, "width": 256, "head_width": 32, "patch_size": 16}


def build_tiny_open_clip(directory: Path, seed: int = 0, vision: dict | None = None) -> Path:
    """Save open_clip_config.json + open_clip_model.safetensors, the layout of a local open_clip model.

    ``vision`` overrides keys of the vision tower's config (:func:`tiny_open_clip_config`).
    """
    ensure_torchvision_importable()
    import open_clip
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_open_clip_config(vision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    preprocess_cfg = {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    # safetensors refuses tensors that share storage; clone to be safe.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory
