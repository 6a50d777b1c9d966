"""`vzedge` command line: each verb builds a config and calls one library function.

One module per verb group; each has `register(sub)` that adds its verbs to the parser.

What every verb shares lives here: bad input (a ValueError/TypeError that vzedge raised on purpose, a refused
output, a missing extra) is one line on stderr and exit 2; anything else is a bug and keeps its traceback;
Ctrl-C and SIGTERM unwind the same way (every temp folder and partial output is removed by the context
manager that made it) and end with one line and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import contextlib
import linecache
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from vzedge.cli import budget, export, model, quant, runtime, serve, tune
from vzedge.cli import eval as eval_verb  # not `eval`: that name is a builtin
from vzedge.cli._common import EXIT_BAD_INPUT

__all__ = ["EXIT_BAD_INPUT", "EXIT_SIGINT", "EXIT_SIGTERM", "Terminated", "build_parser", "main", "run"]

_GROUPS = (model, export, runtime, eval_verb, quant, budget, tune, serve)

EXIT_SIGINT = 128 + signal.SIGINT  # 130, what shells report for Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

# Third-party log lines that a normal run would print before its own output, none of them about the user's
# input: transformers imports torchao (a gptqmodel dependency) whenever it is installed, and torchao logs that
# its CUDA kernels do not load on this machine and trips torch's pytree deprecation notice; torch's ONNX exporter
# notes that torchvision (which vzedge does not use) is missing; bitsandbytes' CPU backend notes that the optional
# `kernels` package (a faster 4-bit CPU GEMM) is absent. Filtered by logger name only (never by level
# for everything), and only without -v.
_QUIET_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "torch.onnx._internal.exporter._registration",
    "bitsandbytes.backends.cpu.ops",
)

# Folders whose `raise` statements are deliberate bad-input errors (the core, the exporter, the runtime).
_OWN_DIRS = tuple(
    str(Path(p).resolve()) + os.sep
    for p in (
        Path(__file__).resolve().parents[1],
        Path(__file__).resolve().parents[2] / "export",
        Path(__file__).resolve().parents[2] / "runtime",
    )
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds exactly like Ctrl-C (every `finally` runs)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vzedge",
        description="VisionZip for vision-language models on edge devices. "
        "Every command works offline with --model tiny (the built-in model).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) and third-party notices")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in _GROUPS:
        group.register(sub)
    return parser


def _quiet_third_party(verbose: bool) -> None:
    if verbose:
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers 5.2x renames LlamaModel.forward's `past_key_values` to `cache`; the runtime keeps the name
    # that every supported transformers (>= 5.0) accepts, so the notice is about a future release, not this run.
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    # transformers' "Loading weights" bar: huggingface_hub reads the variable when transformers is imported;
    # where it already is (the CLI called in-process), switch the bar off directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def raised_on_purpose(err: BaseException) -> bool:
    """True if `err` came from a `raise` statement in vzedge's own code (core, exporter, runtime).

    A ValueError/TypeError that some library threw from deep inside (a shape mismatch, a None where a tensor
    belongs) is a bug in vzedge's checks, not bad input: it must keep its traceback.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    if not filename.startswith(_OWN_DIRS):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


def is_bad_input(err: BaseException) -> bool:
    """Bad input, a refused output or a missing extra, each raised by vzedge with a message that names the fix."""
    return isinstance(err, (ValueError, TypeError, FileExistsError, ImportError)) and raised_on_purpose(err)


@contextlib.contextmanager
def _signals_unwind(state: dict) -> Iterator[None]:
    """Turn SIGTERM into `Terminated` in the main thread while a verb runs (signals can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        state["signal"] = signal.SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_third_party(args.verbose)
    state: dict = {"signal": None}
    try:
        with _signals_unwind(state):
            rc = int(args.func(args))
    except KeyboardInterrupt as err:
        term = isinstance(err, Terminated) or state["signal"] == signal.SIGTERM
        what = "SIGTERM" if term else "Ctrl-C"
        print(
            f"vzedge {args.command}: interrupted by {what}; stopped, and its temporary and partial files removed",
            file=sys.stderr,
        )
        return EXIT_SIGTERM if term else EXIT_SIGINT
    except Exception as err:
        if not is_bad_input(err):
            raise  # a bug: keep the traceback
        print(f"vzedge {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rc == EXIT_SIGINT and state["signal"] == signal.SIGTERM:
        return EXIT_SIGTERM  # the run loop caught the interrupt itself and reported it
    return rc


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
