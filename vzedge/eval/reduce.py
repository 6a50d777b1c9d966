"""The token reducers compared at each budget: VisionZip through the library, random selection, pooling."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vzedge.eval.config import LLAVA15_PATCHES, PAPER_CONTEXTUAL, PAPER_DOMINANT, TUNED_METHOD
from vzedge.models import adapt_vision_tower
from vzedge.models.llava import apply_visionzip, llava_parts, remove_visionzip
from vzedge.visionzip import VisionZipConfig


def scaled_budget(tokens: int, num_patches: int, scale: bool) -> int:
    """A LLaVA-1.5 budget (of 576 patches) on a grid of `num_patches`; full stays full."""
    if not scale:
        return min(tokens, num_patches)
    return min(num_patches, max(2, round(tokens * num_patches / LLAVA15_PATCHES)))


def visionzip_split(k: int) -> tuple[int, int]:
    """The paper's dominant:contextual ratio (54:10) at k tokens."""
    dominant = max(1, round(k * PAPER_DOMINANT / (PAPER_DOMINANT + PAPER_CONTEXTUAL)))
    return dominant, k - dominant


def feature_layer_tokens(tower, layer: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """The raw output of encoder layer `layer` (as VisionZip selects it): [B, N(+CLS), D]."""
    x = tower.embed(pixel_values.to(next(tower.module.parameters()).dtype))
    for blk in tower.layers[: layer % tower.num_layers + 1]:
        x = blk(x, None)
    return x


def random_select(hidden: torch.Tensor, k: int, has_cls: bool, generator: torch.Generator) -> torch.Tensor:
    """CLS (if any) plus k - has_cls uniformly drawn patches per image, in sequence order."""
    b, n, _ = hidden.shape
    start = int(has_cls)
    scores = torch.rand(b, n - start, generator=generator)
    idx = torch.topk(scores, k - start, dim=1).indices.sort(dim=1).values + start
    if has_cls:
        idx = torch.cat([torch.zeros(b, 1, dtype=torch.long), idx], dim=1)
    return torch.gather(hidden, 1, idx.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


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


@contextlib.contextmanager
def reduced_tokens(
    vlm: nn.Module,
    method: str,
    k: int,
    seed: int,
    visionzip: VisionZipConfig | None = None,
    projector: str | os.PathLike[str] | None = None,
) -> Iterator[None]:
    """Make `vlm` see k visual tokens per image chosen by `method` (VisionZip through apply_visionzip).

    visionzip: the config for "visionzip"/"visionzip+tuned" (default: the paper's split at k); projector:
    for "visionzip+tuned", the `vzedge tune` folder whose weights replace the projector's until exit.
    """

    layer = int(getattr(vlm.config, "vision_feature_layer", -2))
    if (projector is not None) != (method == TUNED_METHOD):
        raise ValueError(f"method {method!r} with projector={projector!r}: {TUNED_METHOD!r} needs a tuned folder")
    if method in ("visionzip", TUNED_METHOD):
        vz = visionzip or VisionZipConfig(*visionzip_split(k), layer=layer)
        assert vz.num_tokens == k, (vz, k)
        # remove_visionzip puts the projector's original weights back (copied, so bit for bit).
        apply_visionzip(vlm, vz, projector=projector)
        try:
            yield
        finally:
            remove_visionzip(vlm)
        return
    inner = llava_parts(vlm)
    tower = adapt_vision_tower(inner.vision_tower)
    projector = inner.multi_modal_projector
    generator = torch.Generator().manual_seed(seed)

    def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        hidden = feature_layer_tokens(tower, layer, pixel_values)
        if method == "random":
            tokens = random_select(hidden, k, tower.has_cls, generator)
        else:
            tokens = pool_tokens(hidden[:, int(tower.has_cls) :], tower.grid, k)
        features = projector(tokens)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=list(features))

    vars(inner)["get_image_features"] = get_image_features
    try:
        yield
    finally:
        del vars(inner)["get_image_features"]


def adapt_tower(vlm: nn.Module):

    return adapt_vision_tower(llava_parts(vlm).vision_tower)


def stock_image_tokens(vlm: nn.Module) -> int:
    vcfg = vlm.config.vision_config
    n = (vcfg.image_size // vcfg.patch_size) ** 2
    return n if getattr(vlm.config, "vision_feature_select_strategy", "default") == "default" else n + 1
