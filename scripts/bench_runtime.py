"""Runtime benchmark, one run, JSON out:

1. the loop on synthetic frames, sequential vs pipelined: frames/s, their ratio, and the bound
   1 / slowest stage that pipelining can at best reach;
2. VisionZip (64 tokens) vs all 576 tokens: image-prefix prefill and TTFT measured side by side
   (round-robin), the measured prefill ratio next to the FLOPs ratio of the paper's formula.

Usage: python scripts/bench_runtime.py [--model tiny-random] [--frames 40] [--iters 10] [--llm medium]
`--llm medium` swaps in a random 8-layer, 1024-wide Llama so the prefill is LLM-bound as on a real
model (the built-in LLM is 128 wide, where fixed overheads dominate).
"""

from __future__ import annotations

import argparse
import json

import torch

from vzedge.bench import conditions, measure_side_by_side
from vzedge.flops import transformer_flops
from vzedge.images import demo_image
from vzedge.runtime.api import bench, load_session
from vzedge.runtime.backends.llm import LLMBackend
from vzedge.runtime.backends.vision import TorchVisionBackend
from vzedge.runtime.config import RunConfig

PAPER = "VisionZip (CVPR 2025): LLaVA-NeXT prefill 8x faster at 10% of the tokens"


def _medium_llm(session) -> None:
    """Replace the session's LLM (and projector output width) with a random 1024-wide, 8-layer Llama."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    old = session.loaded.vlm
    text = LlamaConfig(
        vocab_size=old.config.text_config.vocab_size,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=old.config.vision_config.to_dict(),
        text_config=text.to_dict(),
        image_token_id=old.config.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(cfg).eval()
    vlm.model.vision_tower.load_state_dict(old.model.vision_tower.state_dict())
    session.loaded.vlm = vlm
    session.loaded.vision = vlm.model.vision_tower
    session.loaded.projector = vlm.model.multi_modal_projector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--llm", choices=("builtin", "medium"), default="builtin")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()

    cfg = RunConfig(model=args.model, frames=args.frames, max_new_tokens=args.max_new_tokens, policy="all")
    session = load_session(cfg)
    if args.llm == "medium":
        _medium_llm(session)
        session.llm = LLMBackend(session.loaded.vlm, session.loaded.processor.tokenizer, session.llm.template)
        session.vision = TorchVisionBackend(session.loaded, cfg.visionzip, session.device)
    loop = bench(cfg, session)

    # VisionZip vs all tokens: the same LLM, the same image, interleaved.
    full_vision = TorchVisionBackend(session.loaded, None, session.device)
    pixels = session.vision.preprocess.batch([demo_image()])
    with torch.inference_mode():
        tokens = {"visionzip": session.vision.encode(pixels), "all": full_vision.encode(pixels)}
    llm = session.llm
    prefixes = {k: llm.prefill_image(v) for k, v in tokens.items()}
    timings = measure_side_by_side(
        {
            "prefill_visionzip_ms": lambda: llm.prefill_image(tokens["visionzip"]),
            "prefill_all_ms": lambda: llm.prefill_image(tokens["all"]),
            "ttft_visionzip_ms": lambda: llm.answer(prefixes["visionzip"], cfg.prompt, 1),
            "ttft_all_ms": lambda: llm.answer(prefixes["all"], cfg.prompt, 1),
        },
        args.warmup,
        args.iters,
        session.device,
    )
    tc = session.loaded.vlm.config.text_config
    n_vz, n_all = prefixes["visionzip"].length, prefixes["all"].length
    flops = {
        k: transformer_flops(tc.num_hidden_layers, n, tc.hidden_size, tc.intermediate_size)
        for k, n in (("visionzip", n_vz), ("all", n_all))
    }
    result = {
        "benchmark": "runtime",
        "conditions": conditions(
            model=args.model,
            llm=f"{args.llm}: {tc.num_hidden_layers} layers, {tc.hidden_size} wide",
            frames=args.frames,
            iters=args.iters,
            max_new_tokens=args.max_new_tokens,
        ),
        "loop": loop["comparison"],
        "loop_stages_ms_p50": {
            mode: {k: v["p50"] for k, v in loop[mode]["summary"]["stages_ms"].items()}
            for mode in ("sequential", "pipelined")
        },
        "tokens": {"visionzip_prefix": n_vz, "all_prefix": n_all},
        "timings": timings,
        "prefill_ratio_measured_p50": round(
            timings["prefill_all_ms"]["p50"] / timings["prefill_visionzip_ms"]["p50"], 3
        ),
        "ttft_ratio_measured_p50": round(timings["ttft_all_ms"]["p50"] / timings["ttft_visionzip_ms"]["p50"], 3),
        "prefill_ratio_flops_formula": round(flops["all"] / flops["visionzip"], 3),
        "paper": PAPER,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
