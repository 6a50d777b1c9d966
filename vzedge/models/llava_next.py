"""LLaVA-NeXT (anyres) and LLaVA-NeXT-Video on VisionZip tokens.

An anyres image is a base crop (the whole image resized) plus `rows x cols` tiles of the stitched
high-resolution image. Every crop goes through VisionZip independently with the same config, so an
image gives K x (1 + rows x cols) tokens (K = dominant + contextual), plus `rows x patches_per_side`
newlines with `layout="newline"`. The arrangement of those tokens for the LLM is a pure function of
(per-crop tokens, kept indices, grid) -- `arrange_anyres` -- that needs torch only, so the runtime
applies it after the exported vision graph has run on the crops as one batch.

Layouts:
- "reference": the VisionZip authors' LLaVA-NeXT arrangement. The base crop's K tokens as the encoder
  returns them; then the tiles' dominant patch tokens in raster order over the stitched grid (row by
  row across all tiles); then each tile's CLS (CLIP only), in tile order; then every tile's contextual
  tokens, tile by tile. No `image_newline`, no unpadding.
- "newline": the same tokens, with the model's `image_newline` after every row of the stitched grid,
  as stock LLaVA-NeXT marks rows. Rows are counted whether or not a dominant token falls on them, so the
  count stays a function of the grid alone (unpadding would make it depend on which tokens were kept).

Video (LLaVA-NeXT-Video): each frame is compressed independently to K tokens, replacing the stock 2x2
average pool; a clip of F frames gives F x K tokens (the paper's Video-LLaVA setting keeps 17 per frame).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)

Layout = Literal["reference", "newline"]
LAYOUTS: tuple[str, ...] = ("reference", "newline")

_STATE = "_vzedge_visionzip"  # same key as vzedge.models.llava, so is_applied/visionzip_encoder work for all
_NEXT_MODELS = ("LlavaNextModel", "LlavaNextVideoModel")


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: grid selection, token counts, arrangement (torch only; reused by the runtime).


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}; use 'reference' (the authors' arrangement)")


def check_pinpoints(pinpoints: Sequence[Sequence[int]], crop_size: int) -> list[tuple[int, int]]:
    """The checkpoint's anyres resolutions as (height, width) pairs, each a whole number of crops."""
    if not pinpoints:
        raise ValueError("image_grid_pinpoints is empty: an anyres checkpoint lists its resolutions, e.g. [[672, 672]]")
    out = []
    for p in pinpoints:
        if len(p) != 2 or any(int(v) <= 0 for v in p):
            raise ValueError(f"image_grid_pinpoints entry {list(p)} is not a (height, width) pair of positive ints")
        h, w = int(p[0]), int(p[1])
        if h % crop_size or w % crop_size:
            raise ValueError(
                f"image_grid_pinpoints entry [{h}, {w}] is not a whole number of {crop_size}-px crops: this "
                f"checkpoint cannot tile it; use resolutions that are multiples of {crop_size}"
            )
        out.append((h, w))
    return out


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps most of the image and wastes least: LLaVA-NeXT's rule
    (transformers' `select_best_resolution`), reimplemented so this module needs torch only."""
    oh, ow = int(image_hw[0]), int(image_hw[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"image size {oh}x{ow} (height x width) is empty; pass the original image's size")
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    assert best is not None
    return best


def anyres_grid(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], crop_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of size (height, width)."""
    h, w = select_best_resolution(image_hw, check_pinpoints(pinpoints, crop_size))
    return h // crop_size, w // crop_size


def check_grid(grid: Sequence[int], pinpoints: Sequence[Sequence[int]], crop_size: int) -> tuple[int, int]:
    """Refuse a (rows, cols) grid that is not one of the checkpoint's resolutions."""
    rows, cols = int(grid[0]), int(grid[1])
    allowed = {(h // crop_size, w // crop_size) for h, w in check_pinpoints(pinpoints, crop_size)}
    if (rows, cols) not in allowed:
        raise ValueError(
            f"grid {rows}x{cols} (rows x cols of {crop_size}-px tiles) is not one this checkpoint supports; "
            f"its grids are {sorted(allowed)} (from image_grid_pinpoints)"
        )
    return rows, cols


def image_token_count(num_tokens: int, grid: Sequence[int], patches_per_side: int, layout: Layout = "reference") -> int:
    """LLM tokens for one anyres image: K per crop (base + tiles), plus one newline per stitched row."""
    check_layout(layout)
    rows, cols = int(grid[0]), int(grid[1])
    n = num_tokens * (1 + rows * cols)
    if layout == "newline":
        n += rows * patches_per_side
    return n


def video_token_count(num_tokens: int, num_frames: int) -> int:
    """LLM tokens for a clip: K per frame."""
    if num_frames < 1:
        raise ValueError(f"a video has {num_frames} frames; pass at least one frame per video")
    return num_tokens * num_frames


def arrange_anyres(
    tokens: torch.Tensor,
    kept: torch.Tensor,
    grid: Sequence[int],
    patches_per_side: int,
    has_cls: bool,
    layout: Layout = "reference",
    newline: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image's crops -> its LLM token sequence [image_token_count(...), D].

    tokens: [1 + rows*cols, K, D] VisionZip tokens per crop (crop 0 is the base image, tiles row-major), in the
        encoder's order [dominant ascending (CLS first for CLIP), contextual]; projected or not (the arrangement
        only permutes tokens, so it commutes with the per-token projector).
    kept: [1 + rows*cols, dominant] the encoder's ascending kept sequence positions (CLS = 0 for CLIP).
    newline: [D] the `image_newline` embedding, for layout="newline" (same width as tokens).
    """
    check_layout(layout)
    rows, cols = int(grid[0]), int(grid[1])
    if tokens.dim() != 3 or kept.dim() != 2 or kept.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"tokens {list(tokens.shape)} and kept {list(kept.shape)}: expected [crops, K, D] and [crops, dominant]"
        )
    n_crops, k, d = tokens.shape
    if n_crops != 1 + rows * cols:
        raise ValueError(
            f"{n_crops} crops for a {rows}x{cols} grid: an anyres image has 1 base crop + rows*cols tiles "
            f"= {1 + rows * cols}"
        )
    dominant = kept.shape[1]
    if dominant > k:
        raise ValueError(f"kept has {dominant} positions but each crop has only {k} tokens")
    tiles, tiles_kept = tokens[1:], kept[1:]
    first = 1 if has_cls else 0
    pos = tiles_kept[:, first:] - first  # patch positions inside each tile, [T, P]
    tile = torch.arange(rows * cols, device=tokens.device).unsqueeze(1)
    g_row = (tile // cols) * patches_per_side + pos // patches_per_side
    g_col = (tile % cols) * patches_per_side + pos % patches_per_side
    width = cols * patches_per_side
    key = (g_row * width + g_col).reshape(-1)
    flat = tiles[:, first:dominant].reshape(-1, d)
    if layout == "reference":
        grid_tokens = flat[torch.argsort(key)]
    else:
        if newline is None or newline.shape != (d,):
            got = None if newline is None else list(newline.shape)
            raise ValueError(f"layout='newline' needs the model's image_newline of shape [{d}], got {got}")
        n_rows = rows * patches_per_side
        # Keys interleave: token at stitched index g -> 2g; the newline closing row r -> 2(r*width + width-1) + 1.
        nl_key = (torch.arange(n_rows, device=tokens.device) * width + width - 1) * 2 + 1
        keys = torch.cat([key * 2, nl_key])
        values = torch.cat([flat, newline.to(flat.dtype).unsqueeze(0).expand(n_rows, d)])
        grid_tokens = values[torch.argsort(keys)]
    parts = [tokens[0], grid_tokens]
    if has_cls:
        parts.append(tiles[:, 0])
    parts.append(tiles[:, dominant:].reshape(-1, d))
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------------
# Model glue: shared by LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision.


class AnyresGlue:
    """What the patched get_image_features/get_video_features share: the encoder, the projector, the geometry."""

    def __init__(self, model: nn.Module, cfg: VisionZipConfig, layout: Layout) -> None:
        from vzedge.encoder import VisionZipEncoder

        check_layout(layout)
        self.inner = model.model
        self.config = model.config
        self.cfg = cfg
        self.layout = layout
        _check_feature_layer(self.config, cfg)
        self.encoder = VisionZipEncoder(self.inner.vision_tower, cfg)
        tower = self.encoder.tower
        self.crop_size = tower.image_size
        self.patches_per_side = tower.grid
        self.has_cls = tower.has_cls
        self.pinpoints = check_pinpoints(self.config.image_grid_pinpoints, self.crop_size)

    @property
    def newline(self) -> torch.Tensor:
        return self.inner.image_newline

    def grids(self, image_sizes: Any) -> list[tuple[int, int]]:
        if image_sizes is None:
            raise ValueError(
                "image_sizes is None: anyres models need each image's (height, width); pass the processor's"
            )
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
        return [anyres_grid(s, self.pinpoints, self.crop_size) for s in sizes]

    def gather_crops(self, pixel_values: torch.Tensor, n_crops: list[int]) -> torch.Tensor:
        """[N, max_crops, C, H, W] (padded by the processor) or [sum crops, C, H, W] -> [sum crops, C, H, W]."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(n_crops):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(n_crops)}")
            for i, n in enumerate(n_crops):
                if n > pixel_values.shape[1]:
                    raise ValueError(
                        f"image {i} needs {n} crops for its grid but pixel_values holds {pixel_values.shape[1]}: the "
                        "processor's image_grid_pinpoints differ from the model's; use the checkpoint's processor"
                    )
            return torch.cat([pv[:n] for pv, n in zip(pixel_values, n_crops, strict=True)])
        if pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(n_crops):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} crops but image_sizes imply {sum(n_crops)} "
                    f"({n_crops} per image)"
                )
            return pixel_values
        raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; expected [N, crops, C, H, W]")

    def encode(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw VisionZip tokens, projected tokens, kept) for a batch of crops or frames."""
        out = self.encoder(crops)
        return out.tokens, self.inner.multi_modal_projector(out.tokens), out.kept_indices

    def arrange(self, feats: torch.Tensor, kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return arrange_anyres(
            feats, kept, grid, self.patches_per_side, self.has_cls, self.layout, self.newline.to(feats.dtype)
        )

    def image_tokens(self, grid: tuple[int, int]) -> int:
        return image_token_count(self.cfg.num_tokens, grid, self.patches_per_side, self.layout)

    def encode_video(self, pixel_values_videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, F, C, H, W] -> (raw tokens [B*F, K, d], projected [B, F*K, D])."""
        if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() != 5:
            shape = getattr(pixel_values_videos, "shape", None)
            raise ValueError(f"pixel_values_videos has shape {shape}; expected [videos, frames, C, H, W]")
        b, f = pixel_values_videos.shape[:2]
        if b == 0 or f == 0:
            raise ValueError(f"pixel_values_videos holds {b} videos of {f} frames; pass at least one frame per video")
        raw, feats, _ = self.encode(pixel_values_videos.flatten(0, 1))
        return raw, feats.reshape(b, f * feats.shape[1], feats.shape[2])


def _check_feature_layer(config: Any, cfg: VisionZipConfig) -> None:
    feature_layer = getattr(config, "vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"vision_feature_layer={feature_layer!r}: multi-layer feature concatenation is not supported by VisionZip"
        )
    if feature_layer != cfg.layer:
        log.warning(
            "VisionZip selects at layer %d while the model was trained on layer %d features", cfg.layer, feature_layer
        )


def _output(raw: torch.Tensor, pooled: Any):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=raw, pooler_output=pooled)


