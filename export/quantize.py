"""`--dtype int8`: the fp32 graph with the ViT layers' linear weights in int8, for ONNX Runtime on CPU.

ONNX Runtime's dynamic quantization (`onnxruntime.quantization.quantize_dynamic`) rewrites a weight MatMul
as DynamicQuantizeLinear (activations to uint8, one scale per tensor, computed per call) + MatMulInteger
against int8 weights (one scale per output channel) + a float rescale; ORT fuses that into its int8 GEMM,
which uses VNNI / AMX on x86 CPUs that have them. Everything else stays fp32:

- the patch embedding (Conv), LayerNorms, softmax and the attention products (activation x activation);
- the selection layer's q and k projections, whose product *is* the VisionZip score, and the merge keys
  (the same k weights): selection and merge see fp32 arithmetic on the int8 layers' output;
- scoring, TopK, key normalisation, the merge, and the projector (it runs on K tokens only: cheap).

Which weight is which module is found by content (each initializer against the torch Linear weights),
not by node names, which the exporter and onnxslim rewrite. The graph is for ORT's CPU provider:
TensorRT takes int8 as Q/DQ with calibration, not MatMulInteger, so `--trt` needs --dtype fp16 or fp32.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vzedge._deps import require
from vzedge.encoder import VisionZipEncoder

log = logging.getLogger(__name__)

METHOD = "onnxruntime.quantization.quantize_dynamic"


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def linear_weights(encoder: VisionZipEncoder) -> tuple[dict[str, str], set[str]]:
    """sha256 of every ViT-layer Linear weight as an ONNX MatMul stores it (W^T, float32) -> module name, and
    the names kept fp32: q_proj and k_proj of the selection layer (the score, and the merge keys)."""
    tower = encoder.tower
    sel = encoder.layer_index
    by_digest: dict[str, str] = {}
    keep: set[str] = set()
    for i, layer in enumerate(tower.layers[: sel + 1]):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                full = f"layers.{i}.{name}"
                by_digest[_digest(mod.weight.detach().float().T.numpy())] = full
                if i == sel and name.split(".")[-1] in ("q_proj", "k_proj"):
                    keep.add(full)
    return by_digest, keep


def quantize_int8(src: Path, dst: Path, encoder: VisionZipEncoder) -> dict[str, Any]:
    """Write the int8 version of the fp32 graph `src` to `dst`; return the manifest's "quantization" record."""
    onnx = require("onnx", "int8 export")
    quantization = require("onnxruntime.quantization", "int8 export")

    by_digest, keep = linear_weights(encoder)
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    to_int8: list[str] = []
    int8_modules: set[str] = set()
    fp32_modules: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        module = by_digest.get(_digest(onnx.numpy_helper.to_array(inits[node.input[1]])))
        if module is None:  # the projector's weights or a non-layer matmul: stays fp32
            continue
        if module in keep:
            fp32_modules.add(module)
        else:
            to_int8.append(node.name)
            int8_modules.add(module)
    expected = len(by_digest) - len(keep)
    if len(int8_modules) != expected or fp32_modules != keep:
        missing = sorted(set(by_digest.values()) - int8_modules - fp32_modules)
        raise RuntimeError(
            f"int8 export: found {len(int8_modules)} of {expected} ViT linear weights in the graph "
            f"(missing {missing[:4]}...); the exporter changed how it stores weights. Use --dtype fp32"
        )
    del model
    big = src.with_name(src.name + ".data").exists()
    t0 = time.perf_counter()
    log.info("int8: quantizing %d weight MatMuls (%d ViT linear layers kept fp32)", len(to_int8), len(keep))
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)  # its advice is for calibrated static quantization, not this weight-only dynamic path
    try:
        quantization.quantize_dynamic(
            str(src),
            str(dst),
            weight_type=quantization.QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=to_int8,
            use_external_data_format=big,
        )
    finally:
        root.removeFilter(hint)
    seconds = time.perf_counter() - t0
    return {
        "method": METHOD,
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "uint8, one scale and zero point per tensor, computed at run time",
        "int8_matmuls": len(to_int8),
        "int8_modules": len(int8_modules),
        "fp32_modules": sorted(fp32_modules),
        "fp32_rest": "patch embedding, LayerNorms, attention products, scoring, selection, merge, projector",
        "seconds": round(seconds, 2),
        "target": "onnxruntime CPUExecutionProvider",
    }
