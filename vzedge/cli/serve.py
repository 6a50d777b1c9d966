"""`vzedge serve`: the OpenAI-compatible VQA server (vzedge.serve)."""

from __future__ import annotations

import argparse

from vzedge.cli._common import add_visionzip_args, visionzip_config


def _cmd_serve(args: argparse.Namespace) -> int:
    from vzedge.serve import ServeConfig, parse_budget, serve

    vz = None
    if not args.no_visionzip:
        if args.budget is not None:
            args.dominant, args.contextual = parse_budget(args.budget)
        vz = visionzip_config(args)
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
    )
    print(f"vzedge serve: {cfg.name} on http://{cfg.host}:{cfg.port}/v1 (GET /health answers 200 once loaded)")
    return serve(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible chat-completions server on VisionZip tokens, with an image/KV cache"
    )
    p.add_argument("--model", default="tiny", help="'tiny', a local folder, or a hub id")
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
    add_visionzip_args(p)
    p.set_defaults(func=_cmd_serve)
