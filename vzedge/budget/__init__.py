"""Memory budget: predict whether a configuration fits a device, and check the prediction against a run.

`estimate(BudgetConfig)` lists every component of the peak (exact weight and KV bytes from the shapes and
the quant layout, activation peaks from the shapes) with the verdict and speed bounds; `fit` searches the
largest token budget / context or the lightest quantization that fits; `budget.validate.compare` lines a
prediction up with a run of the runtime (`vzedge.runtime.validate`, behind `vzedge budget --validate`).
`budget` is the one call behind `vzedge budget`.
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


def budget(cfg: BudgetConfig, fit: str | None = None) -> dict[str, Any]:
    """What `vzedge budget` runs (without --validate, which runs the runtime: `vzedge.runtime.validate`).
    Returns {"kind": "estimate"|"fit", "ok": bool, ...}: ok is 'fits' for an estimate, 'something fits' for
    a search."""
    if fit is not None:
        from vzedge.budget.fit import fit as search

        result = search(cfg, fit)
        return {"kind": "fit", "ok": result[fit] is not None, **result}
    est = estimate(cfg).to_dict()
    return {"kind": "estimate", "ok": est["fits"], "estimate": est}
