"""`vzedge eval`: accuracy against the visual-token budget."""

from __future__ import annotations

import argparse


def _cmd_eval(args: argparse.Namespace) -> int:
    from vzedge._deps import require
    from vzedge.eval import EvalConfig, evaluate, markdown_table, parse_tokens, plot
    from vzedge.io import write_json

    if args.plot:  # before the run, not after it
        require("matplotlib", "--plot")
    cfg = EvalConfig(
        model=args.model,
        data=args.data,
        images=args.images,
        tokens=parse_tokens(args.tokens),
        scale=not args.no_scale,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        tuned=tuple(args.tuned or ()),
        adaptive=parse_tokens(args.adaptive) if args.adaptive else (),
        adaptive_mass=args.adaptive_mass,
    )
    from vzedge.io import check_writable_file

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable_file(path, flag)  # before the evaluation, not after it
    result = evaluate(cfg)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print(
        f"{result['model']} on {result['data']}: {result['questions']} questions, {result['grid']}x{result['grid']} "
        f"grid ({result['stock_image_tokens']} image tokens), {result['seconds']:.0f} s; {result['projector_tuning']}"
    )
    print(markdown_table(result))
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from vzedge.eval.config import DEFAULT_METHODS, METHODS, SYNTH_DATA

    p = sub.add_parser("eval", help="accuracy vs visual-token budget: every token selector, with 95%% intervals")
    p.add_argument("--model", default="tiny", help="a LLaVA model: 'tiny', a local folder, or a hub id")
    p.add_argument(
        "--data",
        default="synth",
        help=f"a built-in synthetic split ({', '.join(SYNTH_DATA)}: small regions among distractors) "
        "or a LLaVA-format JSON file",
    )
    p.add_argument("--images", default=None, help="folder of the JSON file's images")
    p.add_argument("--tokens", default="576,192,128,64", help="budgets in LLaVA-1.5 tokens (576 = all), scaled")
    p.add_argument("--no-scale", action="store_true", help="use --tokens as literal counts on the model's grid")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"token selectors to compare (any of {','.join(METHODS)})"
    )
    p.add_argument("--n", type=int, default=300, help="questions (synth: balanced kinds; JSON: first N, 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="synth test split and random-selection seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument(
        "--tuned",
        nargs="+",
        default=None,
        metavar="DIR",
        help="`vzedge tune` output folders: each adds a visionzip+tuned row at the token count it was tuned for",
    )
    p.add_argument(
        "--adaptive",
        default=None,
        metavar="B1,B2,...",
        help="bucket budgets (LLaVA-1.5 tokens, scaled like --tokens) for METHOD+adaptive rows: each image at the "
        "bucket its attention mass asks for, and a fixed row at the same mean token count",
    )
    p.add_argument("--adaptive-mass", type=float, default=0.5, help="share of the attention mass the kept patches hold")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot accuracy vs tokens (needs matplotlib)")
    p.set_defaults(func=_cmd_eval)
