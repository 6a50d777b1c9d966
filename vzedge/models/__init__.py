"""Encoder adapters (CLIP, SigLIP), LLaVA glue and the built-in model."""

from __future__ import annotations

from torch import nn

from vzedge.models import clip, siglip
from vzedge.models.base import VisionTower

__all__ = ["VisionTower", "adapt_vision_tower"]


def adapt_vision_tower(model: nn.Module) -> VisionTower:
    """Wrap an HF CLIP or SigLIP vision model (or its `.vision_model`) for VisionZip."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a vision model (torch.nn.Module), got {type(model).__name__}")
    if clip.is_clip(model):
        return clip.adapt(model)
    if siglip.is_siglip(model):
        return siglip.adapt(model)
    raise ValueError(
        f"{type(model).__name__} is not a supported ViT vision encoder: VisionZip needs a CLIP or SigLIP "
        "vision model (e.g. CLIPVisionModel, SiglipVisionModel, or a LLaVA model's .vision_tower) whose "
        "layers expose q/k projections"
    )
