"""`vzedge serve-vllm`: serve a model through vLLM's OpenAI server with the VisionZip plugin.

The lead folds this into `vzedge serve --engine vllm`; the library call behind it is
`vzedge.vllm.launch.serve_vllm`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from vzedge.cli._common import add_visionzip_args, visionzip_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve-vllm",
        help="serve through vLLM (OpenAI API) on VisionZip tokens",
        description="Start vLLM's OpenAI-compatible server with vzedge's VisionZip plugin. Unknown options after "
        '`--vllm-args` go to vLLM unchanged (e.g. --vllm-args "--tensor-parallel-size 2").',
    )
    p.add_argument("--model", default="tiny", help="'tiny', a local LLaVA folder, or a hub id")
    p.add_argument(
        "--mode",
        choices=("visionzip", "stock", "embeds"),
        default="visionzip",
        help="visionzip (the plugin), stock (vLLM's LLaVA, all tokens), embeds (stock + --enable-mm-embeds: "
        "the server side of `vzedge run --remote`)",
    )
    p.add_argument(
        "--projector", default="auto", help="auto (shipped tuned one for tiny), none, or a `vzedge tune` folder"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="clients must send it as a Bearer token")
    p.add_argument("--context", type=int, default=None, help="max model length in tokens (vLLM --max-model-len)")
    p.add_argument("--served-model-name", default=None, help="name clients pass as model= (default: --model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--vllm-python", default=None, help="python of the environment with vLLM (default: this one)")
    p.add_argument("--vllm-args", default="", help="further vLLM flags, one shell-quoted string")
    p.add_argument("--print-command", action="store_true", help="print vLLM's command line and exit")
    add_visionzip_args(p)
    p.set_defaults(func=_cmd_serve_vllm)


def _cmd_serve_vllm(args: argparse.Namespace) -> int:
    from vzedge.vllm.launch import VLLMServeConfig, build_command, serve_vllm

    cfg = VLLMServeConfig(
        model=args.model,
        visionzip=visionzip_config(args),
        mode=args.mode,
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
