"""Quantized LLM loading: bitsandbytes int8/nf4/fp4 and AWQ, the vision tower and projector kept in float.

One path for every source: the built-in `tiny` is saved to a temp folder and loaded through the same
`from_pretrained` call as a local folder or hub id, so what the tests exercise is what users run.
bitsandbytes quantizes at load time (transformers' `BitsAndBytesConfig`); AWQ loads checkpoints made by
`quantize_awq` (vzedge.quant.awq, gptqmodel) or by others. Before a bitsandbytes model is built, a
one-kernel smoke test runs on the target device; if it fails (bitsandbytes #1930: aarch64 wheels on
Jetson sm_87 fail at the first kernel), the loader warns with the reason and falls back to the next
method in `QuantConfig.fallback_chain()` instead of crashing mid-loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from vzedge._deps import require, resolve_device
from vzedge.models.loading import BUILTIN_MODELS, LoadedModel, from_vlm, load_config, load_model
from vzedge.quant.config import (
    BNB_4BIT_BLOCKSIZE,
    METHODS,
    VISION_MODULES,
    QuantConfig,
    QuantInfo,
    QuantKernelError,
)
from vzedge.quant.sizes import out_of_memory

log = logging.getLogger(__name__)


def checkpoint_quant_method(config: Any) -> str | None:
    """The vzedge method name a checkpoint is already quantized with (None: not quantized)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    kind = str(qc.get("quant_method", "unknown")).lower()
    if kind == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return "bnb-int8"
        return "bnb-fp4" if qc.get("bnb_4bit_quant_type") == "fp4" else "bnb-nf4"
    return kind  # "awq", or another method vzedge does not load ("gptq", "compressed-tensors", ...)


def load_quantized(model: str, qcfg: QuantConfig, device: str = "auto") -> LoadedModel:
    """A LLaVA (or causal LM) with its LLM quantized by `qcfg`; vision tower and projector in float.

    Same LoadedModel as `load_model`; `loaded.vlm.vzedge_quant` (QuantInfo) says which method ran, which
    may differ from the one asked for after a failed smoke test (a warning names the reason).
    """
    dev = resolve_device(device)
    config = load_config(model)
    _check_checkpoint(model, config, qcfg.method)
    info = QuantInfo(qcfg.method, qcfg.method, str(dev), "", model)
    chain = qcfg.fallback_chain()
    for i, method in enumerate(chain):
        try:
            if method.startswith("bnb-"):
                bnb_smoke_test(method, dev, qcfg.torch_dtype(dev))
            src = qcfg.awq_fallback if method == "awq" and qcfg.awq_fallback else model
            if src != model:
                _check_checkpoint(src, load_config(src), "awq")
            loaded = _load(src, qcfg, method, dev)
            if method == "awq":
                awq_smoke_test(loaded.vlm)
        except QuantKernelError as err:
            if i + 1 == len(chain):
                raise
            reason = f"{method} failed its smoke test on {_device_name(dev)}: {err}"
            info.fallback_reasons.append(reason)
            log.warning("%s; falling back to %s", reason, chain[i + 1])
            continue
        info.method, info.source = method, src
        info.compute_dtype = str(qcfg.torch_dtype(dev)).removeprefix("torch.")
        loaded.vlm.vzedge_quant = info
        return loaded
    raise AssertionError("unreachable: the chain always ends in a return or a raise")


def _check_checkpoint(model: str, config: Any, method: str) -> None:
    have = checkpoint_quant_method(config)
    if have is None:
        if method == "awq":
            raise ValueError(
                f"{model!r} is not an AWQ checkpoint; make one with `vzedge quantize --method awq --model {model} "
                "--calib 128 --out DIR`, or use --method bnb-nf4 (quantizes at load time)"
            )
        return
    if have not in METHODS:
        raise ValueError(
            f"{model!r} is already quantized with {have!r}, which vzedge does not load; use an AWQ or "
            "unquantized checkpoint"
        )
    if have != method:
        raise ValueError(
            f"{model!r} is already quantized with {have}; load it with --method {have} "
            f"(vzedge does not re-quantize a quantized checkpoint with {method})"
        )


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm_{major}{minor})"
    return "cpu"


@contextlib.contextmanager
def _as_folder(model: str) -> Iterator[str]:
    """The checkpoint folder (or hub id) to load from; the built-in model is saved to a temp folder first."""
    if model not in BUILTIN_MODELS:
        yield model
        return
    loaded = load_model(model)
    with tempfile.TemporaryDirectory(prefix="vzedge-quant-") as tmp:
        loaded.vlm.save_pretrained(tmp)
        loaded.processor.save_pretrained(tmp)
        yield tmp


def stdout_to_stderr() -> contextlib.AbstractContextManager[Any]:
    """gptqmodel prints banners and progress bars to stdout; keep stdout for results (`--json`)."""
    return contextlib.redirect_stdout(sys.stderr)


