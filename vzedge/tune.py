"""Projector tuning: fine-tune only LLaVA's multimodal projector on VisionZip tokens.

VisionZip hands the LLM 64 tokens where it was trained on 576 (and CLS among them); the paper recovers
part of the gap by training the projector alone on a tenth of LLaVA-1.5's instruction data. Here the
vision tower, the LLM and its embeddings are frozen (the LLM may be loaded 4/8-bit through
`vzedge.quant`); only the projector's weights get gradients, in float32, under autocast on GPU.

Output folder:
    projector.safetensors   the tuned projector (float32)
    tune_config.json        base model (source, revision, weight fingerprint), VisionZip config,
                            hyperparameters, steps, losses, data set hash, projector sha256
    loss.png, log.jsonl     the loss curve (matplotlib) and one JSON line per step
    run.json, checkpoint/   the run's identity and its last checkpoint (`--resume` continues from it)

`apply_visionzip(model, cfg, processor, projector=DIR)` and `vzedge export --projector DIR` load the
weights through `read_tuned_projector`, which refuses another base model or another token config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vzedge.io import atomic_path, sha256_file, write_json, write_text
from vzedge.tune_data import IGNORE_INDEX, MISSING_IMAGE_POLICIES, Example
from vzedge.visionzip import VisionZipConfig

log = logging.getLogger(__name__)

FORMAT = "vzedge-projector/1"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "tune_config.json"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
_RUN_FILES = (PROJECTOR_FILE, CONFIG_FILE, RUN_FILE, LOG_FILE, PLOT_FILE, CHECKPOINT_DIR)


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


# --- identity: which model a tuned projector belongs to ----------------------------------------------------


def _hash_tensor(h: Any, name: str, t: torch.Tensor, chunk: int = 1 << 22) -> None:
    # Float32 bytes whatever the dtype, so fp16/fp32 loads of one checkpoint agree; chunked for 7B embeddings.
    h.update(f"{name}:{tuple(t.shape)};".encode())
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), chunk):
        h.update(flat[i : i + chunk].to("cpu", torch.float32).numpy().tobytes())


def _module_sha256(module: nn.Module, prefix: str = "", h: Any = None) -> str:
    h = h or hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        _hash_tensor(h, prefix + name, t)
    return h.hexdigest()


def projector_sha256(vlm: nn.Module) -> str:
    from vzedge.models.llava import _llava_parts

    return _module_sha256(_llava_parts(vlm).multi_modal_projector)


def base_fingerprint(vlm: nn.Module) -> str:
    """sha256 over the weights a tuned projector sits between: the projector, the vision tower's
    embeddings and the LLM's input embeddings, as float32 (independent of the load dtype and of a
    4/8-bit LLM, which keeps these in float)."""
    from vzedge.models.llava import _llava_parts

    inner = _llava_parts(vlm)
    h = hashlib.sha256()
    _module_sha256(inner.multi_modal_projector, "projector.", h)
    embeddings = getattr(getattr(inner.vision_tower, "vision_model", inner.vision_tower), "embeddings", None)
    if embeddings is not None:
        _module_sha256(embeddings, "vision.embeddings.", h)
    _module_sha256(inner.get_input_embeddings(), "llm.embed_tokens.", h)
    return h.hexdigest()


def _model_label(vlm: nn.Module) -> str:
    return getattr(vlm.config, "_name_or_path", "") or type(vlm).__name__


@dataclass
class TunedProjector:
    state: dict[str, torch.Tensor]
    record: dict[str, Any]  # what the manifest / caller records: path, sha256, base, visionzip, steps, loss


def read_tune_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tune_config.json of a `vzedge tune` output folder, checked for format and completeness only."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{folder} is not a tuned projector folder (no {CONFIG_FILE}); make one with `vzedge tune --out DIR`"
        )
    try:
        tuned = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(tuned, dict) or tuned.get("format") != FORMAT:
        raise ValueError(
            f"{config_path}: format {tuned.get('format') if isinstance(tuned, dict) else None!r}, expected {FORMAT!r}"
        )
    missing = [k for k in ("base", "visionzip", "projector", "training") if not isinstance(tuned.get(k), dict)]
    if missing:
        raise ValueError(f"{config_path} lacks {missing}: an incomplete or edited file; tune again")
    return tuned


def read_tuned_projector(path: str | os.PathLike[str], vlm: nn.Module, cfg: VisionZipConfig) -> TunedProjector:
    """Read and check a `vzedge tune` output folder against `vlm` and `cfg`; nothing is modified.

    Raises ValueError naming both sides when the folder was tuned for another base model or another
    VisionZip config, or when its files do not match their recorded hashes.
    """
    from safetensors.torch import load_file

    from vzedge.models.llava import _llava_parts

    folder = Path(path)
    tuned = read_tune_config(folder)
    if tuned["visionzip"] != cfg.to_dict():
        raise ValueError(
            f"{folder} was tuned for VisionZip {tuned['visionzip']} but the model is set up for {cfg.to_dict()}; "
            f"use the config it was tuned for (--dominant {tuned['visionzip']['dominant']} --contextual "
            f"{tuned['visionzip']['contextual']}) or tune again for this one"
        )
    base = tuned["base"]
    have = base_fingerprint(vlm)
    if have != base["fingerprint"]:
        raise ValueError(
            f"{folder} was tuned on base model {base['source']!r} (revision {base['revision']}, fingerprint "
            f"{base['fingerprint'][:12]}) but this model, {_model_label(vlm)!r}, has other weights (fingerprint "
            f"{have[:12]}); load the base model it was tuned on, or tune again for this one"
        )
    weights = folder / PROJECTOR_FILE
    if not weights.is_file() or sha256_file(weights) != tuned["projector"]["sha256"]:
        raise ValueError(f"{weights} is missing or does not match its sha256 in {CONFIG_FILE}; tune again")
    state = load_file(str(weights))
    expected = _llava_parts(vlm).multi_modal_projector.state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    if {k: tuple(v.shape) for k, v in state.items()} != shapes:
        raise ValueError(f"{weights} holds {sorted(state)} which do not fit this model's projector {shapes}")
    record = {
        "path": str(folder),
        "sha256": tuned["projector"]["sha256"],
        "base": base,
        "visionzip": tuned["visionzip"],
        "steps": tuned["training"]["steps"],
        "final_loss": tuned["training"]["final_loss"],
    }
    return TunedProjector(state, record)


def load_projector_state(projector: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `projector` in place, each tensor cast to the parameter's dtype and device."""
    own = projector.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))


