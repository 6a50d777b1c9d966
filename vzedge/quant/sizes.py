"""Exact bytes of quantized weights (no model built), and the out-of-memory message that uses them."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from vzedge._deps import resolve_device
from vzedge.models.loading import load_config
from vzedge.quant.config import BNB_4BIT_BLOCKSIZE, METHODS, VISION_MODULES, QuantConfig


def layer_bytes(
    out_features: int,
    in_features: int,
    method: str,
    double_quant: bool = False,
    group_size: int = 128,
    float_bytes: int = 2,
) -> int:
    """Exact bytes one linear weight (no bias) takes in `method`'s stored layout.

    bnb-int8: int8 [N,K] + fp32 row absmax [N]. bnb 4-bit: uint8 [N*K/2] + fp32 absmax per 64 weights +
    fp32 code [16]; with double_quant the absmax is uint8 plus fp32 absmax per 256 blocks, an fp32 code
    [256] and an fp32 offset. (bitsandbytes' avx512_bf16 CPU path repacks at the first forward: absmax
    becomes bf16 and double quant is undone.) awq: int32 qweight [K, N/8] + int32 qzeros [K/g, N/8] +
    fp16 scales [K/g, N]. none: N*K*float_bytes.
    """
    n, k = out_features, in_features
    if method == "none":
        return n * k * float_bytes
    if method == "bnb-int8":
        return n * k + 4 * n
    if method in ("bnb-nf4", "bnb-fp4"):
        blocks = math.ceil(n * k / BNB_4BIT_BLOCKSIZE)
        if not double_quant:
            return math.ceil(n * k / 2) + 4 * blocks + 64
        return math.ceil(n * k / 2) + blocks + 4 * math.ceil(blocks / 256) + 1024 + 64 + 4
    if method == "awq":
        groups = k // group_size
        return k * n // 2 + groups * n // 2 + 2 * groups * n
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def estimate_weight_bytes(model: str, qcfg: QuantConfig, device: str = "auto") -> dict[str, int]:
    """Weight bytes of `model` under `qcfg`, from its config alone (a meta-device model, no weights read):
    the LLM's decoder linears in the quantized layout, everything else in the compute dtype."""
    dev = resolve_device(device)
    config = load_config(model)
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    with torch.device("meta"):
        if getattr(config, "model_type", "") == "llava":
            meta = LlavaForConditionalGeneration(config)
        else:
            meta = AutoModelForCausalLM.from_config(config)
    float_bytes = torch.finfo(qcfg.torch_dtype(dev)).bits // 8
    quantized = other = 0
    counted: set[str] = set()
    if qcfg.method != "none":
        for name, mod in meta.named_modules():
            if isinstance(mod, torch.nn.Linear) and _is_quantized_name(name, qcfg):
                quantized += layer_bytes(
                    mod.out_features, mod.in_features, qcfg.method, qcfg.double_quant, qcfg.group_size, float_bytes
                )
                counted.add(f"{name}.weight")
    for name, p in meta.named_parameters():
        if name not in counted:
            other += p.numel() * float_bytes
    return {"quantized_linear": quantized, "float": other, "total": quantized + other}


def _is_quantized_name(name: str, qcfg: QuantConfig) -> bool:
    skip = (*VISION_MODULES, *qcfg.skip_modules)
    return not any(name.startswith(s) or name.endswith(s) or f".{s}." in f".{name}." for s in skip)


def out_of_memory(model: str, config: Any, qcfg: QuantConfig, method: str, dev: torch.device) -> MemoryError:
    """A MemoryError that says how much the weights need and how much the device had."""
    try:
        need = estimate_weight_bytes(
            model,
            QuantConfig(
                method=method,
                compute_dtype=qcfg.compute_dtype,
                double_quant=qcfg.double_quant and method != "bnb-int8",
                group_size=qcfg.group_size,
            ),
            str(dev),
        )["total"]
        need_s = f"~{need / 2**30:.2f} GiB of weights"
    except (ValueError, RuntimeError) as err:
        need_s = f"unknown weight size ({err})"
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
    else:
        free, total = _host_memory()
    hint = (
        "try --method bnb-nf4 (about 0.14x of fp32 per linear weight)" if method != "bnb-nf4" else "use a smaller model"
    )
    return MemoryError(
        f"out of memory loading {model!r} with {method} on {dev}: it needs {need_s}; the device had "
        f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB. {hint}"
    )


def _host_memory() -> tuple[int, int]:
    info: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info.get("MemAvailable", 0), info.get("MemTotal", 0)
