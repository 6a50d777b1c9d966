"""Arguments and helpers that several verbs share."""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def add_visionzip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dominant", type=int, default=54, help="tokens kept by attention (CLS included)")
    p.add_argument("--contextual", type=int, default=10, help="tokens merged from the rest (0: none)")
    p.add_argument("--layer", type=int, default=-2, help="encoder layer to select at (default -2)")
    p.add_argument("--merge", choices=("reference", "mean"), default="reference")
    p.add_argument(
        "--selector",
        choices=("visionzip", "divprune", "vispruner", "random", "pool"),
        default="visionzip",
        help="token selector (vzedge.select); all keep dominant + contextual tokens",
    )


def add_adaptive_args(p: argparse.ArgumentParser, where: str) -> None:
    """--adaptive K1,K2,... and --adaptive-mass (vzedge.select.adaptive); `where` ends the --adaptive help."""
    p.add_argument(
        "--adaptive",
        default=None,
        metavar="K1,K2,...",
        help="per-image token budget: each image gets the smallest of these token counts that holds "
        f"--adaptive-mass of its attention (overrides --dominant/--contextual; {where})",
    )
    p.add_argument(
        "--adaptive-mass", type=float, default=None, help="share of the attention mass to keep (default 0.5)"
    )


def adaptive_budget(args: argparse.Namespace):
    """The AdaptiveBudget of --adaptive/--adaptive-mass, or None without --adaptive."""
    if not getattr(args, "adaptive", None):
        if getattr(args, "adaptive_mass", None) is not None:
            raise ValueError("--adaptive-mass needs --adaptive K1,K2,... (the buckets)")
        return None
    from vzedge.select import AdaptiveBudget

    parts = args.adaptive.replace(" ", "").split(",")
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--adaptive {args.adaptive!r}: pass comma-separated token counts, e.g. --adaptive 16,28,57")
    mass = 0.5 if args.adaptive_mass is None else args.adaptive_mass
    return AdaptiveBudget(tuple(int(p) for p in parts), mass)


def add_image_limit_args(p: argparse.ArgumentParser) -> None:
    from vzedge.images import DEFAULT_LIMITS

    g = p.add_argument_group("input limits (checked from the image header, before decoding)")
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_LIMITS.max_pixels,
        help=f"largest width x height accepted (default {DEFAULT_LIMITS.max_pixels:,})",
    )
    g.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=DEFAULT_LIMITS.max_aspect,
        help=f"largest long side / short side accepted (default {DEFAULT_LIMITS.max_aspect:g})",
    )


def image_limits(args: argparse.Namespace):
    from vzedge.images import ImageLimits

    return ImageLimits(max_pixels=args.max_image_pixels, max_aspect=args.max_aspect_ratio)


def visionzip_config(args: argparse.Namespace):
    from vzedge.visionzip import VisionZipConfig

    return VisionZipConfig(
        dominant=args.dominant,
        contextual=args.contextual,
        layer=args.layer,
        merge=args.merge,
        selector=getattr(args, "selector", "visionzip"),
    )


def results_stdout():
    """While a library call runs, anything printed to stdout goes to stderr: stdout carries only the verb's
    results (third-party packages such as gptqmodel print banners to stdout, which broke `--json`)."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)


def progress_bar(total: int | None):
    """A rich progress bar on a terminal (frames processed / dropped); a no-op without rich or a TTY."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    try:
        from rich.progress import Progress
    except ImportError:
        return contextlib.nullcontext(None)
    return Progress(transient=True)