def _load(model: str, qcfg: QuantConfig, method: str, dev: torch.device) -> LoadedModel:
    config = load_config(model)
    is_vlm = getattr(config, "model_type", "") == "llava"
    dtype = qcfg.torch_dtype(dev)
    kw: dict[str, Any] = {"dtype": dtype}
    if method.startswith("bnb-"):
        require("accelerate", f"--method {method}")
        bnb = require("bitsandbytes", f"--method {method}")
        logging.getLogger(bnb.__name__).setLevel(logging.ERROR)  # int8 logs a cast notice on every matmul
        kw["quantization_config"] = bnb_config(qcfg, method, dtype, is_vlm)
    elif method == "awq":
        require("accelerate", "--method awq")
        require("gptqmodel", "loading AWQ checkpoints (--method awq)")
    if dev.type == "cuda" and method != "none":
        kw["device_map"] = {"": dev}
    with _as_folder(model) as folder, stdout_to_stderr():
        local = os.path.isdir(folder)
        try:
            if is_vlm:
                from transformers import AutoProcessor, LlavaForConditionalGeneration

                vlm = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=local, **kw)
                processor = AutoProcessor.from_pretrained(folder, local_files_only=local)
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                vlm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=local, **kw)
                processor = AutoTokenizer.from_pretrained(folder, local_files_only=local)
        except (torch.OutOfMemoryError, MemoryError) as err:
            raise out_of_memory(model, config, qcfg, method, dev) from err
    if "device_map" not in kw:
        vlm = vlm.to(dev)
    vlm.eval()
    if method in ("bnb-nf4", "bnb-fp4"):
        check_4bit_cpu_shapes(vlm)
    if not is_vlm:  # a bare causal LM: no vision tower (the runtime pairs it with an exported graph)
        return LoadedModel(name=model, source=model, revision=None, vision=None, vlm=vlm, processor=processor)
    return from_vlm(model, model, None, vlm, processor)


def bnb_config(qcfg: QuantConfig, method: str, dtype: torch.dtype, is_vlm: bool) -> Any:
    """transformers' BitsAndBytesConfig for `method`, skipping the vision tower, projector and `skip_modules`."""
    from transformers import BitsAndBytesConfig

    skip = [*VISION_MODULES, *qcfg.skip_modules] if is_vlm else list(qcfg.skip_modules)
    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=qcfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def check_4bit_cpu_shapes(model: torch.nn.Module) -> list[str]:
    """bitsandbytes' avx512_bf16 CPU path repacks 4-bit weights at the first forward and asserts unless
    out_features % 32 == 0 and in_features % 64 == 0. Layers that miss it are switched to the generic
    (slower) path with a warning, instead of failing at the first forward. Returns their names."""
    import bitsandbytes as bnb

    bad = [
        f"{name} ({mod.out_features}x{mod.in_features})"
        for name, mod in model.named_modules()
        if isinstance(mod, bnb.nn.Linear4bit)
        and getattr(mod, "support_avx512bf16_for_cpu", False)
        and (mod.out_features % 32 or mod.in_features % BNB_4BIT_BLOCKSIZE)
    ]
    if bad:
        log.warning(
            "bitsandbytes' avx512_bf16 4-bit CPU kernel needs out_features %% 32 == 0 and in_features %% 64 == 0; "
            "%d layer(s) miss it and use the slower generic path: %s",
            len(bad),
            ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
        )
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit) and (mod.out_features % 32 or mod.in_features % BNB_4BIT_BLOCKSIZE):
                mod.support_avx512bf16_for_cpu = False
    return bad


def bnb_smoke_test(method: str, dev: torch.device, dtype: torch.dtype, size: int = 64) -> float:
    """Quantize one small linear layer with `method` on `dev`, run it once, and check it against the float
    matmul. Raises QuantKernelError (with the kernel's own message) if it errors or returns garbage;
    returns the relative error."""
    bnb = require("bitsandbytes", f"--method {method}")
    logging.getLogger(bnb.__name__).setLevel(logging.ERROR)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=g) / math.sqrt(size)
    x = torch.randn(4, size, generator=g)
    try:
        if method == "bnb-int8":
            layer = bnb.nn.Linear8bitLt(size, size, bias=False, has_fp16_weights=False, threshold=0.0)
            layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, quant_type=method[4:])
            layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=method[4:])
        layer = layer.to(dev).eval()
        with torch.no_grad():
            y = layer(x.to(dev, dtype)).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except (RuntimeError, AssertionError, ValueError, NotImplementedError, OSError) as err:
        raise QuantKernelError(f"{type(err).__name__}: {err}".strip()) from err
    ref = x @ w.T
    rel = ((y - ref).norm() / ref.norm()).item()
    limit = 0.05 if method == "bnb-int8" else 0.25  # 4-bit RTN of a Gaussian: ~0.1
    if not math.isfinite(rel) or rel > limit:
        raise QuantKernelError(f"wrong results: relative error {rel:.3g} > {limit} against the float matmul")
    return rel


def awq_smoke_test(model: torch.nn.Module) -> None:
    """Run the first AWQ linear once on a small input; a kernel that errors or returns non-finite values
    raises QuantKernelError."""
    layer = next((m for m in model.modules() if hasattr(m, "qweight")), None)
    if layer is None:
        raise QuantKernelError("no AWQ layer found in the loaded model (was the checkpoint really AWQ?)")
    param = next(model.parameters())
    x = torch.randn(2, layer.in_features, device=layer.qweight.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            y = layer(x)
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as err:
        raise QuantKernelError(f"{type(err).__name__}: {err}") from err
    if not torch.isfinite(y).all():
        raise QuantKernelError("the AWQ kernel returned non-finite values")
