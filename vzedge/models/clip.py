"""CLIP vision towers (LLaVA-1.5's encoder): a CLS token at position 0, then the patches."""

from __future__ import annotations

from typing import Any

from torch import nn

from vzedge.models.base import VisionTower, check_vit_layers

# OpenAI CLIP preprocessing, used by LLaVA-1.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _inner(model: nn.Module) -> nn.Module:
    # transformers 5.x CLIPVisionModel holds embeddings/encoder itself; 4.x and the
    # *WithProjection classes wrap a `.vision_model`. Accept both shapes.
    if not hasattr(model, "embeddings") and hasattr(model, "vision_model"):
        return model.vision_model
    return model


def is_clip(model: nn.Module) -> bool:
    inner = _inner(model)
    emb = getattr(inner, "embeddings", None)
    return emb is not None and hasattr(emb, "class_embedding") and hasattr(inner, "encoder")


def adapt(model: nn.Module) -> VisionTower:
    inner = _inner(model)
    cfg: Any = inner.config
    layers = inner.encoder.layers
    check_vit_layers(layers, "CLIP")
    pre_norm = getattr(inner, "pre_layrnorm", None) or nn.Identity()
    emb = inner.embeddings

    def embed(pixel_values):
        return pre_norm(emb(pixel_values))

    return VisionTower(
        family="clip",
        module=inner,
        embed=embed,
        layers=layers,
        has_cls=True,
        image_size=int(cfg.image_size),
        patch_size=int(cfg.patch_size),
        num_channels=int(getattr(cfg, "num_channels", 3)),
        hidden_size=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads),
        intermediate_size=int(cfg.intermediate_size),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def vit_l14_336_config(**overrides: Any):
    """LLaVA-1.5's tower (openai/clip-vit-large-patch14-336) sizes, for random benchmark models."""
    from transformers import CLIPVisionConfig

    kw: dict[str, Any] = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    kw.update(overrides)
    return CLIPVisionConfig(**kw)


def tiny_config(**overrides: Any):
    """A CLIP tower small enough for unit tests, with LLaVA-1.5's 24 x 24 patch grid."""
    from transformers import CLIPVisionConfig

    kw: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    kw.update(overrides)
    return CLIPVisionConfig(**kw)
