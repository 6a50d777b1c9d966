"""int8 versions of the fp32 graph: which MatMuls are the ViT's linear layers, and the dynamic (CPU) scheme.

Two schemes share one plan of which nodes to quantize (`plan_linear_layers`):

- `--dtype int8` (`quantize_int8`, ONNX Runtime's dynamic quantization): a weight MatMul becomes
  DynamicQuantizeLinear (activations to uint8, one scale per tensor, computed per call) + MatMulInteger against
  int8 weights (one scale per output channel); ORT fuses that into its int8 GEMM (VNNI / AMX on x86). For ORT's
  CPU provider only: TensorRT takes int8 as Q/DQ, not MatMulInteger.
- `--dtype int8-static` (vzedge.export.calibration): QuantizeLinear/DequantizeLinear around the same MatMuls,
  activation scales calibrated on images, for TensorRT (and ORT).

Everything else stays fp32: the patch embedding (Conv), LayerNorms, softmax and the attention products
(activation x activation); the selection layer's q and k projections, whose product *is* the VisionZip score,
and the merge keys (the same k weights); scoring, TopK, key normalisation, the merge and the projector.

Finding the layers. A linear layer in the graph is a MatMul (or a Gemm) whose second operand is a constant 2-D
weight; which torch Linear it is comes from the weight's content (sha256 of the [in, out] matrix, W^T, whatever
orientation the node stores it in), never from node or initializer names, which the exporter and onnxslim rewrite
(a static batch 1 graph names them `val_21_weight` and fuses MatMul + Add into Gemm with transB=1). The int8 paths
slim the graph without the Gemm fusions (`slim_onnx(..., keep_matmul=True)`), since ORT's dynamic quantizer only
rewrites MatMul.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vzedge._deps import require
from vzedge.encoder import VisionZipEncoder

log = logging.getLogger(__name__)

METHOD = "onnxruntime.quantization.quantize_dynamic"
# Ops that carry a linear layer's weight as their second input.
LINEAR_OPS = ("MatMul", "Gemm")
# Kept float32 in the selection layer: its q/k product is the VisionZip score, its k the merge keys.
SCORE_MODULES = ("q_proj", "k_proj")
FP32_REST = "patch embedding, LayerNorms, attention products, scoring, selection, merge, projector"


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def linear_weights(encoder: VisionZipEncoder, fp32_layers: tuple[int, ...] = ()) -> tuple[dict[str, str], set[str]]:
    """sha256 of every ViT-layer Linear weight as a MatMul stores it (W^T, [in, out], float32) -> module name
    ("layers.{i}.{path}"), and the names kept fp32: q_proj and k_proj of the selection layer, and every linear
    of the layers in `fp32_layers`."""
    tower = encoder.tower
    sel = encoder.layer_index
    by_digest: dict[str, str] = {}
    keep: set[str] = set()
    for i, layer in enumerate(tower.layers[: sel + 1]):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                full = f"layers.{i}.{name}"
                by_digest[_digest(mod.weight.detach().float().T.numpy())] = full
                if (i == sel and name.split(".")[-1] in SCORE_MODULES) or i in fp32_layers:
                    keep.add(full)
    return by_digest, keep


@dataclass
class LinearPlan:
    """Which graph nodes are which ViT linear layers, and which of them become int8.

    int8_nodes / fp32_nodes: node names (as they are in *this* graph) of the quantized and the kept layers;
    modules: module name -> the node names that carry its weight (CLIP's score projects the CLS row with the
    selection layer's q weight a second time)."""

    int8_nodes: list[str] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)
    int8_modules: set[str] = field(default_factory=set)
    fp32_modules: set[str] = field(default_factory=set)
    modules: dict[str, list[str]] = field(default_factory=dict)

    def islands(self) -> dict[str, dict[str, list[str]]]:
        """Per ViT layer: its linear sub-modules in int8 and in fp32 (the manifest's per-layer record)."""
        out: dict[str, dict[str, list[str]]] = {}
        for kind, names in (("int8", self.int8_modules), ("fp32", self.fp32_modules)):
            for name in names:
                _, idx, sub = name.split(".", 2)
                out.setdefault(f"layers.{idx}", {"int8": [], "fp32": []})[kind].append(sub)
        for entry in out.values():
            entry["int8"].sort()
            entry["fp32"].sort()
        return dict(sorted(out.items(), key=lambda kv: int(kv[0].split(".")[1])))


