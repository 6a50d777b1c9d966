"""The built-in models: LLaVA-1.5's architecture at toy width.

Two variants share the architecture (a CLIP-style tower with a CLS token, LLaVA's two-layer MLP
projector, a small Llama, a byte-level tokenizer built locally):

- `tiny`: trained on the synthetic VQA of `vzedge.synth` by `scripts/train_tiny.py` and shipped as a
  folder under `weights/tiny` (224 px, patch 14: 256 patches + CLS). `load_model("tiny")` reads it with
  `from_pretrained`, the same path as a user's local folder.
- `tiny-random`: `build_tiny()`, random weights from a fixed seed at LLaVA-1.5's geometry (336 px,
  patch 14: 576 patches + CLS), for tests that need a quick model.

Every linear layer's in/out features are multiples of 32 (bitsandbytes' 4-bit CPU path asserts
otherwise on avx512_bf16 machines) and of 128 on the LLM's inputs (AWQ group size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_SEED = 20250601
RANDOM_IMAGE_SIZE = 336  # tiny-random: LLaVA-1.5's 24 x 24 grid
TRAINED_IMAGE_SIZE = 224  # tiny (trained): 16 x 16, chosen for CPU training time (see the README)
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)
VOCAB_SIZE = 288  # 4 specials + 256 bytes, padded to a multiple of 32
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer():
    """A byte-level tokenizer: every UTF-8 byte is one token, plus the specials. No training, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<reserved_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


def weights_dir() -> Path:
    """The shipped trained model's folder (config, safetensors, tokenizer, processor)."""
    return Path(__file__).parent / "weights" / "tiny"


# Projectors shipped tuned (`vzedge tune`) for `tiny` at a VisionZip config, keyed by (dominant, contextual).
# Made with: vzedge make-data --out synth-train --n 1000 --split train; vzedge tune --model tiny --data
# synth-train/data.json --images synth-train --dominant 54 --contextual 10 --epochs 1 --lr 1e-3 --batch 8
TUNED_PROJECTORS = {(54, 10): "tiny-projector-54+10"}


def tuned_projector_dir(visionzip: Any) -> Path | None:
    """The shipped tuned projector folder of `tiny` for this VisionZipConfig (default layer and merge), or None."""
    name = TUNED_PROJECTORS.get((visionzip.dominant, visionzip.contextual))
    if name is None or (visionzip.layer, visionzip.merge) != (-2, "reference"):
        return None
    return Path(__file__).parent / "weights" / name


def tiny_config(image_size: int = RANDOM_IMAGE_SIZE, **text_overrides: Any):
    """The LlavaConfig of both variants; `image_size` sets the vision grid (patch 14)."""
    from transformers import LlamaConfig, LlavaConfig

    from vzedge.models import clip

    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    text.update(text_overrides)
    vision = clip.tiny_config(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build_processor(image_size: int = RANDOM_IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from vzedge.models.clip import CLIP_MEAN, CLIP_STD

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny(seed: int = TINY_SEED, image_size: int = RANDOM_IMAGE_SIZE):
    """`tiny-random`: (LlavaForConditionalGeneration, LlavaProcessor) with random weights, identical on
    every machine for a given seed. The trained `tiny` is `load_model("tiny")`."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_config(image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model.eval(), build_processor(image_size)
