"""What VisionZip needs from a ViT vision tower, independent of its family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionTower:
    """A ViT vision encoder seen through the parts VisionZip touches.

    embed: pixels [B, C, H, W] -> token sequence [B, N, D] before the first encoder layer.
    layers: the encoder layers; each has `layer_norm1` and `self_attn` with q_proj/k_proj.
    """

    family: str
    module: nn.Module
    embed: Callable[[torch.Tensor], torch.Tensor]
    layers: nn.ModuleList
    has_cls: bool
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.num_patches + int(self.has_cls)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def check_vit_layers(layers: nn.ModuleList, family: str) -> None:
    """Refuse encoders whose layers lack what the score and the keys are computed from."""
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
            raise ValueError(
                f"{family} encoder layer {i} ({type(layer).__name__}) has no self_attn with q_proj/k_proj: "
                "VisionZip needs a ViT whose attention exposes its query and key projections"
            )
        if not hasattr(layer, "layer_norm1"):
            raise ValueError(f"{family} encoder layer {i} has no layer_norm1 (pre-norm ViT expected)")


def llava_parts(model: nn.Module) -> nn.Module:
    """The LlavaModel inside a LlavaForConditionalGeneration (or the LlavaModel itself)."""
    inner = getattr(model, "model", model)
    if not (hasattr(inner, "vision_tower") and hasattr(inner, "multi_modal_projector")):
        raise TypeError(
            f"{type(model).__name__} is not a LLaVA model: apply_visionzip expects a "
            "transformers LlavaForConditionalGeneration (use VisionZipEncoder for a bare vision model)"
        )
    return inner
