"""ONNX Runtime execution-provider lists for a vision graph (plain data: onnxruntime is not imported).

Shared by the exporter (which offers the graph through ORT's TensorRT EP) and the runtime (which runs
it), so the runtime never imports the exporter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Sized for an 8 GB Jetson Orin: the engine builder may use up to 1 GiB of scratch memory.
DEFAULT_WORKSPACE_MIB = 1024


def ort_tensorrt_providers(
    cache_dir: Path,
    input_name: str,
    input_shape: tuple[int, int, int],
    max_batch: int,
    fp16: bool = True,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    int8: bool = False,
) -> list[Any]:
    """Providers for onnxruntime.InferenceSession running a graph through ORT's TensorRT execution provider
    (engine and timing caches in `cache_dir`, one profile over the batch range), with CUDA then CPU as fallback.
    int8: the graph is explicitly quantized (an int8-static export's Q/DQ), which TensorRT builds with its INT8
    flag; the scales come from the graph, so no calibration table is named."""
    c, h, w = input_shape

    def shape(b: int) -> str:
        return f"{input_name}:{b}x{c}x{h}x{w}"

    options = {
        "trt_fp16_enable": fp16,
        "trt_max_workspace_size": workspace_mib * 1024**2,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(1),
        "trt_profile_max_shapes": shape(max_batch),
    }
    if int8:
        options["trt_int8_enable"] = True
    return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def providers_for(backend: str, available: list[str]) -> list[Any]:
    """Provider names for a runtime backend choice, restricted to what this onnxruntime build offers."""
    wanted = {
        "ort-cpu": ["CPUExecutionProvider"],
        "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "ort": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "auto": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    }[backend]
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"--vision-backend ort-cuda: this onnxruntime offers {available}; install vzedge[gpu] (onnxruntime-gpu)"
        )
    return [p for p in wanted if p in available]
