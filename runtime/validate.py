"""`vzedge budget --validate`: run a configuration through the runtime here and compare with the memory model.

The run uses the runtime's own stages, metered one phase at a time:
- vision: `open_vision_backend(None, ...)` -> `TorchVisionBackend.encode` (VisionZipEncoder + projector) on a
  random frame batch;
- prefill: `LLMBackend.prefill_image` (BOS + template prefix + image tokens into a DynamicCache), then the
  question's prefill inside `LLMBackend.answer`, read through its `on_phase("prefill")` hook;
- decode: the rest of `answer` (greedy, `ignore_eos`, `new_tokens` steps), read at `on_phase("decode")`
  before the cache is cropped back to the prefix.
The question is sized so the template's text tokens (BOS, prefix, question) come to `cfg.prompt_tokens`
as closely as the tokenizer allows; the estimate is made for the counts the run actually fed.

What counts as measured:
- CPU: resident set size. The run happens in a fresh child process with glibc's mmap threshold fixed at
  16 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS and RSS tracks live tensors rather
  than the heap's history. Peaks come from the kernel's high-water mark (VmHWM), reset before each phase
  through /proc/self/clear_refs, so no short-lived peak is missed (a sampling thread would). Before the
  baseline the child runs the same stages once on a micro model of the same family, so one-time
  initialisation (lazy imports, kernel caches: ~20-40 MB) is not counted; on a device that is part of the
  runtime reserve. Measured peak = the highest RSS from the vision pass to the last decode step, minus RSS
  before loading.
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

from vzedge.budget.devices import host_profile
from vzedge.budget.estimate import BudgetConfig, estimate
from vzedge.budget.validate import compare, run_config, split_tokens

MMAP_THRESHOLD = 16384
_FILLER = "What is in this picture, and what is happening in it? "


def validate(
    cfg: BudgetConfig, new_tokens: int = 8, random_weights: bool = False, device: str = "auto", timeout: float = 900
) -> dict[str, Any]:
    """Run `cfg` through the runtime here (in a child process) and compare with the prediction for this machine.

    The prediction is for the run that is made: the prompt the runtime fed, context = prefill + `new_tokens`
    decode steps, on the host profile. random_weights: `cfg.model` is a folder holding only config.json;
    weights are filled from a fixed seed and the built-in byte-level tokenizer is used (quant 'none' only).
    Returns {"predicted", "measured", "rows", "total_ratio", "tolerance", "within_tolerance"}; "measured"
    names the runtime backends that ran ("backends").
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if random_weights and cfg.quant != "none":
        raise ValueError("random weights are filled in float; validate quantized layouts on a real checkpoint or tiny")
    if cfg.batch != 1:
        raise ValueError(f"the runtime answers one frame at a time; validate with --batch 1, not {cfg.batch}")
    if cfg.vision_backend != "torch":
        raise ValueError(
            f"--validate runs the runtime's PyTorch vision backend, not {cfg.vision_backend!r}; "
            "validate with --vision-backend torch"
        )
    job = {"config": cfg.to_dict(), "new_tokens": new_tokens, "random_weights": random_weights, "device": device}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    with tempfile.TemporaryDirectory(prefix="vzedge-budget-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, "-m", "vzedge.runtime.validate", job_path, out_path],
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
    return compare(estimate(run_config(cfg, measured), host_profile()), measured)


def question_for(llm: Any, prompt_tokens: int) -> str:
    """A question that brings the template's text tokens to `prompt_tokens` (or the nearest below; the empty
    question when the template alone is longer). Binary search on a prefix of filler text."""
    if llm.prompt_length("") >= prompt_tokens:
        return ""
    hi = len(_FILLER)
    while llm.prompt_length(_text(hi)) < prompt_tokens:
        hi *= 2
    lo = 0  # prompt_length(_text(lo)) < prompt_tokens <= prompt_length(_text(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if llm.prompt_length(_text(mid)) < prompt_tokens else (lo, mid)
    return _text(hi) if llm.prompt_length(_text(hi)) == prompt_tokens else _text(lo)


def _text(chars: int) -> str:
    return (_FILLER * (chars // len(_FILLER) + 1))[:chars]


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


def _run(loaded: Any, tokens: int, crops: int, prompt_tokens: int, new_tokens: int, meter: _Meter) -> dict[str, Any]:
    """One frame and one question through the runtime's backends, each phase metered."""
    import torch

    from vzedge.bench import sync
    from vzedge.runtime.backends.llm import LLMBackend
    from vzedge.runtime.backends.vision import open_vision_backend
    from vzedge.visionzip import VisionZipConfig

    dominant, contextual = split_tokens(tokens)
    device = str(next(loaded.vlm.model.multi_modal_projector.parameters()).device)
    vzcfg = VisionZipConfig(dominant=dominant, contextual=contextual)
    vision = open_vision_backend(None, loaded, vzcfg, "torch", device)
    llm = LLMBackend(loaded.vlm, loaded.processor.tokenizer)
    question = question_for(llm, prompt_tokens)
    size = int(loaded.vision.config.image_size)
    out: dict[str, Any] = {
        "backends": {"vision": type(vision).__name__, "llm": type(llm).__name__},
        "vision_backend": vision.name,
        "question": question,
        "crops": crops,
    }
    before = meter.current()
    meter.reset()
    t0 = time.perf_counter()
    pixels = torch.randn(crops, 3, size, size, generator=torch.Generator().manual_seed(1))  # counted: the frames
    image = vision.encode(pixels)
    sync(device)
    out["vision_ms"] = 1e3 * (time.perf_counter() - t0)
    peaks = [meter.peak()]
    out["vision_peak"] = peaks[-1] - before
    del pixels
    image = image.reshape(1, crops * vision.num_tokens, -1)  # the crops of one image, in one prompt
    at: dict[str, dict[str, int]] = {"start": {"before": meter.current()}}
    meter.reset()

    def on_phase(name: str, cache: Any) -> None:
        peaks.append(meter.peak())
        seq = int(cache.get_seq_length())
        at[name] = {"peak": peaks[-1], "kv": _cache_bytes(cache), "seq": seq, "before": meter.current()}
        meter.reset()

    prefix = llm.prefill_image(image)
    del image
    ans = llm.answer(prefix, question, new_tokens + 1, ignore_eos=True, on_phase=on_phase)
    prefill, decode = at["prefill"], at["decode"]
    out.update(
        image_tokens=crops * vision.num_tokens,
        prefill_tokens=prefill["seq"],
        prompt_tokens=prefill["seq"] - crops * vision.num_tokens,
        prefill_ms=prefix.prefill_ms + ans.prefill_ms,
        prefill_peak=prefill["peak"] - at["start"]["before"],
        kv_bytes_prefill=prefill["kv"],
        decode_steps=len(ans.token_ids) - 1,
        decode_ms_per_token=ans.decode_ms_per_token,
        decode_peak=decode["peak"] - prefill["before"],
        kv_bytes=decode["kv"],
        cache_seq=decode["seq"],
        absolute_peak=max(peaks),
    )
    assert out["prompt_tokens"] == llm.prompt_length(question), "the runtime fed another prompt than it measures"
    assert out["cache_seq"] == out["prefill_tokens"] + new_tokens, "the decode loop ran another number of steps"
    return out


def _cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _as_loaded(vlm: Any, processor: Any, name: str) -> Any:
    """A LoadedModel around a VLM built here, as `load_model` makes one."""
    from vzedge.models.loading import from_vlm

    return from_vlm(name, name, None, vlm, processor)


def _load(cfg: BudgetConfig, random_weights: bool, device: str, dtype: Any) -> Any:
    """The model as the runtime loads it (`load_model` / `load_quantized`), or random weights from config.json."""
    if random_weights:
        from vzedge.models.tiny import build_processor

        return _as_loaded(_random_model(cfg.model, dtype).to(device), build_processor(), cfg.model)
    if cfg.quant == "none":
        from vzedge.models.loading import load_model

        loaded = load_model(cfg.model, dtype=dtype)
        loaded.vlm.to(device)
        return loaded
    from vzedge.quant import QuantConfig, load_quantized

    qcfg = QuantConfig(
        method=cfg.quant,
        compute_dtype={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")],
        double_quant=cfg.double_quant,
        group_size=cfg.group_size,
        skip_modules=cfg.skip_modules,
        fallback=False,
    )
    return load_quantized(cfg.model, qcfg, device)


def _random_model(folder: str, dtype: Any) -> Any:
    """A VLM from config.json alone, its weights filled from a fixed seed (uninitialised pages are not resident).
    Prompts come from the built-in byte-level tokenizer, whose ids fit any vocabulary of 288 or more."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    from vzedge.budget.layout import VLM_CLASSES, resolve_config
    from vzedge.models.tiny import VOCAB_SIZE

    config, _ = resolve_config(folder)
    if config.text_config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"random-weight validation needs a vocabulary of >= {VOCAB_SIZE} tokens")
    cls = getattr(transformers, VLM_CLASSES[config.model_type])
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

    from vzedge.budget.layout import VLM_CLASSES, resolve_config
    from vzedge.models.tiny import VOCAB_SIZE

    config, _ = resolve_config(model)
    config = type(config).from_dict(config.to_dict())
    v, t = config.vision_config, config.text_config
    v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 32, 64, 2, 2
    t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads = 64, 128, 1, 2
    t.num_key_value_heads, t.vocab_size, t.head_dim = 1, VOCAB_SIZE, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, VLM_CLASSES[config.model_type])(config).to(dtype).eval()


def _warm_up(cfg: BudgetConfig, dev: str, dtype: Any, meter: _Meter) -> None:
    """One throwaway pass through the same stages on a micro model of the same geometry (a few hundred KB of
    weights, so the heap it frees is too small to hide the real model's pages): lazy imports and kernel
    caches land before the baseline."""
    import torch

    from vzedge.models.tiny import build_processor

    if cfg.quant.startswith("bnb-"):
        from vzedge.quant import bnb_smoke_test

        bnb_smoke_test(cfg.quant, torch.device(dev), dtype)
    vlm, processor = _micro_model(cfg.model, dtype), build_processor()
    with tempfile.TemporaryDirectory(prefix="vzedge-warm-") as tmp:
        if cfg.quant != "none":  # the loading path too: quantizer, safetensors and processor modules
            vlm.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            loaded = _load(replace(cfg, model=tmp), False, dev, dtype)
        else:
            loaded = _as_loaded(vlm.to(dev), processor, "micro")
        _run(loaded, min(cfg.tokens, 8), 1, 0, 2, meter)
    del vlm, processor, loaded
    gc.collect()


def _child(job_path: str, out_path: str) -> None:
    import logging

    import torch

    from vzedge._deps import resolve_device
    from vzedge.budget.layout import measured_module_bytes
    from vzedge.io import write_json

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
    _warm_up(cfg, dev, dtype, meter)
    baseline = meter.current()
    meter.reset()
    loaded = _load(cfg, job["random_weights"], dev, dtype)
    load_peak = meter.peak() - baseline
    load_rss = meter.current() - baseline
    run = _run(loaded, cfg.tokens, cfg.crops or 1, cfg.prompt_tokens, job["new_tokens"], meter)
    vlm = loaded.vlm
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
