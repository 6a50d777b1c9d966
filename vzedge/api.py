"""The library calls behind the core CLI verbs: info, show, generate."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from vzedge.encoder import VisionZipEncoder
from vzedge.flops import summarize
from vzedge.images import ImageLimits, load_image
from vzedge.models.loading import LoadedModel, load_config, load_model
from vzedge.prompt import IMAGE_TOKEN, single_turn
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)


def info(model: str, cfg: VisionZipConfig) -> dict[str, Any]:
    """Encoder, token counts and FLOPs with and without VisionZip, from the config alone (no weights)."""
    config = load_config(model)
    vcfg = getattr(config, "vision_config", config)
    n_layers = int(vcfg.num_hidden_layers)
    if not -n_layers <= cfg.layer < n_layers:  # the encoder's own check, so info and generate agree
        raise ValueError(
            f"layer={cfg.layer} is out of range for a {n_layers}-layer encoder; "
            f"use -{n_layers} <= layer <= {n_layers - 1} (-2 is LLaVA's feature layer)"
        )
    summary = summarize(config, cfg.dominant, cfg.contextual, cfg.layer)
    seq = summary["encoder"]["sequence_tokens"]
    # Same checks the encoder makes, without building it.
    if summary["encoder"]["has_cls"] and cfg.dominant < 1:
        raise ValueError("dominant must be >= 1 for a CLIP tower (CLS is always kept)")
    if cfg.num_tokens > seq:
        raise ValueError(f"dominant + contextual = {cfg.num_tokens} exceeds the {seq} tokens of this encoder")
    return {"model": model, "visionzip": cfg.to_dict(), **summary}


def preprocess(loaded: LoadedModel, images: list[Any]) -> torch.Tensor:
    """pixel_values [B, 3, H, W] with the model's own image processor (or the family defaults)."""
    if loaded.image_processor is not None:
        return loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    from vzedge.models import adapt_vision_tower

    t = adapt_vision_tower(loaded.vision)
    arrays = []
    for im in images:
        im = im.convert("RGB").resize((t.image_size, t.image_size), resample=3)  # bicubic
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
        arrays.append((x - torch.tensor(t.image_mean).view(3, 1, 1)) / torch.tensor(t.image_std).view(3, 1, 1))
    return torch.stack(arrays)


def quant_label(vlm: Any, requested: str) -> str:
    """The quantization the LLM really has: what load_quantized ran, or what a quantized checkpoint holds."""
    info = getattr(vlm, "vzedge_quant", None)
    if info is not None:
        return str(info.method)
    qc = getattr(getattr(vlm, "config", None), "quantization_config", None)
    if qc is not None:
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        return str(qc.get("quant_method", "unknown")).lower()
    return requested


def check_pixels(pixel_values: torch.Tensor, what: str = "the preprocessed image") -> None:
    """NaN/inf pixels make every token NaN without an error anywhere downstream: refuse them here."""
    if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(
            f"{what} has NaN or infinite values; check the image and the preprocessing (mean/std must be finite "
            "and std non-zero)"
        )


def context_length(vlm: Any) -> int | None:
    """The LLM's context (max_position_embeddings), or None if the config does not say."""
    cfg = getattr(vlm, "config", None)
    text = getattr(cfg, "text_config", cfg)
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n else None