def install(inner: nn.Module, encoder: nn.Module, **methods: Any) -> None:
    """Attach the encoder and the replacement methods to the model instance (not its state_dict)."""
    if _STATE in vars(inner):
        raise ValueError("VisionZip is already applied to this model; call remove_visionzip(model) first")
    vars(inner)[_STATE] = encoder
    vars(inner).update(methods)


def patch_processor(processor: Any, methods: dict[str, Any], num_tokens: int) -> None:
    """Replace the processor's placeholder counting on this instance only."""
    if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
        raise TypeError(f"{type(processor).__name__} is not a LLaVA processor (no replace_image_token)")
    if _STATE in vars(processor):
        raise ValueError("VisionZip is already applied to this processor; call remove_visionzip first")
    vars(processor).update(methods)
    vars(processor)[_STATE] = num_tokens


def check_processor_pinpoints(processor: Any, glue: AnyresGlue) -> None:
    theirs = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
    if theirs is None:
        raise TypeError(f"{type(processor).__name__} has no image_processor.image_grid_pinpoints (not anyres)")
    if [tuple(int(v) for v in p) for p in theirs] != glue.pinpoints:
        raise ValueError(
            f"the processor tiles with image_grid_pinpoints {theirs} but the model was built for "
            f"{[list(p) for p in glue.pinpoints]}; use the checkpoint's own processor"
        )


