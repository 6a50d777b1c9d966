"""Check the memory model against a run on the machine at hand: predicted vs measured, per component.

This is vzedge's own small harness (the core does not import the runtime): it loads the model the way the
runtime does (`load_quantized` / `load_model`), runs a VisionZip vision pass + projector, a prefill of the
image and prompt tokens into a DynamicCache, and greedy decode steps, and measures each phase.

What counts as measured:
- CPU: resident set size. The run happens in a fresh child process with glibc's mmap threshold fixed at
  128 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS and RSS tracks live tensors rather
  than the heap's history. Peaks come from the kernel's high-water mark (VmHWM), reset before each phase
  through /proc/self/clear_refs, so no short-lived peak is missed (a sampling thread would). Before the
  baseline the child runs the same pipeline once on the built-in tiny model, so one-time initialisation
  (lazy imports, kernel caches: ~20-40 MB) is not counted; on a device that is part of the runtime reserve.
  Measured peak = the highest RSS from the vision pass to the last decode step, minus RSS before loading.
- CUDA: torch's allocator, `max_memory_allocated` over the same phases minus the allocation before loading
  (the CUDA context is not an allocation and is excluded on both sides).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

from vzedge.budget.devices import HOST, host_profile
from vzedge.budget.estimate import DOMINANT_SHARE, BudgetConfig, Estimate, estimate
from vzedge.budget.layout import measured_module_bytes

TOLERANCE = 0.15  # the bound on |predicted / measured - 1| for the total peak
MMAP_THRESHOLD = 16384


def split_tokens(tokens: int) -> tuple[int, int]:
    """VisionZip's dominant/contextual split of a token budget (54:10 at 64)."""
    dominant = max(1, round(tokens * DOMINANT_SHARE))
    return dominant, tokens - dominant


def validate(
    cfg: BudgetConfig, new_tokens: int = 8, random_weights: bool = False, device: str = "auto", timeout: float = 900
) -> dict[str, Any]:
    """Run `cfg` here (in a child process) and compare with the prediction for this machine.

    The prediction is for the run that is made: context = prefill + `new_tokens` on the host profile.
    random_weights: `cfg.model` is a folder holding only config.json; weights are filled from a fixed seed
    (quant 'none' only). Returns {"predicted", "measured", "rows", "total_ratio", "within_tolerance"}.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if random_weights and cfg.quant != "none":
        raise ValueError("random weights are filled in float; validate quantized layouts on a real checkpoint or tiny")
    run_cfg = replace(cfg, device=HOST, context=cfg.prefill_tokens + new_tokens)
    predicted = estimate(run_cfg, host_profile())
    job = {"config": run_cfg.to_dict(), "new_tokens": new_tokens, "random_weights": random_weights, "device": device}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    with tempfile.TemporaryDirectory(prefix="vzedge-budget-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, "-m", "vzedge.budget.validate", job_path, out_path],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the validation run failed (exit {proc.returncode}):\n{tail}")
        with open(out_path, encoding="utf-8") as f:
            measured = json.load(f)
    return compare(predicted, measured)


def compare(predicted: Estimate, measured: dict[str, Any]) -> dict[str, Any]:
    """Rows of predicted vs measured (bytes) with their ratio; the total is the one the tolerance applies to."""
    p = predicted
    kv_prefill = measured["kv_bytes_prefill"]
    rows = [
        ("llm_weights (tensors)", p.component("llm_weights"), measured["llm_tensor_bytes"]),
        ("vision_weights (tensors)", p.component("vision_weights"), measured["vision_tensor_bytes"]),
        ("weights + file map (RSS after load)", _weights_rss(p), measured["load_rss"]),
        ("kv_cache (tensors)", p.component("kv_cache"), measured["kv_bytes"]),
        ("vision pass peak", p.transients["vision"], measured["vision_peak"]),
        ("prefill peak (incl. its KV)", p.transients["prefill"] + _kv(p, kv_prefill), measured["prefill_peak"]),
        ("decode step peak", p.transients["decode"], measured["decode_peak"]),
        ("total peak", p.total, measured["total_peak"]),
    ]
    out_rows = [
        {"component": name, "predicted": int(a), "measured": int(b), "ratio": (a / b) if b > 0 else None}
        for name, a, b in rows
    ]
    ratio = p.total / measured["total_peak"]
    return {
        "predicted": p.to_dict(),
        "measured": measured,
        "rows": out_rows,
        "total_ratio": ratio,
        "tolerance": TOLERANCE,
        "within_tolerance": abs(ratio - 1) <= TOLERANCE,
    }


def _weights_rss(p: Estimate) -> int:
    names = ("llm_weights", "vision_weights", "checkpoint_mmap")
    return sum(c.bytes for c in p.components if c.name in names)


def _kv(p: Estimate, measured_prefill_kv: int) -> int:
    """Predicted KV bytes at the prefill length (the prediction at full context scaled to prefill)."""
    full = p.component("kv_cache")
    return full * p.facts["prefill_tokens"] // p.config.context if measured_prefill_kv >= 0 else full


# ---------------------------------------------------------------- the child process


class _Meter:
    """Peak memory per phase: VmHWM (reset via clear_refs) on CPU, the allocator's peak on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def current(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.memory_allocated())
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


