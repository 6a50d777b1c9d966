"""`--dtype int8-static`: explicit (Q/DQ) int8 of the ViT linear layers, activation scales calibrated on images.

What TensorRT builds int8 engines from, following its and ONNX Runtime's quantization guides:

- QDQ format (QuantizeLinear -> DequantizeLinear in front of each quantized MatMul), only around the ViT layers'
  linear MatMuls (`vzedge.export.quantize.plan_linear_layers`), so TensorRT fuses each into an int8 GEMM;
- symmetric int8 everywhere (TensorRT's scheme: zero points 0): weights int8 with one scale per output channel
  (axis 1 of the [in, out] MatMul weight), activations int8 with one scale per tensor;
- activation ranges from ORT's MinMax calibrator (`quantize_static` with a `CalibrationDataReader`) run on
  preprocessed images: `--calib DIR` or the built-in synthetic scenes (the training split of vzedge.synth);
- the first ViT layer stays fp32 (unless it is the selection layer): quantization-sensitive layers next to the
  input are left out, as the guides advise. Measured on a random ViT-L/14-336-shaped CLIP with 3 layers (2
  computed) and 8 calibration scenes, kept-index agreement on the demo image: 0.944 with layer 0 in int8, 0.981
  with it fp32 (there that leaves only layer 1 in int8), 0.963 keeping every fc2 fp32 instead, 0.944 with
  Percentile calibration instead of MinMax. On ViT-L's 23 computed layers it keeps 1/23 of the linears fp32;
- the selection layer's q/k projections (the VisionZip score and the merge keys) read the *unquantized* tensor:
  ORT's quantizer gives every reader of a tensor its Q/DQ pair, so `_restore_fp32_inputs` rewires those two back.
  Scoring, TopK, key normalisation, the merge and the projector are untouched fp32.

ORT's recommended pre-processing (`quant_pre_process`) is not run: the graph has been through onnxslim's shape
inference and constant folding already, and ORT's own graph optimizer would fuse LayerNorm/GELU into
`com.microsoft` ops, which TensorRT cannot parse.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzedge._deps import require
from vzedge.encoder import VisionZipEncoder
from vzedge.export.quantize import FP32_REST, _DropPreprocessHint, plan_linear_layers

log = logging.getLogger(__name__)

METHOD = "onnxruntime.quantization.quantize_static"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CALIB_SPLIT = "train"  # synthetic scenes from the training split: never the scenes the parity gate or eval use
CALIB_BATCH = 8  # images per calibration run (at most the graph's max batch)
CALIB_METHOD = "MinMax"  # ORT's default, and TensorRT Model Optimizer's for int8 ("max" calibration)
# ORT's MinMax calibrator adds ReduceMin/ReduceMax per tensor, so what it keeps per batch is scalars; its
# CalibMaxIntermediateOutputs option is not used: ORT 1.32 clears the kept batches there without folding them in.


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs [N, 3, H, W] (float32) and what the manifest records of them."""

    pixels: torch.Tensor
    source: str
    images: int

    def record(self) -> dict[str, Any]:
        x = np.ascontiguousarray(self.pixels.numpy(), dtype=np.float32)
        digest = hashlib.sha256(str(list(x.shape)).encode() + x.tobytes()).hexdigest()
        return {
            "source": self.source,
            "images": self.images,
            "count": int(x.shape[0]),  # graph inputs: anyres processors make several crops per image
            "sha256": digest,
            "method": CALIB_METHOD,
        }


def calibration_set(calib: Path | None, n: int, loaded: Any, image_size: int, max_batch: int) -> CalibrationSet:
    """`n` images from the folder `calib` (first n image files by name) or `n` synthetic scenes, preprocessed
    with the model's own processor, as the graph sees them."""
    from PIL import Image

    from vzedge.api import preprocess

    if calib is None:
        from vzedge.synth import make_scene, render, scene_seed

        images = [render(make_scene(scene_seed(0, CALIB_SPLIT, i)), size=image_size) for i in range(n)]
        source = f"vzedge.synth:{CALIB_SPLIT}:0-{n - 1}"
    else:
        files = sorted(p for p in Path(calib).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"--calib {calib} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images, or omit "
                "--calib for the built-in synthetic scenes"
            )
        if len(files) < n:
            log.warning("--calib %s has %d images, fewer than --calib-n %d: using all of them", calib, len(files), n)
        images = []
        for path in files[:n]:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except OSError as err:
                raise ValueError(f"cannot read calibration image {path}: {err}; remove it from --calib") from err
        source = str(Path(calib).resolve())
    pixels = preprocess(loaded, images).float()
    if pixels.dim() == 5:  # an anyres processor: [images, crops, C, H, W]; the graph sees crops as a batch
        pixels = pixels.flatten(0, 1)
    return CalibrationSet(pixels=pixels, source=source, images=len(images))