def _weight_of(node: Any, inits: dict[str, Any], numpy_helper: Any) -> np.ndarray | None:
    """The [in, out] weight of a linear node (MatMul B, or Gemm B honouring transB), or None if it has none."""
    if node.op_type not in LINEAR_OPS or len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = numpy_helper.to_array(inits[node.input[1]])
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
        if attrs.get("transA", 0):
            return None
        if attrs.get("transB", 0):
            w = w.T
    return w


def plan_linear_layers(model: Any, encoder: VisionZipEncoder, fp32_layers: tuple[int, ...] = ()) -> LinearPlan:
    """Find every ViT linear layer in `model` (an onnx.ModelProto with its weights loaded) by structure and
    weight content; RuntimeError if any is missing, so a changed exporter fails loudly instead of half-quantizing.
    fp32_layers: ViT layers whose linears all stay fp32 (besides the selection layer's q/k)."""
    onnx = require("onnx", "int8 export")
    by_digest, keep = linear_weights(encoder, fp32_layers)
    inits = {i.name: i for i in model.graph.initializer}
    plan = LinearPlan()
    for node in model.graph.node:
        w = _weight_of(node, inits, onnx.numpy_helper)
        if w is None or w.dtype != np.float32:
            continue
        module = by_digest.get(_digest(w))
        if module is None:  # the projector's weights or a non-layer matmul: stays fp32
            continue
        plan.modules.setdefault(module, []).append(node.name)
        if module in keep:
            plan.fp32_nodes.append(node.name)
            plan.fp32_modules.add(module)
        else:
            plan.int8_nodes.append(node.name)
            plan.int8_modules.add(module)
    expected = len(by_digest) - len(keep)
    if len(plan.int8_modules) != expected or plan.fp32_modules != keep:
        missing = sorted(set(by_digest.values()) - plan.int8_modules - plan.fp32_modules)
        raise RuntimeError(
            f"int8 export: found {len(plan.int8_modules)} of {expected} ViT linear weights in the graph "
            f"(missing {missing[:4]}...); a graph pass changed how weights are stored. Use --dtype fp32"
        )
    return plan


def quantize_int8(src: Path, dst: Path, encoder: VisionZipEncoder) -> dict[str, Any]:
    """Write the dynamic-int8 version of the fp32 graph `src` to `dst`; return the manifest's "quantization"."""
    onnx = require("onnx", "int8 export")
    quantization = require("onnxruntime.quantization", "int8 export")

    model = onnx.load(str(src))
    plan = plan_linear_layers(model, encoder)
    gemm = [n.name for n in model.graph.node if n.op_type == "Gemm" and n.name in plan.int8_nodes]
    if gemm:  # ORT's dynamic quantizer leaves Gemm alone; the exporter slims int8 graphs without Gemm fusion
        raise RuntimeError(f"int8 export: ViT linear layers fused into Gemm ({gemm[:3]}...); slim with keep_matmul")
    del model
    big = src.with_name(src.name + ".data").exists()
    t0 = time.perf_counter()
    log.info(
        "int8: quantizing %d weight MatMuls (%d ViT linear layers kept fp32)",
        len(plan.int8_nodes),
        len(plan.fp32_modules),
    )
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
            nodes_to_quantize=plan.int8_nodes,
            use_external_data_format=big,
        )
    finally:
        root.removeFilter(hint)
    seconds = time.perf_counter() - t0
    return {
        "scheme": "dynamic",
        "method": METHOD,
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "uint8, one scale and zero point per tensor, computed at run time",
        "int8_matmuls": len(plan.int8_nodes),
        "int8_modules": len(plan.int8_modules),
        "fp32_modules": sorted(plan.fp32_modules),
        "fp32_islands": plan.islands(),
        "fp32_rest": FP32_REST,
        "calibration": None,
        "seconds": round(seconds, 2),
        "target": "onnxruntime CPUExecutionProvider",
    }
