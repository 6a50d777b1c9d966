"""The `visionzip` selector: the released VisionZip algorithm, through `vzedge.visionzip.compress` unchanged."""

from __future__ import annotations

import torch

from vzedge.select.base import SelectionInputs, Selector
from vzedge.visionzip import VisionZipConfig, compress


class VisionZipSelector(Selector):
    """Dominant tokens by attention score (CLS kept), the rest merged into contextual tokens by key similarity."""

    name = "visionzip"
    needs_attention = True

    def kept_count(self, cfg: VisionZipConfig) -> int:
        return cfg.dominant

    def check(self, cfg: VisionZipConfig, seq_len: int, has_cls: bool) -> None:
        pass  # the encoder's check_token_budget states VisionZip's own limits

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.scores is not None and x.keys is not None
        return compress(x.hidden, x.scores, x.keys, cfg, x.has_cls)
