"""The `pool` selector, an honest baseline: near-square region averages of the patch grid, no selection.

CLS is not used. Its tokens are not input tokens, so `kept_indices` has no columns.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from vzedge.select.base import SelectionInputs, Selector
from vzedge.visionzip import VisionZipConfig


def pool_tokens(patches: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """k averages of near-square regions of a grid x grid patch map (raster order): [B, k, D].

    Rows are split into round(sqrt(k)) bands; band i gets k // bands (+1 for the first k % bands) cells,
    each the mean over the band's rows and an adaptive slice of its columns. For k = h * h with h
    dividing the grid this is plain h x h average pooling.
    """
    b, p, d = patches.shape
    assert p == grid * grid, (p, grid)
    x = patches.reshape(b, grid, grid, d)
    bands = max(1, min(grid, round(math.sqrt(k))))
    out = []
    for i in range(bands):
        r0, r1 = (i * grid) // bands, -(-(i + 1) * grid // bands)
        cells = k // bands + int(i < k % bands)
        row = x[:, r0:r1].mean(dim=1)  # [B, grid, D]
        out.append(F.adaptive_avg_pool1d(row.transpose(1, 2), cells).transpose(1, 2))
    return torch.cat(out, dim=1)


class PoolSelector(Selector):
    """dominant + contextual region averages of the patches (kept_indices: [B, 0])."""

    name = "pool"

    def kept_count(self, cfg: VisionZipConfig) -> int:
        return 0

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(x.has_cls)
        tokens = pool_tokens(x.hidden[:, start:], x.grid, cfg.num_tokens)
        kept = torch.zeros(x.hidden.shape[0], 0, dtype=torch.long, device=x.hidden.device)
        return tokens, kept
