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

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vzedge import __version__
from vzedge.io import output_lock, write_text
from vzedge.models.llava import anyres_family, apply_visionzip, remove_visionzip
from vzedge.models.loading import BUILTIN_MODELS, load_model
from vzedge.models.projector import FORMAT, base_fingerprint, load_projector_state, projector_sha256
from vzedge.quant import QuantConfig, load_quantized, resolve_device
from vzedge.tune.config import LOG_FILE, StepInfo, TuneConfig, TuneResult
from vzedge.tune.data import IGNORE_INDEX, Example, collate, data_sha256, encode, examples_sha256, read_records
from vzedge.tune.outputs import check_out, claim_out, package_versions, save_checkpoint, write_outputs

log = logging.getLogger(__name__)


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

    return resolve_device(name)


def _amp_dtype(dev: torch.device) -> torch.dtype | None:
    if dev.type != "cuda":
        return None  # fp32 on CPU: bf16 autocast on CPU is slow and lossy for a small projector
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base(cfg: TuneConfig, dev: torch.device) -> Any:
    """The base model, its LLM quantized with `cfg.quant` when asked (vision tower and projector in float)."""

    amp = _amp_dtype(dev)
    if cfg.quant not in ("none", None):
        compute = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp]
        loaded = load_quantized(cfg.model, QuantConfig(method=cfg.quant, compute_dtype=compute), device=str(dev))
        if cfg.model in BUILTIN_MODELS:
            loaded.source = f"builtin:{cfg.model}"
    else:
        loaded = load_model(cfg.model, dtype=amp, revision=cfg.revision)
        loaded.vlm.to(dev)
    if loaded.vlm is None or loaded.projector is None:
        raise ValueError(f"{cfg.model!r} is a bare vision encoder; projector tuning needs a LLaVA-1.5 model")

    if anyres_family(loaded.vlm.model) is not None:
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

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            loss, n = answer_loss(vlm, collate(examples[i : i + batch], processor), _amp_dtype(vlm.device))
            total, tokens = total + float(loss), tokens + n
    return total / max(tokens, 1)


def tune(cfg: TuneConfig, on_step: Callable[[StepInfo], None] | None = None) -> TuneResult:
    """Fine-tune `cfg.model`'s projector on VisionZip tokens; write `cfg.out` (see the module docstring)."""

    if not isinstance(cfg, TuneConfig):
        raise TypeError(f"cfg must be a TuneConfig, got {type(cfg).__name__}")
    records, skipped = read_records(cfg.data, cfg.images, cfg.on_missing_image)
    dev = _device(cfg.device)  # a bad --device is refused before check_out creates the folder
    # Held for the whole run: a second tune into the same folder fails at once instead of interleaving.
    with output_lock(cfg.out):
        return _tune_locked(cfg, dev, records, skipped, on_step)


def _tune_locked(
    cfg: TuneConfig,
    dev: torch.device,
    records: list[Any],
    skipped: list[str],
    on_step: Callable[[StepInfo], None] | None,
) -> TuneResult:
    check_out(cfg.out, cfg.force)
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
    resume_state = claim_out(cfg.out, run, cfg)

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
                save_checkpoint(
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
        config = write_outputs(
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
                "versions": package_versions(__version__),
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