def check_context(vlm: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that cannot fit the model's context before spending minutes on it."""
    ctx = context_length(vlm)
    if ctx is not None and prompt_tokens + max_new_tokens > ctx:
        raise ValueError(
            f"the prompt is {prompt_tokens:,} tokens (image tokens included) and --max-new-tokens is "
            f"{max_new_tokens}: {prompt_tokens + max_new_tokens:,} is over the model's context of {ctx:,} tokens; "
            "shorten the prompt or lower --max-new-tokens"
        )


def show(model: str, image: str, out: str, cfg: VisionZipConfig, limits: ImageLimits | None = None) -> dict[str, Any]:
    """Draw `image` with its attention heat map and the tokens VisionZip keeps, to `out` (PNG)."""
    from vzedge.io import check_writable_file
    from vzedge.viz import show as draw

    check_writable_file(out, "--out")  # before the model loads, not after the work
    picture = load_image(image, limits)
    loaded = load_model(model)
    encoder = VisionZipEncoder(loaded.vision, cfg).eval()
    pixels = preprocess(loaded, [picture])
    check_pixels(pixels)
    mean = getattr(loaded.image_processor, "image_mean", None)
    std = getattr(loaded.image_processor, "image_std", None)
    if mean is not None and std is not None:
        encoder.tower.image_mean, encoder.tower.image_std = tuple(mean), tuple(std)
    title = (
        f"{model}: {encoder.tower.seq_len} tokens -> {cfg.num_tokens} "
        f"(dominant {cfg.dominant} yellow, contextual {cfg.contextual} targets cyan)"
    )
    return draw(encoder, pixels, out, title)


def resolve_projector(source: str, cfg: VisionZipConfig | None, projector: str | None) -> str | None:
    """The tuned projector folder to use, or None for the model's own.

    "auto" takes the one shipped for the built-in `tiny` (`source` "builtin:tiny") at this VisionZip config if
    there is one (54+10); None or "none": the model's own; else `projector` is a `vzedge tune` folder.
    """
    if projector == "auto":
        if cfg is not None and source == "builtin:tiny":
            from vzedge.models.tiny import tuned_projector_dir

            shipped = tuned_projector_dir(cfg)
            return str(shipped) if shipped is not None else None
        return None
    if projector == "none":
        return None
    if projector is not None and cfg is None:
        raise ValueError("a tuned projector is for VisionZip tokens; drop --no-visionzip, or --projector")
    return projector


@torch.no_grad()
def generate(
    model: str,
    image: str,
    prompt: str,
    cfg: VisionZipConfig | None,
    max_new_tokens: int = 32,
    projector: str | None = "auto",
    limits: ImageLimits | None = None,
) -> dict[str, Any]:
    """Answer `prompt` about `image` with a LLaVA model, on VisionZip tokens (cfg) or all tokens (None).

    projector: a `vzedge tune` folder to use for the VisionZip tokens; "auto" takes the one shipped for the
    built-in `tiny` at this config if there is one (54+10), else the model's own; None or "none": the model's own.
    """
    from vzedge.models.llava import apply_visionzip

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: pass --max-new-tokens >= 1")
    picture = load_image(image, limits)  # before the model loads: a bad image costs nothing
    loaded = load_model(model)
    if loaded.vlm is None or loaded.processor is None:
        raise ValueError(f"{model!r} is a bare vision encoder; generate needs a LLaVA model (e.g. --model tiny)")
    vlm, processor = loaded.vlm, loaded.processor
    projector = resolve_projector(loaded.source, cfg, projector)
    if cfg is not None:
        apply_visionzip(vlm, cfg, processor, projector=projector)
    text = prompt if IMAGE_TOKEN in prompt else single_turn(processor, prompt)
    inputs = processor(images=picture, text=text, return_tensors="pt")
    check_pixels(inputs["pixel_values"])
    image_token_id = vlm.config.image_token_id
    n_image = int((inputs["input_ids"] == image_token_id).sum())
    check_context(vlm, int(inputs["input_ids"].shape[1]), max_new_tokens)
    t0 = time.perf_counter()
    out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1] :]
    return {
        "model": model,
        "visionzip": cfg.to_dict() if cfg is not None else None,
        "projector": projector,
        "quant": quant_label(vlm, "none"),
        "image_tokens": n_image,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": int(new.numel()),
        "answer": processor.tokenizer.decode(new, skip_special_tokens=True).strip(),
        "seconds": round(elapsed, 3),
    }
