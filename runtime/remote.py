"""The edge half of an edge-to-server split: the edge runs the vision graph, a server runs the LLM.

The edge sends the image's projected VisionZip tokens (e.g. 64 x LLM width), not the image, to any vLLM
started with `--enable-mm-embeds` (a stock vLLM; `vzedge serve --engine vllm --vllm-mode embeds`), through its
OpenAI chat API (`{"type": "image_embeds"}` content). The server then runs neither a vision tower nor VisionZip and its
KV cache holds 64 image tokens per request. Only the standard library speaks HTTP here, so the edge install
needs no HTTP client package.

Bytes: the tokens go as a base64 `.npy` array (`wire_dtype` float16 by default: half the bytes of float32,
and what a GPU server computes in). That is K x D x 2 bytes, e.g. 64 x 4096 x 2 = 512 KiB for a 7B LLM, which
can be more than a compressed image: the split saves the server's vision compute and lets the edge keep its
pixels private, not necessarily bandwidth. The report gives the exact bytes per image.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

WIRE_DTYPES = {"float16": np.float16, "float32": np.float32}


def encode_embeds(tokens: torch.Tensor, wire_dtype: str = "float16") -> tuple[str, int]:
    """[K, D] (or [1, K, D]) projected image tokens -> (base64 of a .npy array, its byte count before base64)."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype={wire_dtype!r}: use one of {sorted(WIRE_DTYPES)}")
    if tokens.dim() == 3 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 2:
        raise ValueError(f"image tokens must be [K, D] (one image), got shape {list(tokens.shape)}")
    buf = io.BytesIO()
    np.save(buf, tokens.detach().to("cpu", torch.float32).numpy().astype(WIRE_DTYPES[wire_dtype]))
    raw = buf.getvalue()
    return base64.b64encode(raw).decode("ascii"), len(raw)


@dataclass
class RemoteAnswer:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_ms: float
    total_ms: float
    embeds_bytes: int  # the .npy array
    request_bytes: int  # the whole HTTP request body (base64 array + JSON)


class RemoteError(RuntimeError):
    """The server refused or failed a request (its message and HTTP status inside)."""


@dataclass
class RemoteLLM:
    """A client for the LLM half on a vLLM server started with `--enable-mm-embeds`.

    url: the server's base URL (`http://host:8000`, with or without `/v1`); model: its served model name.
    add_special_tokens: ask the server to add BOS to the chat prompt, as vzedge's local runtime does (a vLLM
    extension to the OpenAI API; vLLM's chat path leaves it out by default).
    """

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    wire_dtype: str = "float16"
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--remote {self.url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype={self.wire_dtype!r}: use one of {sorted(WIRE_DTYPES)}")
        base = self.url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def answer(self, tokens: torch.Tensor, question: str, max_new_tokens: int = 16) -> RemoteAnswer:
        """Greedy answer to `question` about the image whose projected tokens are `tokens` [K, D]."""
        embeds, embeds_bytes = encode_embeds(tokens, self.wire_dtype)
        content = [{"type": "image_embeds", "image_embeds": embeds}, {"type": "text", "text": question}]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "add_special_tokens": self.add_special_tokens,
        }
        data = json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/chat/completions", data=data, headers=self._headers())
        t0 = time.perf_counter()
        ttft = None
        parts: list[str] = []
        usage: dict[str, Any] = {}
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                for raw in resp:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RemoteError(f"{self.base}: {chunk['error'].get('message', chunk['error'])}")
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            parts.append(piece)
                    usage = chunk.get("usage") or usage
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):  # not the OpenAI error schema: keep it raw
                detail = json.loads(detail)["error"]["message"]
            raise RemoteError(f"{self.base} answered {err.code}: {detail}") from err
        except urllib.error.URLError as err:
            raise RemoteError(f"cannot reach {self.base}: {err.reason}; is the server up?") from err
        total = time.perf_counter() - t0
        return RemoteAnswer(
            text="".join(parts).strip(),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            ttft_ms=(ttft if ttft is not None else total) * 1e3,
            total_ms=total * 1e3,
            embeds_bytes=embeds_bytes,
            request_bytes=len(data),
        )


