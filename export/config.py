"""ExportConfig: everything `vzedge export` needs, validated once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vzedge.select.adaptive import AdaptiveBudget
from vzedge.visionzip import VisionZipConfig

ExportDtype = Literal["fp32", "fp16", "int8", "int8-static"]
# int8: ViT linear weights int8 with run-time activation scales, for ONNX Runtime on CPU (export/quantize.py).
# int8-static: Q/DQ around the same layers, activation scales calibrated on images, for TensorRT and ORT
# (export/calibration.py).
DTYPES: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-static")
INT8_DTYPES: tuple[str, ...] = ("int8", "int8-static")
DEFAULT_CALIB_N = 32
MAX_CALIB_N = 4096

# LayerNormalization, one per ViT layer, is an ONNX op from opset 17 on; below it the exporter would decompose it
# into ReduceMean/Pow/Sqrt, whose fp16 Pow overflows on Jetson. 17 is also the newest TensorRT 8.6 parses.
MIN_OPSET = 17
# TensorRT 10.0's ONNX parser reads opsets 9-20 (onnx-tensorrt docs/operators.md); newer ones are not tested here.
MAX_OPSET = 20
DEFAULT_OPSET = 18  # torch.onnx's dynamo exporter emits 18 natively; 17 is rewritten by onnx_export.downgrade_opset
MAX_BATCH_LIMIT = 1024


@dataclass(frozen=True)
class ExportConfig:
    """One export: model -> `out/` holding model.onnx, manifest.json and (with trt) a TensorRT engine.

    model: 'tiny', a local folder or a hub id (a LLaVA-1.5 checkpoint or a bare CLIP/SigLIP vision model).
    projector: append the LLaVA projector, so tokens come out in the LLM's embedding width.
    dtype: weights and activations of the ViT layers; scoring, key normalisation and the merge stay fp32.
        int8 quantizes the ViT layers' linear weights (activations at run time) for ORT on CPU; int8-static
        puts Q/DQ around the same layers with activation scales calibrated on images (TensorRT's explicit int8);
        see vzedge.export.quantize for what stays fp32.
    calib: int8-static only: a folder of images to calibrate the activation scales on (None: the built-in
        synthetic scenes); calib_n: how many images (the first calib_n files in name order, or scenes).
    max_batch: the largest batch the graph (and the TensorRT profile) accepts; the batch dim is dynamic in [1, max].
    force: replace an `out` that holds a different model's export, or leftovers of an interrupted one.
    adaptive: a per-image token budget (vzedge.select.adaptive): one graph that selects at every bucket and picks
        each image's bucket in-graph; the buckets replace visionzip's dominant/contextual (split 54:10 each).
    projector_weights: a `vzedge tune` folder whose tuned projector replaces the model's (checked against the
        base model and `visionzip`; recorded in the manifest as "projector_weights").
    """

    model: str
    out: Path
    visionzip: VisionZipConfig = field(default_factory=VisionZipConfig)
    projector: bool = False
    dtype: ExportDtype = "fp32"
    opset: int = DEFAULT_OPSET
    max_batch: int = 8
    trt: bool = False
    trt_workspace_mib: int | None = None
    force: bool = False
    slim: bool = True
    revision: str | None = None
    parity_seed: int = 0
    projector_weights: Path | None = None
    calib: Path | None = None
    calib_n: int = DEFAULT_CALIB_N
    adaptive: AdaptiveBudget | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model is empty: pass --model tiny, a local folder, or a hub id such as owner/name")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out).strip():
            raise ValueError("out is empty: pass --out DIR, the folder to write the export to")
        object.__setattr__(self, "out", Path(self.out))
        if not isinstance(self.visionzip, VisionZipConfig):
            raise TypeError(f"visionzip must be a VisionZipConfig, got {type(self.visionzip).__name__}")
        if self.visionzip.selector == "random":
            raise ValueError(
                "--selector random draws from torch's seeded generator on every call, which no ONNX graph "
                "reproduces (no parity gate could pass); it is an evaluation baseline: export visionzip, divprune, "
                "vispruner or pool"
            )
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} is not one of {DTYPES}; use --dtype fp32, fp16, int8 or int8-static"
            )
        if self.dtype == "int8" and self.trt:
            raise ValueError(
                "--dtype int8 makes a graph for ONNX Runtime on CPU (MatMulInteger), which TensorRT does not build; "
                "for a TensorRT engine use --dtype int8-static --trt (TensorRT's explicit int8) or --dtype fp16 --trt"
            )
        for name in ("opset", "max_batch", "parity_seed", "calib_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ExportConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        if self.opset < MIN_OPSET:
            raise ValueError(
                f"opset {self.opset} is too old: LayerNormalization, used by every ViT layer, needs opset "
                f"{MIN_OPSET}; use --opset {MIN_OPSET} (TensorRT 8.6) or --opset {DEFAULT_OPSET}"
            )
        if self.opset > MAX_OPSET:
            raise ValueError(
                f"opset {self.opset} is newer than TensorRT's ONNX parser reads (<= {MAX_OPSET}); "
                f"use --opset {DEFAULT_OPSET}"
            )
        if not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch={self.max_batch}: use 1 <= --max-batch <= {MAX_BATCH_LIMIT} (e.g. 8)")
        if self.trt_workspace_mib is not None and (
            isinstance(self.trt_workspace_mib, bool)
            or not isinstance(self.trt_workspace_mib, int)
            or self.trt_workspace_mib < 64
        ):
            raise ValueError(f"trt_workspace_mib={self.trt_workspace_mib!r}: use an int >= 64 (MiB), or None")
        if self.projector_weights is not None:
            if not self.projector:
                raise ValueError("projector_weights (a tuned projector) needs projector=True; pass --projector DIR")
            object.__setattr__(self, "projector_weights", Path(self.projector_weights))
        if not 1 <= self.calib_n <= MAX_CALIB_N:
            raise ValueError(f"calib_n={self.calib_n}: use 1 <= --calib-n <= {MAX_CALIB_N} (e.g. {DEFAULT_CALIB_N})")
        if self.calib is not None:
            if self.dtype != "int8-static":
                raise ValueError(
                    f"--calib calibrates int8-static activation scales; add --dtype int8-static (not {self.dtype})"
                )
            object.__setattr__(self, "calib", Path(self.calib))
            if not self.calib.is_dir():
                raise ValueError(
                    f"--calib {self.calib} is not a folder; pass a folder of images, or omit it for "
                    "the built-in synthetic scenes"
                )
        if self.adaptive is not None:
            if not isinstance(self.adaptive, AdaptiveBudget):
                raise TypeError(f"adaptive must be an AdaptiveBudget, got {type(self.adaptive).__name__}")
            if self.dtype == "int8-static":
                raise ValueError(
                    "--adaptive with --dtype int8-static is not supported (its calibration and Q/DQ placement are "
                    "not checked on the multi-bucket graph); use --dtype fp32, fp16 or int8"
                )
        if self.revision is not None and not isinstance(self.revision, str):
            raise TypeError(f"revision must be a string or None, got {type(self.revision).__name__}")

    @property
    def parity_batch(self) -> int:
        """Random-input batch for the parity gate: 3 where the graph allows it, to check a batch > 1."""
        return min(3, self.max_batch)
