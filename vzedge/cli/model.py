"""`vzedge info, show, generate`: look at an image through VisionZip and answer a prompt."""

from __future__ import annotations

import argparse
import json

from vzedge.cli._common import add_image_limit_args, add_visionzip_args, image_limits, results_stdout, visionzip_config


def _cmd_info(args: argparse.Namespace) -> int:
    from vzedge.api import info

    report = info(args.model, visionzip_config(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    enc, tok = report["encoder"], report["visual_tokens"]
    print(f"model       {report['model']}")
    print(
        f"encoder     {enc['family']} {enc['image_size']}px patch {enc['patch_size']} -> {enc['grid']}x{enc['grid']}"
        f"{' + CLS' if enc['has_cls'] else ''} = {enc['sequence_tokens']} tokens, {enc['layers']} layers, "
        f"d={enc['hidden_size']}"
    )
    print(
        f"tokens      stock {tok['stock']} -> VisionZip {tok['visionzip']} "
        f"(dominant {tok['dominant']} + contextual {tok['contextual']})"
    )
    ef = report["encoder_flops"]
    print(
        f"encoder     {ef['stock'] / 1e9:,.2f} GFLOPs -> {ef['visionzip'] / 1e9:,.2f} "
        f"({enc['layers_computed_with_visionzip']} of {enc['layers']} layers computed), x{ef['ratio']:.2f}"
    )
    if "llm_prefill_flops_visual" in report:
        lf = report["llm_prefill_flops_visual"]
        print(
            f"LLM prefill {lf['stock'] / 1e9:,.2f} GFLOPs -> {lf['visionzip'] / 1e9:,.2f} for the visual tokens, "
            f"x{lf['ratio']:.1f}   (formula T(4nd^2 + 2n^2d + 2ndm))"
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from vzedge.api import show

    summary = show(args.model, args.image, args.out, visionzip_config(args), image_limits(args))
    print(
        f"wrote {summary['out']}: {summary['kept_tokens']} dominant + {summary['contextual_tokens']} contextual "
        f"tokens on a {summary['grid']}x{summary['grid']} grid; kept patches hold "
        f"{100 * summary['attention_share_of_kept_patches']:.1f}% of the attention"
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from vzedge.api import generate

    cfg = None if args.no_visionzip else visionzip_config(args)
    with results_stdout():
        result = generate(
            args.model,
            args.image,
            args.prompt,
            cfg,
            max_new_tokens=args.max_new_tokens,
            projector=args.projector,
            limits=image_limits(args),
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['image_tokens']} image tokens, {result['prompt_tokens']} prompt tokens, "
            f"{result['new_tokens']} new tokens in {result['seconds']:.2f} s"
        )
        if result["projector"]:
            print(f"projector: tuned, {result['projector']}")
        print(f"answer: {result['answer']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="encoder, token counts and FLOPs with and without VisionZip")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_visionzip_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("show", help="draw the attention heat map and the kept tokens of an image")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image", default="demo", help="image file, or 'demo' for the built-in scene")
    p.add_argument("--out", required=True, help="PNG to write")
    add_visionzip_args(p)
    add_image_limit_args(p)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("generate", help="answer a prompt about an image on VisionZip tokens")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image", default="demo")
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-visionzip", action="store_true", help="use all image tokens (baseline)")
    p.add_argument(
        "--projector",
        default="auto",
        metavar="auto|none|TUNED_DIR",
        help="projector for the VisionZip tokens: a `vzedge tune` folder; auto (default) = the one shipped for "
        "--model tiny at 54+10, else the model's own; none = the model's own",
    )
    p.add_argument("--json", action="store_true")
    add_visionzip_args(p)
    add_image_limit_args(p)
    p.set_defaults(func=_cmd_generate)