def load_tuned_projector(path: str | os.PathLike[str], vlm: nn.Module, cfg: VisionZipConfig) -> dict[str, Any]:
    """Check (see `read_tuned_projector`) and load a tuned projector into `vlm` in place; returns its record."""
    from vzedge.models.llava import _llava_parts

    tuned = read_tuned_projector(path, vlm, cfg)
    load_projector_state(_llava_parts(vlm).multi_modal_projector, tuned.state)
    return tuned.record


# --- the training run ---------------------------------------------------------------------------------------


def build_schedule(n: int, cfg: TuneConfig) -> list[tuple[int, list[list[int]]]]:
    """Every optimizer step as (epoch, micro-batches of example indices); a function of (n, cfg) only,
    so a resumed run continues with exactly the data an uninterrupted one would have seen."""
    steps: list[tuple[int, list[list[int]]]] = []
    epoch = 0
    while epoch < cfg.epochs or (cfg.max_steps is not None and len(steps) < cfg.max_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        micro = [order[i : i + cfg.batch] for i in range(0, n, cfg.batch)]
        steps += [(epoch, micro[j : j + cfg.grad_accum]) for j in range(0, len(micro), cfg.grad_accum)]
        epoch += 1
    return steps[: cfg.max_steps] if cfg.max_steps is not None else steps


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup then cosine decay to 0 (LLaVA's schedule); `step` is 0-based."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def _device(name: str) -> torch.device:
    from vzedge.quant import resolve_device

    return resolve_device(name)


def _amp_dtype(dev: torch.device) -> torch.dtype | None:
    if dev.type != "cuda":
        return None  # fp32 on CPU: bf16 autocast on CPU is slow and lossy for a small projector
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base(cfg: TuneConfig, dev: torch.device) -> Any:
    """The base model, its LLM quantized with `cfg.quant` when asked (vision tower and projector in float)."""
    from vzedge.models.loading import BUILTIN_MODELS, load_model

    amp = _amp_dtype(dev)
    if cfg.quant not in ("none", None):
        from vzedge.quant import QuantConfig, load_quantized

        compute = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp]
        loaded = load_quantized(cfg.model, QuantConfig(method=cfg.quant, compute_dtype=compute), device=str(dev))
        if cfg.model in BUILTIN_MODELS:
            loaded.source = f"builtin:{cfg.model}"
    else:
        loaded = load_model(cfg.model, dtype=amp, revision=cfg.revision)
        loaded.vlm.to(dev)
    if loaded.vlm is None or loaded.projector is None:
        raise ValueError(f"{cfg.model!r} is a bare vision encoder; projector tuning needs a LLaVA-1.5 model")
    from vzedge.models.llava import _anyres_family

    if _anyres_family(loaded.vlm.model) is not None:
        raise ValueError(
            f"{cfg.model!r} is an anyres LLaVA ({type(loaded.vlm.model).__name__}); projector tuning supports "
            "LLaVA-1.5 checkpoints"
        )
    return loaded


def answer_loss(vlm: nn.Module, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over answer tokens, number of answer tokens). The LM head runs on
    answer positions only, which keeps a 32k-vocabulary model's logits small."""
    dev = next(vlm.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        out = vlm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        logits = vlm.lm_head(out.last_hidden_state[:, :-1][keep])
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def dataset_loss(vlm: nn.Module, processor: Any, examples: list[Example], batch: int = 8) -> float:
    """Mean answer-token loss over `examples` (VisionZip must be applied), no gradients."""
    from vzedge.tune_data import collate

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            loss, n = answer_loss(vlm, collate(examples[i : i + batch], processor), _amp_dtype(vlm.device))
            total, tokens = total + float(loss), tokens + n
    return total / max(tokens, 1)


def _check_out(out: Path, force: bool) -> None:
    """Cheap checks before loading anything: `out` is a folder we may write, holding only run files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _RUN_FILES and not p.name.startswith("."))
        if foreign:
            raise FileExistsError(
                f"--out {out} holds files that are not a vzedge tune run ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out} is not writable")


def _claim_out(out: Path, run: dict[str, Any], cfg: TuneConfig) -> dict[str, Any] | None:
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
    for name in _RUN_FILES:  # a fresh start (or --force): only run files are removed (_check_out refused others)
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    write_json(run_path, run)
    return None


def _save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    with atomic_path(out / CHECKPOINT_DIR / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def plot_losses(path: Path, losses: list[float], title: str) -> None:
    """Loss per optimizer step and a running mean, as a PNG (needs matplotlib)."""
    from vzedge._deps import require

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


def tune(cfg: TuneConfig, on_step: Callable[[StepInfo], None] | None = None) -> TuneResult:
    """Fine-tune `cfg.model`'s projector on VisionZip tokens; write `cfg.out` (see the module docstring)."""
    from vzedge import __version__
    from vzedge.models.llava import apply_visionzip, remove_visionzip
    from vzedge.tune_data import collate, data_sha256, encode, examples_sha256, read_records

    if not isinstance(cfg, TuneConfig):
        raise TypeError(f"cfg must be a TuneConfig, got {type(cfg).__name__}")
    records, skipped = read_records(cfg.data, cfg.images, cfg.on_missing_image)
    _check_out(cfg.out, cfg.force)
    dev = _device(cfg.device)
    amp = _amp_dtype(dev)
    loaded = load_base(cfg, dev)
    vlm, processor = loaded.vlm, loaded.processor
    k = cfg.visionzip.num_tokens
    examples = [e for r in records if (e := encode(r, processor, k, cfg.max_length)) is not None]
    if not examples:
        raise ValueError(f"{cfg.data}: no record fits max_length={cfg.max_length} tokens")
    log.info("%d conversations tokenized (%d skipped for missing images)", len(examples), len(skipped))
    base = {
        "source": loaded.source,
        "revision": loaded.revision,
        "fingerprint": base_fingerprint(vlm),
        "projector_sha256": projector_sha256(vlm),
    }
    run = {
        "format": FORMAT,
        "base": base,
        "visionzip": cfg.visionzip.to_dict(),
        "data_sha256": data_sha256(cfg.data),
        "examples_sha256": examples_sha256(examples),
        "hyperparameters": cfg.hyperparameters(),
    }
    resume_state = _claim_out(cfg.out, run, cfg)

    apply_visionzip(vlm, cfg.visionzip)  # the processor is not patched: encode() placed the K placeholders
    projector = vlm.model.multi_modal_projector
    try:
        for p in vlm.parameters():
            p.requires_grad_(False)
        projector.float()  # float32 master weights; autocast runs the matmuls in half on GPU
        for p in projector.parameters():
            p.requires_grad_(True)
        vlm.eval()  # frozen parts stay deterministic (LLaVA's projector has no dropout either)
        _keep_4bit_differentiable(vlm)
        eval_set = examples[: cfg.eval_samples]
        loss_before = dataset_loss(vlm, processor, eval_set, cfg.batch) if eval_set else None

        schedule = build_schedule(len(examples), cfg)
        total = len(schedule)
        params = [p for p in projector.parameters()]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_ratio))
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        torch.manual_seed(cfg.seed)
        entries: list[dict[str, Any]] = []
        start = 0
        if resume_state is not None:
            load_projector_state(projector, resume_state["projector"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if resume_state.get("scaler"):
                scaler.load_state_dict(resume_state["scaler"])
            torch.set_rng_state(resume_state["rng"]["torch"])
            entries = list(resume_state["log"])
            start = int(resume_state["step"])
            log.info("resuming %s at step %d of %d", cfg.out, start, total)
        write_text(cfg.out / LOG_FILE, "".join(json.dumps(e) + "\n" for e in entries))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t_run = time.perf_counter()
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch, micro = schedule[step]
            tokens = sum(examples[i].answer_tokens for mb in micro for i in mb)
            loss_sum = 0.0
            for mb in micro:
                loss, _ = answer_loss(vlm, collate([examples[i] for i in mb], processor), amp)
                scaler.scale(loss / tokens).backward()  # token-weighted over the whole accumulated step
                loss_sum += float(loss.detach())
            scaler.unscale_(optimizer)
            if step == start:
                _check_gradients(params, cfg)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss_sum / tokens
            if not math.isfinite(value):
                raise RuntimeError(
                    f"the loss is {value} at step {step + 1}; nothing was saved as tuned. Lower --lr (now {cfg.lr})"
                )
            seconds = time.perf_counter() - t0
            entry = {"step": step + 1, "epoch": epoch, "loss": value, "lr": lr, "tokens": tokens, "seconds": seconds}
            entries.append(entry)
            with open(cfg.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                _save_checkpoint(
                    cfg.out,
                    {
                        "step": step + 1,
                        "projector": {k: v.detach().cpu().clone() for k, v in projector.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "rng": {"torch": torch.get_rng_state()},
                        "log": entries,
                    },
                )
            if on_step is not None:
                on_step(StepInfo(step + 1, total, epoch, value, lr, seconds))
        train_seconds = time.perf_counter() - t_run
        loss_after = dataset_loss(vlm, processor, eval_set, cfg.batch) if eval_set else None
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        losses = [e["loss"] for e in entries]
        config = _write_outputs(
            cfg,
            run,
            projector,
            losses,
            skipped,
            examples,
            total,
            {
                "loss_before": loss_before,
                "loss_after": loss_after,
                "seconds": train_seconds,
                "peak_cuda_bytes": peak,
                "device": str(dev),
                "amp_dtype": None if amp is None else str(amp).removeprefix("torch."),
                "quant": cfg.quant,
                "versions": _versions(__version__),
            },
        )
    finally:
        for p in vlm.parameters():
            p.requires_grad_(False)
        remove_visionzip(vlm)
    log.info("tuned projector written to %s", cfg.out)
    return TuneResult(cfg.out, config, losses, loaded)


def _keep_4bit_differentiable(vlm: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit layer for its CPU inference kernel, which has no backward, the first
    time it runs in eval mode on a tensor without grad (bitsandbytes 0.50 Linear4bit.forward); training
    mode keeps it on the differentiable path. Linear4bit has no dropout, so this changes nothing else."""
    for module in vlm.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            module.train()


def _check_gradients(params: list[nn.Parameter], cfg: TuneConfig) -> None:
    """Fail loudly when no gradient reaches the projector (a quantized kernel without a backward)."""
    if all(p.grad is None or not torch.any(p.grad != 0) for p in params):
        raise RuntimeError(
            f"no gradient reaches the projector through the LLM (--quant {cfg.quant}): a quantized kernel on "
            "this device has no backward. Use --quant int8 or none here, or nf4 on a CUDA GPU"
        )


def _versions(vzedge_version: str) -> dict[str, str]:
    import transformers

    return {"vzedge": vzedge_version, "torch": torch.__version__, "transformers": transformers.__version__}


def _write_outputs(
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
    plot_losses(cfg.out / PLOT_FILE, losses, title)
    return config
