"""TensorRT engine from the exported ONNX graph, with a timing cache and an engine cache.

Written against the TensorRT Python API (8.6 and 10.x): `Builder`, `OnnxParser.parse_from_file`,
`IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`, `create_optimization_profile` /
`IOptimizationProfile.set_shape`, `create_timing_cache` / `set_timing_cache`, `build_serialized_network`.
Unverified by a run where this was written (no TensorRT there); tests skip without the library.

Precision: an fp16 ONNX graph carries its own precision plan (ViT layers fp16, VisionZip float32).
TensorRT >= 9 builds it as a strongly typed network, which obeys the ONNX types; 8.6 gets the FP16 flag
plus float32 constraints on every layer whose outputs are float32 in the graph. An int8-static graph is
explicitly quantized (Q/DQ): strongly typed on TensorRT >= 9 (TensorRT's guide: explicit quantization with
strong typing, no precision flags), the INT8 flag on 8.6; int8 GEMMs where the graph has Q/DQ, float32
elsewhere. An fp32 graph builds in fp32 unless `fp16=True`, which lets TensorRT pick fp16 anywhere (selection
may then flip).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vzedge._deps import require

# The ORT TensorRT-EP options and the default workspace (1 GiB: an 8 GB Orin shares its memory with a ~4 GB
# 4-bit 7B LLM) live in the core, where the runtime reads them without importing the exporter.
from vzedge.ort_providers import DEFAULT_WORKSPACE_MIB, ort_tensorrt_providers

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WORKSPACE_MIB", "TensorRTConfig", "build_engine", "engine_key", "ort_tensorrt_providers"]
TIMING_CACHE_NAME = "timing.cache"


@dataclass(frozen=True)
class TensorRTConfig:
    """onnx: the graph; cache_dir: engines and the timing cache; batch profile min <= opt <= max."""

    onnx: Path
    cache_dir: Path
    input_name: str
    input_shape: tuple[int, int, int]  # C, H, W
    max_batch: int
    opt_batch: int = 1
    min_batch: int = 1
    onnx_dtype: str = "fp16"
    fp16: bool = True
    workspace_mib: int = DEFAULT_WORKSPACE_MIB

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch profile min={self.min_batch} opt={self.opt_batch} max={self.max_batch}: "
                "need 1 <= min <= opt <= max"
            )
        if self.workspace_mib < 64:
            raise ValueError(f"workspace_mib={self.workspace_mib}: use at least 64 MiB")

    def profile(self) -> dict[str, list[int]]:
        c, h, w = self.input_shape
        return {k: [b, c, h, w] for k, b in (("min", self.min_batch), ("opt", self.opt_batch), ("max", self.max_batch))}


def gpu_name() -> str:
    """Name of CUDA device 0; a ValueError where there is none (TensorRT builds for the GPU it runs on)."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("building a TensorRT engine needs a CUDA GPU (none visible); build on the target device")
    return torch.cuda.get_device_name(0)


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, cfg: TensorRTConfig) -> str:
    """Engine cache key: the graph, the TensorRT version, the GPU, and the build settings."""
    text = "|".join(
        [
            onnx_sha256,
            trt_version,
            gpu,
            str(cfg.profile()),
            f"fp16={cfg.fp16}",
            f"ws={cfg.workspace_mib}",
            cfg.onnx_dtype,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_timing_cache(config: Any, path: Path) -> Any:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _pin_float32_layers(trt: Any, network: Any) -> int:
    """TensorRT 8.6 with FP16: keep layers whose outputs are float32 in the graph (the VisionZip part) in fp32."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outs and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(cfg: TensorRTConfig, onnx_sha256: str) -> dict[str, Any]:
    """Build (or reuse from `cfg.cache_dir`) a serialized engine for `cfg.onnx`; returns what the manifest records."""
    trt = require("tensorrt", "building a TensorRT engine (--trt)")
    gpu = gpu_name()
    version = str(trt.__version__)
    key = engine_key(onnx_sha256, version, gpu, cfg)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    engine_path = cfg.cache_dir / f"{key}.engine"
    record = {
        "engine": engine_path.name,
        "key": key,
        "tensorrt_version": version,
        "gpu": gpu,
        "onnx_sha256": onnx_sha256,
        "fp16": cfg.fp16,
        "profile": cfg.profile(),
        "workspace_mib": cfg.workspace_mib,
    }
    if engine_path.is_file():
        log.info("TensorRT engine cache hit: %s", engine_path)
        return {**record, "cache_hit": True}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(version.split(".")[0])
    strongly_typed = (
        major >= 9
        and cfg.onnx_dtype in ("fp16", "int8-static")
        and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    )
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(cfg.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {cfg.onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib * 1024**2)
    if not strongly_typed and cfg.onnx_dtype == "int8-static":
        config.set_flag(trt.BuilderFlag.INT8)  # 8.6: explicit quantization from the graph's Q/DQ, no calibrator
    if not strongly_typed and (cfg.fp16 or cfg.onnx_dtype == "fp16"):
        config.set_flag(trt.BuilderFlag.FP16)
        if cfg.onnx_dtype == "fp16":
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            log.info("pinned %d float32 layers", _pin_float32_layers(trt, network))
    profile = builder.create_optimization_profile()
    p = cfg.profile()
    profile.set_shape(cfg.input_name, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    timing_path = cfg.cache_dir / TIMING_CACHE_NAME
    _load_timing_cache(config, timing_path)
    log.info("building TensorRT %s engine for %s (profile %s)", version, gpu, p)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {**record, "cache_hit": False, "build_seconds": round(time.perf_counter() - t0, 1)}
