"""Benchmark `vzedge serve`: N concurrent clients against the server with VisionZip and with --no-visionzip.

Both servers run at once (an idle one costs nothing) and the levels alternate between them, so load from other
processes on a shared machine hits both alike. Every request is a new image (a cache miss: vision pass + image
prefill), streamed, with `ignore_eos` so that both modes decode the same number of tokens. Then the cache-hit
speed-up: a first question about an image vs a follow-up about the same image (multi-turn, a cache hit).

    python scripts/bench_serve.py --clients 1 4 16 --requests 16 --json bench_serve.json

Prints JSON: per mode and level requests/s, TTFT and end-to-end p50/p90/p99 (ms), tokens/s, the server's peak
RSS, the follow-up speed-up, and the conditions.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vzedge.serve.probe import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def data_url(seed: int) -> str:
    from vzedge.images import demo_image

    buf = io.BytesIO()
    demo_image(seed=seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    def __init__(self, model: str, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "vzedge", "serve", "--model", model, "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_healthy(self.proc, f"{self.base}/health", 300, logs=lambda: f"see {log_path}")
        except RuntimeError:
            self.stop()
            raise

    def peak_rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return -1

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()


def one_request(client, messages: list[dict], max_tokens: int) -> dict[str, float]:
    """Stream one answer; TTFT = first content chunk, end to end = [DONE]."""
    t0 = time.perf_counter()
    ttft = None
    usage = None
    stream = client.chat.completions.create(
        model="bench",
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    e2e = time.perf_counter() - t0
    return {
        "ttft_ms": (ttft if ttft is not None else e2e) * 1e3,
        "e2e_ms": e2e * 1e3,
        "completion_tokens": usage.completion_tokens,
        "cache_hit": usage.model_extra["images"][0]["cache_hit"],
        "visual_tokens": usage.model_extra["images"][0]["visual_tokens"],
    }


def question(url: str, text: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def run_level(server: Server, clients: int, urls: list[str], max_tokens: int) -> dict:
    """`clients` threads share the requests (one new image each); requests/s over the whole level."""
    import openai

    from vzedge.bench import percentiles

    jobs = list(enumerate(urls))
    lock = threading.Lock()
    samples: list[dict] = []
    errors: list[str] = []

    def worker() -> None:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)
        while True:
            with lock:
                if not jobs:
                    return
                _, url = jobs.pop(0)
            try:
                s = one_request(client, [question(url, "What colour is the triangle?")], max_tokens)
            except Exception as err:  # counted and reported, the level goes on
                errors.append(f"{type(err).__name__}: {err}")
                continue
            with lock:
                samples.append(s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(s["completion_tokens"] for s in samples)
    return {
        "clients": clients,
        "requests": len(urls),
        "ok": len(samples),
        "errors": errors[:5],
        "cache_hits": sum(s["cache_hit"] for s in samples),
        "visual_tokens": samples[0]["visual_tokens"] if samples else None,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(samples) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 2),
        "ttft_ms": {k: round(v, 1) for k, v in percentiles([s["ttft_ms"] for s in samples]).items()},
        "e2e_ms": {k: round(v, 1) for k, v in percentiles([s["e2e_ms"] for s in samples]).items()},
    }


def follow_ups(server: Server, urls: list[str], max_tokens: int) -> dict:
    """First question about each image (miss) vs a follow-up about it (hit), one client, alternating."""
    import openai

    from vzedge.bench import percentiles

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=300)
    first, follow = [], []
    for url in urls:
        q1 = [question(url, "What colour is the triangle?")]
        a = one_request(client, q1, max_tokens)
        convo = [
            *q1,
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many shapes are there?"},
        ]
        b = one_request(client, convo, max_tokens)
        assert not a["cache_hit"] and b["cache_hit"], "the follow-up should hit the image cache"
        first.append(a)
        follow.append(b)
    out = {}
    for name, rows in (("first_question", first), ("follow_up_cache_hit", follow)):
        out[name] = {
            "ttft_ms": {k: round(v, 1) for k, v in percentiles([r["ttft_ms"] for r in rows]).items()},
            "e2e_ms": {k: round(v, 1) for k, v in percentiles([r["e2e_ms"] for r in rows]).items()},
        }
    out["ttft_speedup_p50"] = round(
        out["first_question"]["ttft_ms"]["p50"] / out["follow_up_cache_hit"]["ttft_ms"]["p50"], 2
    )
    out["e2e_speedup_p50"] = round(
        out["first_question"]["e2e_ms"]["p50"] / out["follow_up_cache_hit"]["e2e_ms"]["p50"], 2
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per level (each a new image)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens decoded per request (ignore_eos)")
    ap.add_argument("--follow-ups", type=int, default=8, help="images for the cache-hit speed-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--server-threads", type=int, default=None, help="--threads of both servers")
    ap.add_argument("--logs", default=None, help="folder for the servers' logs (default: a temp folder)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    import tempfile

    from vzedge.bench import conditions

    logs = Path(args.logs or tempfile.mkdtemp(prefix="bench_serve_"))
    logs.mkdir(parents=True, exist_ok=True)
    modes = {"visionzip": [], "all_tokens": ["--no-visionzip"]}
    common = ["--served-model-name", "bench", "--max-queue", str(4 * max(args.clients) + 8)]
    if args.server_threads is not None:
        common += ["--threads", str(args.server_threads)]
    servers = {m: Server(args.model, [*extra, *common], logs / f"{m}.log") for m, extra in modes.items()}
    seed = 1000
    result: dict = {"levels": {m: [] for m in modes}, "follow_ups": {}}
    try:
        for server in servers.values():  # warm-up requests, not measured
            run_level(server, 1, [data_url(seed + i) for i in range(args.warmup)], args.max_tokens)
        seed += args.warmup
        for clients in args.clients:
            urls = [data_url(seed + i) for i in range(args.requests)]  # the same new images for both modes
            seed += args.requests
            for mode, server in servers.items():
                row = run_level(server, clients, urls, args.max_tokens)
                result["levels"][mode].append(row)
                print(f"{mode:10s} clients {clients:2d}: {row['requests_per_s']} req/s", file=sys.stderr)
        urls = [data_url(seed + i) for i in range(args.follow_ups)]
        for mode, server in servers.items():
            result["follow_ups"][mode] = follow_ups(server, urls, args.max_tokens)
        for mode, server in servers.items():
            result.setdefault("peak_rss_bytes", {})[mode] = server.peak_rss_bytes()
    finally:
        for server in servers.values():
            server.stop()
    result["speedup_visionzip_over_all_tokens"] = {
        str(v["clients"]): round(v["requests_per_s"] / a["requests_per_s"], 2)
        for v, a in zip(result["levels"]["visionzip"], result["levels"]["all_tokens"], strict=True)
        if a["requests_per_s"]
    }
    result["conditions"] = conditions(
        model=args.model,
        max_tokens=args.max_tokens,
        requests_per_level=args.requests,
        server_torch_threads=args.server_threads or "default",
        load_average_at_end=os.getloadavg(),
        note="each request a new image (cache miss), streamed, ignore_eos; servers run side by side",
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        from vzedge.io import write_json

        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
