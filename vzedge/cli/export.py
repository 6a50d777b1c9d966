"""`vzedge export`: the vision encoder with VisionZip as one ONNX graph (+ TensorRT)."""

from __future__ import annotations

import argparse
import json
import sys

from vzedge.cli._common import adaptive_budget, add_adaptive_args, add_visionzip_args, visionzip_config


def _cmd_export(args: argparse.Namespace) -> int:
    from vzedge.export import ExportConfig, ParityError, export_vision

    cfg = ExportConfig(
        model=args.model,
        out=args.out,
        visionzip=visionzip_config(args),
        projector=args.projector is not False,
        projector_weights=args.projector if isinstance(args.projector, str) else None,
        dtype=args.dtype,
        opset=args.opset,
        max_batch=args.max_batch,
        trt=args.trt,
        trt_workspace_mib=args.trt_workspace_mib,
        force=args.force,
        revision=args.revision,
        calib=args.calib,
        calib_n=args.calib_n,
        adaptive=adaptive_budget(args),
    )
    try:
        result = export_vision(cfg)
    except ParityError as err:
        print(f"vzedge export: {err}; nothing was written to {cfg.out}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.manifest, indent=2))
        return 0
    m = result.manifest
    graph, tokens = m["graph"], m["graph"]["outputs"][0]
    print(f"wrote {result.out}: {graph['file']} {graph['dtype']} opset {graph['opset']}, tokens {tokens['shape']}")
    if ad := m.get("adaptive"):
        print(
            f"adaptive    buckets {ad['buckets']} (mass {ad['mass']}): one graph, each bucket's tokens an output, "
            f"the bucket chosen in-graph ({ad['bucket_output']})"
        )
        for b in m["parity"]["buckets"]:
            print(f"parity      {b['inputs']}: buckets {b['bucket']} (forward_adaptive {b['reference_bucket']})")
    slim = m["slim"]
    if slim.get("before"):
        print(
            f"onnxslim    {slim['before']['nodes']} -> {slim['after']['nodes']} nodes, "
            f"{slim['before']['bytes'] / 1e6:.1f} -> {slim['after']['bytes'] / 1e6:.1f} MB"
        )
    for r in m["parity"]["results"]:
        print(
            f"parity      {r['inputs']} (batch {r['batch']}): max|diff| {r['max_abs_diff']:.2e}, "
            f"cosine min {r['min_cosine']:.6f}, kept agreement {r['index_agreement']:.4f}"
        )
    op = m["opcheck"]
    print(
        f"tensorrt    op check {'ok' if op['ok'] else 'FAILED: ' + '; '.join(op['problems'])} "
        f"(parsers: {', '.join(op['tensorrt_versions']) or 'none'})"
    )
    if q := m["quantization"]:
        cal = q.get("calibration")
        where = f", calibrated on {cal['count']} inputs ({cal['source']})" if cal else ""
        print(f"int8        {q['scheme']}: {q['int8_modules']} linear layers int8, fp32 {q['fp32_modules']}{where}")
    if trt := m["tensorrt"]:
        print(f"tensorrt    engine {trt['engine']} ({trt['tensorrt_version']}, {trt['gpu']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the vision encoder with VisionZip as one ONNX graph (+ TensorRT)")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--out", required=True, help="folder to write model.onnx and manifest.json to")
    p.add_argument(
        "--projector",
        nargs="?",
        const=True,
        default=False,
        metavar="TUNED_DIR",
        help="include the LLaVA projector (tokens in the LLM width); with a `vzedge tune` folder, its tuned weights",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "int8", "int8-static"),
        default="fp32",
        help="fp32 (default); fp16 (GPU, TensorRT); int8: ViT linear layers int8 with run-time activation scales, "
        "for ONNX Runtime on CPU; int8-static: Q/DQ int8 calibrated on images, for TensorRT (and ORT)",
    )
    p.add_argument(
        "--calib",
        default=None,
        metavar="DIR",
        help="int8-static: a folder of images to calibrate activation scales on (default: built-in synthetic scenes)",
    )
    p.add_argument("--calib-n", type=int, default=32, help="int8-static: calibration images (default 32)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17 for TensorRT 8.6; default 18)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the graph accepts (default 8)")
    p.add_argument("--trt", action="store_true", help="also build a TensorRT engine (needs vzedge[trt] and a GPU)")
    p.add_argument("--trt-workspace-mib", type=int, default=None, help="TensorRT workspace limit (default 1024)")
    p.add_argument("--revision", default=None, help="hub revision to load")
    p.add_argument("--force", action="store_true", help="replace a folder holding another export or leftovers")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    add_visionzip_args(p)
    add_adaptive_args(p, "one graph with every bucket's tokens as an output and the bucket chosen in-graph")
    p.set_defaults(func=_cmd_export)
