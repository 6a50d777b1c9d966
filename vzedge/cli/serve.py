"""`vzedge serve`: the OpenAI-compatible VQA server, on vzedge's own engine (vzedge.serve) or on vLLM with the
VisionZip plugin (`--engine vllm`, vzedge.vllm.launch)."""

from __future__ import annotations

import argparse
import shlex
import sys

from vzedge.cli._common import adaptive_budget, add_adaptive_args, add_visionzip_args, visionzip_config

# Flags of the built-in engine that vLLM has no equivalent for (vLLM runs its own vision tower and LLM).
_VZEDGE_ONLY = {
    "vision": None,
    "quant": "none",
    "image_root": None,
    "threads": None,
    "adaptive": None,
    "adaptive_mass": None,
    "text_stage": None,
}
# Flags of --engine vllm that the built-in engine has no use for.
_VLLM_ONLY = {"vllm_mode": None, "vllm_args": "", "vllm_python": None, "context": None, "print_command": False}


def _cmd_serve(args: argparse.Namespace) -> int:
    from vzedge.serve import ServeConfig, parse_budget, serve

    if args.budget is not None:
        args.dominant, args.contextual = parse_budget(args.budget)
    if args.engine == "vllm":
        return _serve_vllm(args)
    _refuse_others(args, _VLLM_ONLY, "--engine vllm")
    vz = None if args.no_visionzip else visionzip_config(args)
    cfg = ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        visionzip=vz,
        vision=args.vision,
        vision_backend=args.vision_backend,
        quant=args.quant,
        projector=args.projector,
        device=args.device,
        layout=args.layout,
        served_name=args.served_model_name,
        image_root=args.image_root,
        image_cache_mb=args.image_cache_mb,
        max_body_mb=args.max_body_mb,
        max_image_pixels=args.max_image_pixels,
        max_queue=args.max_queue,
        max_active=args.max_active,
        max_vision_batch=args.max_vision_batch,
        default_max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        threads=args.threads,
        text_stage=args.text_stage,
        adaptive=adaptive_budget(args),
    )
    print(f"vzedge serve: {cfg.name} on http://{cfg.host}:{cfg.port}/v1 (GET /health answers 200 once loaded)")
    return serve(cfg)


def _refuse_others(args: argparse.Namespace, flags: dict[str, object], engine: str) -> None:
    given = [f"--{k.replace('_', '-')}" for k, default in flags.items() if getattr(args, k) != default]
    if given:
        raise ValueError(f"{', '.join(given)} apply to {engine} only; drop them or pass {engine}")


def _serve_vllm(args: argparse.Namespace) -> int:
    from vzedge.vllm.launch import VLLMServeConfig, build_command, serve_vllm

    _refuse_others(args, _VZEDGE_ONLY, "--engine vzedge")
    mode = args.vllm_mode or ("stock" if args.no_visionzip else "visionzip")
    if args.no_visionzip and mode == "visionzip":
        raise ValueError("--no-visionzip with --vllm-mode visionzip: pick one (stock serves all image tokens)")
    cfg = VLLMServeConfig(
        model=args.model,
        visionzip=visionzip_config(args),
        mode=mode,
        projector=args.projector,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_model_len=args.context,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        python=args.vllm_python or sys.executable,
        vllm_args=shlex.split(args.vllm_args),
    )
    if args.print_command:
        print(shlex.join(build_command(cfg)))
        return 0
    return serve_vllm(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible chat-completions server on VisionZip tokens, with an image/KV cache"
    )
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
    p.add_argument(
        "--engine",
        choices=("vzedge", "vllm"),
        default="vzedge",
        help="vzedge (default: this package's engine, image/KV cache) or vllm (vLLM's OpenAI server with the "
        "VisionZip plugin: continuous batching, paged KV, tensor parallelism; needs vzedge[vllm])",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--budget", default=None, metavar="D+C", help="VisionZip dominant+contextual tokens, e.g. 54+10")
    p.add_argument("--no-visionzip", "--all-tokens", action="store_true", help="serve on all image tokens")
    p.add_argument("--vision", default=None, help="export folder (manifest.json); default: PyTorch VisionZip")
    p.add_argument(
        "--vision-backend", default="auto", choices=("auto", "torch", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt")
    )
    p.add_argument("--quant", default="none", help="LLM quantization: none, int8, nf4, fp4, awq")
    p.add_argument(
        "--projector",
        default="auto",
        metavar="auto|none|TUNED_DIR",
        help="as for `vzedge generate`: auto = the tuned projector shipped for tiny at 54+10, else the model's own",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--layout", choices=("reference", "newline"), default="reference", help="anyres crop arrangement")
    p.add_argument("--image-root", default=None, metavar="DIR", help="allow local image paths under DIR")
    p.add_argument("--image-cache-mb", type=float, default=256.0, help="image tokens + KV prefix cache (0: off)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image (width x height)")
    p.add_argument("--max-queue", type=int, default=64, help="requests queued or running; more get 503")
    p.add_argument("--max-active", type=int, default=8, help="requests decoding at once (round-robin)")
    p.add_argument("--max-vision-batch", type=int, default=8, help="images per vision pass")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, queue included")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--text-stage",
        type=int,
        default=None,
        metavar="K",
        help="text-conditioned stage 2: keep K of each image's cached tokens per question (conditional DPP); "
        "with --all-tokens the cache holds all projected patches",
    )
    g = p.add_argument_group("--engine vllm")
    g.add_argument(
        "--vllm-mode",
        choices=("visionzip", "stock", "embeds"),
        default=None,
        help="visionzip (the plugin; default), stock (vLLM's LLaVA, all tokens; the default with --no-visionzip), "
        "embeds (stock + --enable-mm-embeds: the server side of `vzedge run --remote`)",
    )
    g.add_argument("--context", type=int, default=None, help="max model length in tokens (vLLM --max-model-len)")
    g.add_argument("--dtype", default="auto", help="vLLM --dtype")
    g.add_argument("--vllm-python", default=None, help="python of the environment with vLLM (default: this one)")
    g.add_argument(
        "--vllm-args", default="", help='further vLLM flags, one shell-quoted string, e.g. "--tensor-parallel-size 2"'
    )
    g.add_argument("--print-command", action="store_true", help="print vLLM's command line and exit")
    add_visionzip_args(p)
    add_adaptive_args(
        p, "each request's image at its own bucket; with --vision the export's buckets: omit it or pass the same"
    )
    p.set_defaults(func=_cmd_serve)
