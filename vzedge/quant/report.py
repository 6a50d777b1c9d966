"""What quantizing the LLM cost: exact weight bytes by dtype, footprints, and quality against the float LLM.

Bytes are counted from the tensors themselves, quantization state included (bitsandbytes keeps the int8
row scales `SCB` and the 4-bit `quant_state` outside the parameters, so `get_memory_footprint()` misses
them; both figures are reported). Each quantized linear's effective weight is read back by running the
layer's own kernel on identity rows, so the SQNR is that of what the kernel computes, whatever its packing
(bitsandbytes' avx512_bf16 CPU repack, AWQ's int4 layouts), not of a dequantizer that may disagree with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn

from vzedge.models.loading import LoadedModel, load_model
from vzedge.quant.config import QuantConfig
from vzedge.quant.load import load_quantized
from vzedge.quant.sizes import layer_bytes

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "USER: What is in the image? ASSISTANT:",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Edge devices run small vision language models with quantized weights.",
    "A photo of a red car parked next to a tall tree while three people walk by.",
)
QUANTIZED_LINEAR_TYPES = ("Linear4bit", "Linear8bitLt", "Params4bit")
METADATA_FILE = "vzedge_quant.json"  # written by quantize_awq beside an AWQ checkpoint: its float source


def is_quantized_linear(mod: nn.Module) -> bool:
    return type(mod).__name__ in QUANTIZED_LINEAR_TYPES or hasattr(mod, "qweight")


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if is_quantized_linear(mod)}


def _tensors(mod: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes quantization state of `mod` (each tensor once)."""
    out = [*mod.parameters(recurse=recurse), *mod.buffers(recurse=recurse)]
    for sub in mod.modules() if recurse else [mod]:
        w = getattr(sub, "weight", None)
        scb = getattr(w, "SCB", None)
        if scb is None:  # bitsandbytes moves the int8 row scales to the module state after the first forward
            scb = getattr(getattr(sub, "state", None), "SCB", None)
        if scb is not None:
            out.append(scb)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code]
            if getattr(qs, "nested", False):
                out += [qs.state2.absmax, qs.state2.code, qs.offset]
    seen: set[int] = set()
    unique = []
    for t in out:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Exact bytes of every weight and quantization-state tensor, by dtype."""
    out: dict[str, int] = {}
    for t in _tensors(model):
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + _nbytes(t)
    return dict(sorted(out.items()))


def module_bytes(mod: nn.Module) -> int:
    return sum(_nbytes(t) for t in _tensors(mod))


def is_cpu_packed(model: nn.Module) -> bool:
    """True once bitsandbytes' avx512_bf16 path has repacked 4-bit weights (after the first forward on CPU)."""
    return any(
        getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
    )


@torch.no_grad()
def effective_weight(mod: nn.Module, dtype: torch.dtype, chunk: int = 1024) -> torch.Tensor:
    """The [out, in] float32 weight the layer's kernel actually applies, read back through identity rows."""
    k = mod.in_features
    device = next(t.device for t in _tensors(mod, recurse=False))
    bias = getattr(mod, "bias", None)
    cols = []
    for i in range(0, k, chunk):
        eye = torch.zeros(min(chunk, k - i), k, dtype=dtype, device=device)
        eye[:, i : i + eye.shape[0]].fill_diagonal_(1)
        y = mod(eye).float()
        if bias is not None:
            y = y - bias.float()
        cols.append(y.cpu())
    return torch.cat(cols).T.contiguous()


