"""Encoder time: stock HF tower (all layers) vs VisionZipEncoder, and the selection+merge share.

ViT-L/14-336 sizes (LLaVA-1.5's tower, random weights), batch 1 and 8, side by side in one run.
Prints JSON. Usage: python scripts/bench_core.py [--iters 5] [--batches 1,8] [--threads N]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import CLIPVisionModel

from vzedge import VisionZipConfig, VisionZipEncoder
from vzedge.bench import conditions, measure_side_by_side
from vzedge.models import clip
from vzedge.visionzip import compress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dominant", type=int, default=54)
    ap.add_argument("--contextual", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    stock = CLIPVisionModel(clip.vit_l14_336_config()).eval().to(device)
    cfg = VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
    enc = VisionZipEncoder(stock, cfg).eval()
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(batch, 3, 336, 336, device=device)
        with torch.inference_mode():
            x_in = enc._layer_inputs(x)
            scores, keys = enc._score_and_keys(x_in)
            hidden = enc.tower.layers[enc.layer_index](x_in, None)
            timings = measure_side_by_side(
                {
                    "stock_all_layers_ms": lambda x=x: stock(x),
                    "visionzip_ms": lambda x=x: enc(x),
                    "score_ms": lambda xi=x_in: enc._score_and_keys(xi),
                    "select_merge_ms": lambda h=hidden, s=scores, k=keys: compress(h, s, k, cfg, True),
                },
                args.warmup,
                args.iters,
                device,
            )
            row = {"batch": batch, **timings}
        vz = row["visionzip_ms"]["p50"]
        row["speedup_p50"] = round(row["stock_all_layers_ms"]["p50"] / vz, 3)
        row["score_select_merge_share_p50"] = round((row["score_ms"]["p50"] + row["select_merge_ms"]["p50"]) / vz, 4)
        results.append(row)
    print(
        json.dumps(
            {
                "benchmark": "core_encoder",
                "conditions": conditions(
                    model="random CLIP ViT-L/14-336 (24 layers, 1024 wide, 577 tokens)",
                    dtype=str(next(stock.parameters()).dtype),
                    visionzip=cfg.to_dict(),
                    attn_implementation=stock.config._attn_implementation,
                    warmup=args.warmup,
                    iters=args.iters,
                ),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
