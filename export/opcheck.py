"""Static checks of an exported graph against what TensorRT's ONNX parser takes, runnable without TensorRT.

In the spirit of `polygraphy inspect capability`, but from data: the operator list below is the
intersection of the support matrices in onnx/onnx-tensorrt `docs/operators.md` for the TensorRT 8.6
(release/8.6-GA, "supports operators up to Opset 17") and 10.0 (release/10.0-GA, "opset 9 to opset 20")
branches, restricted to ops a ViT + VisionZip graph can contain. It checks:

- every node is an ONNX-domain op in that list (no custom domains, no ORT contrib ops);
- Q/DQ (explicit int8): constant scales, int8 zero points of 0, per-channel scales on weights only;
- TopK's K is a constant (the matrix: "`K` input must be an initializer") and its input is FP32/FP16,
  the types the 8.x matrix lists for TopK and ArgMax;
- the opset each TensorRT version parses.

It also reports the precision of the VisionZip part (`visionzip_precision`): scoring, key normalisation
and the merge must be float32 inside fp16 graphs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# onnx/onnx-tensorrt docs/operators.md, ops marked Y in both the 8.6 and 10.0 matrices (subset).
TENSORRT_ONNX_OPS: frozenset[str] = frozenset(
    """
    Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv
    Cos CumSum DequantizeLinear Div Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool Greater GreaterOrEqual HardSigmoid Identity If InstanceNormalization LayerNormalization
    LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mul Neg Not Or Pad Pow QuantizeLinear Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ScatterElements ScatterND Shape Sigmoid Sign Sin Size Slice Softmax
    Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor
    """.split()  # noqa: SIM905  (one op per word reads like the source table)
)
# Gelu is an ONNX op from opset 20 only; TensorRT 10 parses it, 8.6 never sees it (its opset is <= 17).
# QuantizeLinear/DequantizeLinear: TensorRT's explicit quantization. Both matrices restrict them to constant
# scales and zero points of 0 (symmetric int8), and per-channel (`axis`) scales to weights, not activations.
QDQ_OPS: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear"})
_INT8 = 3  # onnx.TensorProto.INT8

# Highest opset each TensorRT ONNX parser reads (the same documents).
TENSORRT_MAX_OPSET: dict[str, int] = {"8.6": 17, "10": 20}

# Input types the 8.x matrix lists for the selection ops (TensorRT 10 adds integer types).
FLOAT_ONLY_OPS: frozenset[str] = frozenset({"TopK", "ArgMax", "ArgMin"})
_FLOAT_TYPES = {1: "float32", 10: "float16"}
_TYPE_NAMES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}


@dataclass
class OpCheckReport:
    """What the static check found. `problems` empty means the graph passes for all `tensorrt_versions`."""

    opset: int
    op_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)
    tensorrt_versions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "opset": self.opset,
            "tensorrt_versions": self.tensorrt_versions,
            "problems": self.problems,
            "op_counts": dict(sorted(self.op_counts.items())),
            "source": "onnx/onnx-tensorrt docs/operators.md (8.6-GA, 10.0-GA)",
        }


def _opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the model imports no ONNX-domain opset")


def _constants(model: Any) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def constant_tensors(model: Any) -> dict[str, Any]:
    """Tensor protos by name: the initializers and the `value` of Constant nodes (not converted to numpy)."""
    tensors = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    return tensors


def _elem_types(model: Any) -> dict[str, int]:
    """Element type of every tensor, from shape inference (names absent where inference could not type them)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def check_tensorrt_ops(model: Any) -> OpCheckReport:
    """Check `model` (an onnx.ModelProto; external data need not be loaded) against TensorRT's ONNX parser."""
    opset = _opset(model)
    counts = Counter(node.op_type for node in model.graph.node)
    report = OpCheckReport(opset=opset, op_counts=dict(counts))
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            report.problems.append(f"{node.name or node.op_type}: op {node.domain}::{node.op_type} is not ONNX-domain")
    for op in sorted(set(counts) - TENSORRT_ONNX_OPS):
        report.problems.append(f"op {op} ({counts[op]}x) is not in TensorRT's ONNX operator list")
    constants = _constants(model)
    types = _elem_types(model)
    for node in model.graph.node:
        if node.op_type == "TopK" and (len(node.input) < 2 or node.input[1] not in constants):
            report.problems.append(f"{node.name}: TopK K is computed at run time; TensorRT needs it constant")
        if node.op_type in FLOAT_ONLY_OPS:
            t = types.get(node.input[0])
            if t not in _FLOAT_TYPES:
                report.problems.append(
                    f"{node.name}: {node.op_type} on {_TYPE_NAMES.get(t, t)}; TensorRT 8.6 takes FP32/FP16 only"
                )
    report.problems += _qdq_problems(model, constants)
    report.tensorrt_versions = [v for v, top in TENSORRT_MAX_OPSET.items() if opset <= top]
    if not report.tensorrt_versions:
        report.problems.append(f"opset {opset} is newer than every TensorRT parser listed ({TENSORRT_MAX_OPSET})")
    return report