def _crop_hw(image_inputs: dict) -> tuple[int, int]:
    # [images, crops, C, H, W], as a tensor or nested lists of arrays
    h, w = image_inputs["pixel_values"][0][0].shape[-2:]
    return int(h), int(w)


def _size_of(image_inputs: dict, image_idx: int) -> list[int]:
    size = image_inputs["image_sizes"][image_idx]
    return size.tolist() if hasattr(size, "tolist") else list(size)


def _check_crop(glue: AnyresGlue, hw: tuple[int, int]) -> None:
    if hw != (glue.crop_size, glue.crop_size):
        raise ValueError(
            f"the processor makes {hw[0]}x{hw[1]} crops but the vision tower takes {glue.crop_size}x{glue.crop_size}; "
            "use the checkpoint's own processor"
        )


def _video_frames(video_inputs: dict, video_idx: int) -> int:
    video = video_inputs["pixel_values_videos"][video_idx]
    return len(video) if isinstance(video, (list, tuple)) else int(video.shape[0])


def apply_visionzip(
    model: nn.Module, cfg: VisionZipConfig, processor: Any | None = None, layout: Layout = "reference"
) -> nn.Module:
    """LLaVA-NeXT / NeXT-Video: every crop and every video frame compressed to `cfg.num_tokens` tokens.

    Called through `vzedge.apply_visionzip`, which dispatches here for NeXT models. The processor, when given,
    inserts `image_token_count(...)` placeholders per image and `video_token_count(...)` per video.
    """
    inner = model.model
    if type(inner).__name__ not in _NEXT_MODELS:
        raise TypeError(f"{type(model).__name__} is not a LLaVA-NeXT model")
    if _STATE in vars(inner):
        raise ValueError("VisionZip is already applied to this model; call remove_visionzip(model) first")
    glue = AnyresGlue(model, cfg, layout)
    if processor is not None:
        check_processor_pinpoints(processor, glue)

    def get_image_features(pixel_values: torch.Tensor, image_sizes: Any = None, *args: Any, **kwargs: Any):
        grids = glue.grids(image_sizes)
        n_crops = [1 + r * c for r, c in grids]
        raw, feats, kept = glue.encode(glue.gather_crops(pixel_values, n_crops))
        per_image = zip(feats.split(n_crops), kept.split(n_crops), grids, strict=True)
        return _output(raw, [glue.arrange(f, k, g) for f, k, g in per_image])

    methods: dict[str, Any] = {"get_image_features": get_image_features}
    if hasattr(inner, "get_video_features"):

        def get_video_features(pixel_values_videos: torch.Tensor, *args: Any, **kwargs: Any):
            raw, feats = glue.encode_video(pixel_values_videos)
            return _output(raw, feats)

        methods["get_video_features"] = get_video_features

    if processor is not None:
        patch_processor(processor, _next_processor_methods(processor, glue), cfg.num_tokens)
    install(inner, glue.encoder, **methods)
    log.info("VisionZip applied to %s: %d tokens per crop, layout=%s", type(model).__name__, cfg.num_tokens, layout)
    return model