def static_fp32_layers(encoder: VisionZipEncoder) -> tuple[int, ...]:
    """ViT layers kept entirely fp32 in int8-static graphs: the first, unless it is the selection layer."""
    return (0,) if encoder.layer_index > 0 else ()


def _reader(input_name: str, pixels: torch.Tensor, batch: int) -> Any:
    quantization = require("onnxruntime.quantization", "int8-static export")

    class Reader(quantization.CalibrationDataReader):
        """Feeds the calibration set to ORT's calibrator in batches the graph accepts."""

        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: np.ascontiguousarray(pixels[i : i + batch].numpy(), dtype=np.float32)}
                for i in range(0, len(pixels), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return Reader()


def _restore_fp32_inputs(model: Any, nodes: set[str]) -> int:
    """Give the fp32 nodes back their unquantized inputs (X instead of DQ(Q(X))); drop Q/DQ nobody reads."""
    producers = {o: n for n in model.graph.node for o in n.output}
    restored = 0
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # an activation pair (weights have DQ only)
                node.input[k] = q.input[0]
                restored += 1
    while True:  # remove Q/DQ chains left without readers
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [
            n
            for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    return restored


def qdq_layout(model: Any) -> dict[str, Any]:
    """Which MatMul/Gemm nodes read int8 (a DequantizeLinear on both operands), and Q/DQ counts."""
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and all(
            (p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" for i in node.input[:2]
        ):
            quantized.append(node.name)
    ops = [n.op_type for n in model.graph.node]
    return {
        "int8_matmul_nodes": quantized,
        "QuantizeLinear": ops.count("QuantizeLinear"),
        "DequantizeLinear": ops.count("DequantizeLinear"),
    }


def quantize_int8_static(
    src: Path, dst: Path, encoder: VisionZipEncoder, calib: CalibrationSet, input_name: str, max_batch: int
) -> dict[str, Any]:
    """Write the static-QDQ int8 version of the fp32 graph `src` to `dst`; return the manifest's "quantization"."""
    onnx = require("onnx", "int8-static export")
    quantization = require("onnxruntime.quantization", "int8-static export")
    from vzedge.export.onnx_export import save_model

    model = onnx.load(str(src))
    plan = plan_linear_layers(model, encoder, static_fp32_layers(encoder))
    del model
    big = src.with_name(src.name + ".data").exists()
    t0 = time.perf_counter()
    log.info(
        "int8-static: calibrating %d inputs, Q/DQ on %d weight MatMuls (%d ViT linear layers kept fp32)",
        len(calib.pixels),
        len(plan.int8_nodes),
        len(plan.fp32_modules),
    )
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)  # see the module docstring: ORT's pre-processing would add ops TensorRT cannot parse
    try:
        quantization.quantize_static(
            str(src),
            str(dst),
            _reader(input_name, calib.pixels, min(CALIB_BATCH, max_batch)),
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=plan.int8_nodes,
            per_channel=True,
            reduce_range=False,
            activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=getattr(quantization.CalibrationMethod, CALIB_METHOD),
            use_external_data_format=big,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
    finally:
        root.removeFilter(hint)
    seconds = time.perf_counter() - t0
    model = onnx.load(str(dst))
    restored = _restore_fp32_inputs(model, set(plan.fp32_nodes))
    layout = qdq_layout(model)
    if sorted(layout["int8_matmul_nodes"]) != sorted(plan.int8_nodes):
        raise RuntimeError(
            f"int8-static export: {len(layout['int8_matmul_nodes'])} MatMuls read Q/DQ int8, expected the "
            f"{len(plan.int8_nodes)} ViT linear layers; use --dtype int8 or fp32"
        )
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)
    save_model(model, dst)
    return {
        "scheme": "static-qdq",
        "method": METHOD,
        "weights": "int8, symmetric, one scale per output channel (axis 1 of the [in, out] MatMul weight)",
        "activations": "int8, symmetric, one scale per tensor, calibrated (MinMax)",
        "int8_matmuls": len(plan.int8_nodes),
        "int8_modules": len(plan.int8_modules),
        "fp32_modules": sorted(plan.fp32_modules),
        "fp32_islands": plan.islands(),
        "fp32_inputs_restored": restored,
        "fp32_rest": FP32_REST,
        "qdq_nodes": {"QuantizeLinear": layout["QuantizeLinear"], "DequantizeLinear": layout["DequantizeLinear"]},
        "calibration": calib.record(),
        "seconds": round(seconds, 2),
        "target": "TensorRT (explicit int8) and onnxruntime",
    }
