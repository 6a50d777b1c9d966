"""TuneConfig and the run's records (StepInfo, TuneResult); the output folder's file names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzedge.models.projector import CONFIG_FILE, PROJECTOR_FILE
from vzedge.tune.data import MISSING_IMAGE_POLICIES
from vzedge.visionzip import VisionZipConfig

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
RUN_FILES = (PROJECTOR_FILE, CONFIG_FILE, RUN_FILE, LOG_FILE, PLOT_FILE, CHECKPOINT_DIR)


@dataclass(frozen=True)
class TuneConfig:
    """One projector-tuning run.

    model: 'tiny', 'tiny-random', a local folder or a hub id (a LLaVA-1.5 checkpoint).
    data / images: a LLaVA-format JSON file and the folder its 'image' paths are relative to.
    epochs / max_steps: passes over the data; max_steps (optimizer steps) overrides epochs when set.
    batch x grad_accum: samples per optimizer step. lr: peak learning rate (linear warmup over
        warmup_ratio of the steps, then cosine to 0); the tiny models want ~1e-3, LLaVA-1.5-7B ~2e-5.
    quant: load the LLM with vzedge.quant ('none', 'int8', 'nf4', ...) to fit small GPUs.
    on_missing_image: 'error' stops at the first record whose image is missing, 'skip' leaves it out.
    save_every: optimizer steps between checkpoints. resume: continue the run in `out`.
    force: replace a run of another model/config in `out` (only run files are removed).
    eval_samples: loss on the first N examples before and after tuning, recorded in tune_config.json.
    """

    model: str
    data: Path
    images: Path
    out: Path
    visionzip: VisionZipConfig = field(default_factory=VisionZipConfig)
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-5
    batch: int = 4
    grad_accum: int = 1
    seed: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    quant: str = "none"
    device: str = "auto"
    on_missing_image: str = "error"
    save_every: int = 50
    eval_samples: int = 16
    resume: bool = False
    force: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model is empty: pass --model tiny, a local folder, or a hub id such as owner/name")
        for name in ("data", "images", "out"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                raise ValueError(f"{name} is empty: pass --{name} PATH")
            object.__setattr__(self, name, Path(value))
        if not isinstance(self.visionzip, VisionZipConfig):
            raise TypeError(f"visionzip must be a VisionZipConfig, got {type(self.visionzip).__name__}")
        for name in ("epochs", "batch", "grad_accum", "seed", "max_length", "save_every", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TuneConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("epochs", "batch", "grad_accum", "max_length", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use --{name.replace('_', '-')} >= 1")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples={self.eval_samples}: use >= 0 (0 skips the before/after loss)")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"max_steps={self.max_steps!r}: use --max-steps >= 1, or leave it out to run --epochs")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: use a positive learning rate such as --lr 2e-5")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio}: use 0 <= warmup_ratio < 1")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0 and max_grad_norm > 0")
        if self.on_missing_image not in MISSING_IMAGE_POLICIES:
            raise ValueError(f"on_missing_image={self.on_missing_image!r}: use one of {MISSING_IMAGE_POLICIES}")
        if self.resume and self.force:
            raise ValueError("resume and force contradict: --resume continues the run in --out, --force replaces it")

    def hyperparameters(self) -> dict[str, Any]:
        """What, with the base model, the VisionZip config and the data, defines a run."""
        keys = ("epochs", "max_steps", "lr", "batch", "grad_accum", "seed", "warmup_ratio", "weight_decay")
        return {k: getattr(self, k) for k in (*keys, "max_grad_norm", "max_length")}


@dataclass
class StepInfo:
    step: int  # 1-based optimizer step just finished
    total: int
    epoch: int
    loss: float
    lr: float
    seconds: float


@dataclass
class TuneResult:
    out: Path
    config: dict[str, Any]  # tune_config.json
    losses: list[float]
    model: Any = None  # LoadedModel with the tuned projector in place (VisionZip removed)
