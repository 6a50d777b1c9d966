"""What the text-conditioned stage 2 costs per question at LLaVA-1.5 shapes, side by side, JSON on stdout.

    python scripts/bench_textstage.py                    # 576 cached tokens x 4096 (LLaVA-1.5-7B), keep 64
    python scripts/bench_textstage.py --tokens 576 --width 4096 --keep 64 --iters 10

Rows (round-robin, so load from other processes hits all alike), all on the same random cached tokens
[batch, tokens, width] and a question of `--question-tokens` embeddings:
- `relevance`: cosine to the question tokens, mean, min-max (vzedge.select.textcond.text_relevance);
- `cdpruner (relevance + DPP)`: the whole stage 2 (TextStage.select: relevance, kernel, greedy MAP, gather);
- `dpp (relevance 1)`: the same without the question (the ablation);
- `divprune`: the text-agnostic max-min selector on the same tokens, for scale.
float32 on CPU (the runtime runs stage 2 in the LLM's dtype; bf16 matmuls on CPU are not representative).
A Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vzedge.bench import conditions, measure_side_by_side
from vzedge.select import divprune_indices
from vzedge.select.textcond import TextStage, text_relevance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=576, help="cached tokens per image (stage 1)")
    ap.add_argument("--width", type=int, default=4096, help="the LLM's hidden size")
    ap.add_argument("--keep", type=int, default=64, help="tokens stage 2 keeps")
    ap.add_argument("--question-tokens", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    if not 1 <= args.keep < args.tokens:
        ap.error(f"--keep {args.keep} must be between 1 and --tokens - 1 ({args.tokens - 1})")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cached = torch.randn(args.batch, args.tokens, args.width, generator=g)
    text = torch.randn(args.batch, args.question_tokens, args.width, generator=g)
    cdpruner, dpp = TextStage(args.keep), TextStage(args.keep, conditioned=False)

    def run(fn):
        def call() -> None:
            with torch.no_grad():
                fn()

        return call

    fns = {
        "relevance": run(lambda: text_relevance(cached, text)),
        "cdpruner (relevance + DPP)": run(lambda: cdpruner.select(cached, text)),
        "dpp (relevance 1)": run(lambda: dpp.select(cached, None)),
        "divprune": run(lambda: divprune_indices(cached, args.keep)),
    }
    res = measure_side_by_side(fns, warmup=args.warmup, iters=args.iters)
    ref = res["divprune"]["p50"]
    rows = [{"row": name, **fig, "p50_over_divprune": round(fig["p50"] / ref, 3)} for name, fig in res.items()]
    out = {
        "rows": rows,
        "conditions": conditions(
            cached_tokens=args.tokens,
            width=args.width,
            keep=args.keep,
            question_tokens=args.question_tokens,
            batch=args.batch,
            dtype="float32",
            iters=args.iters,
            warmup=args.warmup,
        ),
    }
    print(json.dumps(out, indent=2))
    print("| row | p50 ms | p90 ms | p99 ms | p50 / divprune |\n|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(
            f"| {r['row']} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {r['p50_over_divprune']:.2f} |",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
