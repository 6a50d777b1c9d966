"""A per-image token budget chosen from the image itself, rounded to a few static buckets.

Rule (`AdaptiveBudget`): at the selection layer, the smallest number of patches whose attention scores
(CLS-row attention for CLIP, attention received for SigLIP) hold a share `mass` of the total, plus CLS where
there is one, rounded up to the next bucket (the largest bucket when none is enough). An image whose
attention is concentrated on a few patches gets a small budget; a cluttered one a large budget.

Each bucket is a constant token count, so each keeps static shapes: the encoder runs the layers once, then
the selector once per bucket present in the batch, on that bucket's images. At bucket K a two-part
selector (visionzip, vispruner) splits K in the paper's 54:10 dominant:contextual ratio (`split_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAPER_DOMINANT, PAPER_CONTEXTUAL = 54, 10


def split_budget(k: int) -> tuple[int, int]:
    """The paper's dominant:contextual ratio (54:10) at k tokens: (dominant, contextual), dominant >= 1."""
    dominant = max(1, round(k * PAPER_DOMINANT / (PAPER_DOMINANT + PAPER_CONTEXTUAL)))
    return dominant, k - dominant


@dataclass(frozen=True)
class AdaptiveBudget:
    """buckets: the token counts an image may get (ascending after validation); mass: the share of the
    attention mass the kept patches must hold (0 < mass <= 1)."""

    buckets: tuple[int, ...] = (16, 32, 64)
    mass: float = 0.5

    def __post_init__(self) -> None:
        b = tuple(self.buckets)
        if not b or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in b):
            raise ValueError(f"buckets={self.buckets!r}: pass positive token counts, e.g. --adaptive 16,32,64")
        if len(set(b)) != len(b):
            raise ValueError(f"buckets={self.buckets!r} repeats a count; list each bucket once")
        object.__setattr__(self, "buckets", tuple(sorted(b)))
        if isinstance(self.mass, bool) or not isinstance(self.mass, (int, float)) or not 0 < self.mass <= 1:
            raise ValueError(f"mass={self.mass!r}: use a share of the attention mass in (0, 1], e.g. 0.5")

    def to_dict(self) -> dict[str, object]:
        return {"buckets": list(self.buckets), "mass": self.mass, "rule": "attention-mass share, rounded up"}

    def counts(self, scores: torch.Tensor, has_cls: bool) -> torch.Tensor:
        """scores [B, N] -> tokens each image needs before rounding, [B] int64 (CLS included)."""
        return tokens_for_mass(scores[:, int(has_cls) :], self.mass) + int(has_cls)

    def bucket_index(self, scores: torch.Tensor, has_cls: bool) -> torch.Tensor:
        """scores [B, N] -> index into `buckets` per image, [B] int64."""
        return choose_buckets(self.counts(scores, has_cls), self.buckets)


def tokens_for_mass(patch_scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Smallest k per row whose top-k scores hold `mass` of the row's total: [B, N] -> [B] int64 in [1, N]."""
    p = patch_scores.float().clamp(min=0)
    p = p / p.sum(dim=1, keepdim=True).clamp(min=1e-12)
    cum = torch.sort(p, dim=1, descending=True).values.cumsum(dim=1)
    # A small tolerance so mass=1.0 is reached despite rounding in the cumulative sum.
    k = (cum < mass - 1e-6).sum(dim=1) + 1
    return k.clamp(max=patch_scores.shape[1])


def choose_buckets(counts: torch.Tensor, buckets: tuple[int, ...]) -> torch.Tensor:
    """Index of the smallest bucket >= each count (the last bucket when none is): [B] -> [B] int64.

    Counted as "how many buckets are smaller than the count" (a compare and a sum, not searchsorted), so the
    exported adaptive graph computes it with ops ONNX and TensorRT have."""
    edges = torch.tensor(buckets, dtype=counts.dtype, device=counts.device)
    return (counts.unsqueeze(-1) > edges).sum(dim=-1).clamp(max=len(buckets) - 1)
