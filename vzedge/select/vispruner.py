"""The `vispruner` selector, after VisPruner (ICCV 2025): important tokens by the encoder's own attention,
then diverse tokens from the rest by similarity-based de-duplication.

`dominant` patches with the highest attention score are kept (the CLS row's attention for CLIP; attention
received for SigLIP, which has no CLS). From the remaining patches, in descending score order, duplicates
are removed in rounds until `contextual` are left: each round splits the list into alternating halves A and
B, scores every A token by its highest cosine similarity to any B token, and drops the (at most 8) A tokens
with the highest such similarity. The kept tokens are input tokens, in sequence order; CLS is not kept (as
in VisPruner, which prunes LLaVA's patch tokens). "Style": VisPruner's own default split between important
and diverse tokens is a ratio of the budget; here it is the config's dominant:contextual.

Static shape: the number of rounds and each round's sizes depend only on the token counts, so the rounds
unroll into a fixed graph.
"""

from __future__ import annotations

import torch

from vzedge.select.base import SelectionInputs, Selector, gather_rows, sort_positions, unit_rows
from vzedge.visionzip import VisionZipConfig

DROP_PER_ROUND = 8


def dedup_rounds(remaining: int, keep: int) -> list[int]:
    """Tokens dropped in each round (constants) to go from `remaining` to `keep` tokens."""
    rounds = []
    while remaining > keep:
        r = min(DROP_PER_ROUND, remaining - keep, (remaining + 1) // 2)
        rounds.append(r)
        remaining -= r
    return rounds


def vispruner_indices(scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int) -> torch.Tensor:
    """scores [B, N], features [B, N, D] -> [B, important + diverse] positions (not sorted)."""
    n = features.shape[1]
    order = torch.sort(scores.float(), dim=1, descending=True).indices
    keep_imp, residual = order[:, :important], order[:, important:]
    if diverse == 0:
        return keep_imp
    f = unit_rows(features)
    for r in dedup_rounds(n - important, diverse):
        tokens = gather_rows(f, residual)
        a_idx, b_idx = residual[:, ::2], residual[:, 1::2]
        sim = torch.matmul(tokens[:, ::2], tokens[:, 1::2].transpose(1, 2)).max(dim=-1).values  # [B, |A|]
        distinct = torch.sort(sim, dim=1, descending=True).indices[:, r:]  # drop the r most duplicated
        residual = torch.cat([torch.gather(a_idx, 1, distinct), b_idx], dim=1)
    return torch.cat([keep_imp, residual], dim=1)


class VisPrunerSelector(Selector):
    """dominant patches by attention score + contextual patches by similarity de-duplication."""

    name = "vispruner"
    needs_attention = True

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.scores is not None
        start = int(x.has_cls)
        idx = vispruner_indices(x.scores[:, start:], x.hidden[:, start:], cfg.dominant, cfg.contextual) + start
        kept = sort_positions(idx)
        return gather_rows(x.hidden, kept), kept
