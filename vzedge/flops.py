"""FLOPs by the VisionZip paper's formula: T (4 n d^2 + 2 n^2 d + 2 n d m) for T layers, n tokens,
hidden size d and FFN size m (attention projections, attention maps, FFN)."""

from __future__ import annotations

from typing import Any


def transformer_flops(layers: int, tokens: int, hidden: int, ffn: int) -> float:
    n, d, m = float(tokens), float(hidden), float(ffn)
    return layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def summarize(config: Any, dominant: int, contextual: int, layer: int = -2) -> dict[str, Any]:
    """Token counts and FLOPs with and without VisionZip for a LLaVA (or bare vision) config."""
    vcfg = getattr(config, "vision_config", config)
    tcfg = getattr(config, "text_config", None)
    has_cls = not str(getattr(vcfg, "model_type", "clip")).startswith("siglip")
    grid = int(vcfg.image_size) // int(vcfg.patch_size)
    seq = grid * grid + int(has_cls)
    n_layers = int(vcfg.num_hidden_layers)
    layer_index = layer % n_layers
    strategy = getattr(config, "vision_feature_select_strategy", "full")
    stock_tokens = seq - 1 if (has_cls and strategy == "default") else seq
    kept = dominant + contextual
    vis_all = transformer_flops(n_layers, seq, vcfg.hidden_size, vcfg.intermediate_size)
    vis_vz = transformer_flops(layer_index + 1, seq, vcfg.hidden_size, vcfg.intermediate_size)
    out: dict[str, Any] = {
        "encoder": {
            "family": "siglip" if not has_cls else "clip",
            "image_size": int(vcfg.image_size),
            "patch_size": int(vcfg.patch_size),
            "grid": grid,
            "sequence_tokens": seq,
            "has_cls": has_cls,
            "layers": n_layers,
            "layers_computed_with_visionzip": layer_index + 1,
            "hidden_size": int(vcfg.hidden_size),
        },
        "visual_tokens": {"stock": stock_tokens, "visionzip": kept, "dominant": dominant, "contextual": contextual},
        "encoder_flops": {"stock": vis_all, "visionzip": vis_vz, "ratio": vis_all / vis_vz},
    }
    if tcfg is not None:
        t_layers, d, m = int(tcfg.num_hidden_layers), int(tcfg.hidden_size), int(tcfg.intermediate_size)
        full = transformer_flops(t_layers, stock_tokens, d, m)
        vz = transformer_flops(t_layers, kept, d, m)
        out["llm"] = {"layers": t_layers, "hidden_size": d, "intermediate_size": m}
        out["llm_prefill_flops_visual"] = {"stock": full, "visionzip": vz, "ratio": full / vz}
    return out
