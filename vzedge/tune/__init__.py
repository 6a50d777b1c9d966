"""Projector tuning: fine-tune only LLaVA's multimodal projector on VisionZip tokens (`vzedge tune`).

    config.py   TuneConfig, the run's records and the output folder's file names
    data.py     LLaVA-format conversations -> examples; `make_data` (synthetic VQA, `vzedge make-data`)
    train.py    `tune(cfg)`: the training loop
    outputs.py  the output folder: claiming it, checkpoints, the loss plot, the final files

A tuned projector's format (reading, checking, loading it) lives below, in `vzedge.models.projector`,
because the LLaVA glue, the exporter and the runtime load it too.
"""

from __future__ import annotations

from vzedge.models.projector import (
    CONFIG_FILE,
    PROJECTOR_FILE,
    TunedProjector,
    base_fingerprint,
    load_projector_state,
    load_tuned_projector,
    projector_sha256,
    read_tune_config,
    read_tuned_projector,
)
from vzedge.tune.config import StepInfo, TuneConfig, TuneResult
from vzedge.tune.data import make_data
from vzedge.tune.train import tune

__all__ = [
    "CONFIG_FILE",
    "PROJECTOR_FILE",
    "StepInfo",
    "TuneConfig",
    "TuneResult",
    "TunedProjector",
    "base_fingerprint",
    "load_projector_state",
    "load_tuned_projector",
    "make_data",
    "projector_sha256",
    "read_tune_config",
    "read_tuned_projector",
    "tune",
]
