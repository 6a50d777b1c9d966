"""Time one epoch of projector tuning on a LLaVA-1.5-7B-sized random model (CLIP ViT-L/14-336 + Llama-2-7B
shapes) with its LLM loaded 4-bit (nf4), and record time and peak GPU memory as JSON.

    python scripts/bench_tune.py --out /tmp/bench-tune              # GPU: 7B shapes, nf4, 256 samples
    python scripts/bench_tune.py --out /tmp/bench-tune --size small --quant none --n 16   # CPU dry run

The random model is saved once to OUT/model (about 14 GB at 7B in fp16) with the built-in byte-level
processor (its image token id is set in the config), then loaded through `vzedge tune`'s own path
(`load_quantized` for --quant), so what is timed is what users run. Random weights: the loss is not
meaningful, the time and memory are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vzedge.bench import conditions
from vzedge.io import write_json
from vzedge.models.tiny import SPECIAL_TOKENS, build_processor
from vzedge.tune import TuneConfig, make_data, tune
from vzedge.visionzip import VisionZipConfig

SIZES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide) + Llama-2-7B (32 layers, 4096 wide).
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064),
    ),
    "small": dict(
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=288),
    ),
}  # fmt: skip


def build_model(folder: Path, size: str) -> None:
    """Save a random LLaVA of `size` with the built-in processor (image 336 px, patch 14) to `folder`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shapes = SIZES[size]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **shapes["vision"]).to_dict(),
        text_config=LlamaConfig(max_position_embeddings=4096, **shapes["text"]).to_dict(),
        image_token_id=SPECIAL_TOKENS.index("<image>"),  # the byte-level tokenizer's id; < any vocab here
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlavaForConditionalGeneration(config).to(torch.float16 if dev == "cuda" else torch.float32)
    model.save_pretrained(folder)
    build_processor(336).save_pretrained(folder)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", choices=tuple(SIZES), default="7b")
    ap.add_argument("--quant", default="nf4", help="none, int8, nf4")
    ap.add_argument("--n", type=int, default=256, help="samples in the epoch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    args = ap.parse_args()

    model_dir, data_dir = args.out / f"model-{args.size}", args.out / "data"
    if not (model_dir / "config.json").is_file():
        t = time.perf_counter()
        build_model(model_dir, args.size)
        print(f"built {model_dir} in {time.perf_counter() - t:.0f} s")
    if not data_dir.exists():
        make_data(data_dir, n=args.n, split="train", size=336)
    run_dir = args.out / f"run-{args.size}-{args.quant}"
    cfg = TuneConfig(
        model=str(model_dir),
        data=data_dir / "data.json",
        images=data_dir,
        out=run_dir,
        visionzip=VisionZipConfig(54, 10),
        epochs=1,
        lr=2e-5,
        batch=args.batch,
        grad_accum=args.grad_accum,
        quant=args.quant,
        eval_samples=0,
        save_every=10_000,
        force=True,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = tune(cfg)
    wall = time.perf_counter() - t
    training = result.config["training"]
    steps = [e["seconds"] for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]
    steps_sorted = sorted(steps[1:] or steps)  # the first step includes kernel warm-up
    report = {
        "conditions": {
            **conditions(),
            "model": f"random LLaVA-1.5 {args.size} shapes",
            "quant": args.quant,
            "amp_dtype": training["amp_dtype"],
            "samples": args.n,
            "batch": args.batch,
            "grad_accum": args.grad_accum,
            "visual_tokens": cfg.visionzip.num_tokens,
        },
        "epoch_seconds": training["seconds"],
        "wall_seconds_with_load": wall,
        "optimizer_steps": training["steps"],
        "step_seconds": {
            "p50": steps_sorted[len(steps_sorted) // 2],
            "p90": steps_sorted[int(0.9 * (len(steps_sorted) - 1))],
            "p99": steps_sorted[int(0.99 * (len(steps_sorted) - 1))],
        },
        "peak_cuda_gib": None if training["peak_cuda_bytes"] is None else training["peak_cuda_bytes"] / 2**30,
        "peak_cuda_gib_incl_load": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "final_loss": training["final_loss"],
    }
    write_json(args.out / f"bench_tune-{args.size}-{args.quant}.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
