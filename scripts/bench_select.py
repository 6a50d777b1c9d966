"""Selector overhead against the encoder's time, side by side on one input, JSON on stdout.

    python scripts/bench_select.py                       # CLIP ViT-L/14-336 shapes (576 + CLS tokens), random weights
    python scripts/bench_select.py --layers 4 --iters 5 --batch 1 --tokens 64

Rows (round-robin, so load from other processes hits all alike): the encoder's layers up to the selection layer
(what every selector needs; `--layers` of ViT-L's 24, selection at -2), then each selector's own work on those
layer outputs: the attention score and keys where it needs them (visionzip, vispruner) plus its selection,
merge or pooling. Overhead = selector p50 / encoder p50 (with --layers 24 this is against the real encoder; with
fewer layers scale the encoder time by 23 / (layers - 1)). A Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vzedge.bench import conditions, measure_side_by_side
from vzedge.encoder import VisionZipEncoder
from vzedge.select import SELECTORS, SelectionInputs
from vzedge.select.adaptive import split_budget
from vzedge.visionzip import VisionZipConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="encoder layers (ViT-L has 24; selection at -2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="tokens kept (split 54:10 for two-part selectors)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    model = CLIPVisionModel(vcfg).eval()
    dominant, contextual = split_budget(args.tokens)
    encoders = {
        name: VisionZipEncoder(model, VisionZipConfig(dominant, contextual, selector=name)).eval() for name in SELECTORS
    }
    base = encoders["visionzip"]
    x = torch.randn(args.batch, 3, 336, 336)
    with torch.no_grad():
        layer_in = base._layer_inputs(x)
        hidden = base.tower.layers[base.layer_index](layer_in, None)

    def encoder_layers() -> None:
        with torch.no_grad():
            h = base._layer_inputs(x)
            base.tower.layers[base.layer_index](h, None)

    def selector_fn(name: str):
        enc = encoders[name]

        def fn() -> None:
            with torch.no_grad():
                scores = keys = None
                if enc.selector.needs_attention:
                    scores, keys = enc._score_and_keys(layer_in)
                inputs = SelectionInputs(hidden, scores, keys, enc.tower.has_cls, enc.tower.grid)
                enc.selector.select(inputs, enc.cfg, enc.generator)

        return fn

    fns = {"encoder (layers to -2)": encoder_layers, **{name: selector_fn(name) for name in SELECTORS}}
    res = measure_side_by_side(fns, warmup=args.warmup, iters=args.iters)
    enc_p50 = res["encoder (layers to -2)"]["p50"]
    rows = [
        {"row": name, **fig, "overhead_vs_encoder": None if i == 0 else round(fig["p50"] / enc_p50, 4)}
        for i, (name, fig) in enumerate(res.items())
    ]
    out = {
        "rows": rows,
        "tokens": args.tokens,
        "split": [dominant, contextual],
        "conditions": conditions(
            model="random CLIP ViT-L/14-336 shapes",
            layers=args.layers,
            batch=args.batch,
            dtype="float32",
            iters=args.iters,
            warmup=args.warmup,
        ),
    }
    print(json.dumps(out, indent=2))
    print("| row | p50 ms | p90 ms | p99 ms | p50 / encoder |\n|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        ratio = "-" if r["overhead_vs_encoder"] is None else f"{100 * r['overhead_vs_encoder']:.2f}%"
        print(f"| {r['row']} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {ratio} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
