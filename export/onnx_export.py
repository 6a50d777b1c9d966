"""The ONNX writer: trace VisionZipEncoder (plus the projector) into one graph, then clean it up.

The graph is the encoder object itself, traced by torch.export (the dynamo ONNX exporter), not a
reimplementation. The TorchScript exporter is not used: it lowers scatter-with-reduction to a
ScatterElements without reduction and gives silently wrong output.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vzedge._deps import require
from vzedge.encoder import VisionZipEncoder
from vzedge.export.opcheck import constant_tensors
from vzedge.select.adaptive import AdaptiveBudget

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("tokens", "kept_indices")
BATCH_DIM = "batch"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot serialise a message over 2 GiB: bigger graphs keep their weights in EXTERNAL_DATA_FILE.
PROTOBUF_LIMIT = 2 * 1024**3
NATIVE_OPSET = 18  # what torch.onnx's dynamo exporter emits
# Reductions whose `axes` moved from an attribute to an input in opset 18 (ReduceSum did so in 13).
_AXES_INPUT_SINCE_18 = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)
# Ops whose opset-18 form has inputs/attributes opset 17 lacks, which this downgrade does not rewrite.
_CHANGED_IN_18 = frozenset({"Split", "Pad", "Resize", "ScatterND", "CenterCropPad", "Col2Im", "GroupNormalization"})


class VisionGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> (tokens [B, K, D or D_llm], kept_indices [B, dominant]).

    A thin wrapper so the exported function returns a plain tuple; the math is the encoder's.
    """

    def __init__(self, encoder: VisionZipEncoder, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(pixel_values)
        tokens = out.tokens
        if self.projector is not None:
            tokens = self.projector(tokens)
        return tokens, out.kept_indices


BUCKET_OUTPUT = "bucket"
NEEDED_OUTPUT = "needed_tokens"


def bucket_output_names(k: int) -> tuple[str, str]:
    """The adaptive graph's (tokens, kept_indices) outputs of bucket `k`."""
    return f"tokens_{k}", f"kept_indices_{k}"


class AdaptiveVisionGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> for each bucket K, largest first: tokens [B, K, D or D_llm], kept_indices;
    then bucket [B] int64 (index into the ascending `budget.buckets`) and needed_tokens [B] int64.

    One graph, static shapes: the encoder layers run once, the selector once per bucket on every image
    (`VisionZipEncoder.forward_buckets`), and the bucket is chosen in-graph by `AdaptiveBudget`'s rule. The
    largest bucket comes first so that a reader that knows only `outputs[0]` sizes for the worst case."""

    def __init__(self, encoder: VisionZipEncoder, budget: AdaptiveBudget, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.budget = budget
        self.projector = projector

    @property
    def output_names(self) -> list[str]:
        names = [n for k in sorted(self.budget.buckets, reverse=True) for n in bucket_output_names(k)]
        return [*names, BUCKET_OUTPUT, NEEDED_OUTPUT]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs, bucket, needed = self.encoder.forward_buckets(pixel_values, self.budget)
        flat: list[torch.Tensor] = []
        for out in reversed(outs):  # largest bucket first
            tokens = self.projector(out.tokens) if self.projector is not None else out.tokens
            flat += [tokens, out.kept_indices]
        return (*flat, bucket, needed)


def export_onnx(graph: VisionGraph | AdaptiveVisionGraph, path: Path, opset: int, max_batch: int) -> dict[str, Any]:
    """Write `graph` to `path` (weights beside it as external data when over 2 GiB). Returns timing info."""
    require("onnxscript", "ONNX export")
    tower = graph.encoder.tower
    dtype = graph.encoder.dtype
    # Example batch 2, not 1: torch.export specialises size-1 dims, which would pin the batch.
    example_batch = 2 if max_batch >= 2 else 1
    example = torch.randn(example_batch, tower.num_channels, tower.image_size, tower.image_size)
    dynamic_shapes = None
    if max_batch >= 2:
        dynamic_shapes = {"pixel_values": {0: torch.export.Dim(BATCH_DIM, min=1, max=max_batch)}}
    log.info("tracing %s (%s, opset %d, batch 1..%d)", type(tower.module).__name__, dtype, opset, max_batch)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore", category=FutureWarning)
        program = torch.onnx.export(
            graph.eval(),
            (example,),
            dynamo=True,
            # The exporter's native opset; older ones are written by `downgrade_opset` below (onnx's version
            # converter, which torch.onnx would use, fails 18 -> 17 on ReduceMean with axes as an input).
            opset_version=max(opset, NATIVE_OPSET),
            input_names=[INPUT_NAME],
            output_names=graph.output_names if isinstance(graph, AdaptiveVisionGraph) else list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    seconds = time.perf_counter() - t0
    model = program.model_proto
    if opset < NATIVE_OPSET:
        model = downgrade_opset(model, opset)
    save_model(model, path)
    log.info("exported %s in %.1f s", path.name, seconds)
    return {"export_seconds": round(seconds, 2)}


def downgrade_opset(model: Any, opset: int) -> Any:
    """Rewrite an opset-18 graph as opset `opset` (17): reductions get their constant `axes` back as an
    attribute. Ops whose opset-18 form this does not handle are refused with a message, never guessed."""
    onnx = require("onnx", "ONNX export")
    from onnx import numpy_helper

    if opset != 17:
        raise ValueError(f"opset {opset}: only 17 (TensorRT 8.6) is written by downgrading; use --opset 17 or 18")
    # Tensor protos by name, converted only where read: the axes are a few int64s, the weights a gigabyte.
    constants = constant_tensors(model)
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _CHANGED_IN_18:
            problems.append(f"{node.op_type} ({node.name})")
        elif node.op_type == "ScatterElements" and any(
            a.name == "reduction" and a.s in (b"max", b"min") for a in node.attribute
        ):
            problems.append(f"ScatterElements with max/min reduction ({node.name})")
        elif node.op_type in _AXES_INPUT_SINCE_18:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axes = node.input[1] if len(node.input) > 1 and node.input[1] else None
            if axes is not None and axes not in constants:
                problems.append(f"{node.op_type} with computed axes ({node.name})")
                continue
            values = numpy_helper.to_array(constants[axes]).ravel() if axes is not None else None
            if attrs.get("noop_with_empty_axes", 0) and (values is None or values.size == 0):
                problems.append(f"{node.op_type} with noop_with_empty_axes ({node.name})")
                continue
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            del node.attribute[:]
            node.attribute.extend(keep)
            if values is not None:
                node.attribute.append(onnx.helper.make_attribute("axes", [int(v) for v in values]))
                del node.input[1:]
    if problems:
        raise ValueError(
            f"cannot write this graph as opset {opset}: {', '.join(problems)} use opset-18 features; "
            f"use --opset {NATIVE_OPSET} (TensorRT 10 reads it)"
        )
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    onnx.checker.check_model(model)
    return model


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """onnxscript/onnx_ir log every rewrite at INFO; keep `vzedge -v` output to our own progress lines."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def save_model(model: Any, path: Path) -> None:
    """Save a ModelProto, with external data when its weights would pass protobuf's 2 GiB limit."""
    onnx = require("onnx", "ONNX export")
    big = _initializer_bytes(model) > PROTOBUF_LIMIT - 64 * 1024**2
    data = path.with_name(EXTERNAL_DATA_FILE)
    if data.exists():
        data.unlink()
    if big:
        log.info("weights exceed 2 GiB: saving them to %s", data.name)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(path))


