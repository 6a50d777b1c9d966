"""Optional dependencies and hardware probes.

Heavy backends are imported inside the function that needs them, through `require`, whose error
names the extra to install. The probes are plain functions that double as pytest skip conditions;
none of them initialises CUDA unless asked about CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def onnxruntime_available() -> bool:
    return has_module("onnxruntime")


def tensorrt_available() -> bool:
    return has_module("tensorrt")


def bitsandbytes_available() -> bool:
    return has_module("bitsandbytes")