def _next_processor_methods(processor: Any, glue: AnyresGlue) -> dict[str, Any]:
    original_count = type(processor)._get_num_multimodal_tokens
    k = glue.cfg.num_tokens

    def count(image_size: Sequence[int]) -> int:
        return glue.image_tokens(anyres_grid(image_size, glue.pinpoints, glue.crop_size))

    def replace_image_token(image_inputs: dict, image_idx: int = 0, **kwargs: Any) -> str:
        _check_crop(glue, _crop_hw(image_inputs))
        return processor.image_token * count(_size_of(image_inputs, image_idx))

    def replace_video_token(video_inputs: dict, video_idx: int = 0, **kwargs: Any) -> str:
        return processor.video_token * video_token_count(k, _video_frames(video_inputs, video_idx))

    def get_num_multimodal_tokens(image_sizes: Any = None, **kwargs: Any):
        data = original_count(processor, image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [count(s) for s in image_sizes]
        return data

    methods = {"replace_image_token": replace_image_token, "_get_num_multimodal_tokens": get_num_multimodal_tokens}
    if hasattr(processor, "replace_video_token"):
        methods["replace_video_token"] = replace_video_token
    return methods


# ---------------------------------------------------------------------------------------------------------------
# Tiny random variants for tests (no downloads): LLaVA-NeXT geometry at toy width.

TINY_CROP = 112  # 8 x 8 patches of 14 px + CLS: small enough for many crops per test
TINY_PINPOINTS = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336], [336, 336]]
TINY_VIDEO_TOKEN_ID = 260  # the byte tokenizer has no <video>; a reserved id stands in