def open_edge_vision(cfg: Any):
    """The edge's vision backend for `cfg` (a RunConfig): the exported graph when `cfg.vision` is set (then the
    LLM is not loaded at all: the graph must hold the projector), else PyTorch VisionZip + projector."""
    from vzedge.runtime.backends.vision import open_vision_backend

    if cfg.vision is not None:
        if cfg.projector is not None:
            raise ValueError("--projector with --vision: export the graph with vzedge export --projector TUNED_DIR")
        vision = open_vision_backend(cfg.vision, None, cfg.visionzip, cfg.vision_backend, cfg.resolved_device())
    else:
        from vzedge.models.loading import load_model

        loaded = load_model(cfg.model)
        if loaded.vlm is None:
            raise ValueError(f"{cfg.model!r} is a bare vision encoder; the edge needs its LLaVA projector too")
        if cfg.projector is not None:
            from vzedge.models.projector import load_tuned_projector

            load_tuned_projector(cfg.projector, loaded.vlm, cfg.visionzip)
        vision = open_vision_backend(None, loaded, cfg.visionzip, "torch", "cpu")
    if not vision.projected:
        raise ValueError(
            "the server needs LLM-width image tokens: export the vision graph with --projector "
            "(vzedge export --model M --projector --out DIR)"
        )
    return vision


def run_remote(cfg: Any, client: RemoteLLM) -> dict[str, Any]:
    """`vzedge run --remote`: frames -> preprocess + vision here -> tokens to the server -> answers.

    One request per frame, in order (the server batches across edges; one edge's loop is sequential).
    Returns the runtime's report (same stages and format as `vzedge run`) plus a `remote` section with the
    bytes per image.
    """
    from vzedge.bench import conditions
    from vzedge.runtime.metrics import MemorySampler, RunMetrics
    from vzedge.runtime.sources import open_source

    if getattr(cfg, "text_stage", None) is not None:
        raise ValueError("--text-stage runs next to the LLM and the server has no text stage: drop --remote or it")
    t_load = time.perf_counter()
    vision = open_edge_vision(cfg)
    load_s = time.perf_counter() - t_load
    metrics = RunMetrics(cfg.max_records)
    sampler = MemorySampler(cfg.memory_interval_s).start()
    metrics.memory = sampler
    sent: list[dict[str, Any]] = []
    interrupted = False
    first_error: BaseException | None = None
    try:
        for frame in open_source(cfg.source, cfg.frames):
            i = frame.index
            metrics.stage(i, "capture", frame.capture_ms)
            try:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    prepared = vision.prepare([frame.image])
                    t1 = time.perf_counter()
                    tokens = vision.encode_prepared(prepared)
                t2 = time.perf_counter()
                ans = client.answer(tokens, cfg.prompt, cfg.max_new_tokens)
            except (RemoteError, ValueError) as err:
                metrics.failed(i, "remote", err)
                first_error = first_error or err
                if cfg.on_error == "stop":
                    break
                continue
            metrics.stage(i, "preprocess", (t1 - t0) * 1e3)
            metrics.stage(i, "vision", (t2 - t1) * 1e3)
            metrics.stage(i, "ttft", ans.ttft_ms)
            metrics.stage(i, "end_to_end", frame.capture_ms + (t2 - t0) * 1e3 + ans.total_ms)
            rec = metrics.frame(i)
            rec.answer, rec.new_tokens = ans.text, ans.completion_tokens or 0
            rec.image_tokens = int(tokens.shape[1])  # this frame's own count (its bucket with --adaptive)
            metrics.processed(i)
            sent.append(
                {"embeds_bytes": ans.embeds_bytes, "request_bytes": ans.request_bytes, "prompt": ans.prompt_tokens}
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        metrics.finish()
        sampler.stop()
    report: dict[str, Any] = {
        "title": f"vzedge run --remote {client.base}",
        "config": cfg.to_dict(),
        "device": cfg.resolved_device(),
        "vision_backend": vision.name,
        "image_tokens": vision.num_tokens,
        "quant": "remote",
        "load_s": round(load_s, 3),
        "interrupted": interrupted,
        "conditions": conditions(),
        "summary": metrics.summary(),
        "frames": metrics.records(),
        "memory_samples": list(sampler.samples),
        "remote": {
            "url": client.base,
            "model": client.model,
            "wire_dtype": client.wire_dtype,
            "embeds_bytes_per_image": sent[0]["embeds_bytes"] if sent else None,
            "request_bytes_per_image": max((s["request_bytes"] for s in sent), default=None),
            "server_prompt_tokens": sent[0]["prompt"] if sent else None,
        },
    }
    if first_error is not None and cfg.on_error == "stop":
        report["stopped_by_error"] = f"{type(first_error).__name__}: {first_error}"
    return report
