"""Image preprocessing from a manifest's `preprocess` block (PIL + numpy; no transformers needed).

Mirrors CLIP-style processors: resize (shortest edge or exact), center crop, rescale, normalise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

MAX_SIDE = 8192  # the largest resize or crop side a manifest may ask for
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Preprocess:
    resize_mode: str  # "shortest_edge" | "exact"
    size: int | tuple[int, int]
    resample: int
    crop: tuple[int, int] | None
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> Preprocess:
        try:
            resize = spec["resize"]
            mode = resize["mode"]
            size = int(resize["size"]) if mode == "shortest_edge" else tuple(int(s) for s in resize["size"])
            resample = _RESAMPLE[str(resize.get("resample", "bicubic")).lower()]
            crop = tuple(int(c) for c in spec["center_crop"]) if spec.get("center_crop") else None
            return cls(
                resize_mode=mode,
                size=size,  # type: ignore[arg-type]
                resample=resample,
                crop=crop,  # type: ignore[arg-type]
                rescale=float(spec["rescale"]),
                mean=tuple(float(m) for m in spec["mean"]),  # type: ignore[arg-type]
                std=tuple(float(s) for s in spec["std"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the manifest's preprocess block is malformed ({err!r}); re-export the model") from err

    def __post_init__(self) -> None:
        """Values that would silently give NaN/inf pixels or giant buffers are refused, wherever they come from."""
        import math

        def bad(msg: str) -> ValueError:
            return ValueError(f"preprocess: {msg}; re-export the model (its manifest is damaged or was edited)")

        if self.resize_mode not in ("shortest_edge", "exact"):
            raise bad(f"resize mode {self.resize_mode!r} is not shortest_edge or exact")
        sizes = [self.size] if isinstance(self.size, int) else list(self.size)
        if self.crop is not None:
            sizes += list(self.crop)
        if len(sizes) != (1 if isinstance(self.size, int) else 2) + (2 if self.crop is not None else 0):
            raise bad(f"size {self.size!r} / center_crop {self.crop!r} need one or two sides each")
        if any(not 1 <= int(v) <= MAX_SIDE for v in sizes):
            raise bad(f"size {self.size!r} / center_crop {self.crop!r} must be between 1 and {MAX_SIDE} pixels")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise bad(f"mean {self.mean!r} and std {self.std!r} need 3 values (RGB)")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.rescale)):
            raise bad(f"mean {self.mean!r}, std {self.std!r} and rescale {self.rescale!r} must be finite")
        if any(abs(v) < 1e-6 for v in self.std):
            raise bad(f"std {self.std!r} has a zero: every pixel would become inf")
        if not 0 < self.rescale <= 1:
            raise bad(f"rescale {self.rescale!r} must be in (0, 1] (1/255 for 8-bit images)")

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        if self.resize_mode == "exact":
            return self.size  # type: ignore[return-value]
        raise ValueError("shortest-edge resize without a center crop gives a data-dependent size")

    def image(self, im: Image.Image) -> np.ndarray:
        """One PIL image -> float32 [3, H, W]."""
        im = im.convert("RGB")
        if self.resize_mode == "shortest_edge":
            short = int(self.size)  # type: ignore[arg-type]
            w, h = im.size
            if w <= h:
                new = (short, int(short * h / w))
            else:
                new = (int(short * w / h), short)
        else:
            h_, w_ = self.size  # type: ignore[misc]
            new = (w_, h_)
        if im.size != new:
            im = im.resize(new, resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = im.size
            top, left = (h - ch) // 2, (w - cw) // 2
            im = im.crop((left, top, left + cw, top + ch))
        x = np.asarray(im, dtype=np.float32) * np.float32(self.rescale)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.image(im) for im in images]))


def from_image_processor(image_processor: Any, image_size: int, mean: tuple, std: tuple) -> Preprocess:
    """The same spec read off an HF image processor (for the PyTorch backend, which has no manifest)."""
    if image_processor is None:
        return Preprocess("exact", (image_size, image_size), 3, None, 1 / 255, tuple(mean), tuple(std))
    size = getattr(image_processor, "size", None) or {}
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    crop_hw = None
    if crop:
        crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (crop.height, crop.width)
    resample = getattr(image_processor, "resample", 3)
    resample = int(getattr(resample, "value", resample))
    if shortest:
        mode, sz = "shortest_edge", int(shortest)
    else:
        h = size.get("height", image_size) if isinstance(size, dict) else getattr(size, "height", image_size)
        w = size.get("width", image_size) if isinstance(size, dict) else getattr(size, "width", image_size)
        mode, sz = "exact", (int(h), int(w))
    return Preprocess(
        resize_mode=mode,
        size=sz,  # type: ignore[arg-type]
        resample=resample,
        crop=crop_hw,
        rescale=float(getattr(image_processor, "rescale_factor", 1 / 255)),
        mean=tuple(float(m) for m in getattr(image_processor, "image_mean", mean)),  # type: ignore[arg-type]
        std=tuple(float(s) for s in getattr(image_processor, "image_std", std)),  # type: ignore[arg-type]
    )
