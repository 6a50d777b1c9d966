"""QuantConfig: which method, compute dtype and fallbacks; the method names and constants."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
