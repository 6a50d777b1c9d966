"""`vzedge` command line: each verb builds a config and calls one library function.

One module per verb group; each has `register(sub)` that adds its verbs to the parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vzedge.cli import budget, export, model, quant, runtime, tune, vllm
from vzedge.cli import eval as eval_verb  # not `eval`: that name is a builtin
from vzedge.cli._common import EXIT_BAD_INPUT

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main", "run"]

_GROUPS = (model, export, runtime, eval_verb, quant, budget, tune, vllm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vzedge",
        description="VisionZip for vision-language models on edge devices. "
        "Every command works offline with --model tiny (the built-in model).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in _GROUPS:
        group.register(sub)
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
