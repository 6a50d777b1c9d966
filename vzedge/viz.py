"""`vzedge show`: the image with the attention heat map and the tokens VisionZip keeps (paper Fig. 2)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from vzedge.encoder import VisionZipEncoder, VisionZipExplanation
from vzedge.io import atomic_path


def _heat_colour(v: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a blue -> yellow -> red ramp, [..., 3] uint8."""
    r = np.clip(2.0 * v, 0, 1)
    g = np.clip(2.0 - 2.0 * np.abs(2.0 * v - 1.0), 0, 1) * 0.9
    b = np.clip(1.0 - 2.0 * v, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def denormalize(pixel_values: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Image.Image:
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def render(image: Image.Image, exp: VisionZipExplanation, grid: int, has_cls: bool, title: str = "") -> Image.Image:
    """Two panels: the CLS/received-attention heat map, and the kept tokens (others dimmed;
    contextual merge targets outlined in cyan, dominant tokens in yellow)."""
    size = image.width
    cell = size / grid
    offset = 1 if has_cls else 0
    scores = exp.scores[0, offset:].float().cpu().numpy().reshape(grid, grid)
    # Attention is heavy-tailed; a square root keeps the mid-range visible.
    heat = np.sqrt(np.clip((scores - scores.min()) / max(np.ptp(scores), 1e-12), 0, 1))
    heat_img = Image.fromarray(_heat_colour(heat)).resize((size, size), Image.NEAREST)
    left = Image.blend(image, heat_img, 0.55)

    base = np.asarray(image).astype(np.float32)
    dim = (base * 0.25 + 40).astype(np.uint8)
    keep_mask = np.zeros((grid, grid), dtype=bool)
    kept = [int(i) - offset for i in exp.kept_indices[0].tolist() if int(i) >= offset]
    for p in kept:
        keep_mask[p // grid, p % grid] = True
    pix_mask = np.kron(keep_mask, np.ones((int(np.ceil(cell)),) * 2, dtype=bool))[:size, :size]
    right = Image.fromarray(np.where(pix_mask[..., None], base.astype(np.uint8), dim))
    draw = ImageDraw.Draw(right)
    for p in kept:
        r, c = divmod(p, grid)
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(255, 215, 0))
    for t in exp.targets[0].tolist():
        p = int(t) - offset
        if p < 0:
            continue
        r, c = divmod(p, grid)
        draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], outline=(0, 220, 255), width=2)

    bar = 22
    canvas = Image.new("RGB", (2 * size + 8, size + bar), (255, 255, 255))
    canvas.paste(left, (0, bar))
    canvas.paste(right, (size + 8, bar))
    ImageDraw.Draw(canvas).text((4, 5), title, fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def show(encoder: VisionZipEncoder, pixel_values: torch.Tensor, out: str, title: str = "") -> dict:
    """Draw the first image of `pixel_values` to `out` (PNG, written atomically). Returns a summary."""
    t = encoder.tower
    exp = encoder.explain(pixel_values[:1])
    image = denormalize(pixel_values[0], t.image_mean, t.image_std)
    canvas = render(image, exp, t.grid, t.has_cls, title)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    offset = int(t.has_cls)
    patch_scores = exp.scores[0, offset:]
    kept_patches = exp.kept_indices[0][exp.kept_indices[0] >= offset] - offset
    return {
        "out": str(out),
        "kept_tokens": encoder.cfg.dominant,
        "contextual_tokens": encoder.cfg.contextual,
        "grid": t.grid,
        "attention_share_of_kept_patches": float(patch_scores[kept_patches].sum() / patch_scores.sum()),
    }
