"""Reports of a run: a Markdown table for people, JSON for machines, a PNG of latency and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vzedge.io import atomic_path, write_json


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    f = s["frames"]
    sel = report.get("selection") or {}
    tokens = f"{report.get('image_tokens')} image tokens"
    if sel.get("text_conditioned"):
        tokens += f" (text-conditioned: chosen per question from {sel['stage1']['tokens']} cached)"
    lines = [
        f"**{report.get('title', 'vzedge run')}** — vision `{report.get('vision_backend')}` "
        f"({report.get('vision_dtype', 'torch')}), "
        f"{tokens}, LLM `{report.get('quant')}` on {report.get('device')}",
        "",
        "| stage | p50 ms | p90 ms | p99 ms | n |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, st in s["stages_ms"].items():
        lines.append(f"| {stage} | {st['p50']:.2f} | {st['p90']:.2f} | {st['p99']:.2f} | {st['n']} |")
    lines += [
        "",
        f"frames: {f['seen']} seen, {f['processed']} processed, {f['dropped']} dropped "
        f"{f['dropped_by_stage'] or ''}, {f['failed']} failed, {f['pending']} unaccounted; "
        f"{s['frames_per_s']:.2f} frames/s over {s['elapsed_s']:.1f} s; "
        f"decode {s['decode_tokens_per_s'] or 0:.1f} tok/s; token-cache hits {s['cache_hits']}"
        + (f"; image tokens per question {s['image_tokens_mean']:.1f} (mean)" if s.get("image_tokens_mean") else ""),
    ]
    mem = s.get("memory")
    if mem:
        parts = [
            f"host RSS peak {_mib(mem['host_rss_peak'])} (slope {mem['host_rss_slope_bytes_per_s'] / 1024:.1f} KiB/s)"
        ]
        if "gpu_peak_allocated" in mem:
            parts.append(f"GPU peak allocated {_mib(mem['gpu_peak_allocated'])}")
        if "unified_used_peak" in mem:
            parts.append(f"unified memory peak {_mib(mem['unified_used_peak'])}")
        lines.append("memory: " + ", ".join(parts))
    if s.get("errors"):
        lines.append(f"errors: {s['errors'][0]['error']} (frame {s['errors'][0]['frame']}, {s['errors'][0]['stage']})")
    return "\n".join(lines)


def write_report_json(path: str | Path, report: dict[str, Any]) -> None:
    write_json(path, report)


def plot(path: str | Path, report: dict[str, Any]) -> None:
    """Per-stage latency per frame and host/GPU memory over time, as one PNG."""
    from vzedge._deps import require

    require("matplotlib", "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r for r in report["frames"] if r["status"] == "processed"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5))
    for stage in ("preprocess", "vision", "prefill", "ttft", "end_to_end"):
        xs = [r["index"] for r in frames if stage in r["stage_ms"]]
        ys = [r["stage_ms"][stage] for r in frames if stage in r["stage_ms"]]
        if xs:
            ax1.plot(xs, ys, ".-", ms=3, lw=0.8, label=stage)
    ax1.set_xlabel("frame")
    ax1.set_ylabel("ms")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8, ncol=5)
    ax1.set_title(report.get("title", "vzedge run"))
    mem = report.get("memory_samples", [])
    if mem:
        ax2.plot([m["t"] for m in mem], [m["host_rss"] / 2**20 for m in mem], label="host RSS")
        gpu = [(m["t"], m["gpu"]["allocated"] / 2**20) for m in mem if "gpu" in m]
        if gpu:
            ax2.plot(*zip(*gpu, strict=True), label="GPU allocated")
    ax2.set_xlabel("s")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
