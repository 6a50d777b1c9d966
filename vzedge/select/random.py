"""The `random` selector, an honest baseline: CLS (where there is one) plus patches drawn uniformly.

The draws come from a seeded `torch.Generator` that advances with every batch, so a run is reproducible
and every image gets its own draw. That makes it an evaluation baseline, not an exportable graph: ONNX's
random ops are not seeded like torch's, so no parity gate could hold (the exporter refuses it).
"""

from __future__ import annotations

import torch

from vzedge.select.base import SelectionInputs, Selector, gather_rows
from vzedge.visionzip import VisionZipConfig


def random_positions(batch: int, seq_len: int, k: int, has_cls: bool, generator: torch.Generator) -> torch.Tensor:
    """[batch, k] ascending positions: CLS (0) if has_cls, and k - has_cls patches drawn without replacement."""
    start = int(has_cls)
    keys = torch.rand(batch, seq_len - start, generator=generator)
    idx = torch.topk(keys, k - start, dim=1).indices.sort(dim=1).values + start
    if has_cls:
        idx = torch.cat([torch.zeros(batch, 1, dtype=torch.long), idx], dim=1)
    return idx


class RandomSelector(Selector):
    """CLS + dominant + contextual - 1 uniformly drawn patches (all patches drawn when there is no CLS)."""

    name = "random"
    exportable = False

    def check(self, cfg: VisionZipConfig, seq_len: int, has_cls: bool) -> None:
        if cfg.num_tokens > seq_len:
            raise ValueError(
                f"random keeps {cfg.num_tokens} tokens of {seq_len}; use dominant + contextual <= {seq_len}"
            )

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        b, n, _ = x.hidden.shape
        kept = random_positions(b, n, cfg.num_tokens, x.has_cls, generator).to(x.hidden.device)
        return gather_rows(x.hidden, kept), kept