def _initializer_bytes(model: Any) -> int:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.raw_data else 0
        for entry in init.external_data:
            if entry.key == "length":
                total += int(entry.value)
    return total


def graph_stats(path: Path) -> dict[str, int]:
    """Node count and bytes on disk (graph + external data) of the ONNX model at `path`."""
    onnx = require("onnx", "ONNX export")
    model = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size
    data = path.with_name(EXTERNAL_DATA_FILE)
    if data.exists():
        size += data.stat().st_size
    return {"nodes": len(model.graph.node), "bytes": size}


# onnxslim's MatMul (+ Add, + Mul) -> Gemm fusions, applied where the batch is static (a 2-D MatMul input).
GEMM_FUSIONS = ("FusionGemm", "FusionGemmAdd", "FusionGemmMul")


def slim_onnx(path: Path, keep_matmul: bool = False) -> dict[str, Any]:
    """Clean the graph up in place with onnxslim (constant folding, dead nodes, fusions); report before/after.

    keep_matmul: skip the Gemm fusions, so every linear layer stays MatMul (+ Add) at every batch size: what
    the int8 paths quantize (ORT's dynamic quantizer rewrites MatMul only)."""
    onnx = require("onnx", "ONNX graph clean-up")
    onnxslim = require("onnxslim", "ONNX graph clean-up")
    before = graph_stats(path)
    t0 = time.perf_counter()
    model = onnx.load(str(path))
    slimmed = onnxslim.slim(model, skip_fusion_patterns=list(GEMM_FUSIONS)) if keep_matmul else onnxslim.slim(model)
    if slimmed is None:
        raise RuntimeError(f"onnxslim returned no model for {path}")
    save_model(slimmed, path)
    after = graph_stats(path)
    log.info(
        "onnxslim: %d -> %d nodes, %.1f -> %.1f MB in %.1f s",
        before["nodes"],
        after["nodes"],
        before["bytes"] / 1e6,
        after["bytes"] / 1e6,
        time.perf_counter() - t0,
    )
    return {"tool": "onnxslim", "before": before, "after": after, "skipped": list(GEMM_FUSIONS) if keep_matmul else []}