def unfold_scales(ref: torch.Tensor, q: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """`ref` with the per-row and per-column gains that best map it onto `q` (alternating least squares).

    AWQ multiplies a layer's input channels by scales s before quantizing and folds 1/s into the op before
    it: the norm (a column scale on q/k/v/gate/up) or the previous linear (a row scale on up_proj and
    v_proj). A quantized layer thus holds Q(diag(r) W diag(c)), not Q(W); comparing it with W would count
    r and c as error. With them fitted the SQNR measures the quantization alone (N + K fitted numbers
    against N x K weights, so the fit hides almost nothing)."""
    ref, q = ref.float(), q.float()
    r = torch.ones(ref.shape[0], 1)
    c = torch.ones(1, ref.shape[1])
    for _ in range(iters):
        a = ref * r
        c = (a * q).sum(0, keepdim=True) / a.pow(2).sum(0, keepdim=True).clamp_min(1e-30)
        b = ref * c
        r = (b * q).sum(1, keepdim=True) / b.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
    return ref * r * c


def sqnr_db(ref: torch.Tensor, q: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - q|^2)."""
    noise = (ref.float() - q.float()).pow(2).sum().item()
    signal = ref.float().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _text_logits(vlm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = vlm.get_input_embeddings().weight.device
    with torch.no_grad():
        return vlm(input_ids=ids.to(device)).logits.float().cpu()


def logit_agreement(ref: nn.Module, quant: nn.Module, tokenizer: Any, prompts: tuple[str, ...]) -> dict[str, float]:
    """Max/mean |Δlogit|, relative L2 error and top-1 agreement of `quant` against `ref`, text-only prompts."""
    errs, means, rel, agree, n = [], [], [], 0, 0
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        a, b = _text_logits(ref, ids), _text_logits(quant, ids)
        errs.append((a - b).abs().max().item())
        means.append((a - b).abs().mean().item())
        rel.append(((a - b).norm() / a.norm()).item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        n += ids.shape[1]
    return {
        "max_abs_logit_err": max(errs),
        "mean_abs_logit_err": sum(means) / len(means),
        "rel_l2_logit_err": max(rel),
        "top1_agreement": agree / n,
        "prompts": len(prompts),
        "tokens": n,
    }


def _tokenizer(loaded: LoadedModel) -> Any:
    return getattr(loaded.processor, "tokenizer", loaded.processor)


def _reference_source(loaded: LoadedModel, model: str, reference: str | None) -> str | None:
    if reference is not None:
        return reference
    info = getattr(loaded.vlm, "vzedge_quant", None)
    src = info.source if info is not None else model
    meta = os.path.join(src, METADATA_FILE)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            return json.load(f).get("source")
    return None if info is not None and info.method == "awq" else src


def quant_report(
    model: str,
    qcfg: QuantConfig,
    device: str = "cpu",
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    loaded: LoadedModel | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Bytes by dtype, footprints and quality of `model` under `qcfg` against its float LLM.

    `loaded`: an already quantized model (measure it before its first forward for the stored layout).
    `reference`: the float model to compare with (default: the same source; for an AWQ checkpoint the
    source recorded in its vzedge_quant.json). Quality figures are None where there is no reference.
    """
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_quantized(model, qcfg, device)
    vlm = loaded.vlm
    info = getattr(vlm, "vzedge_quant", None)
    method = info.method if info is not None else qcfg.method
    packed = is_cpu_packed(vlm)
    layers = quantized_linears(vlm)
    by_dtype = weight_bytes(vlm)
    linear = {name: module_bytes(mod) for name, mod in layers.items()}
    double_quant = qcfg.double_quant and not packed
    formula = sum(
        layer_bytes(m.out_features, m.in_features, method, double_quant, qcfg.group_size) for m in layers.values()
    )
    report: dict[str, Any] = {
        "model": model,
        "requested_method": qcfg.method,
        "method": method,
        "fallback_reasons": list(info.fallback_reasons) if info is not None else [],
        "device": str(next(vlm.parameters()).device),
        "compute_dtype": info.compute_dtype if info is not None else None,
        "layout": "bitsandbytes cpu-packed (after first forward)" if packed else "stored",
        "bytes_by_dtype": by_dtype,
        "total_bytes": sum(by_dtype.values()),
        "get_memory_footprint": int(vlm.get_memory_footprint()),
        "quantized_layers": len(layers),
        "quantized_linear_bytes": sum(linear.values()),
        "quantized_linear_bytes_formula": None if packed else formula,
    }
    ref_src = _reference_source(loaded, model, reference)
    if ref_src is None:
        log.warning("no float reference for %s: pass reference= to get quality figures", model)
        report.update(quality=None, reference=None)
        return report
    ref = load_model(ref_src, dtype=torch.float32)
    ref_vlm = ref.vlm if ref.vlm is not None else ref.vision
    ref_sd = dict(ref_vlm.named_parameters())
    fp32_linear = sum(_nbytes(ref_sd[f"{name}.weight"]) for name in layers)
    report["reference"] = ref_src
    report["reference_footprint"] = int(ref_vlm.get_memory_footprint())
    report["footprint_ratio"] = report["get_memory_footprint"] / report["reference_footprint"]
    report["fp32_linear_bytes"] = fp32_linear
    report["linear_bytes_ratio"] = report["quantized_linear_bytes"] / fp32_linear if fp32_linear else None
    report["total_bytes_ratio"] = report["total_bytes"] / sum(weight_bytes(ref_vlm).values())
    act_dtype = next(p.dtype for p in vlm.parameters() if p.is_floating_point())
    sq = {}
    for name, mod in layers.items():
        w_ref, w_q = ref_sd[f"{name}.weight"].detach().float(), effective_weight(mod, act_dtype)
        if method == "awq":
            w_ref = unfold_scales(w_ref, w_q)
        sq[name] = round(sqnr_db(w_ref, w_q), 3)
    quality = logit_agreement(ref_vlm, vlm, _tokenizer(loaded), prompts)
    quality["sqnr_db"] = sq
    quality["sqnr_db_min"] = min(sq.values()) if sq else None
    quality["sqnr_db_mean"] = sum(sq.values()) / len(sq) if sq else None
    report["quality"] = quality
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines for people; the CLI prints them."""
    q = report.get("quality") or {}
    rows = [
        (
            "method",
            f"{report['method']}"
            + (f" (asked {report['requested_method']})" if report["method"] != report["requested_method"] else ""),
        ),
        (
            "bytes",
            ", ".join(f"{k} {v:,}" for k, v in report["bytes_by_dtype"].items()) + f" = {report['total_bytes']:,}",
        ),
        ("footprint", f"{report['get_memory_footprint']:,} B (get_memory_footprint, excludes bnb quant state)"),
    ]
    if "linear_bytes_ratio" in report and report["linear_bytes_ratio"] is not None:
        rows.append(
            (
                "linears",
                f"{report['quantized_layers']} quantized, {report['quantized_linear_bytes']:,} B = "
                f"{report['linear_bytes_ratio']:.3f}x of fp32",
            )
        )
    if q:
        # No quantized layer (method none, or every linear skipped): no SQNR to report.
        sqnr = (
            f"SQNR min {q['sqnr_db_min']:.2f} dB mean {q['sqnr_db_mean']:.2f} dB"
            if q.get("sqnr_db_min") is not None
            else "SQNR n/a (no quantized layer)"
        )
        rows.append(("quality", f"max|Δlogit| {q['max_abs_logit_err']:.4f}, top-1 {q['top1_agreement']:.3f}, {sqnr}"))
    rows += [("fallback", r) for r in report["fallback_reasons"]]
    return rows
