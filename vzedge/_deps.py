"""Optional dependencies and hardware probes.

Heavy backends are imported inside the function that needs them, through `require`, whose error
names the extra to install. The probes are plain functions that double as pytest skip conditions;
none of them initialises CUDA unless asked about CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from types import ModuleType

import torch

_EXTRAS = {
    "onnx": "export",
    "onnxruntime": "export",
    "onnxslim": "export",
    "onnxscript": "export",
    "tensorrt": "trt",
    "bitsandbytes": "bnb",
    "gptqmodel": "awq",
    "matplotlib": "plot",
    "cv2": "video",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise an ImportError that says which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'vzedge[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"{module} is needed for {purpose}: {hint}") from err


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


PLOT_HINT = "pip install 'vzedge[plot]'"


def plotting_available() -> bool:
    """matplotlib is installed (the `plot` extra): plots are drawn; without it they are skipped or refused."""
    return has_module("matplotlib")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def onnxruntime_available() -> bool:
    return has_module("onnxruntime")


def tensorrt_available() -> bool:
    return has_module("tensorrt")


def bitsandbytes_available() -> bool:
    return has_module("bitsandbytes")


def check_device(device: str, flag: str = "--device") -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and CUDA only where this torch sees a GPU; ValueError naming the fix."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"{flag} {device!r}: use auto, cpu, cuda or cuda:N (N a GPU index such as 0)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that finds no GPU"
            raise ValueError(
                f"{flag} {device}: this torch {torch.__version__} is {build}; use {flag} cpu (or auto), or "
                "install a CUDA torch on a machine with a GPU"
            )
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


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
