"""LLaVA-OneVision on VisionZip tokens: the SigLIP-based VLM (the authors' demos ran on it).

Its tower is SigLIP (no CLS), so dominant tokens are chosen by the attention they receive, and the anyres
arrangement of `vzedge.models.llava_next` applies with no per-tile CLS section. What differs from LLaVA-NeXT:
- a single image is anyres (base + tiles, K x (1 + rows x cols) tokens, + newlines with layout="newline");
  stock OneVision's `anyres_max_9` bilinear downsampling of large grids is skipped: VisionZip already bounds
  the count per crop;
- several images in one prompt are one crop each (as stock): K tokens + the `image_newline`;
- a video of F frames gives F x K tokens + one `image_newline` closing the clip (as stock, which pools each
  frame 2x2 bilinearly instead).
OneVision reads features at layer -1 of its 26-layer tower; pass `VisionZipConfig(layer=-1)` to match.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vzedge.models.llava_next import (
    _STATE,
    AnyresGlue,
    Layout,
    _check_crop,
    _crop_hw,
    _output,
    _size_of,
    _video_frames,
    anyres_grid,
    check_processor_pinpoints,
    install,
    patch_processor,
    video_token_count,
)
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)


def is_onevision(model: nn.Module) -> bool:
    return type(getattr(model, "model", model)).__name__ == "LlavaOnevisionModel"


def single_crop_token_count(num_tokens: int) -> int:
    """One crop of a multi-image prompt: K tokens + the image_newline."""
    return num_tokens + 1


def onevision_video_token_count(num_tokens: int, num_frames: int) -> int:
    """A clip: K per frame + one image_newline after the last frame."""
    return video_token_count(num_tokens, num_frames) + 1


def apply_visionzip(
    model: nn.Module, cfg: VisionZipConfig, processor: Any | None = None, layout: Layout = "reference"
) -> nn.Module:
    """LLaVA-OneVision: every crop and every frame compressed to `cfg.num_tokens` tokens (see the module doc)."""
    inner = model.model
    if not is_onevision(model):
        raise TypeError(f"{type(model).__name__} is not a LLaVA-OneVision model")
    if _STATE in vars(inner):
        raise ValueError("VisionZip is already applied to this model; call remove_visionzip(model) first")
    glue = AnyresGlue(model, cfg, layout)
    if processor is not None:
        check_processor_pinpoints(processor, glue)

    def get_image_features(
        pixel_values: torch.Tensor,
        image_sizes: Any = None,
        *args: Any,
        batch_num_images: Any = None,
        **kwargs: Any,
    ):
        grids = glue.grids(image_sizes)
        if batch_num_images is None:
            patched = [True] * len(grids)
        else:
            patched = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
            if len(patched) != len(grids):
                raise ValueError(f"batch_num_images sums to {len(patched)} images but image_sizes has {len(grids)}")
        n_crops = [1 + r * c if p else 1 for (r, c), p in zip(grids, patched, strict=True)]
        raw, feats, kept = glue.encode(glue.gather_crops(pixel_values, n_crops))
        out = []
        for f, k, g, p in zip(feats.split(n_crops), kept.split(n_crops), grids, patched, strict=True):
            out.append(glue.arrange(f, k, g) if p else torch.cat([f[0], glue.newline[None].to(f.dtype)]))
        return _output(raw, out)

    def get_video_features(pixel_values_videos: torch.Tensor, *args: Any, **kwargs: Any):
        raw, feats = glue.encode_video(pixel_values_videos)
        newline = glue.newline.to(feats.dtype)[None, None].expand(feats.shape[0], 1, feats.shape[2])
        return _output(raw, torch.cat([feats, newline], dim=1))

    if processor is not None:
        patch_processor(processor, _processor_methods(processor, glue), cfg.num_tokens)
    install(inner, glue.encoder, get_image_features=get_image_features, get_video_features=get_video_features)
    log.info("VisionZip applied to %s: %d tokens per crop, layout=%s", type(model).__name__, cfg.num_tokens, layout)
    return model


def _processor_methods(processor: Any, glue: AnyresGlue) -> dict[str, Any]:
    original_count = type(processor)._get_num_multimodal_tokens
    k = glue.cfg.num_tokens

    def count(image_size: Any) -> int:
        return glue.image_tokens(anyres_grid(image_size, glue.pinpoints, glue.crop_size))

    def replace_image_token(image_inputs: dict, image_idx: int = 0, **kwargs: Any) -> str:
        _check_crop(glue, _crop_hw(image_inputs))
        # Same rule as the stock processor: an image that shares its prompt with others is one crop.
        start = 0
        multi = False
        for n in image_inputs["batch_num_images"]:
            if image_idx < start + n:
                multi = n != 1
                break
            start += n
        n_tokens = single_crop_token_count(k) if multi else count(_size_of(image_inputs, image_idx))
        return processor.image_token * n_tokens

    def replace_video_token(video_inputs: dict, video_idx: int = 0, **kwargs: Any) -> str:
        return processor.video_token * onevision_video_token_count(k, _video_frames(video_inputs, video_idx))

    def get_num_multimodal_tokens(image_sizes: Any = None, video_sizes: Any = None, **kwargs: Any):
        data = original_count(processor, image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [count(s) for s in image_sizes]
        if video_sizes is not None:
            data.num_video_tokens = [onevision_video_token_count(k, int(v[0])) for v in video_sizes]
        return data

    return {
        "replace_image_token": replace_image_token,
        "replace_video_token": replace_video_token,
        "_get_num_multimodal_tokens": get_num_multimodal_tokens,
    }


TINY_CROP = 96  # 6 x 6 SigLIP patches of 16 px
TINY_PINPOINTS = [[96, 192], [192, 96], [192, 192], [288, 96], [96, 288], [288, 288]]


def build_tiny_onevision(seed: int = 0):
    """(LlavaOnevisionForConditionalGeneration, processor): random, SigLIP tower 96 px / patch 16, toy Llama."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    from vzedge.models import siglip
    from vzedge.models.llava_next import TINY_VIDEO_TOKEN_ID, _tiny_text_config, image_only_processor
    from vzedge.models.tiny import SPECIAL_TOKENS, build_tokenizer

    vision = siglip.tiny_config(image_size=TINY_CROP, patch_size=16, num_hidden_layers=3)
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=_tiny_text_config().to_dict(),
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        video_token_id=TINY_VIDEO_TOKEN_ID,
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TINY_CROP, "width": TINY_CROP},
        image_grid_pinpoints=TINY_PINPOINTS,
        image_mean=list(siglip.SIGLIP_MEAN),
        image_std=list(siglip.SIGLIP_STD),
    )
    processor = image_only_processor(
        LlavaOnevisionProcessor,
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        num_image_tokens=(TINY_CROP // 16) ** 2,
        vision_feature_select_strategy="full",
    )
    processor.video_token, processor.video_token_id = f"<reserved_{TINY_VIDEO_TOKEN_ID}>", TINY_VIDEO_TOKEN_ID
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    return model, processor
