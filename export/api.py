"""`export_vision(cfg)`: the library call behind `vzedge export`.

Load -> wrap VisionZipEncoder (+ projector) -> ONNX (dynamo) -> onnxslim -> op check -> parity gate
-> optional TensorRT engine -> manifest, all inside a temp folder beside `cfg.out` that becomes
`cfg.out` only when every step passed.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vzedge._deps import require
from vzedge.encoder import VisionZipEncoder
from vzedge.export.config import INT8_DTYPES, ExportConfig
from vzedge.export.manifest import identity, identity_diff, tool_versions, write_manifest
from vzedge.export.onnx_export import (
    BATCH_DIM,
    BUCKET_OUTPUT,
    EXTERNAL_DATA_FILE,
    INPUT_NAME,
    MODEL_FILE,
    NEEDED_OUTPUT,
    OUTPUT_NAMES,
    AdaptiveVisionGraph,
    VisionGraph,
    bucket_output_names,
    export_onnx,
    graph_stats,
    slim_onnx,
)
from vzedge.export.opcheck import check_tensorrt_ops, visionzip_precision
from vzedge.export.parity import run_adaptive_gate, run_gate
from vzedge.io import atomic_dir, output_lock, sha256_file
from vzedge.manifest import read_manifest
from vzedge.select.adaptive import AdaptiveBudget

log = logging.getLogger(__name__)

TENSORRT_DIR = "tensorrt"
PARTIAL_SUFFIX = ".partial"


@dataclass
class ExportResult:
    out: Path
    manifest: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return self.manifest["parity"]


def _leftovers(out: Path) -> list[Path]:
    """Temp folders of interrupted exports to `out` (atomic_dir names them .NAME.*.partial)."""
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.*{PARTIAL_SUFFIX}"))


def check_output_dir(out: Path, want: dict[str, Any], force: bool) -> None:
    """Refuse an `out` we must not replace; raise before any expensive work."""
    leftovers = _leftovers(out)
    if leftovers:
        if not force:
            raise FileExistsError(
                f"a previous export to {out} was interrupted and left {', '.join(str(p) for p in leftovers)}; "
                "remove it, or pass --force to clean up and re-export"
            )
        for p in leftovers:
            log.warning("removing leftover of an interrupted export: %s", p)
            shutil.rmtree(p, ignore_errors=True)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()):
        # --force replaces only what vzedge made: a folder holding a vzedge manifest (exports reach --out whole,
        # through a temp folder, so a folder without one is someone else's and is never deleted).
        diff = identity_diff(identity(_vzedge_manifest(out)), want)
        if diff and not force:
            raise FileExistsError(
                f"{out} holds the export of a different model or config ({'; '.join(diff)}); "
                "pass --force to replace it, or choose another --out"
            )
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
    except OSError as err:
        raise ValueError(f"cannot write beside {out} ({err}); choose a writable --out") from err
    os.rmdir(probe)


def _vzedge_manifest(out: Path) -> dict[str, Any]:
    """The manifest of the vzedge export in `out`; FileExistsError if `out` holds files but is not one."""
    try:
        return read_manifest(out)
    except ValueError as err:
        raise FileExistsError(
            f"{out} holds files but no valid vzedge manifest, so it is not a vzedge export and --force will "
            f"not delete it ({err}). Choose another --out, or empty that folder yourself"
        ) from None


def _preprocess_spec(image_processor: Any, tower: Any) -> dict[str, Any]:
    """What the runtime must do to an RGB image before the graph, from the model's image processor."""
    mean, std = list(tower.image_mean), list(tower.image_std)
    resize: dict[str, Any] = {"mode": "exact", "size": [tower.image_size, tower.image_size], "resample": "bicubic"}
    crop = None
    rescale = 1 / 255
    if image_processor is not None:
        mean = [float(x) for x in getattr(image_processor, "image_mean", mean)]
        std = [float(x) for x in getattr(image_processor, "image_std", std)]
        rescale = float(getattr(image_processor, "rescale_factor", rescale))
        resample = getattr(image_processor, "resample", None)
        name = getattr(resample, "name", None) or {2: "BILINEAR", 3: "BICUBIC"}.get(resample, "BICUBIC")
        size = getattr(image_processor, "size", None)
        shortest = getattr(size, "shortest_edge", None) if size is not None else None
        if shortest is None and isinstance(size, dict):
            shortest = size.get("shortest_edge")
        if shortest:
            resize = {"mode": "shortest_edge", "size": int(shortest), "resample": name.lower()}
        else:
            h = getattr(size, "height", None) or (size or {}).get("height", tower.image_size)
            w = getattr(size, "width", None) or (size or {}).get("width", tower.image_size)
            resize = {"mode": "exact", "size": [int(h), int(w)], "resample": name.lower()}
        cs = getattr(image_processor, "crop_size", None)
        if getattr(image_processor, "do_center_crop", False) and cs is not None:
            ch = getattr(cs, "height", None) or cs.get("height")
            cw = getattr(cs, "width", None) or cs.get("width")
            crop = [int(ch), int(cw)]
    return {
        "resize": resize,
        "center_crop": crop,
        "rescale": rescale,
        "mean": mean,
        "std": std,
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }


def _parity_inputs(cfg: ExportConfig, loaded: Any, tower: Any) -> dict[str, torch.Tensor]:
    from vzedge.api import preprocess
    from vzedge.images import demo_image

    g = torch.Generator().manual_seed(cfg.parity_seed)
    shape = (cfg.parity_batch, tower.num_channels, tower.image_size, tower.image_size)
    image = preprocess(loaded, [demo_image(size=tower.image_size, seed=cfg.parity_seed)]).float()
    if image.dim() == 5:  # an anyres processor: [images, crops, C, H, W]; the graph sees the crops as a batch
        image = image.flatten(0, 1)[: cfg.max_batch]
    return {f"random_seed{cfg.parity_seed}": torch.randn(shape, generator=g), "demo_image": image}


def export_vision(cfg: ExportConfig) -> ExportResult:
    """Export `cfg.model`'s vision encoder with VisionZip as one ONNX graph into `cfg.out` (see ExportConfig).

    `cfg.out` is locked for the whole export: a second export to it fails at once instead of removing this
    one's temporary folder.
    """
    if not isinstance(cfg, ExportConfig):
        raise TypeError(f"cfg must be an ExportConfig, got {type(cfg).__name__}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} is a file; pass a folder path")
    if cfg.out.is_dir() and any(cfg.out.iterdir()):
        _vzedge_manifest(cfg.out)  # someone else's folder is refused before the model loads
    with output_lock(cfg.out):
        return _export_locked(cfg)


