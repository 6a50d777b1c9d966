"""The text-conditioned second stage on a loaded LLaVA-1.5: cache the image once, select per question.

Stage 1 (image only, cached): the model's own projected features of all patch tokens, exactly what the
stock model feeds its LLM (`image_cache_tokens`). Keeping all of them rather than a stage-1 selector's
K1 > K is a memory decision: 576 x 4096 bf16 is 4.7 MB per LLaVA-1.5-7B image, while the KV prefix the
text-agnostic path caches for the same 576 tokens is 32 layers x 2 x 576 x 4096 x 2 B = 302 MB; a cache of
a few images' features costs nothing next to either. Stage 1 can also be any image-only token set of the
LLM's width (a selector's K1 tokens, an exported graph with `--projector`); stage 2 only sees tokens.

Stage 2 (per question): the question's tokens through the LLM's input embedding table, relevance per
cached token, conditional DPP (`vzedge.select.textcond`), K tokens in sequence order
(`select_for_questions`). `generate_text_conditioned` answers with them through `inputs_embeds`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vzedge.models.base import llava_parts
from vzedge.select.textcond import TextStage

__all__ = ["embed_questions", "generate_text_conditioned", "image_cache_tokens", "select_for_questions"]


def _check_llava15(vlm: nn.Module) -> Any:
    inner = llava_parts(vlm)
    if type(inner).__name__ != "LlavaModel":
        raise ValueError(
            f"the text stage supports LLaVA-1.5 (one crop per image), not {type(inner).__name__}: its anyres "
            "crops are arranged around the selected tokens"
        )
    return inner


@torch.no_grad()
def image_cache_tokens(vlm: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Stage 1: the model's projected features of every image token it would use: [B, N, D_llm]."""
    inner = _check_llava15(vlm)
    device = next(inner.vision_tower.parameters()).device
    feats = inner.get_image_features(
        pixel_values=pixel_values.to(device=device, dtype=vlm.dtype),
        vision_feature_layer=vlm.config.vision_feature_layer,
        vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(feats))


@torch.no_grad()
def embed_questions(vlm: nn.Module, tokenizer: Any, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's input embeddings of each question's tokens (no special tokens), right-padded:
    ([B, T, D_llm], mask [B, T] True on question tokens)."""
    if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
        raise ValueError("the text stage conditions on the question: pass a non-empty question per image")
    ids = [tokenizer(q.replace("<image>", "").strip(), add_special_tokens=False)["input_ids"] for q in questions]
    t = max(len(i) for i in ids)
    embed = vlm.get_input_embeddings()
    dev = embed.weight.device
    padded = torch.zeros(len(ids), t, dtype=torch.long, device=dev)
    mask = torch.zeros(len(ids), t, dtype=torch.bool, device=dev)
    for row, i in enumerate(ids):
        padded[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        mask[row, : len(i)] = True
    return embed(padded), mask


@torch.no_grad()
def select_for_questions(
    vlm: nn.Module, tokenizer: Any, cached: torch.Tensor, questions: list[str], stage: TextStage
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: cached [B, N, D_llm] (one question per image) -> (tokens [B, K, D_llm], kept positions [B, K])."""
    if cached.shape[0] != len(questions):
        raise ValueError(f"{cached.shape[0]} cached images but {len(questions)} questions: pass one per image")
    text, mask = embed_questions(vlm, tokenizer, questions)
    return stage.select(cached, text.to(cached.device), mask.to(cached.device))


@torch.no_grad()
def generate_text_conditioned(
    vlm: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    image_tokens: torch.Tensor,
    max_new_tokens: int,
    image_token: str = "<image>",
) -> list[str]:
    """Greedy answers to `prompts` (each with one `image_token`) with image_tokens [B, K, D_llm] in its place,
    fed as `inputs_embeds`: the same merge the stock model does with its own image features."""
    b, k, _ = image_tokens.shape
    if len(prompts) != b or any(p.count(image_token) != 1 for p in prompts):
        raise ValueError(f"pass {b} prompts, each with exactly one {image_token!r}")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([p.replace(image_token, image_token * k) for p in prompts], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    embed = vlm.get_input_embeddings()
    ids = enc["input_ids"].to(embed.weight.device)
    where = ids == vlm.config.image_token_id
    if int(where.sum()) != b * k:
        raise ValueError(f"the prompts hold {int(where.sum())} image placeholders after expansion, expected {b * k}")
    embeds = embed(ids).masked_scatter(where.unsqueeze(-1), image_tokens.to(ids.device, embed.weight.dtype))
    eos = vlm.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = vlm.generate(
        inputs_embeds=embeds,
        attention_mask=enc["attention_mask"].to(ids.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return tokenizer.batch_decode(out, skip_special_tokens=True)
