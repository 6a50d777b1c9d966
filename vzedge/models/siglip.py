"""SigLIP vision towers: patches only, no CLS token (the score is attention received)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vzedge.models.base import VisionTower, check_vit_layers

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _inner(model: nn.Module) -> nn.Module:
    if not hasattr(model, "embeddings") and hasattr(model, "vision_model"):
        return model.vision_model
    return model


def is_siglip(model: nn.Module) -> bool:
    inner = _inner(model)
    cfg = getattr(inner, "config", None)
    model_type = str(getattr(cfg, "model_type", ""))
    emb = getattr(inner, "embeddings", None)
    return (
        emb is not None
        and not hasattr(emb, "class_embedding")
        and hasattr(inner, "encoder")
        and model_type.startswith("siglip")
    )


def adapt(model: nn.Module) -> VisionTower:
    inner = _inner(model)
    cfg: Any = inner.config
    layers = inner.encoder.layers
    check_vit_layers(layers, "SigLIP")
    emb = inner.embeddings
    return VisionTower(
        family="siglip",
        module=inner,
        embed=emb,
        layers=layers,
        has_cls=False,
        image_size=int(cfg.image_size),
        patch_size=int(cfg.patch_size),
        num_channels=int(getattr(cfg, "num_channels", 3)),
        hidden_size=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads),
        intermediate_size=int(cfg.intermediate_size),
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )


def so400m_384_config(**overrides: Any):
    """google/siglip-so400m-patch14-384 sizes (LLaVA-OneVision's tower), for random benchmark models."""
    from transformers import SiglipVisionConfig

    kw: dict[str, Any] = dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    kw.update(overrides)
    return SiglipVisionConfig(**kw)


def tiny_config(**overrides: Any):
    from transformers import SiglipVisionConfig

    kw: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
    )
    kw.update(overrides)
    return SiglipVisionConfig(**kw)