def _load(cfg: BudgetConfig, random_weights: bool, device: str, dtype: Any) -> Any:
    if random_weights:
        return _random_model(cfg.model, dtype).to(device)
    if cfg.quant == "none":
        from vzedge.models.loading import load_model

        return load_model(cfg.model, dtype=dtype).vlm.to(device)
    from vzedge.quant import QuantConfig, load_quantized

    qcfg = QuantConfig(
        method=cfg.quant,
        compute_dtype={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")],
        double_quant=cfg.double_quant,
        group_size=cfg.group_size,
        skip_modules=cfg.skip_modules,
        fallback=False,
    )
    return load_quantized(cfg.model, qcfg, device).vlm


def _random_model(folder: str, dtype: Any) -> Any:
    """A VLM from config.json alone, its weights filled from a fixed seed (uninitialised pages are not resident)."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from vzedge.budget.layout import _VLM_CLASSES, resolve_config

    config, _ = resolve_config(folder)
    cls = getattr(transformers, _VLM_CLASSES[config.model_type])
    with no_init_weights():
        model = cls(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02, generator=g)
    return model.to(dtype).eval()


def _micro_model(model: str, dtype: Any) -> Any:
    """The model's family at toy width (same image geometry, so the same kernels run)."""
    import torch
    import transformers

    from vzedge.budget.layout import _VLM_CLASSES, resolve_config

    config, _ = resolve_config(model)
    config = type(config).from_dict(config.to_dict())
    v, t = config.vision_config, config.text_config
    v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 32, 64, 2, 2
    t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads = 64, 128, 1, 2
    t.num_key_value_heads, t.vocab_size, t.head_dim = 1, 288, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, _VLM_CLASSES[config.model_type])(config).to(dtype).eval()


