"""The token reducers compared at each budget: every selector of `vzedge.select`, through `apply_visionzip`
(so eval runs the same `VisionZipEncoder` code the exporter traces)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from vzedge.eval.config import LLAVA15_PATCHES, METHODS, STAGE2_METHODS, TUNED_METHOD
from vzedge.models import adapt_vision_tower
from vzedge.models.llava import apply_visionzip, llava_parts, remove_visionzip
from vzedge.select import pool_tokens, random_positions
from vzedge.select.adaptive import split_budget
from vzedge.visionzip import VisionZipConfig

__all__ = ["pool_tokens", "random_select", "reduced_tokens", "scaled_budget", "visionzip_split"]


def scaled_budget(tokens: int, num_patches: int, scale: bool) -> int:
    """A LLaVA-1.5 budget (of 576 patches) on a grid of `num_patches`; full stays full."""
    if not scale:
        return min(tokens, num_patches)
    return min(num_patches, max(2, round(tokens * num_patches / LLAVA15_PATCHES)))


def visionzip_split(k: int) -> tuple[int, int]:
    """The paper's dominant:contextual ratio (54:10) at k tokens."""
    return split_budget(k)


def feature_layer_tokens(tower, layer: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """The raw output of encoder layer `layer` (as VisionZip selects it): [B, N(+CLS), D]."""
    x = tower.embed(pixel_values.to(next(tower.module.parameters()).dtype))
    for blk in tower.layers[: layer % tower.num_layers + 1]:
        x = blk(x, None)
    return x


def random_select(hidden: torch.Tensor, k: int, has_cls: bool, generator: torch.Generator) -> torch.Tensor:
    """CLS (if any) plus k - has_cls uniformly drawn patches per image, in sequence order (the `random`
    selector's draw)."""
    b, n, _ = hidden.shape
    idx = random_positions(b, n, k, has_cls, generator).to(hidden.device)
    return torch.gather(hidden, 1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@contextlib.contextmanager
def reduced_tokens(
    vlm: nn.Module,
    method: str,
    k: int,
    seed: int,
    visionzip: VisionZipConfig | None = None,
    projector: str | os.PathLike[str] | None = None,
) -> Iterator[None]:
    """Make `vlm` see k visual tokens per image chosen by `method` (a selector name, or "visionzip+tuned"),
    through `apply_visionzip`: the same `VisionZipEncoder` and selector code as the exporter and runtime.

    visionzip: the config for "visionzip"/"visionzip+tuned" (default: the paper's split at k, which the
    two-part selectors use as dominant:contextual and the others only as the total); projector: for
    "visionzip+tuned", the `vzedge tune` folder whose weights replace the projector's until exit. The random
    selector draws from a generator seeded with `seed` at entry, advancing batch by batch.
    """

    layer = int(getattr(vlm.config, "vision_feature_layer", -2))
    if (projector is not None) != (method == TUNED_METHOD):
        raise ValueError(f"method {method!r} with projector={projector!r}: {TUNED_METHOD!r} needs a tuned folder")
    if method not in (*METHODS, TUNED_METHOD):
        raise ValueError(f"method {method!r} is not one of {(*METHODS, TUNED_METHOD)}")
    if method in STAGE2_METHODS:
        raise ValueError(f"{method!r} is a second stage on cached tokens: eval answers it with answer_text_conditioned")
    selector = "visionzip" if method == TUNED_METHOD else method
    vz = visionzip or VisionZipConfig(*visionzip_split(k), layer=layer, selector=selector, seed=seed)
    assert vz.num_tokens == k, (vz, k)
    # remove_visionzip puts the projector's original weights back (copied, so bit for bit).
    apply_visionzip(vlm, vz, projector=projector)
    try:
        yield
    finally:
        remove_visionzip(vlm)


def adapt_tower(vlm: nn.Module):
    return adapt_vision_tower(llava_parts(vlm).vision_tower)


def stock_image_tokens(vlm: nn.Module) -> int:
    vcfg = vlm.config.vision_config
    n = (vcfg.image_size // vcfg.patch_size) ** 2
    return n if getattr(vlm.config, "vision_feature_select_strategy", "default") == "default" else n + 1
