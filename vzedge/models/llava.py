"""LLaVA glue: make a LlavaForConditionalGeneration (and its processor) run on VisionZip tokens.

What happens to LLaVA's feature strategy: LLaVA-1.5 uses `vision_feature_select_strategy="default"`,
which drops CLS and feeds the 576 patch tokens of layer -2 to the projector. With VisionZip the
strategy is bypassed, as in the authors' release: CLS is always the first dominant token and goes
through the projector with the rest (54 + 10 = 64 tokens, CLS included). The model was trained
without CLS in its visual input; the paper's numbers include this effect, and projector tuning
(`vzedge tune`) recovers part of the gap.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from vzedge.encoder import VisionZipEncoder
from vzedge.models import llava_next, llava_onevision
from vzedge.models.base import llava_parts
from vzedge.models.projector import load_projector_state, read_tuned_projector
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)

_STATE = "_vzedge_visionzip"
_PROJECTOR_BACKUP = "_vzedge_projector_backup"


def anyres_family(inner: nn.Module):
    """The module that handles an anyres LLaVA (NeXT, NeXT-Video, OneVision), or None for LLaVA-1.5."""
    name = type(inner).__name__
    if name in ("LlavaNextModel", "LlavaNextVideoModel"):
        return llava_next
    if name == "LlavaOnevisionModel":
        return llava_onevision
    return None


def is_applied(model: nn.Module) -> bool:
    return _STATE in vars(llava_parts(model))


def apply_visionzip(
    model: nn.Module,
    cfg: VisionZipConfig | None = None,
    processor: Any | None = None,
    layout: str = "reference",
    projector: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Make `model.generate()` (and forward) see `cfg.num_tokens` image tokens per image.

    Replaces the model's `get_image_features` with VisionZip on its own vision tower followed by its
    own projector, and makes `processor` insert that many image placeholders. Undo with
    `remove_visionzip(model, processor)`. Returns the model.

    LLaVA-NeXT, NeXT-Video and OneVision compress every crop and frame with `cfg` and arrange an anyres
    image's crops by `layout` ("reference" or "newline", see `vzedge.models.llava_next`).

    projector: a `vzedge tune` output folder; its tuned projector weights replace the model's (LLaVA-1.5
    only) after checking they were tuned on this base model for this `cfg` (ValueError otherwise).
    `remove_visionzip` puts the original weights back.
    """
    cfg = cfg or VisionZipConfig()
    inner = llava_parts(model)
    family = anyres_family(inner)
    if family is not None:
        if projector is not None:
            raise ValueError(f"projector= (a tuned projector) supports LLaVA-1.5, not {type(inner).__name__}")
        return family.apply_visionzip(model, cfg, processor, layout=layout)
    if layout != "reference":
        raise ValueError(f"layout={layout!r} applies to anyres models (LLaVA-NeXT/OneVision); LLaVA-1.5 has one crop")
    if _STATE in vars(inner):
        raise ValueError("VisionZip is already applied to this model; call remove_visionzip(model) first")
    feature_layer = getattr(model.config, "vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"vision_feature_layer={feature_layer!r}: multi-layer feature concatenation is not supported by VisionZip"
        )
    if feature_layer != cfg.layer:
        log.warning(
            "VisionZip selects at layer %d while the model was trained on layer %d features",
            cfg.layer,
            feature_layer,
        )
    encoder = VisionZipEncoder(inner.vision_tower, cfg)
    tuned = None
    if projector is not None:
        tuned = read_tuned_projector(projector, model, cfg)  # checks everything before anything changes
    mm_projector = inner.multi_modal_projector

    def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if kwargs.get("image_sizes") is not None:
            raise ValueError("image_sizes (anyres) is not supported by VisionZip on LLaVA-1.5")
        out = encoder(pixel_values)
        features = mm_projector(out.tokens)
        return BaseModelOutputWithPooling(last_hidden_state=out.tokens, pooler_output=list(features))

    # Kept outside nn.Module attribute registration so the encoder does not appear a second time in
    # the model's state_dict.
    vars(inner)[_STATE] = encoder
    vars(inner)["get_image_features"] = get_image_features
    if processor is not None:
        _patch_processor(processor, cfg.num_tokens)
    if tuned is not None:
        vars(inner)[_PROJECTOR_BACKUP] = {k: v.detach().clone() for k, v in mm_projector.state_dict().items()}
        load_projector_state(mm_projector, tuned.state)
        log.info("tuned projector loaded from %s", tuned.record["path"])
    log.info("VisionZip applied: %d image tokens per image (was %d)", cfg.num_tokens, _stock_count(inner))
    return model


def remove_visionzip(model: nn.Module, processor: Any | None = None) -> nn.Module:
    """Undo `apply_visionzip`: the model and processor go back to all image tokens."""
    inner = llava_parts(model)
    if _STATE not in vars(inner):
        raise ValueError("VisionZip is not applied to this model")
    del vars(inner)[_STATE]
    backup = vars(inner).pop(_PROJECTOR_BACKUP, None)
    if backup is not None:  # apply_visionzip(projector=...) replaced the weights: put the originals back
        load_projector_state(inner.multi_modal_projector, backup)
    for name in ("get_image_features", "get_video_features"):
        vars(inner).pop(name, None)
    if processor is not None:
        for name in ("replace_image_token", "replace_video_token", "_get_num_multimodal_tokens", _STATE):
            vars(processor).pop(name, None)
    return model


def visionzip_encoder(model: nn.Module):
    """The VisionZipEncoder that `apply_visionzip` attached, or None."""
    return vars(llava_parts(model)).get(_STATE)


def _stock_count(inner: nn.Module) -> int:
    vcfg = inner.vision_tower.config
    n = (vcfg.image_size // vcfg.patch_size) ** 2
    return n if getattr(inner.config, "vision_feature_select_strategy", "default") == "default" else n + 1


def _patch_processor(processor: Any, num_tokens: int) -> None:
    """Make a LlavaProcessor insert `num_tokens` placeholders per image.

    transformers 5.x counts placeholders in `replace_image_token` ((H/p)(W/p) + extra, minus one for
    the "default" strategy) and reports them through `_get_num_multimodal_tokens`; both are replaced
    on this instance only.
    """
    if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
        raise TypeError(f"{type(processor).__name__} is not a LLaVA processor (no replace_image_token)")
    if _STATE in vars(processor):
        raise ValueError("VisionZip is already applied to this processor; call remove_visionzip first")
    original_count = type(processor)._get_num_multimodal_tokens

    def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return processor.image_token * num_tokens

    def get_num_multimodal_tokens(image_sizes=None, **kwargs: Any):
        data = original_count(processor, image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            # MultiModalData (transformers 5.x) is a dataclass: no item assignment.
            data.num_image_tokens = [num_tokens] * len(image_sizes)
        return data

    vars(processor)["replace_image_token"] = replace_image_token
    vars(processor)["_get_num_multimodal_tokens"] = get_num_multimodal_tokens
    vars(processor)[_STATE] = num_tokens
