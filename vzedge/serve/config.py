"""ServeConfig: one validated dataclass for `vzedge serve`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vzedge.select.adaptive import AdaptiveBudget
from vzedge.visionzip import VisionZipConfig


def parse_budget(text: str) -> tuple[int, int]:
    """'54+10' -> (54, 10): dominant + contextual VisionZip tokens."""
    parts = text.split("+")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"budget {text!r}: write dominant+contextual tokens, e.g. 54+10")
    return int(parts[0]), int(parts[1])


@dataclass
class ServeConfig:
    """model: 'tiny', a folder or a hub id; vision/vision_backend/quant/projector/device as for `vzedge run`
    (projector "auto": the tuned projector shipped for `tiny` at this budget, as `vzedge generate` does).
    visionzip None serves on all image tokens. Limits bound what one request may cost and how many may wait."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    visionzip: VisionZipConfig | None = field(default_factory=VisionZipConfig)
    vision: str | None = None
    vision_backend: str = "auto"
    quant: str = "none"
    projector: str | None = "auto"
    device: str = "auto"
    layout: str = "reference"
    served_name: str | None = None  # the `model` name clients send (default: --model)
    image_root: str | None = None  # local image paths are allowed only under this folder
    image_cache_mb: float = 256.0
    max_body_mb: float = 20.0
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1  # images per conversation (the KV prefix holds one image)
    max_queue: int = 64  # requests waiting or running; more get 503 + Retry-After
    max_active: int = 8  # requests decoding at once (round-robin, one token each per turn)
    max_vision_batch: int = 8  # cache misses encoded in one vision pass
    default_max_tokens: int = 256
    timeout_s: float = 120.0
    threads: int | None = None  # torch intra-op threads (None: torch's default); 1 is faster on a loaded 2-core CPU
    warmup: bool = True
    # Text-conditioned stage 2 (vzedge.select.textcond): keep this many of the image's cached tokens per question
    # (the image's stage-1 tokens are cached; the KV prefix is then per image and question). None: off.
    text_stage: int | None = None
    # Each request's image at its own bucket (vzedge.select.adaptive); with `vision`, an adaptive export's budget
    # (None: the manifest's; else it must match). Prompt-size checks allow for the largest bucket.
    adaptive: AdaptiveBudget | None = None

    def __post_init__(self) -> None:
        self.run_config()  # the runtime's own checks of model/vision/quant/device/layout
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("image_cache_mb", "max_body_mb", "timeout_s"):
            if getattr(self, name) < 0 or (name != "image_cache_mb" and getattr(self, name) == 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_image_pixels", "max_images", "max_queue", "max_active", "max_vision_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images != 1:
            raise ValueError("max_images: the server holds one image per conversation (its KV prefix); use 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise ValueError(f"--image-root {self.image_root!r} is not a folder; pass an existing folder")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key is empty; pass a key or leave the option out")
        if self.projector is not None and self.projector not in ("auto", "none") and self.visionzip is None:
            raise ValueError("a tuned projector is for VisionZip tokens; drop --no-visionzip, or --projector")

    @property
    def name(self) -> str:
        return self.served_name or self.model

    def run_config(self):
        """The runtime config that loads the same model and backends (`vzedge.runtime.api.load_session`)."""
        from vzedge.runtime.config import RunConfig

        return RunConfig(
            model=self.model,
            vision=self.vision,
            vision_backend=self.vision_backend,
            visionzip=self.visionzip,
            quant=self.quant,
            projector=None,  # resolved against the loaded model's source by the engine ("auto")
            device=self.device,
            layout=self.layout,
            text_stage=self.text_stage,
            adaptive=self.adaptive,
        )

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["visionzip"] = self.visionzip.to_dict() if self.visionzip is not None else None
        d["api_key"] = "***" if self.api_key else None
        d["adaptive"] = self.adaptive.to_dict() if self.adaptive is not None else None
        return d