def _tiny_text_config(**overrides: Any):
    from transformers import LlamaConfig

    from vzedge.models.tiny import VOCAB_SIZE

    kw: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def image_only_processor(cls: type, **kwargs: Any):
    """`cls(video_processor=None, ...)` for a video-capable processor class.

    transformers' video processors need torchvision; without it (as on edge installs) a NeXT-Video or
    OneVision processor cannot be built at all, though its image and text paths need no video processor.
    """

    class ImageOnly(cls):  # type: ignore[valid-type, misc]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly(video_processor=None, **kwargs)


def build_tiny_next(video: bool = False, seed: int = 0, pinpoints: list[list[int]] | None = None):
    """(LlavaNext[Video]ForConditionalGeneration, processor): random, CLIP tower 112 px / patch 14, toy Llama."""
    from transformers import LlavaNextImageProcessorPil

    from vzedge.models import clip
    from vzedge.models.tiny import SPECIAL_TOKENS, build_tokenizer

    pinpoints = pinpoints or TINY_PINPOINTS
    vision = clip.tiny_config(image_size=TINY_CROP, patch_size=14, num_hidden_layers=3)
    kw: dict[str, Any] = dict(
        vision_config=vision.to_dict(),
        text_config=_tiny_text_config().to_dict(),
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TINY_CROP},
        crop_size={"height": TINY_CROP, "width": TINY_CROP},
        image_grid_pinpoints=pinpoints,
        image_mean=list(clip.CLIP_MEAN),
        image_std=list(clip.CLIP_STD),
    )
    common = dict(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    if video:
        from transformers import (
            LlavaNextVideoConfig,
            LlavaNextVideoForConditionalGeneration,
            LlavaNextVideoProcessor,
        )

        config = LlavaNextVideoConfig(**kw, video_token_id=TINY_VIDEO_TOKEN_ID)
        model_cls = LlavaNextVideoForConditionalGeneration
        processor = image_only_processor(LlavaNextVideoProcessor, **common)
        processor.video_token, processor.video_token_id = f"<reserved_{TINY_VIDEO_TOKEN_ID}>", TINY_VIDEO_TOKEN_ID
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

        config = LlavaNextConfig(**kw)
        model_cls = LlavaNextForConditionalGeneration
        processor = LlavaNextProcessor(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.generation_config.pad_token_id = 0
    return model, processor
