"""Text tables for people (the CLI prints them); JSON is `Estimate.to_dict()`."""

from __future__ import annotations

from typing import Any

MIB = 2**20
GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:8.3f} GiB" if abs(n) >= 64 * MIB else f"{n / MIB:8.2f} MiB"


def estimate_table(est: dict[str, Any]) -> str:
    """Component table of an estimate (its to_dict()), with the total, headroom, verdict and bounds."""
    cfg, dev = est["config"], est["device"]
    lines = [
        f"model   {cfg['model']} ({est['model_source'] or 'config'}), quant {cfg['quant']}, {est['dtype']}, "
        f"{cfg['tokens']} visual tokens x {est['facts']['crops_per_image']} crop(s), context {cfg['context']}, "
        f"batch {cfg['batch']}, vision backend {cfg['vision_backend']}",
        f"device  {dev['name']} ({dev['id']}): {dev['memory_gib']:g} GiB{' unified' if dev['unified'] else ''}, "
        f"reserve {dev['reserve_gib']:g} GiB",
        "",
        f"| {'component':<16} | {'memory':>12} | detail",
        f"|{'-' * 18}|{'-' * 14}|{'-' * 40}",
    ]
    for c in est["components"]:
        lines.append(f"| {c['name']:<16} | {_gib(c['bytes']):>12} | {c['detail']}")
    lines += [
        f"| {'total (peak)':<16} | {_gib(est['total_bytes']):>12} |",
        f"| {'available':<16} | {_gib(est['available_bytes']):>12} | device memory less the OS reserve",
        f"| {'headroom':<16} | {_gib(est['headroom_bytes']):>12} | verdict: {est['verdict'].upper()}",
    ]
    t = est["transients"]
    lines.append(
        f"\ntransients: vision pass {_gib(t['vision']).strip()}, prefill {_gib(t['prefill']).strip()}, "
        f"decode step {_gib(t['decode']).strip()}"
    )
    lines.append(bounds_line(est["bounds"]))
    return "\n".join(lines)


def bounds_line(b: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    parts = []
    if b.get("decode_tokens_per_s_max") is not None:
        parts.append(f"decode <= {b['decode_tokens_per_s_max']:.1f} tok/s")
    if b.get("prefill_ms_min") is not None:
        parts.append(f"prefill >= {b['prefill_ms_min']:.1f} ms")
    if b.get("vision_ms_min") is not None:
        parts.append(f"vision >= {b['vision_ms_min']:.2f} ms")
    line = "bounds: " + (", ".join(parts) if parts else "none (no bandwidth/FLOPs figures for this device)")
    if measured:
        tps = 1e3 / measured["decode_ms_per_token"] if measured.get("decode_ms_per_token") else float("nan")
        line += (
            f"\nmeasured here: decode {tps:.1f} tok/s, prefill {measured['prefill_ms']:.1f} ms, "
            f"vision {measured['vision_ms']:.1f} ms ({measured['device']}, {measured['dtype']})"
        )
    return line


def validation_table(result: dict[str, Any]) -> str:
    lines = [
        f"| {'component':<30} | {'predicted':>12} | {'measured':>12} | ratio",
        f"|{'-' * 32}|{'-' * 14}|{'-' * 14}|------",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['component']:<30} | {_gib(r['predicted']):>12} | {_gib(r['measured']):>12} | {ratio}")
    ok = "within" if result["within_tolerance"] else "OUTSIDE"
    lines.append(
        f"\ntotal predicted / measured = {result['total_ratio']:.3f} ({ok} the +-{result['tolerance']:.0%} bound)"
    )
    m = result["measured"]
    if "backends" in m:
        lines.append(
            f"run through the runtime: {m['backends']['vision']} ({m['vision_backend']}) + {m['backends']['llm']}; "
            f"prefill {m['prompt_tokens']} text + {m['image_tokens']} image tokens, {m['decode_steps']} decode steps"
        )
    lines.append(bounds_line(result["predicted"]["bounds"], m))
    return "\n".join(lines)
