"""LLM prefill at LLaVA-NeXT-shaped visual token counts: 2,880 (stock, one 672x672 image = 5 crops x 576)
against VisionZip's 640 / 320 / 160 (128 / 64 / 32 tokens per crop), plus a short text prompt.

LLM only: inputs_embeds through a random Llama (~1B by default: hidden 2048, 16 layers, FFN 5504; `--size 7b` for
LLaVA-NeXT-7B's Vicuna shape), one prefill per call that fills a KV cache, as generation does. The vision tower
is out of this figure (bench_core/bench_export time it). Timed round-robin so the shared machine's load hits all
counts alike; reports p50/p90, measured ratios against 2,880, FLOPs ratios by the paper's formula, and the
paper's 7.8x (its headline prefill speedup on LLaVA-NeXT, GPU). Prints JSON.

Usage: python scripts/bench_prefill.py [--size 1b|7b] [--iters 3] [--warmup 1] [--tokens 2880,640,320,160]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from transformers import LlamaConfig, LlamaModel

from vzedge.bench import conditions, measure_side_by_side
from vzedge.flops import transformer_flops

SIZES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5504, num_attention_heads=16),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32),
}
PAPER_PREFILL_SPEEDUP = 7.8
STOCK_TOKENS = 2880


def build(size: str, layers: int | None, dtype: torch.dtype, device: str) -> LlamaModel:
    kw: dict[str, Any] = dict(SIZES[size], vocab_size=32000, max_position_embeddings=4096)
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    if layers:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(config)
    return model.to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick smoke runs)")
    ap.add_argument("--tokens", default="2880,640,320,160", help="visual token counts; the first is the baseline")
    ap.add_argument("--prompt", type=int, default=32, help="text tokens after the image")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp32 on CPU, fp16 on GPU")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    counts = [int(t) for t in args.tokens.split(",")]

    model = build(args.size, args.layers, dtype, device)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device=device).manual_seed(0)
    embeds = {
        n: torch.randn(1, n + args.prompt, cfg.hidden_size, generator=g, device=device, dtype=dtype) * 0.02
        for n in counts
    }

    def prefill(x: torch.Tensor):
        return lambda: model(inputs_embeds=x, use_cache=True)

    with torch.inference_mode():
        timings = measure_side_by_side(
            {f"{n}_visual_tokens": prefill(embeds[n]) for n in counts}, args.warmup, args.iters, device
        )

    base = counts[0]
    flops = {n: transformer_flops(cfg.num_hidden_layers, n + args.prompt, cfg.hidden_size, cfg.intermediate_size)
             for n in counts}  # fmt: skip
    rows = []
    for n in counts:
        t = timings[f"{n}_visual_tokens"]
        rows.append(
            {
                "visual_tokens": n,
                "sequence_tokens": n + args.prompt,
                "prefill_ms": t,
                "speedup_p50_vs_baseline": round(timings[f"{base}_visual_tokens"]["p50"] / t["p50"], 3),
                "flops": flops[n],
                "flops_ratio_vs_baseline": round(flops[base] / flops[n], 3),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "llm_prefill_llava_next_tokens",
                "conditions": conditions(
                    model=f"random Llama {args.size}-shaped",
                    parameters=params,
                    layers=cfg.num_hidden_layers,
                    hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size,
                    dtype=dtype_name,
                    batch=1,
                    prompt_tokens=args.prompt,
                    attn_implementation=cfg._attn_implementation,
                    warmup=args.warmup,
                    iters=args.iters,
                ),
                "baseline_visual_tokens": base,
                "results": rows,
                "paper": {
                    "prefill_speedup": PAPER_PREFILL_SPEEDUP,
                    "note": "VisionZip (CVPR 2025) headline: LLaVA-NeXT prefill ~8x faster (7.8x) with the "
                    "smallest budget on a GPU; compare the 160-token row",
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
