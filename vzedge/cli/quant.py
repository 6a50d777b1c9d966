"""`vzedge quantize`: the LLM in 4/8-bit, with a report of what it cost."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_quantize(args: argparse.Namespace) -> int:
    from vzedge.quant import CalibConfig, QuantCheckError, QuantConfig, QuantKernelError, quantize, summary_rows

    qcfg = QuantConfig(
        method=args.method,
        compute_dtype=args.compute_dtype,
        double_quant=args.double_quant,
        group_size=args.group_size,
        skip_modules=tuple(args.skip_modules),
    )
    calib = CalibConfig(samples=args.calib, seq_len=args.calib_len, data=args.calib_data)
    try:
        report = quantize(args.model, qcfg, out=args.out, calib=calib, device=args.device, force=args.force)
    except (MemoryError, QuantKernelError, QuantCheckError) as err:
        print(f"vzedge quantize: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.out:
        print(f"wrote {args.out}: AWQ {qcfg.bits}-bit g{qcfg.group_size} checkpoint (+ quant_report.json)")
    for label, value in summary_rows(report):
        print(f"{label:<11} {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize the LLM (AWQ checkpoint with --out) and report what it cost")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--method", required=True, help="none, bnb-int8, bnb-nf4, bnb-fp4 or awq")
    p.add_argument("--out", default=None, help="folder for the AWQ checkpoint (awq only)")
    p.add_argument("--calib", type=int, default=128, help="AWQ calibration samples (default 128)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    p.add_argument("--calib-data", default="synthetic", help="UTF-8 text file to calibrate on, or 'synthetic'")
    p.add_argument("--group-size", type=int, default=128, help="AWQ group size: 32, 64 or 128")
    p.add_argument("--compute-dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16")
    p.add_argument("--double-quant", action="store_true", help="bnb 4-bit: quantize the absmax too")
    p.add_argument("--skip-modules", nargs="*", default=["lm_head"], help="modules kept unquantized")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_quantize)
