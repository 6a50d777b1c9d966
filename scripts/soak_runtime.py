"""Soak: N frames (default 10,000) through the perception loop behind `vzedge run`, on the built-in `tiny` with
its vision graph exported int8 for ONNX Runtime on the CPU; the host RSS is sampled every --every frames.

Prints JSON: the RSS samples (frame count, MiB), the least-squares slope in MiB per 1,000 frames after the
warm-up samples, the frame accounting (every frame processed, dropped by the policy or failed; none
unaccounted) and the conditions. Pass criteria (issue 13): slope < 1 MiB / 1,000 frames, unaccounted == 0.

Usage: python scripts/soak_runtime.py [--frames 10000] [--every 500] [--policy all|latest] [--vision DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vzedge.bench import conditions
from vzedge.runtime.api import run
from vzedge.runtime.config import RunConfig


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def slope_per_1000(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of RSS (MiB) against frames, in MiB per 1,000 frames."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--vision", default=None, help="export folder; default: export --dtype int8 to a temp folder")
    ap.add_argument("--dtype", choices=("int8", "fp32", "fp16"), default="int8", help="graph dtype of the export")
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=500, help="frames between RSS samples")
    ap.add_argument("--warmup-samples", type=int, default=2, help="samples left out of the slope (caches filling)")
    ap.add_argument("--policy", choices=("latest", "all"), default="all")
    ap.add_argument("--max-new-tokens", type=int, default=2)
    ap.add_argument("--max-records", type=int, default=500, help="per-frame records kept (the rest fold into totals)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="vzedge-soak-") as tmp:
        vision = args.vision
        export_s = None
        if vision is None:
            from vzedge.export import ExportConfig, export_vision

            t0 = time.perf_counter()
            vision = str(Path(tmp) / args.dtype)
            export_vision(ExportConfig(model=args.model, out=vision, projector=True, dtype=args.dtype, max_batch=1))
            export_s = round(time.perf_counter() - t0, 1)
        cfg = RunConfig(
            model=args.model,
            vision=vision,
            vision_backend="ort-cpu",
            source=f"synthetic:{args.frames}",
            policy=args.policy,
            max_new_tokens=args.max_new_tokens,
            memory_interval_s=1.0,
            max_records=args.max_records,
            device="cpu",
        )
        samples: list[tuple[int, float]] = []
        seen = 0

        def on_frame(_rec) -> None:
            nonlocal seen
            seen += 1
            if seen % args.every == 0:
                samples.append((seen, round(rss_mib(), 2)))

        t0 = time.perf_counter()
        report = run(cfg, on_frame=on_frame, title="soak")
        wall = time.perf_counter() - t0
    s = report["summary"]
    f = s["frames"]
    report["vision_dtype"] = args.dtype if args.vision is None else "from --vision"
    accounted = f["processed"] + f["dropped"] + f["failed"]
    used = samples[args.warmup_samples :]
    slope = slope_per_1000(used)
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "conditions": conditions(
                    model=args.model,
                    vision_backend=report["vision_backend"],
                    vision_dtype=report["vision_dtype"],
                    image_tokens=report["image_tokens"],
                    policy=args.policy,
                    max_new_tokens=args.max_new_tokens,
                    max_records=args.max_records,
                    frames=args.frames,
                ),
                "export_s": export_s,
                "wall_s": round(wall, 1),
                "frames_per_s": s["frames_per_s"],
                "frames": f,
                "unaccounted": args.frames - accounted + f["pending"],
                "rss_samples_frames_mib": samples,
                "rss_slope_mib_per_1000_frames": None if slope is None else round(slope, 4),
                "slope_samples": f"{len(used)} (first {args.warmup_samples} left out as warm-up)",
                "rss_first_last_mib": [samples[0][1], samples[-1][1]] if samples else None,
                "pass": slope is not None and slope < 1.0 and args.frames - accounted + f["pending"] == 0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