def _run(vlm: Any, cfg: BudgetConfig, new_tokens: int, meter: _Meter, device: str) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    from vzedge.encoder import VisionZipEncoder
    from vzedge.visionzip import VisionZipConfig

    dominant, contextual = split_tokens(cfg.tokens)
    inner = vlm.model
    dtype = next(inner.multi_modal_projector.parameters()).dtype
    crops = cfg.crops or 1
    image = int(inner.vision_tower.config.image_size)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        encoder = VisionZipEncoder(inner.vision_tower, VisionZipConfig(dominant=dominant, contextual=contextual)).eval()
        gen = torch.Generator().manual_seed(1)
        before = meter.current()
        meter.reset()
        t0 = time.perf_counter()
        pixels = torch.randn(cfg.batch * crops, 3, image, image, generator=gen).to(device)  # counted: the frame batch
        tokens = inner.multi_modal_projector(encoder(pixels).tokens)
        tokens = tokens.reshape(cfg.batch, crops * cfg.tokens, -1)
        out["vision_ms"] = 1e3 * (time.perf_counter() - t0)
        peaks = [meter.peak()]
        out["vision_peak"] = peaks[-1] - before
        del pixels
        embed = vlm.get_input_embeddings()
        ids = torch.randint(
            3, embed.num_embeddings, (cfg.batch, cfg.prompt_tokens), generator=torch.Generator().manual_seed(2)
        )
        embeds = torch.cat([embed(ids.to(device)), tokens.to(dtype)], dim=1)
        cache = DynamicCache(config=vlm.config.text_config)
        before = meter.current()
        meter.reset()
        t0 = time.perf_counter()
        hidden = inner.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
        nxt = vlm.lm_head(hidden[:, -1:]).argmax(-1)
        out["prefill_ms"] = 1e3 * (time.perf_counter() - t0)
        peaks.append(meter.peak())
        out["prefill_peak"] = peaks[-1] - before
        out["kv_bytes_prefill"] = _cache_bytes(cache)
        del embeds, hidden
        before = meter.current()
        meter.reset()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            hidden = inner.language_model(
                inputs_embeds=embed(nxt), past_key_values=cache, use_cache=True
            ).last_hidden_state
            nxt = vlm.lm_head(hidden[:, -1:]).argmax(-1)
        out["decode_ms_per_token"] = 1e3 * (time.perf_counter() - t0) / new_tokens
        peaks.append(meter.peak())
        out["decode_peak"] = peaks[-1] - before
        out["absolute_peak"] = max(peaks)
        out["kv_bytes"] = _cache_bytes(cache)
        out["cache_seq"] = int(cache.get_seq_length())
    return out


def _cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _child(job_path: str, out_path: str) -> None:
    import logging

    import torch

    from vzedge.io import write_json
    from vzedge.quant import resolve_device

    logging.basicConfig(level=logging.WARNING)
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    cfg = BudgetConfig(**{**job["config"], "skip_modules": tuple(job["config"]["skip_modules"])})
    dev = str(resolve_device(job["device"]))
    cuda = dev.startswith("cuda")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        cfg.dtype if cfg.dtype != "auto" else ("fp16" if cuda else "fp32")
    ]
    meter = _Meter(cuda)
    # One throwaway pass first, on a micro model of the same geometry (a few hundred KB of weights, so the
    # heap it frees is too small to hide the real model's pages): lazy imports and kernel caches land
    # before the baseline.
    warm_cfg = replace(cfg, tokens=min(cfg.tokens, 8), prompt_tokens=4, batch=1, crops=None, context=64)
    if cfg.quant.startswith("bnb-"):
        from vzedge.quant import bnb_smoke_test

        bnb_smoke_test(cfg.quant, torch.device(dev), dtype)
    vlm = _micro_model(cfg.model, dtype)
    with tempfile.TemporaryDirectory(prefix="vzedge-warm-") as tmp:
        from vzedge.models.tiny import build_processor

        processor = build_processor()
        if cfg.quant != "none":  # the loading path too: quantizer, safetensors and processor modules
            vlm.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            vlm = _load(replace(cfg, model=tmp), False, dev, dtype)
        _run(vlm.to(dev), warm_cfg, 2, meter, dev)
    del vlm, processor
    gc.collect()
    baseline = meter.current()
    meter.reset()
    vlm = _load(cfg, job["random_weights"], dev, dtype)
    load_peak = meter.peak() - baseline
    load_rss = meter.current() - baseline
    run = _run(vlm, cfg, job["new_tokens"], meter, dev)
    llm = measured_module_bytes(vlm.model.language_model) + measured_module_bytes(vlm.lm_head)
    vision = measured_module_bytes(vlm.model.vision_tower) + measured_module_bytes(vlm.model.multi_modal_projector)
    total = run.pop("absolute_peak") - baseline
    result = {
        "device": dev,
        "dtype": str(dtype).removeprefix("torch."),
        "baseline": baseline,
        "load_peak": load_peak,
        "load_rss": load_rss,
        "llm_tensor_bytes": llm,
        "vision_tensor_bytes": vision,
        "total_peak": total,
        "torch": torch.__version__,
        **run,
    }
    write_json(out_path, result)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        _child(sys.argv[1], sys.argv[2])
