"""Memory budget: predict whether a configuration fits a device, and check the prediction against a run.

`estimate(BudgetConfig)` lists every component of the peak (exact weight and KV bytes from the shapes and
the quant layout, activation peaks from the shapes) with the verdict and speed bounds; `fit` searches the
largest token budget / context or the lightest quantization that fits; `validate` runs the configuration
here and compares predicted with measured. `budget` is the one call behind `vzedge budget`.
"""

from __future__ import annotations

from typing import Any

from vzedge.budget.devices import DeviceProfile, get_device, load_devices
from vzedge.budget.estimate import BudgetConfig, Component, Estimate, estimate

__all__ = [
    "BudgetConfig",
    "Component",
    "DeviceProfile",
    "Estimate",
    "budget",
    "estimate",
    "get_device",
    "load_devices",
]


def budget(cfg: BudgetConfig, fit: str | None = None, validate: bool = False, new_tokens: int = 8) -> dict[str, Any]:
    """What `vzedge budget` runs. Returns {"kind": "estimate"|"fit"|"validate", "ok": bool, ...}: ok is
    'fits' for an estimate, 'something fits' for a search, 'within tolerance' for a validation."""
    if fit is not None and validate:
        raise ValueError("--fit and --validate are separate questions; pass one of them")
    if fit is not None:
        from vzedge.budget.fit import fit as search

        result = search(cfg, fit)
        return {"kind": "fit", "ok": result[fit] is not None, **result}
    if validate:
        from vzedge.budget.validate import validate as check

        result = check(cfg, new_tokens=new_tokens)
        return {"kind": "validate", "ok": result["within_tolerance"], **result}
    est = estimate(cfg).to_dict()
    return {"kind": "estimate", "ok": est["fits"], "estimate": est}