def _export_locked(cfg: ExportConfig) -> ExportResult:
    from vzedge.models.loading import load_model

    for module in ("onnx", "onnxruntime", "onnxscript", *(("onnxslim",) if cfg.slim else ())):
        require(module, "vzedge export")
    if cfg.trt:
        require("tensorrt", "building a TensorRT engine (--trt)")
    ort = require("onnxruntime", "the parity gate")

    loaded = load_model(cfg.model, revision=cfg.revision)
    # The graph is traced, and the parity gate's reference computed, in float32 whatever the checkpoint's dtype
    # (real LLaVA checkpoints are fp16/bf16); --dtype fp16 casts copies of these below. The LLM is not exported.
    loaded.vision.float()
    if loaded.projector is not None:
        loaded.projector.float()
    if cfg.projector and loaded.projector is None:
        raise ValueError(
            f"{cfg.model!r} is a bare vision encoder without a projector; drop --projector or export a LLaVA model"
        )
    if cfg.adaptive is not None and type(loaded.vlm).__name__.startswith(("LlavaNext", "LlavaOnevision")):
        raise ValueError(
            f"--adaptive exports single-crop (LLaVA-1.5-style) models; {cfg.model!r} is an anyres model whose crops "
            "would each get their own bucket: drop --adaptive and export a fixed --dominant/--contextual"
        )
    tuned = None
    if cfg.projector_weights is not None:
        from vzedge.models.projector import load_tuned_projector

        tuned = load_tuned_projector(cfg.projector_weights, loaded.vlm, cfg.visionzip)
    encoder = VisionZipEncoder(loaded.vision, cfg.visionzip).eval()  # raises on token counts that do not fit
    budget = cfg.adaptive
    # An adaptive export records the largest bucket's config as its `visionzip` (the worst case a reader sizes for).
    vz = encoder.bucket_config(max(budget.buckets)) if budget is not None else cfg.visionzip
    if budget is not None:
        for k in budget.buckets:
            encoder.bucket_config(k)  # every bucket must fit the tower, before the trace
    want = {
        "model": loaded.source,
        "revision": loaded.revision,
        "visionzip": vz.to_dict(),
        "projector": cfg.projector,
        "dtype": cfg.dtype,
        "opset": cfg.opset,
        "adaptive": _adaptive_identity(budget),
    }
    check_output_dir(cfg.out, want, cfg.force)

    projector = loaded.projector.eval() if cfg.projector and loaded.projector is not None else None
    reference = VisionGraph(encoder, projector).eval()
    if cfg.dtype == "fp16":
        half_vision = copy.deepcopy(loaded.vision).half()
        half_projector = copy.deepcopy(projector).half() if projector is not None else None
        if budget is not None:
            graph: VisionGraph | AdaptiveVisionGraph = AdaptiveVisionGraph(
                VisionZipEncoder(half_vision, cfg.visionzip), budget, half_projector
            ).eval()
        else:
            graph = VisionGraph(VisionZipEncoder(half_vision, cfg.visionzip), half_projector).eval()
    else:
        graph = AdaptiveVisionGraph(encoder, budget, projector).eval() if budget is not None else reference
    tower = encoder.tower
    out_width = projector[-1].out_features if projector is not None and hasattr(projector, "__getitem__") else None
    if out_width is None and projector is not None:
        with torch.no_grad():
            out_width = int(projector(torch.zeros(1, 1, tower.hidden_size)).shape[-1])

    with atomic_dir(cfg.out, replace=True) as tmp:
        onnx_path = tmp / MODEL_FILE
        # int8 starts from the (cleaned-up) fp32 graph in a side folder, so its file names cannot clash.
        int8 = cfg.dtype in INT8_DTYPES
        traced = tmp / "fp32" / MODEL_FILE if int8 else onnx_path
        traced.parent.mkdir(exist_ok=True)
        timing = export_onnx(graph, traced, cfg.opset, cfg.max_batch)
        slim = slim_onnx(traced, keep_matmul=int8) if cfg.slim else {"tool": None, "after": graph_stats(traced)}
        quantization = None
        if int8:
            quantization = _quantize(cfg, traced, onnx_path, encoder, loaded, tower)
            quantization["before"] = slim["after"]  # the graph it was quantized from, as measured above
            quantization["after"] = graph_stats(onnx_path)
            shutil.rmtree(traced.parent)

        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
        opcheck = check_tensorrt_ops(proto).to_dict()
        if cfg.dtype == "int8":
            opcheck["note"] = (
                "dynamic int8 graphs are for ONNX Runtime on CPU; TensorRT int8 engines come from int8-static exports"
            )
        precision = visionzip_precision(proto)
        _check_precision(precision, selects=encoder.selector.kept_count(cfg.visionzip) > 0)
        del proto

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        if budget is None:
            parity = run_gate(session, reference, _parity_inputs(cfg, loaded, tower), cfg.dtype)
        else:
            refs = {
                k: VisionGraph(VisionZipEncoder(loaded.vision, encoder.bucket_config(k)), projector).eval()
                for k in budget.buckets
            }
            outputs = {k: bucket_output_names(k) for k in budget.buckets}
            names = (BUCKET_OUTPUT, NEEDED_OUTPUT)
            inputs = _parity_inputs(cfg, loaded, tower)
            parity = run_adaptive_gate(session, refs, encoder, budget, outputs, names, inputs, cfg.dtype)
        del session

        trt_record = None
        if cfg.trt:
            trt_record = _build_trt(cfg, tmp, onnx_path, tower, opcheck)

        width = out_width or tower.hidden_size
        token_dtype = "float16" if cfg.dtype == "fp16" else "float32"
        if budget is None:
            kept_n = encoder.selector.kept_count(cfg.visionzip)
            outputs_spec = [
                {"name": OUTPUT_NAMES[0], "shape": [BATCH_DIM, cfg.visionzip.num_tokens, width], "dtype": token_dtype},
                {"name": OUTPUT_NAMES[1], "shape": [BATCH_DIM, kept_n], "dtype": "int64"},
            ]
            adaptive_record = None
        else:
            kept_n = encoder.selector.kept_count(vz)
            adaptive_record = _adaptive_record(encoder, budget)
            outputs_spec = [
                spec
                for b in reversed(adaptive_record["outputs"])  # the graph's order: largest bucket first
                for spec in (
                    {"name": b["tokens"], "shape": [BATCH_DIM, b["bucket"], width], "dtype": token_dtype},
                    {"name": b["kept_indices"], "shape": [BATCH_DIM, b["kept"]], "dtype": "int64"},
                )
            ]
            outputs_spec += [
                {"name": BUCKET_OUTPUT, "shape": [BATCH_DIM], "dtype": "int64"},
                {"name": NEEDED_OUTPUT, "shape": [BATCH_DIM], "dtype": "int64"},
            ]
        manifest = write_manifest(
            tmp,
            {
                "source": {
                    "model": cfg.model,
                    "source": loaded.source,
                    "revision": loaded.revision,
                    "family": tower.family,
                    "image_size": tower.image_size,
                    "patch_size": tower.patch_size,
                    "seq_len": tower.seq_len,
                    "num_layers": tower.num_layers,
                    "hidden_size": tower.hidden_size,
                    "output_width": width,
                },
                "visionzip": vz.to_dict(),
                "selector": {**encoder.selector.describe(), "kept_indices": kept_n},
                "adaptive": adaptive_record,
                "projector": cfg.projector,
                "projector_weights": tuned,
                "graph": {
                    "file": MODEL_FILE,
                    "external_data": EXTERNAL_DATA_FILE if (tmp / EXTERNAL_DATA_FILE).exists() else None,
                    "opset": cfg.opset,
                    "dtype": cfg.dtype,
                    "inputs": [
                        {
                            "name": INPUT_NAME,
                            "shape": [BATCH_DIM, tower.num_channels, tower.image_size, tower.image_size],
                            "dtype": "float32",
                        }
                    ],
                    "outputs": outputs_spec,
                    "batch": {"min": 1, "max": cfg.max_batch},
                },
                "preprocess": _preprocess_spec(loaded.image_processor, tower),
                "tools": tool_versions(),
                "export": timing,
                "slim": slim,
                "opcheck": opcheck,
                "precision": precision,
                "quantization": quantization,
                "parity": parity,
                "tensorrt": trt_record,
            },
        )
    log.info("export written to %s", cfg.out)
    return ExportResult(out=cfg.out, manifest=manifest)


