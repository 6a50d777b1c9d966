"""`vzedge run, chat, bench`: the perception loop and VQA through vzedge.runtime."""

from __future__ import annotations

import argparse
import json
import sys

from vzedge._deps import require
from vzedge.cli._common import (
    adaptive_budget,
    add_adaptive_args,
    add_image_limit_args,
    add_visionzip_args,
    image_limits,
    progress_bar,
    results_stdout,
    visionzip_config,
)


def add_runtime_args(p: argparse.ArgumentParser, source_default: str) -> None:
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id (the LLM)")
    p.add_argument("--vision", default=None, help="export folder (manifest.json); default: PyTorch VisionZip")
    p.add_argument(
        "--vision-backend", default="auto", choices=("auto", "torch", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")
    )
    p.add_argument("--quant", default="none", help="LLM quantization: none, int8, nf4, fp4, awq")
    p.add_argument("--projector", default=None, metavar="TUNED_DIR", help="a `vzedge tune` output folder")
    p.add_argument("--all-tokens", action="store_true", help="no VisionZip: all image tokens (baseline)")
    p.add_argument("--source", default=source_default, help="image, folder, video, camera:K, synthetic[:N], demo")
    p.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--clip", type=int, default=1, help="frames per question (video): each compressed on its own")
    p.add_argument("--layout", choices=("reference", "newline"), default="reference", help="anyres crop arrangement")
    add_adaptive_args(
        p,
        "with --vision the buckets come from the export's manifest: omit --adaptive or pass the same buckets and mass",
    )
    p.add_argument(
        "--text-stage",
        type=int,
        default=None,
        metavar="K",
        help="text-conditioned stage 2 (CDPruner-style conditional DPP): keep K of the vision stage's cached tokens "
        "per question; with --all-tokens the cache holds all projected patches (CDPruner's setting)",
    )
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report as JSON to this file")
    p.add_argument("--plot", default=None, help="write per-stage latency and memory over time to this PNG")
    add_visionzip_args(p)
    add_image_limit_args(p)


def run_config(args: argparse.Namespace, **extra):
    from vzedge.runtime.config import RunConfig

    if getattr(args, "plot", None):  # refuse before the run, not after it
        require("matplotlib", "--plot")

    return RunConfig(
        model=args.model,
        vision=args.vision,
        vision_backend=args.vision_backend,
        visionzip=None if args.all_tokens else visionzip_config(args),
        quant=args.quant,
        projector=args.projector,
        source=args.source,
        frames=args.frames,
        clip=args.clip,
        layout=args.layout,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        image_limits=image_limits(args),
        adaptive=adaptive_budget(args),
        text_stage=args.text_stage,
        **extra,
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Report files are checked before the run, not found unwritable after it."""
    from vzedge.io import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")
    if getattr(args, "plot", None):
        from vzedge._deps import require

        require("matplotlib", "--plot")
        check_writable_file(args.plot, "--plot")


def write_reports(args: argparse.Namespace, report: dict) -> None:
    from vzedge.runtime.report import markdown, plot, write_report_json

    print(markdown(report))
    if args.json_out:
        write_report_json(args.json_out, report)
        print(f"wrote {args.json_out}")
    if args.plot:
        plot(args.plot, report)
        print(f"wrote {args.plot}")


def _cmd_run(args: argparse.Namespace) -> int:
    from vzedge.runtime.api import run as run_loop

    cfg = run_config(
        args, policy=args.policy, pipelined=not args.sequential, on_error=args.on_error, queue_size=args.queue_size
    )
    check_outputs(args)
    if args.remote:
        return _run_remote(args, cfg)
    with progress_bar(cfg.frames) as progress, results_stdout():
        on_frame = None
        if progress is not None:
            task = progress.add_task("frames", total=cfg.frames)

            def on_frame(rec):
                progress.update(task, advance=1, description=f"frame {rec.index} {rec.status}")

        report = run_loop(cfg, on_frame=on_frame)
    write_reports(args, report)
    return _finish_run(report)


def _finish_run(report: dict) -> int:
    """The last answer, then the run's exit status: 1 stopped by an error, 130 interrupted (one line), else 0."""
    last = next((f for f in reversed(report["frames"]) if f["answer"] is not None), None)
    if last is not None:
        print(f"last answer (frame {last['index']}): {last['answer']}")
    if report.get("stopped_by_error"):
        print(f"vzedge run: stopped: {report['stopped_by_error']}", file=sys.stderr)
        return 1
    if report["interrupted"]:
        f = report["summary"]["frames"]
        print(
            f"vzedge run: interrupted; the report covers the {f['seen']} frames read "
            f"({f['processed']} processed, {f['dropped']} dropped, {f['failed']} failed)",
            file=sys.stderr,
        )
        return 130  # vzedge.cli.run makes it 143 when the interrupt was SIGTERM
    return 0


def _run_remote(args: argparse.Namespace, cfg) -> int:
    from vzedge.runtime.remote import RemoteLLM, run_remote

    if args.quant != "none" or cfg.visionzip is None:
        raise ValueError("--remote runs the LLM on the server: drop --quant and --all-tokens")
    if cfg.text_stage is not None:
        raise ValueError("--text-stage runs next to the LLM and the server has no text stage: drop --remote or it")
    client = RemoteLLM(args.remote, args.remote_model or args.model, args.api_key, wire_dtype=args.wire_dtype)
    report = run_remote(cfg, client)
    write_reports(args, report)
    r = report["remote"]
    print(
        f"sent {r['embeds_bytes_per_image']} B of image tokens per image ({r['wire_dtype']}; request "
        f"{r['request_bytes_per_image']} B) to {r['url']}; server prompt {r['server_prompt_tokens']} tokens"
    )
    return _finish_run(report)


def _cmd_chat(args: argparse.Namespace) -> int:
    from vzedge.runtime.api import chat, load_session

    cfg = run_config(args)
    check_outputs(args)
    questions = list(args.question or [])
    with results_stdout():
        session = load_session(cfg)
    if not questions:  # interactive: one question per line until EOF or an empty line
        print(f"chat about {cfg.source} ({session.vision.num_tokens} image tokens); empty line to quit")
        for line in sys.stdin:
            if not line.strip():
                break
            turn = chat(cfg, [line.strip()], session)["turns"][0]
            print(f"> {turn['answer']}   ({turn['ttft_ms']:.0f} ms to first token)")
        return 0
    with results_stdout():
        result = chat(cfg, questions, session)
    for turn in result["turns"]:
        print(f"Q: {turn['question']}\nA: {turn['answer']}   (TTFT {turn['ttft_ms']:.1f} ms)")
    sel = result["selection"]
    if sel["text_conditioned"]:
        print(
            f"image: encoded once ({sel['stage1']['tokens']} cached tokens, vision {result['vision_ms']:.1f} ms); "
            f"text-conditioned stage 2 per question: {result['image_tokens']} tokens selected, then prefilled"
        )
    else:
        print(
            f"image: {result['image_tokens']} tokens, vision {result['vision_ms']:.1f} ms, "
            f"prefix prefill {result['image_prefill_ms']:.1f} ms once for {len(result['turns'])} questions"
        )
    if args.json_out:
        from vzedge.io import write_json

        write_json(args.json_out, result)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from vzedge.runtime.api import bench
    from vzedge.runtime.report import markdown

    cfg = run_config(args, policy="all")
    check_outputs(args)
    with results_stdout():
        result = bench(cfg)
    for mode in ("sequential", "pipelined"):
        print(f"## {mode}")
        print(markdown(result[mode]))
    print(json.dumps(result["comparison"], indent=2))
    if args.json_out:
        from vzedge.io import write_json

        write_json(args.json_out, result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the perception loop: frames -> vision graph -> LLM, with latency/memory reports")
    add_runtime_args(p, source_default="demo")
    p.add_argument("--policy", choices=("latest", "all"), default="latest", help="latest drops stale frames")
    p.add_argument("--queue-size", type=int, default=1)
    p.add_argument("--sequential", action="store_true", help="one frame at a time (no stage overlap)")
    p.add_argument("--on-error", choices=("stop", "continue"), default="stop")
    p.add_argument(
        "--remote",
        default=None,
        metavar="URL",
        help="edge-to-server split: send the projected image tokens to a vLLM server started with "
        "--enable-mm-embeds (vzedge serve --engine vllm --vllm-mode embeds) instead of running the LLM here",
    )
    p.add_argument("--remote-model", default=None, help="the server's model name (default: --model)")
    p.add_argument("--api-key", default=None, help="the server's API key")
    p.add_argument("--wire-dtype", choices=("float16", "float32"), default="float16", help="image tokens on the wire")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("chat", help="several questions about one image; its tokens and KV prefix are computed once")
    add_runtime_args(p, source_default="demo")
    p.add_argument("--question", action="append", help="a question (repeatable); none: read them from stdin")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("bench", help="the loop on synthetic frames, sequential vs pipelined, same reports")
    add_runtime_args(p, source_default="synthetic")
    p.set_defaults(func=_cmd_bench)
