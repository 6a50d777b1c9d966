"""RunConfig: one validated dataclass for `vzedge run`, `vzedge chat` and `vzedge bench`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vzedge.images import ImageLimits
from vzedge.select.adaptive import AdaptiveBudget
from vzedge.visionzip import VisionZipConfig

POLICIES = ("latest", "all")
BACKENDS = ("auto", "torch", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")
QUANT_METHODS = ("none", "bnb-int8", "bnb-nf4", "bnb-fp4", "awq")
_QUANT_ALIASES = {"int8": "bnb-int8", "nf4": "bnb-nf4", "fp4": "bnb-fp4"}


@dataclass
class RunConfig:
    """model: 'tiny', a folder or a hub id (the LLM, and the vision tower for the torch backend).
    vision: an export folder (manifest.json) or None for PyTorch VisionZip (visionzip=None: all tokens).
    source: image, folder, video, camera:K, synthetic[:N] or demo. frames: cap on frames read.
    policy: 'latest' drops stale frames (robotics default), 'all' processes every frame.
    """

    model: str = "tiny"
    vision: str | None = None
    vision_backend: str = "auto"
    visionzip: VisionZipConfig | None = field(default_factory=VisionZipConfig)
    quant: str = "none"
    projector: str | None = None  # a `vzedge tune` output folder: its projector replaces the model's
    source: str = "demo"
    frames: int | None = None
    prompt: str = "What is in the image?"
    template: str | None = None  # None: the model's chat template (vzedge.prompt), as `vzedge generate` uses
    layout: str = "reference"  # anyres models: "reference" (authors') or "newline" arrangement of the crops
    clip: int = 1  # frames per question: each compressed on its own, their tokens concatenated
    policy: str = "latest"
    queue_size: int = 1
    pipelined: bool = True
    max_new_tokens: int = 16
    on_error: str = "stop"
    token_cache: int = 8
    device: str = "auto"
    memory_interval_s: float = 0.25
    max_records: int = 10_000  # per-frame records kept for the report; older frames fold into totals
    image_limits: ImageLimits = field(default_factory=ImageLimits)  # checked from each file's header
    # Per-frame token budget (vzedge.select.adaptive): each frame at the bucket its attention mass asks for. With
    # `vision`, an adaptive export's manifest gives it (None: taken from there; else it must match).
    adaptive: AdaptiveBudget | None = None
    # Text-conditioned stage 2 (vzedge.select.textcond): keep this many of the vision stage's cached tokens per
    # frame, chosen per question by conditional DPP. None: the text-agnostic path.
    text_stage: int | None = None

    def __post_init__(self) -> None:
        self.quant = _QUANT_ALIASES.get(self.quant, self.quant)
        if self.quant not in QUANT_METHODS:
            raise ValueError(f"quant {self.quant!r} is not one of {QUANT_METHODS} (or int8/nf4/fp4)")
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r}: use 'latest' (drop stale frames) or 'all'")
        if self.vision_backend not in BACKENDS:
            raise ValueError(f"vision backend {self.vision_backend!r} is not one of {BACKENDS}")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.projector is not None and self.visionzip is None:
            raise ValueError("a tuned projector is tuned for VisionZip tokens: drop --all-tokens or --projector")
        if self.layout not in ("reference", "newline"):
            raise ValueError(f"layout {self.layout!r}: use 'reference' or 'newline'")
        if self.adaptive is not None:
            if not isinstance(self.adaptive, AdaptiveBudget):
                raise TypeError(f"adaptive must be an AdaptiveBudget, got {type(self.adaptive).__name__}")
            if self.visionzip is None:
                raise ValueError("--adaptive picks each frame's VisionZip token count: drop --all-tokens")
        if self.text_stage is not None:
            if isinstance(self.text_stage, bool) or not isinstance(self.text_stage, int) or self.text_stage < 1:
                raise ValueError(f"text_stage={self.text_stage!r}: pass a positive token count, e.g. --text-stage 64")
            if self.adaptive is not None:
                raise ValueError("--text-stage keeps a fixed count per frame: drop --adaptive or --text-stage")
        if self.clip < 1:
            raise ValueError(f"clip must be >= 1 frame per question, got {self.clip}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.on_error not in ("stop", "continue"):
            raise ValueError(f"on_error {self.on_error!r}: use 'stop' or 'continue'")
        from vzedge._deps import check_device

        check_device(self.device)
        if not isinstance(self.image_limits, ImageLimits):
            raise TypeError(f"image_limits must be an ImageLimits, got {type(self.image_limits).__name__}")
        if self.template is not None and ("<image>" not in self.template or "{question}" not in self.template):
            raise ValueError(
                f"prompt template {self.template!r} needs an <image> placeholder and a {{question}} field, "
                "e.g. 'USER: <image>\\n{question} ASSISTANT:'"
            )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["visionzip"] = self.visionzip.to_dict() if self.visionzip is not None else None
        d["image_limits"] = {"max_pixels": self.image_limits.max_pixels, "max_aspect": self.image_limits.max_aspect}
        d["selector"] = self.visionzip.selector if self.visionzip is not None else None
        d["adaptive"] = self.adaptive.to_dict() if self.adaptive is not None else None
        d["text_conditioned"] = self.text_stage is not None
        return d
