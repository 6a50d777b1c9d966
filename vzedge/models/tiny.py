"""The built-in `tiny` model: LLaVA-1.5's architecture and token geometry at toy width.

Built offline from a fixed seed: a CLIP-style tower (336 px, patch 14, so 576 patches + CLS as in
LLaVA-1.5), LLaVA's two-layer MLP projector, a small Llama, and a byte-level tokenizer built locally.
Every linear layer's in/out features are multiples of 32 (bitsandbytes' 4-bit CPU path asserts
otherwise on avx512_bf16 machines) and of 128 on the LLM's inputs (AWQ group size).
"""

from __future__ import annotations

from typing import Any

import torch

TINY_SEED = 20250601
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


def tiny_config(**text_overrides: Any):
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
    vision = clip.tiny_config(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
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


def build_processor(image_size: int = 336, patch_size: int = 14):
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


def build_tiny(seed: int = TINY_SEED):
    """(LlavaForConditionalGeneration, LlavaProcessor), identical on every machine for a given seed."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model.eval(), build_processor()
