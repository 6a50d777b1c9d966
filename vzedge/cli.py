"""`vzedge` command line: each verb builds a config and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2


def _add_visionzip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dominant", type=int, default=54, help="tokens kept by attention (CLS included)")
    p.add_argument("--contextual", type=int, default=10, help="tokens merged from the rest (0: none)")
    p.add_argument("--layer", type=int, default=-2, help="encoder layer to select at (default -2)")
    p.add_argument("--merge", choices=("reference", "mean"), default="reference")


def _visionzip_config(args: argparse.Namespace):
    from vzedge.visionzip import VisionZipConfig

    return VisionZipConfig(dominant=args.dominant, contextual=args.contextual, layer=args.layer, merge=args.merge)


def _cmd_info(args: argparse.Namespace) -> int:
    from vzedge.api import info

    report = info(args.model, _visionzip_config(args))
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

    summary = show(args.model, args.image, args.out, _visionzip_config(args))
    print(
        f"wrote {summary['out']}: {summary['kept_tokens']} dominant + {summary['contextual_tokens']} contextual "
        f"tokens on a {summary['grid']}x{summary['grid']} grid; kept patches hold "
        f"{100 * summary['attention_share_of_kept_patches']:.1f}% of the attention"
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from vzedge.api import generate

    cfg = None if args.no_visionzip else _visionzip_config(args)
    result = generate(args.model, args.image, args.prompt, cfg, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['image_tokens']} image tokens, {result['prompt_tokens']} prompt tokens, "
            f"{result['new_tokens']} new tokens in {result['seconds']:.2f} s"
        )
        print(f"answer: {result['answer']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vzedge",
        description="VisionZip for vision-language models on edge devices. "
        "Every command works offline with --model tiny (the built-in model).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="encoder, token counts and FLOPs with and without VisionZip")
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("show", help="draw the attention heat map and the kept tokens of an image")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image", default="demo", help="image file, or 'demo' for the built-in scene")
    p.add_argument("--out", required=True, help="PNG to write")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("generate", help="answer a prompt about an image on VisionZip tokens")
    p.add_argument("--model", default="tiny")
    p.add_argument("--image", default="demo")
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-visionzip", action="store_true", help="use all image tokens (baseline)")
    p.add_argument("--json", action="store_true")
    _add_visionzip_args(p)
    p.set_defaults(func=_cmd_generate)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileExistsError, ImportError) as err:
        print(f"vzedge {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
