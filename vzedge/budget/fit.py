"""`--fit`: the largest visual-token budget or context, or the lightest quantization, that fits a device."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vzedge.budget.devices import get_device
from vzedge.budget.estimate import BudgetConfig, Estimate, estimate
from vzedge.budget.layout import read_shapes, resolve_config

FIT_TARGETS = ("tokens", "context", "quant")
# Heaviest (best quality) first: the search returns the first that fits.
QUANT_ORDER = ("none", "bnb-int8", "bnb-nf4", "awq")


def fit(cfg: BudgetConfig, target: str) -> dict[str, Any]:
    """Search `target` with everything else in `cfg` fixed. Memory grows monotonically with tokens and
    context, so those are binary searches; quant walks QUANT_ORDER. Returns the value (None if nothing
    fits) and the estimate at it."""
    if target not in FIT_TARGETS:
        raise ValueError(f"--fit {target!r}: choose one of {', '.join(FIT_TARGETS)}")
    device = get_device(cfg.device, cfg.devices_file)
    config, _ = resolve_config(cfg.model)
    shapes = read_shapes(config)

    def at(**kw: Any) -> Estimate:
        return estimate(replace(cfg, **kw), device, shapes)

    best: Any = None
    if target == "quant":
        for method in QUANT_ORDER:
            if at(quant=method, double_quant=False).fits:
                best = method
                break
        result = {"quant": best}
    elif target == "tokens":
        stock = shapes.v_seq - 1 if shapes.has_cls else shapes.v_seq
        crops = cfg.crops or shapes.anyres_crops
        hi = min(stock, (cfg.context - cfg.prompt_tokens - 1) // crops)
        best = _largest(1, hi, lambda t: at(tokens=t).fits)
        result = {"tokens": best}
        if best is not None:
            from vzedge.budget.validate import split_tokens

            result["dominant"], result["contextual"] = split_tokens(best)
    else:
        lo = cfg.prefill_tokens + 1
        hi = shapes.max_positions or 1 << 20
        best = _largest(lo, hi, lambda c: at(context=c).fits)
        result = {"context": best}
    chosen = at(**{target: best}) if best is not None else None
    result["estimate"] = chosen.to_dict() if chosen is not None else None
    result["target"] = target
    return result


def _largest(lo: int, hi: int, ok: Any) -> int | None:
    """The largest v in [lo, hi] with ok(v), for a predicate true up to some point and false after."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
