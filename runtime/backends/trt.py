"""TensorRT vision backend: runs the engine named in the manifest (TensorRT 10 tensor API).

TensorRT is imported only here; without it, a clear error names the extra.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vzedge._deps import require
from vzedge.runtime.backends.base import VisionBackend, manifest_adaptive, pick_buckets
from vzedge.runtime.preprocess import Preprocess

log = logging.getLogger(__name__)

_TORCH_DTYPE = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


class TensorRTVisionBackend(VisionBackend):
    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        found = manifest_adaptive(manifest, folder)  # a malformed manifest fails before TensorRT is needed
        self.adaptive, self.adaptive_block = found if found is not None else (None, None)
        trt = require("tensorrt", "the TensorRT vision backend")
        if not torch.cuda.is_available():
            raise ValueError("the TensorRT backend needs a CUDA GPU; use --vision-backend ort or torch here")
        record = manifest.get("tensorrt") or {}
        engine_file = record.get("engine")
        if not engine_file:
            raise ValueError(f"{folder} has no TensorRT engine: export with --trt on the target device")
        path = folder / engine_file
        if not path.is_file():
            path = folder / "trt" / engine_file
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(
                f"TensorRT could not load {path}: engines are specific to the TensorRT version and GPU they were "
                "built with; rebuild with vzedge export --trt on this device"
            )
        self.context = self.engine.create_execution_context()
        self.trt = trt
        graph = manifest["graph"]
        self.input_name = graph["inputs"][0]["name"]
        self.output_names = [o["name"] for o in graph["outputs"]]
        self.manifest = manifest
        self.num_tokens = int(manifest["visionzip"]["dominant"]) + int(manifest["visionzip"]["contextual"])
        self.projected = bool(manifest["projector"])
        self.preprocess = Preprocess.from_manifest(manifest["preprocess"])
        self.max_batch = int(graph.get("batch", {}).get("max", 1))
        self.stream = torch.cuda.Stream()
        self.name = "tensorrt"
        if self.adaptive is not None:
            self.name += f"-adaptive-{'/'.join(map(str, self.adaptive.buckets))}"

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tokens of the graph's first output (an adaptive export: its largest bucket, for every image)."""
        return self._run(pixel_values)[self.output_names[0]].float()

    @torch.inference_mode()
    def encode_each(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.adaptive_block is None:
            return super().encode_each(pixel_values)
        out: list[torch.Tensor] = []
        for i in range(0, len(pixel_values), self.max_batch):
            out += [
                t.float() for t in pick_buckets(self._run(pixel_values[i : i + self.max_batch]), self.adaptive_block)
            ]
        return out

    def _run(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        x = pixel_values.to("cuda", torch.float32).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _TORCH_DTYPE[self.engine.get_tensor_dtype(name).name]
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        self.stream.synchronize()
        return outputs
