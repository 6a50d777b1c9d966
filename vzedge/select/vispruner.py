"""The `vispruner` selector, after VisPruner (ICCV 2025): important tokens by the encoder's own attention,
then diverse tokens from the rest by similarity-based de-duplication, with every decision robust to float noise.

`dominant` patches with the highest attention score are kept (the CLS row's attention for CLIP; attention
received for SigLIP, which has no CLS). From the remaining patches duplicates are removed in rounds until
`contextual` are left: each round splits the list into alternating halves A and B, scores every A token by its
highest cosine similarity to any B token, and drops the (at most 8) A tokens with the highest such similarity.
The kept tokens are input tokens, in sequence order; CLS is not kept (as in VisPruner, which prunes LLaVA's
patch tokens). VisPruner's own default split between important and diverse tokens is a ratio of the budget;
here it is the config's dominant:contextual.

How it differs from VisPruner's released code (`encode_images` in its `llava/model/llava_arch.py`), and why.
The released rounds decide between near-tied floats hundreds of times per image. On a flat background many
patches are duplicates to within float32 resolution (on `tiny`'s demo image 1 - cosine ~1e-6, neighbours in
that ranking 1e-9 to 1e-7 apart, while a float32 dot product of unit vectors is good to ~3e-7); on a random
ViT-L tower all similarities crowd into a narrow band. Which tokens a round drops, and the order the survivors
take into the next round's A/B split (sorted by that similarity), is then decided by rounding: PyTorch and the
exported graph in ONNX Runtime (both correct, ~1e-7 apart) keep different tokens and every later round inherits
the difference (tiny's demo image: the dropped sets first differ in round 1 of 29, at a margin of 1 ulp; kept
agreement 0.89 where the parity gate needs 0.99). Three changes make each decision tie-robust:

- the A/B split alternates over the remaining tokens in sequence (raster) order, re-sorted after every round,
  instead of descending attention (round 1) and descending similarity (later rounds): it depends only on which
  tokens remain, never on the order of near-tied values (ToMe's alternating bipartite split). The attention
  scores only choose the important set: one top-k cut, as in VisionZip;
- each A token's nearest B token is found with the usual matmul, but its distance is recomputed from the
  difference of the unit vectors, 1 - cos = |u_a - u_b|^2 / 2, over the `NEAREST_CANDIDATES` best B tokens,
  accurate relative to the distance itself instead of ~3e-7 absolute (no cancellation against 1);
- those distances are compared on a grid of 2**-10 (`DIST_STEP`; 0 sits mid-bucket, so every near-duplicate
  with 1 - cos < 2**-11 ties exactly) and exact ties are broken by a fixed priority of the position
  (`tie_priority`, a golden-ratio permutation, so equally duplicated background patches go evenly across the
  image instead of from one end). Distances less than a grid step apart count as equally duplicated.

A decision can still flip where noise carries a distance across a grid boundary next to a round's cut; how
rare that is was measured, not proven (`scripts/vispruner_parity.py`: ORT's selection on ORT's selection-layer
outputs against PyTorch's on 48 images: demo scenes, synth-small scenes, random pixels). On `tiny` (24+4) the
released rounds kept a different set on 38 of 48 images, this version on none (none of 96 selections moved
under 1e-6 relative input noise either); on a 3-layer random ViT-L/14-336 (54+10), 45 of 48 against none (2 of
96 moved under the noise). The raster split alone did not help (42/48 on both); the grid on float32 dot
products fixed tiny but left 11/48 on the ViT-L, whose similarities crowd into a narrow band.

Rounds and their sizes, the important/diverse split, the similarity (cosine of the selection layer's output)
and "drop the A tokens most similar to B" are VisPruner's.

Static shape: the number of rounds and each round's sizes depend only on the token counts, so the rounds
unroll into a fixed graph; each round's decision is one sort of distinct integer-valued float32 keys
(bucket, priority), which PyTorch, ORT and TensorRT order the same way because no two keys are equal.
"""

from __future__ import annotations

import math

import torch

from vzedge.select.base import SelectionInputs, Selector, gather_rows, sort_positions, unit_rows
from vzedge.visionzip import VisionZipConfig

DROP_PER_ROUND = 8
DIST_STEP = 2.0**-10  # 1 - cosine values closer than ~0.001 count as equally duplicated
NEAREST_CANDIDATES = 4  # B tokens whose distance to an A token is recomputed exactly
# Keys are bucket * span + priority in float32, exact below 2**24: with 2,049 buckets, span <= 4,096.
MAX_PATCHES = 4096
_GOLDEN = (math.sqrt(5) - 1) / 2


