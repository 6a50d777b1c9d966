"""manifest.json: the contract between an export and the runtime that loads it.

Plain JSON, read by the runtime without importing the exporter. Schema (version 1)::

    schema            "vzedge.vision-graph"
    schema_version    1
    created           ISO-8601 UTC time of the export
    source            {model, source, revision, family, image_size, patch_size, seq_len, num_layers,
                       hidden_size, output_width}
    visionzip         {dominant, contextual, layer, merge}; num_tokens = dominant + contextual
    projector         true if tokens are already in the LLM's embedding width
    graph             {file, external_data (file name or null), opset, dtype ("fp32"|"fp16"|"int8"|"int8-static":
                       the ViT layers; VisionZip scoring and merge are float32 in all),
                       inputs/outputs: [{name, shape (ints, "batch" for the dynamic dim), dtype}],
                       batch: {min, max}}
    preprocess        {resize: {mode: "shortest_edge"|"exact", size, resample}, center_crop: [h, w] or null,
                       rescale, mean, std, channel_order "RGB", layout "NCHW", dtype "float32"}
    tools             versions of python, torch, transformers, onnx, onnxruntime, onnxscript, onnxslim, vzedge
    slim, opcheck, precision   graph clean-up figures, the TensorRT op check, fp32 island dtypes
    quantization      null, or (int8, int8-static) {scheme ("dynamic"|"static-qdq"), method, weights, activations,
                       int8_matmuls, int8_modules, fp32_modules, fp32_islands ({"layers.i": {int8, fp32}} per ViT
                       layer), fp32_rest, calibration (null, or {source, images, count, sha256, method}), target,
                       before/after {nodes, bytes}}
    adaptive          null, or (--adaptive) {buckets (ascending), mass, rule, outputs: [{bucket, dominant, contextual,
                       kept, tokens, kept_indices (output names)}], bucket_output, needed_output, selection}; the
                       graph's outputs are then each bucket's tokens and kept_indices, largest bucket first, then
                       bucket [batch] int64 (index into buckets) and needed_tokens [batch] int64; `visionzip` and
                       graph.outputs[0] describe the largest bucket (the worst case)
    parity            the gate's thresholds and figures (see vzedge.export.parity); adaptive: results per input
                       and bucket ("name@K") and `buckets` (the in-graph bucket index against forward_adaptive)
    tensorrt          null, or {engine, key, tensorrt_version, gpu, fp16, profile, workspace_mib}
    files             {relative path: {sha256, bytes}} for every file of the export but manifest.json

The runtime must refuse a folder whose files do not match `files` (`vzedge.manifest.verify_files`).
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

from vzedge.io import sha256_file, write_json

# The reader and verifier live in the core so the runtime uses them without importing the exporter.
from vzedge.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION

_IDENTITY_KEYS = ("model", "revision", "visionzip", "projector", "dtype", "opset", "adaptive")


def tool_versions() -> dict[str, str | None]:
    """Versions of the tools that shaped the graph (None where a tool is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxslim", "vzedge"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` except the manifest, by POSIX relative path."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST_NAME:
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def write_manifest(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Complete `data` with schema, time and the file table, and write it to folder/manifest.json."""
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **data,
        "files": file_table(folder),
    }
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two exports the same artifact: model, revision, VisionZip config, projector, dtype, opset."""
    graph = manifest.get("graph", {})
    source = manifest.get("source", {})
    return {
        "model": source.get("source"),
        "revision": source.get("revision"),
        "visionzip": manifest.get("visionzip"),
        "projector": manifest.get("projector"),
        "dtype": graph.get("dtype"),
        "opset": graph.get("opset"),
        "adaptive": _adaptive_identity(manifest.get("adaptive")),
    }


def _adaptive_identity(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, dict):
        return None
    return {"buckets": block.get("buckets"), "mass": block.get("mass")}


def identity_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in _IDENTITY_KEYS if a.get(k) != b.get(k)]
