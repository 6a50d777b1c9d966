"""The library calls behind the core CLI verbs: info, show, generate."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from vzedge.encoder import VisionZipEncoder
from vzedge.flops import summarize
from vzedge.images import load_image
from vzedge.models.loading import LoadedModel, load_config, load_model
from vzedge.prompt import IMAGE_TOKEN, single_turn
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)


def info(model: str, cfg: VisionZipConfig) -> dict[str, Any]:
    """Encoder, token counts and FLOPs with and without VisionZip, from the config alone (no weights)."""
    config = load_config(model)
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


def show(model: str, image: str, out: str, cfg: VisionZipConfig) -> dict[str, Any]:
    """Draw `image` with its attention heat map and the tokens VisionZip keeps, to `out` (PNG)."""
    from vzedge.viz import show as draw

    loaded = load_model(model)
    encoder = VisionZipEncoder(loaded.vision, cfg).eval()
    pixels = preprocess(loaded, [load_image(image)])
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
) -> dict[str, Any]:
    """Answer `prompt` about `image` with a LLaVA model, on VisionZip tokens (cfg) or all tokens (None).

    projector: a `vzedge tune` folder to use for the VisionZip tokens; "auto" takes the one shipped for the
    built-in `tiny` at this config if there is one (54+10), else the model's own; None or "none": the model's own.
    """
    from vzedge.models.llava import apply_visionzip

    loaded = load_model(model)
    if loaded.vlm is None or loaded.processor is None:
        raise ValueError(f"{model!r} is a bare vision encoder; generate needs a LLaVA model (e.g. --model tiny)")
    vlm, processor = loaded.vlm, loaded.processor
    projector = resolve_projector(loaded.source, cfg, projector)
    if cfg is not None:
        apply_visionzip(vlm, cfg, processor, projector=projector)
    text = prompt if IMAGE_TOKEN in prompt else single_turn(processor, prompt)
    inputs = processor(images=load_image(image), text=text, return_tensors="pt")
    image_token_id = vlm.config.image_token_id
    n_image = int((inputs["input_ids"] == image_token_id).sum())
    t0 = time.perf_counter()
    out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1] :]
    return {
        "model": model,
        "visionzip": cfg.to_dict() if cfg is not None else None,
        "projector": projector,
        "image_tokens": n_image,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": int(new.numel()),
        "answer": processor.tokenizer.decode(new, skip_special_tokens=True).strip(),
        "seconds": round(elapsed, 3),
    }
