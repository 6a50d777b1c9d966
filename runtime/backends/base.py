"""The vision backend interface every backend implements: pixels [B, 3, H, W] -> image tokens [B, K, D]."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vzedge.runtime.preprocess import Preprocess


class Prepared(NamedTuple):
    """Preprocessed input of one question: pixels [B, 3, H, W] (anyres: [N, crops, 3, H, W] and image_sizes)."""

    pixels: torch.Tensor
    image_sizes: torch.Tensor | None = None


class VisionBackend:
    """pixels -> tokens. `projected` says whether tokens are already in the LLM's width."""

    name = "vision"
    max_batch: int = 64  # the most frames one encode() call takes (an export's batch profile may be smaller)
    num_tokens: int
    projected: bool
    preprocess: Preprocess
    manifest: dict[str, Any] | None = None

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, images: list[Any]) -> Prepared:
        """PIL images -> what `encode_prepared` takes (the manifest's preprocessing by default)."""
        return Prepared(self.preprocess.batch(images))

    def encode_prepared(self, prepared: Prepared) -> torch.Tensor:
        """All images of one question -> their tokens one after another, [1, T, D]. Each image is encoded on its
        own (in chunks of `max_batch`)."""
        px = prepared.pixels
        tokens = torch.cat([self.encode(px[i : i + self.max_batch]) for i in range(0, len(px), self.max_batch)])
        return tokens.reshape(1, -1, tokens.shape[-1])
