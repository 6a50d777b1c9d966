"""Shared fixtures: small random models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch


def peaky(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Re-initialise q/k projections with a large std under a fixed seed.

    Default random init gives near-uniform attention, so token scores nearly tie and the top-k
    order would hinge on float rounding; peaky attention makes selection comparisons meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def tiny_vlm():
    from vzedge.models.tiny import build_tiny

    return build_tiny()