def _adaptive_identity(budget: AdaptiveBudget | None) -> dict[str, Any] | None:
    """What of the adaptive budget makes two exports different artifacts (the manifest's identity)."""
    return None if budget is None else {"buckets": list(budget.buckets), "mass": budget.mass}


def _adaptive_record(encoder: VisionZipEncoder, budget: AdaptiveBudget) -> dict[str, Any]:
    """The manifest's `adaptive` block: the rule, and which graph outputs hold each bucket (ascending)."""
    outputs = []
    for k in budget.buckets:
        bcfg = encoder.bucket_config(k)
        tokens, kept = bucket_output_names(k)
        outputs.append(
            {
                "bucket": k,
                "dominant": bcfg.dominant,
                "contextual": bcfg.contextual,
                "kept": encoder.selector.kept_count(bcfg),
                "tokens": tokens,
                "kept_indices": kept,
            }
        )
    return {
        **budget.to_dict(),
        "outputs": outputs,
        "bucket_output": BUCKET_OUTPUT,
        "needed_output": NEEDED_OUTPUT,
        "selection": "every bucket is selected for every image (static shapes); the runtime keeps each image's own",
    }


def _quantize(
    cfg: ExportConfig, src: Path, dst: Path, encoder: VisionZipEncoder, loaded: Any, tower: Any
) -> dict[str, Any]:
    """The int8 graph of `cfg.dtype` from the slimmed fp32 graph `src` (see vzedge.export.quantize)."""
    if cfg.dtype == "int8":
        from vzedge.export.quantize import quantize_int8

        return quantize_int8(src, dst, encoder)
    from vzedge.export.calibration import calibration_set, quantize_int8_static

    calib = calibration_set(cfg.calib, cfg.calib_n, loaded, tower.image_size, cfg.max_batch)
    return quantize_int8_static(src, dst, encoder, calib, INPUT_NAME, cfg.max_batch)


def _check_precision(precision: dict[str, Any], selects: bool = True) -> None:
    """VisionZip's scoring, key norm and merge must be float32 in every graph (the core casts them); a selector
    that selects (all but pool) must have its TopK."""
    bad = {k: v for k, v in precision.items() if isinstance(v, list) and any("float32" not in t for t in v)}
    if bad or (selects and not precision["TopK"]):
        raise RuntimeError(f"VisionZip ops are not float32 in the exported graph: {precision}")
    if precision["Pow_in_norm"]:
        raise RuntimeError(f"the graph has a decomposed LayerNorm (Pow -> ReduceMean): {precision}")


def _build_trt(cfg: ExportConfig, tmp: Path, onnx_path: Path, tower: Any, opcheck: dict[str, Any]) -> dict[str, Any]:
    from vzedge.export.tensorrt import DEFAULT_WORKSPACE_MIB, TensorRTConfig, build_engine

    if not opcheck["ok"]:
        raise ValueError("the graph fails the TensorRT op check: " + "; ".join(opcheck["problems"]))
    trt_cfg = TensorRTConfig(
        onnx=onnx_path,
        cache_dir=tmp / TENSORRT_DIR,
        input_name=INPUT_NAME,
        input_shape=(tower.num_channels, tower.image_size, tower.image_size),
        max_batch=cfg.max_batch,
        onnx_dtype=cfg.dtype,
        # int8-static: int8 where the graph has Q/DQ, float32 elsewhere (VisionZip stays fp32, as in ORT).
        fp16=cfg.dtype != "int8-static",
        workspace_mib=cfg.trt_workspace_mib or DEFAULT_WORKSPACE_MIB,
    )
    return build_engine(trt_cfg, sha256_file(onnx_path))