def dedup_rounds(remaining: int, keep: int) -> list[int]:
    """Tokens dropped in each round (constants) to go from `remaining` to `keep` tokens."""
    rounds = []
    while remaining > keep:
        r = min(DROP_PER_ROUND, remaining - keep, (remaining + 1) // 2)
        rounds.append(r)
        remaining -= r
    return rounds


def tie_priority(n: int) -> torch.Tensor:
    """[n] int64, a permutation of range(n): position p's rank among exact ties (higher = kept first).

    p * m mod n with m the integer nearest n * 0.618 that is coprime to n (Fibonacci hashing), so positions
    next to each other get far-apart priorities and ties are resolved evenly over the image.
    """
    m = max(1, round(n * _GOLDEN))
    while math.gcd(m, n) != 1:
        m += 1
    return torch.arange(n, dtype=torch.int64) * m % n


def _span(n: int) -> int:
    """Power of two above every priority: bucket * span + priority never mixes the two."""
    return 1 << max(1, (n - 1).bit_length())


def nearest_distance(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """ua [B, M, D], ub [B, K, D] unit rows -> [B, M] float32: 1 - cos to the nearest ub row, from differences.

    The nearest rows are found by the matmul (cosine up to ~3e-7); the distance to the best few is then
    |u_a - u_b|^2 / 2, whose error is relative to the distance itself rather than to 1."""
    k = min(NEAREST_CANDIDATES, ub.shape[1])
    cand = torch.topk(torch.matmul(ua, ub.transpose(1, 2)), k, dim=-1).indices  # [B, M, k]
    near = gather_rows(ub, cand.flatten(1)).view(*cand.shape, ub.shape[-1])  # [B, M, k, D]
    return ((ua.unsqueeze(2) - near) ** 2).sum(-1).min(dim=-1).values / 2


def dist_keys(dist: torch.Tensor, priority: torch.Tensor, n: int) -> torch.Tensor:
    """dist [B, M] (1 - cos), priority [B, M] -> distinct float32 keys, ascending = dropped first.

    Distance on the DIST_STEP grid (boundaries at half steps, so 0 is a bucket's middle), ties by lower
    priority first."""
    bucket = torch.floor(dist.clamp(0.0, 2.0) / DIST_STEP + 0.5)  # [0, 2 / DIST_STEP]
    return bucket * _span(n) + priority.float()


def vispruner_indices(scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int) -> torch.Tensor:
    """scores [B, N], features [B, N, D] -> [B, important + diverse] positions (not sorted)."""
    n = features.shape[1]
    order = torch.sort(scores.float(), dim=1, descending=True).indices
    keep_imp = order[:, :important]
    if diverse == 0:
        return keep_imp
    residual = sort_positions(order[:, important:])  # the set depends only on the top-k cut, not on the order
    priority = tie_priority(n).to(features.device)
    f = unit_rows(features)
    for r in dedup_rounds(n - important, diverse):
        a_idx, b_idx = residual[:, ::2], residual[:, 1::2]
        dist = nearest_distance(gather_rows(f, a_idx), gather_rows(f, b_idx))  # [B, |A|]
        key = dist_keys(dist, priority[a_idx], n)
        distinct = torch.sort(key, dim=1).indices[:, r:]  # drop the r most duplicated
        residual = sort_positions(torch.cat([torch.gather(a_idx, 1, distinct), b_idx], dim=1))
    return torch.cat([keep_imp, residual], dim=1)


class VisPrunerSelector(Selector):
    """dominant patches by attention score + contextual patches by similarity de-duplication."""

    name = "vispruner"
    needs_attention = True

    def check(self, cfg: VisionZipConfig, seq_len: int, has_cls: bool) -> None:
        super().check(cfg, seq_len, has_cls)
        patches = seq_len - int(has_cls)
        if patches > MAX_PATCHES:
            raise ValueError(
                f"selector 'vispruner' takes towers of at most {MAX_PATCHES} patches (its float32 tie-break keys "
                f"are exact up to there), this one has {patches}; use --selector visionzip or divprune"
            )

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.scores is not None
        start = int(x.has_cls)
        idx = vispruner_indices(x.scores[:, start:], x.hidden[:, start:], cfg.dominant, cfg.contextual) + start
        kept = sort_positions(idx)
        return gather_rows(x.hidden, kept), kept
