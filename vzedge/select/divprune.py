"""The `divprune` selector: max-min diversity on the selection layer's features (DivPrune, CVPR 2025).

DivPrune keeps the subset of visual tokens that approximately solves the Max-Min Diversity Problem under
cosine distance, greedily: the first token is the one farthest from its nearest neighbour, each next one
the token whose distance to the nearest already-kept token is largest. It needs no attention, so it works
with any attention kernel and on encoders with no CLS token; CLS (where there is one) is not a candidate,
as in DivPrune on LLaVA's patch tokens.

Static shape: K greedy steps unrolled (K is a constant), each an ArgMax over a running [B, N] minimum,
so the graph has no loop and no data-dependent size. Kept tokens are masked out of later steps, so K
distinct tokens come out even when some are exact duplicates (the reference code could pick a duplicate
at distance 0 only if every remaining token were one).
"""

from __future__ import annotations

import torch

from vzedge.select.base import SelectionInputs, Selector, gather_rows, sort_positions, unit_rows
from vzedge.visionzip import VisionZipConfig


def divprune_indices(features: torch.Tensor, k: int) -> torch.Tensor:
    """features [B, N, D] -> [B, k] positions in greedy order (not sorted). float32 throughout."""
    b, n, _ = features.shape
    f = unit_rows(features)
    dist = 1.0 - torch.matmul(f, f.transpose(1, 2))  # [B, N, N] cosine distance
    positions = torch.arange(n, device=features.device)
    eye = (positions.unsqueeze(0) == positions.unsqueeze(1)).unsqueeze(0)  # [1, N, N]
    # Step 0: the token whose nearest other token is farthest away.
    nearest = dist.masked_fill(eye, float("inf")).min(dim=1).values  # [B, N]
    pick = nearest.argmax(dim=1)  # [B]
    chosen = [pick]
    taken = positions.unsqueeze(0) == pick.unsqueeze(1)  # [B, N]
    min_dist = torch.gather(dist, 1, pick.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # [B, N]
    for _ in range(1, k):
        pick = min_dist.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen.append(pick)
        taken = taken | (positions.unsqueeze(0) == pick.unsqueeze(1))
        row = torch.gather(dist, 1, pick.view(b, 1, 1).expand(b, 1, n)).squeeze(1)
        min_dist = torch.minimum(min_dist, row)
    return torch.stack(chosen, dim=1)


class DivPruneSelector(Selector):
    """dominant + contextual patches by max-min cosine diversity of the selection layer's features."""

    name = "divprune"

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(x.has_cls)
        idx = divprune_indices(x.hidden[:, start:], cfg.num_tokens) + start
        kept = sort_positions(idx)
        return gather_rows(x.hidden, kept), kept
