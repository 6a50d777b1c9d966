"""The exported adaptive budget against a fixed-budget export at its largest bucket, side by side; JSON on stdout.

    python scripts/bench_adaptive.py                                  # tiny, buckets 14,28,57, batch 1 and 4
    python scripts/bench_adaptive.py --model tiny --buckets 14,28,57 --mass 0.5 --iters 30 --threads 1

Two exports of the same model (fp32, --projector): the adaptive one (`--adaptive B1,B2,...`, one graph with every
bucket's tokens and the in-graph bucket) and a fixed one at the largest bucket's split (what a deployment without
the adaptive graph would ship for the worst case). Reported: export wall time (load, trace, slim, op check,
parity gate, manifest) and the trace alone, graph size and node count, then ONNX Runtime latency (CPU provider)
of both graphs on the same images, round-robin (vzedge.bench.measure_side_by_side), plus the adaptive graph with
the runtime's per-image pick of each image's bucket (`OrtVisionBackend.encode_each`, without the projector,
which is in the graph). A Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vzedge.bench import conditions, measure_side_by_side
from vzedge.select import AdaptiveBudget
from vzedge.select.adaptive import split_budget
from vzedge.visionzip import VisionZipConfig


def _export(model: str, out: Path, vz: VisionZipConfig, budget: AdaptiveBudget | None, max_batch: int) -> dict:
    from vzedge.export import ExportConfig, export_vision

    t0 = time.perf_counter()
    m = export_vision(
        ExportConfig(model=model, out=out, visionzip=vz, projector=True, max_batch=max_batch, adaptive=budget)
    ).manifest
    return {
        "export_wall_s": round(time.perf_counter() - t0, 2),
        "trace_s": m["export"]["export_seconds"],
        "graph_bytes": m["files"]["model.onnx"]["bytes"],
        "graph_nodes": m["slim"]["after"]["nodes"],
        "parity_passed": m["parity"]["passed"],
        "opcheck_ok": m["opcheck"]["ok"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--buckets", default="14,28,57")
    ap.add_argument("--mass", type=float, default=0.5)
    ap.add_argument("--batches", default="1,4", help="image batches to time (each <= 8)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (1 on a shared 2-core machine)")
    ap.add_argument(
        "--export-rounds", type=int, default=2, help="exports of each graph, alternating (the first pays one-off costs)"
    )
    args = ap.parse_args()
    import onnxruntime as ort

    from vzedge.images import load_image
    from vzedge.manifest import read_manifest
    from vzedge.runtime.backends.ort import OrtVisionBackend

    budget = AdaptiveBudget(tuple(int(b) for b in args.buckets.split(",")), args.mass)
    batches = [int(b) for b in args.batches.split(",")]
    largest = max(budget.buckets)
    fixed_vz = VisionZipConfig(*split_budget(largest))
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as tmp:
        fixed_name, adaptive_name = f"fixed {fixed_vz.dominant}+{fixed_vz.contextual}", f"adaptive {args.buckets}"
        rounds: dict[str, list[dict]] = {fixed_name: [], adaptive_name: []}
        for r in range(args.export_rounds):
            fixed_dir, adaptive_dir = Path(tmp) / f"fixed{r}", Path(tmp) / f"adaptive{r}"
            rounds[fixed_name].append(_export(args.model, fixed_dir, fixed_vz, None, max(batches)))
            rounds[adaptive_name].append(_export(args.model, adaptive_dir, VisionZipConfig(), budget, max(batches)))
        exports = {}
        for name, runs in rounds.items():  # sizes are the same every round; times: the fastest round
            exports[name] = {
                **runs[-1],
                "export_wall_s": min(e["export_wall_s"] for e in runs),
                "trace_s": min(e["trace_s"] for e in runs),
                "export_wall_s_per_round": [e["export_wall_s"] for e in runs],
            }
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        fixed = ort.InferenceSession(str(fixed_dir / "model.onnx"), sess_options=opts, providers=providers)
        adaptive = ort.InferenceSession(str(adaptive_dir / "model.onnx"), sess_options=opts, providers=providers)
        backend = OrtVisionBackend(adaptive_dir, read_manifest(adaptive_dir), "ort-cpu")
        backend.session = adaptive  # the same session and thread settings as the raw row
        latency, chosen = {}, {}
        for b in batches:
            images = [load_image(f"demo:{i}") for i in range(b)]
            px = backend.preprocess.batch(images)
            x = np.ascontiguousarray(px.numpy().astype(np.float32))
            chosen[b] = [len(t) for t in backend.encode_each(px)]
            fns = {
                f"fixed graph ({largest} tokens), batch {b}": lambda x=x: fixed.run(None, {"pixel_values": x}),
                f"adaptive graph (all outputs), batch {b}": lambda x=x: adaptive.run(None, {"pixel_values": x}),
                f"adaptive graph + per-image pick, batch {b}": lambda px=px: backend.encode_each(px),
            }
            latency.update(measure_side_by_side(fns, args.warmup, args.iters))
    result = {
        "model": args.model,
        "buckets": list(budget.buckets),
        "mass": budget.mass,
        "tokens_per_image": {str(b): chosen[b] for b in batches},
        "exports": exports,
        "latency_ms": latency,
        "conditions": conditions(ort_threads=args.threads, dtype="fp32", projector=True, batches=batches),
    }
    print(json.dumps(result, indent=2))
    lines = ["| export | wall s | trace s | graph KB | nodes |", "|---|---|---|---|---|"]
    for name, e in exports.items():
        lines.append(
            f"| {name} | {e['export_wall_s']} | {e['trace_s']} | {e['graph_bytes'] / 1e3:.0f} | {e['graph_nodes']} |"
        )
    lines += ["", "| ORT run | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|"]
    for name, r in latency.items():
        lines.append(f"| {name} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} |")
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
