"""Quantized LLM loading: bitsandbytes int8/nf4/fp4 and AWQ, the vision tower and projector kept in float.

One path for every source: the built-in `tiny` is saved to a temp folder and loaded through the same
`from_pretrained` call as a local folder or hub id, so what the tests exercise is what users run.
bitsandbytes quantizes at load time (transformers' `BitsAndBytesConfig`); AWQ loads checkpoints made by
`quantize_awq` (vzedge.quant_awq, gptqmodel) or by others. Before a bitsandbytes model is built, a
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
from dataclasses import dataclass, field
from typing import Any

import torch

from vzedge._deps import require
from vzedge.models.loading import BUILTIN_MODELS, LoadedModel, from_vlm, load_config, load_model

log = logging.getLogger(__name__)

METHODS = ("none", "bnb-int8", "bnb-nf4", "bnb-fp4", "awq")
ALIASES = {"int8": "bnb-int8", "nf4": "bnb-nf4", "fp4": "bnb-fp4"}  # the runtime's --quant names
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Module-name patterns transformers' quantizers match from the start of the full name (and as suffixes):
# the LLaVA vision tower and projector must stay in float.
VISION_MODULES = ("model.vision_tower", "model.multi_modal_projector", "vision_tower", "multi_modal_projector")
AWQ_GROUP_SIZES = (32, 64, 128)
BNB_4BIT_BLOCKSIZE = 64


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the LLM. `awq_fallback`: an AWQ checkpoint of the same model to try if bitsandbytes
    fails its smoke test; `fallback=False` raises instead of falling back."""

    method: str = "none"
    compute_dtype: str = "auto"
    double_quant: bool = False
    group_size: int = 128
    bits: int = 4
    skip_modules: tuple[str, ...] = ("lm_head",)
    fallback: bool = True
    awq_fallback: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", ALIASES.get(self.method, self.method))
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.compute_dtype not in ("auto", *COMPUTE_DTYPES):
            raise ValueError(
                f"compute_dtype {self.compute_dtype!r} is not one of auto, {', '.join(COMPUTE_DTYPES)} "
                "(auto: fp32 on CPU, fp16 on CUDA)"
            )
        if self.double_quant and self.method not in ("bnb-nf4", "bnb-fp4"):
            raise ValueError(f"double_quant applies to bnb-nf4/bnb-fp4 only, not {self.method!r}; drop it")
        if self.bits != 4:
            raise ValueError(f"bits={self.bits}: AWQ checkpoints here are 4-bit GEMM; use bits=4 (or bnb-int8)")
        if self.group_size not in AWQ_GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size}: use one of {AWQ_GROUP_SIZES}")
        if isinstance(self.skip_modules, str):
            raise TypeError(f"skip_modules must be a tuple of module names, not the string {self.skip_modules!r}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.awq_fallback is not None and not self.is_bnb:
            raise ValueError("awq_fallback is the checkpoint tried when bitsandbytes fails; set it with a bnb-* method")

    @property
    def is_bnb(self) -> bool:
        return self.method.startswith("bnb-")

    def torch_dtype(self, device: torch.device | str) -> torch.dtype:
        """The float dtype of activations and of the unquantized parts (vision tower, projector, embeddings)."""
        if self.compute_dtype != "auto":
            return COMPUTE_DTYPES[self.compute_dtype]
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32

    def fallback_chain(self) -> tuple[str, ...]:
        """Methods to try in order: the requested one, then (for bitsandbytes) AWQ if a checkpoint is set, then none."""
        if not self.is_bnb or not self.fallback:
            return (self.method,)
        return (self.method, *(("awq",) if self.awq_fallback else ()), "none")


@dataclass
class QuantInfo:
    """What `load_quantized` actually did; attached to the returned model as `vlm.vzedge_quant`."""

    requested: str
    method: str
    device: str
    compute_dtype: str
    source: str
    fallback_reasons: list[str] = field(default_factory=list)


class QuantKernelError(RuntimeError):
    """A quantized kernel failed its smoke test on the target device."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; refuses cuda where there is none."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: quantized LLMs run on cpu or cuda here")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
    return dev


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


def quant_report(model: str, qcfg: QuantConfig, device: str = "cpu", **kw: Any) -> dict[str, Any]:
    """What quantization cost: bytes by dtype, footprints and quality against the unquantized LLM.
    See `vzedge.quant_report.quant_report`."""
    from vzedge.quant_report import quant_report as _report

    return _report(model, qcfg, device=device, **kw)
