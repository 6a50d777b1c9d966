"""Predicted vs measured: the comparison behind `vzedge budget --validate` (pure: it only compares numbers).

The measured side comes from a run of the runtime's own stages on the machine at hand
(`vzedge.runtime.validate`); this module turns that run into the configuration the estimate is made for
(the token counts the runtime actually fed) and lines the two up per component.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vzedge.budget.devices import HOST
from vzedge.budget.estimate import DOMINANT_SHARE, BudgetConfig, Estimate

TOLERANCE = 0.15  # the bound on |predicted / measured - 1| for the total peak


def split_tokens(tokens: int) -> tuple[int, int]:
    """VisionZip's dominant/contextual split of a token budget (54:10 at 64)."""
    dominant = max(1, round(tokens * DOMINANT_SHARE))
    return dominant, tokens - dominant


def run_config(cfg: BudgetConfig, measured: dict[str, Any]) -> BudgetConfig:
    """`cfg` as the run fed it, on the host: the template's text tokens around the image (BOS, prefix,
    question), the crops encoded, and the context the cache reached (prefill + decode steps)."""
    fed = {k: measured[k] for k in ("prompt_tokens", "crops")}
    run = replace(cfg, device=HOST, context=measured["cache_seq"], **fed)
    if run.prefill_tokens != measured["prefill_tokens"]:
        raise AssertionError(f"prefill {measured['prefill_tokens']} tokens != {run.prefill_tokens} in the estimate")
    return run


def compare(predicted: Estimate, measured: dict[str, Any]) -> dict[str, Any]:
    """Rows of predicted vs measured (bytes) with their ratio; the total is the one the tolerance applies to."""
    p = predicted
    kv_at_prefill = p.component("kv_cache") * p.facts["prefill_tokens"] // p.config.context
    rows = [
        ("llm_weights (tensors)", p.component("llm_weights"), measured["llm_tensor_bytes"]),
        ("vision_weights (tensors)", p.component("vision_weights"), measured["vision_tensor_bytes"]),
        ("weights + file map (RSS after load)", _weights_rss(p), measured["load_rss"]),
        ("kv_cache (tensors)", p.component("kv_cache"), measured["kv_bytes"]),
        ("vision pass peak", p.transients["vision"], measured["vision_peak"]),
        ("prefill peak (incl. its KV)", p.transients["prefill"] + kv_at_prefill, measured["prefill_peak"]),
        ("decode step peak", p.transients["decode"], measured["decode_peak"]),
        ("total peak", p.total, measured["total_peak"]),
    ]
    out_rows = [
        {"component": name, "predicted": int(a), "measured": int(b), "ratio": (a / b) if b > 0 else None}
        for name, a, b in rows
    ]
    ratio = p.total / measured["total_peak"]
    return {
        "predicted": p.to_dict(),
        "measured": measured,
        "rows": out_rows,
        "total_ratio": ratio,
        "tolerance": TOLERANCE,
        "within_tolerance": abs(ratio - 1) <= TOLERANCE,
    }


def _weights_rss(p: Estimate) -> int:
    names = ("llm_weights", "vision_weights", "checkpoint_mmap")
    return sum(c.bytes for c in p.components if c.name in names)
