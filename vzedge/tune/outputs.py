"""The output folder of a tuning run: claiming it, checkpoints, the loss plot, the final files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vzedge._deps import PLOT_HINT, plotting_available, require
from vzedge.io import atomic_path, sha256_file, write_json
from vzedge.models.projector import CONFIG_FILE, FORMAT, PROJECTOR_FILE
from vzedge.tune.config import CHECKPOINT_DIR, CHECKPOINT_FILE, PLOT_FILE, RUN_FILE, RUN_FILES, TuneConfig
from vzedge.tune.data import Example

log = logging.getLogger(__name__)


def check_out(out: Path, force: bool) -> None:
    """Cheap checks before loading anything: `out` is a folder we may write, holding only run files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
        if foreign:
            raise FileExistsError(
                f"--out {out} holds files that are not a vzedge tune run ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} is not writable")


def claim_out(out: Path, run: dict[str, Any], cfg: TuneConfig) -> dict[str, Any] | None:
    """Make `out` this run's folder; returns the checkpoint to resume from, or None to start fresh."""
    run_path = out / RUN_FILE
    if run_path.is_file():
        try:
            have = json.loads(run_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            have = {}
        diff = [f"{k}: {have.get(k)!r} vs {run[k]!r}" for k in run if have.get(k) != run[k]]
        if diff and not cfg.force:
            raise FileExistsError(
                f"--out {out} holds a run of another model, config or data ({'; '.join(diff)}); "
                "pass --force to replace it, or choose another --out"
            )
        if not diff and not cfg.force:
            ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
            if not cfg.resume:
                raise FileExistsError(
                    f"--out {out} already holds this run; pass --resume to continue it or --force to start over"
                )
            if ckpt.is_file():
                return torch.load(ckpt, map_location="cpu", weights_only=True)
            log.warning("%s holds this run but no checkpoint; starting from step 0", out)
    elif cfg.resume and any(out.iterdir()):
        raise FileExistsError(f"--resume: {out} holds no {RUN_FILE}; it is not a tune run")
    for name in RUN_FILES:  # a fresh start (or --force): only run files are removed (check_out refused others)
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    write_json(run_path, run)
    return None


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    with atomic_path(out / CHECKPOINT_DIR / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def plot_losses(path: Path, losses: list[float], title: str) -> None:
    """Loss per optimizer step and a running mean, as a PNG (needs matplotlib)."""

    matplotlib = require("matplotlib", "the loss curve (loss.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=0.8 if window > 1 else 1.6, alpha=0.5 if window > 1 else 1.0, label="loss per step")
    if window > 1:
        ax.plot(steps, smooth, lw=1.6, label=f"running mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def package_versions(vzedge_version: str) -> dict[str, str]:
    import transformers

    return {"vzedge": vzedge_version, "torch": torch.__version__, "transformers": transformers.__version__}


def write_outputs(
    cfg: TuneConfig,
    run: dict[str, Any],
    projector: nn.Module,
    losses: list[float],
    skipped: list[str],
    examples: list[Example],
    total: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in projector.state_dict().items()}
    weights = cfg.out / PROJECTOR_FILE
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "base": run["base"]["source"]})
    config = {
        "format": FORMAT,
        "base": run["base"],
        "visionzip": run["visionzip"],
        "projector": {"file": PROJECTOR_FILE, "sha256": sha256_file(weights), "dtype": "float32"},
        "data": {
            "path": str(cfg.data),
            "sha256": run["data_sha256"],
            "examples": len(examples),
            "examples_sha256": run["examples_sha256"],
            "skipped_missing_images": skipped,
        },
        "training": {
            **run["hyperparameters"],
            "steps": total,
            "final_loss": losses[-1] if losses else None,
            **extra,
        },
    }
    write_json(cfg.out / CONFIG_FILE, config)  # last: a loader checks the weights against this sha256
    title = f"{run['base']['source']} projector, {cfg.visionzip.num_tokens} VisionZip tokens"
    if plotting_available():
        plot_losses(cfg.out / PLOT_FILE, losses, title)
    else:
        log.warning("%s not drawn: matplotlib is not installed (%s)", PLOT_FILE, PLOT_HINT)
    return config