def _qdq_problems(model: Any, constants: set[str]) -> list[str]:
    """What TensorRT's parser refuses in Q/DQ nodes: computed scales, non-int8 or non-zero zero points, a
    per-channel scale on an activation (only constant weights may have one)."""
    from onnx import numpy_helper

    tensors = constant_tensors(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        where = f"{node.name or node.op_type}"
        if len(node.input) < 2 or node.input[1] not in constants:
            problems.append(f"{where}: {node.op_type} scale is computed; TensorRT needs a constant scale")
            continue
        if len(node.input) > 2 and node.input[2]:
            zp = tensors.get(node.input[2])
            if zp is None:
                problems.append(f"{where}: {node.op_type} zero point is computed; TensorRT needs a constant 0")
            elif zp.data_type != _INT8 or numpy_helper.to_array(zp).any():
                problems.append(f"{where}: {node.op_type} zero point is not int8 0 (TensorRT is symmetric int8)")
        scale = tensors.get(node.input[1])
        per_channel = scale is not None and numpy_helper.to_array(scale).size > 1
        if per_channel and not (node.op_type == "DequantizeLinear" and node.input[0] in tensors):
            problems.append(f"{where}: per-channel {node.op_type} on an activation; TensorRT takes it on weights only")
    return problems


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _reaches(name: str, producers: dict[str, Any], target: str, through: set[str], depth: int = 6) -> bool:
    node = producers.get(name)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type == target:
            return True
        if node.op_type not in through:
            return False
        node = producers.get(node.input[0])
    return False


def visionzip_precision(model: Any) -> dict[str, Any]:
    """Element types at the VisionZip ops: TopK and ArgMax inputs, the key norm (ReduceL2), the merge MatMul
    (one operand a one-hot from Equal); plus the Pow counts (an fp16 Pow in a decomposed LayerNorm overflows
    on Jetson; Pow_in_norm counts those)."""
    types = _elem_types(model)
    producers = _producers(model)
    name = lambda t: _TYPE_NAMES.get(t, str(t))  # noqa: E731
    out: dict[str, list[str]] = {"TopK": [], "ArgMax": [], "ReduceL2": [], "merge_MatMul": []}
    for node in model.graph.node:
        if node.op_type in ("ArgMax", "ReduceL2"):
            out[node.op_type].append(name(types.get(node.input[0])))
        elif node.op_type == "TopK":
            out["TopK"].append(name(types.get(node.input[0])))
        elif node.op_type == "MatMul" and any(
            _reaches(i, producers, "Equal", {"Transpose", "Cast", "Unsqueeze", "Reshape"}) for i in node.input
        ):
            out["merge_MatMul"].append("/".join(name(types.get(i)) for i in node.input))
    counts = Counter(node.op_type for node in model.graph.node)
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.op_type)
    # A decomposed LayerNorm squares (x - mean) with Pow and averages it: Pow -> ReduceMean. A tanh-GELU's x**3
    # (SigLIP's MLP) is a Pow too, but not this pattern.
    norm_pow = sum(
        1
        for node in model.graph.node
        if node.op_type == "Pow" and any(c == "ReduceMean" for o in node.output for c in consumers.get(o, []))
    )
    return {
        **out,
        "Pow": counts.get("Pow", 0),
        "Pow_in_norm": norm_pow,
        "LayerNormalization": counts.get("LayerNormalization", 0),
    }
