"""Benchmark the quantized LLM per method: footprint, prefill and decode time, one run, JSON on stdout.

    python scripts/bench_quant.py                      # tiny-random, every method available here
    python scripts/bench_quant.py --model DIR --awq DIR_AWQ --device cuda --prompt-tokens 640

Variants are timed round-robin in one process (vzedge.bench.measure_side_by_side), so the ratios hold on a
shared machine. Decode ms/token = (generate(prompt, N new tokens) - prefill(prompt)) / N, with the KV cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile

import torch

from vzedge._deps import bitsandbytes_available, has_module
from vzedge.bench import conditions, measure_side_by_side
from vzedge.quant import METHODS, QuantConfig, load_quantized
from vzedge.quant.report import module_bytes, quantized_linears, weight_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--awq", default="auto", help="AWQ checkpoint folder; 'auto': make one (tiny models); 'skip'")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    methods = [m for m in args.methods if not m.startswith("bnb-") or bitsandbytes_available()]
    skipped = {m: "bitsandbytes not installed" for m in args.methods if m not in methods}
    tmp = tempfile.TemporaryDirectory(prefix="bench-quant-")
    awq_src = args.awq
    if "awq" in methods:
        if args.awq == "skip" or not has_module("gptqmodel"):
            methods.remove("awq")
            skipped["awq"] = "skipped" if args.awq == "skip" else "gptqmodel not installed"
        elif args.awq == "auto":
            from vzedge.quant import CalibConfig, quantize_awq

            awq_src = f"{tmp.name}/awq"
            quantize_awq(args.model, awq_src, calib=CalibConfig(samples=16, seq_len=64), device=args.device)

    models, results = {}, {}
    for m in methods:
        loaded = load_quantized(awq_src if m == "awq" else args.model, QuantConfig(method=m), args.device)
        by_dtype = weight_bytes(loaded.vlm)  # before the first forward (bitsandbytes' CPU repack)
        models[m] = loaded
        results[m] = {
            "method_run": loaded.vlm.vzedge_quant.method,
            "bytes_by_dtype": by_dtype,
            "total_bytes": sum(by_dtype.values()),
            "get_memory_footprint": int(loaded.vlm.get_memory_footprint()),
            "quantized_linear_bytes": sum(module_bytes(mod) for mod in quantized_linears(loaded.vlm).values()),
        }
    first = next(iter(models.values()))
    dev = first.vlm.get_input_embeddings().weight.device
    vocab = first.vlm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(4, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    n = args.new_tokens

    def prefill(vlm):
        return lambda: vlm(input_ids=ids, use_cache=True)

    def generate(vlm):
        return lambda: vlm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        pre = measure_side_by_side({m: prefill(x.vlm) for m, x in models.items()}, args.warmup, args.iters, dev)
        gen = measure_side_by_side({m: generate(x.vlm) for m, x in models.items()}, 1, args.iters, dev)
    base = results.get("none", {}).get("total_bytes")
    for m in models:
        decode_ms = max(gen[m]["p50"] - pre[m]["p50"], 0.0) / n
        results[m].update(
            prefill_ms=pre[m],
            generate_ms=gen[m],
            decode_ms_per_token_p50=round(decode_ms, 3),
            decode_tok_s=round(1e3 / decode_ms, 1) if decode_ms else None,
            bytes_vs_none=round(results[m]["total_bytes"] / base, 4) if base else None,
        )
    out = {
        "model": args.model,
        "results": results,
        "skipped": skipped,
        "conditions": conditions(
            dtype="fp16 on CUDA, fp32 on CPU (compute)",
            batch=1,
            prompt_tokens=args.prompt_tokens,
            new_tokens=n,
            gptqmodel=_version("gptqmodel"),
            accelerate=_version("accelerate"),
        ),
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    tmp.cleanup()
    return 0


def _version(mod: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
