"""The runtime's text-conditioned stage 2: K of a frame's cached image tokens per question (conditional DPP).

Stage 1 is the vision backend as configured (PyTorch with all tokens for CDPruner's setting, a selector's
K1 tokens, or an exported graph): its LLM-width tokens are cached per image by content as before. Stage 2
runs per question on those cached tokens (`vzedge.select.textcond.TextStage`), so the image is encoded once
and only the selection and the prefill of K tokens repeat when the question changes. The KV prefix then
depends on the question and is reused only for the same (image, question).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from vzedge.bench import sync
from vzedge.models.textstage import embed_questions
from vzedge.runtime.backends.base import VisionBackend
from vzedge.runtime.backends.llm import LLMBackend
from vzedge.select.textcond import TextStage


class RuntimeTextStage:
    """Selects `k` tokens per frame of a clip from the vision backend's cached tokens, given the question."""

    def __init__(self, k: int, vision: VisionBackend, llm: LLMBackend) -> None:
        self.stage = TextStage(k)
        self.k = k
        self.llm = llm
        from vzedge.runtime.backends.vision import AnyresVisionBackend

        if isinstance(vision, AnyresVisionBackend):
            raise ValueError(
                "--text-stage supports LLaVA-1.5 models (one crop per image): an anyres model's crops are "
                "arranged around the selected tokens; drop --text-stage"
            )
        if not vision.projected:
            raise ValueError(
                "--text-stage needs image tokens in the LLM's width (relevance is measured against the LLM's "
                "embeddings): export the graph with --projector, or drop --vision"
            )
        if k >= vision.num_tokens:
            raise ValueError(
                f"--text-stage {k} keeps all or more of the {vision.num_tokens} tokens stage 1 gives; pass "
                f"--text-stage < {vision.num_tokens}, or cache more in stage 1 with --all-tokens (all patches)"
            )
        self.stage1_tokens = vision.num_tokens

    @torch.inference_mode()
    def select(self, tokens: torch.Tensor, question: str, frames: int = 1) -> tuple[torch.Tensor, float]:
        """tokens [1, frames * N1, D] (one clip, frames one after another) -> ([1, frames * k, D], ms)."""
        t0 = time.perf_counter()
        _, total, d = tokens.shape
        if total % frames:
            raise ValueError(f"{total} cached tokens do not split into {frames} frames")
        per_frame = tokens.reshape(frames, total // frames, d)
        text, mask = embed_questions(self.llm.vlm, self.llm.tokenizer, [question])
        text = text.to(per_frame.device, per_frame.dtype).expand(frames, -1, -1)
        mask = mask.to(per_frame.device).expand(frames, -1)
        kept, _ = self.stage.select(per_frame, text, mask)
        out = kept.reshape(1, frames * self.k, d)
        sync(out.device)
        return out, (time.perf_counter() - t0) * 1e3

    def describe(self) -> dict[str, Any]:
        return {**self.stage.describe(), "stage1_tokens": self.stage1_tokens}
