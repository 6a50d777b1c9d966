"""Soak: N frames (default 2,000) through the loop on the built-in model; prints the host-memory slope
and the frame accounting as JSON. Flat memory: |slope| near 0 after warm-up; unaccounted frames: 0.

Usage: python scripts/soak_runtime.py [--frames 2000] [--policy latest|all] [--model tiny-random]
"""

from __future__ import annotations

import argparse
import json

from vzedge.bench import conditions
from vzedge.runtime.api import run
from vzedge.runtime.config import RunConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--policy", choices=("latest", "all"), default="all")
    ap.add_argument("--max-new-tokens", type=int, default=2)
    ap.add_argument("--max-records", type=int, default=500, help="per-frame records kept (the rest fold into totals)")
    args = ap.parse_args()
    cfg = RunConfig(
        model=args.model,
        source=f"synthetic:{args.frames}",
        policy=args.policy,
        max_new_tokens=args.max_new_tokens,
        memory_interval_s=0.5,
        token_cache=8,
        max_records=args.max_records,
    )
    report = run(cfg, title="soak")
    s = report["summary"]
    rss = [m["host_rss"] for m in report["memory_samples"]]
    third = max(1, len(rss) // 3)
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "conditions": conditions(
                    model=args.model,
                    policy=args.policy,
                    max_new_tokens=args.max_new_tokens,
                    max_records=args.max_records,
                ),
                "frames": s["frames"],
                "unaccounted": s["frames"]["pending"] + s["frames"]["seen"] - args.frames,
                "elapsed_s": s["elapsed_s"],
                "frames_per_s": s["frames_per_s"],
                "host_rss_slope_kib_per_s_after_20pct": round(s["memory"]["host_rss_slope_bytes_per_s"] / 1024, 2),
                "host_rss_mib_first_third_median": sorted(rss[:third])[third // 2] / 2**20,
                "host_rss_mib_last_third_median": sorted(rss[-third:])[third // 2] / 2**20,
                "host_rss_peak_mib": s["memory"]["host_rss_peak"] / 2**20,
                "samples": len(rss),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
