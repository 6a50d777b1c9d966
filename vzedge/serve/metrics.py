"""The server's figures as Prometheus metrics (`vzedge_*`, units in the names), one registry per app.

Process memory comes from the runtime's metrics module (one owner per figure), read at scrape time.
"""

from __future__ import annotations

from typing import Any

STAGES = ("decode_image", "vision", "text_stage", "image_prefill", "text_prefill", "decode")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _CacheCollector:
    """The image cache's own counters at scrape time (one owner of each figure)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.cache
        yield CounterMetricFamily("vzedge_image_cache_hits", "Image-cache hits", value=c.hits)
        yield CounterMetricFamily("vzedge_image_cache_misses", "Image-cache misses", value=c.misses)
        yield CounterMetricFamily("vzedge_image_cache_evictions", "Image-cache evictions", value=c.evictions)
        yield GaugeMetricFamily("vzedge_image_cache_bytes", "Bytes held by the image cache", value=c.bytes)
        yield GaugeMetricFamily("vzedge_image_cache_entries", "Images in the image cache", value=len(c))


class ServeMetrics:
    def __init__(self, cache: Any, queue_depth: Any, active: Any) -> None:
        """cache: the ImageCache; queue_depth/active: callables giving the waiting and decoding request counts."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from vzedge.runtime.metrics import gpu_memory, host_rss_bytes

        r = self.registry = CollectorRegistry()
        self.requests = Counter("vzedge_requests", "Chat requests by HTTP status", ["status"], registry=r)
        self.stage = Histogram(
            "vzedge_stage_seconds", "Time per stage of a request", ["stage"], buckets=_SECONDS, registry=r
        )
        self.ttft = Histogram("vzedge_ttft_seconds", "Time to first token", buckets=_SECONDS, registry=r)
        self.e2e = Histogram("vzedge_request_seconds", "End-to-end request time", buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram(
            "vzedge_queue_wait_seconds", "Time from arrival to the start of work", buckets=_SECONDS, registry=r
        )
        self.tokens_per_s = Histogram(
            "vzedge_decode_tokens_per_second",
            "Decode speed of each request",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.prompt_tokens = Counter("vzedge_prompt_tokens", "Prompt tokens (text + image)", registry=r)
        self.completion_tokens = Counter("vzedge_completion_tokens", "Generated tokens", registry=r)
        self.image_tokens = Histogram(
            "vzedge_image_tokens",
            "Image tokens in each request's prompt (varies per image with --adaptive)",
            buckets=(8, 16, 32, 64, 128, 256, 576, 1024, 2048, 4096),
            registry=r,
        )
        self.image_tokens_requests = Counter(
            "vzedge_image_tokens_requests",
            "Requests by the image-token count their image got (one label per --adaptive bucket)",
            ["tokens"],
            registry=r,
        )
        self.vision_batch = Histogram(
            "vzedge_vision_batch_images", "Images per vision pass", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        Gauge("vzedge_queue_depth", "Requests waiting for the engine", registry=r).set_function(queue_depth)
        Gauge("vzedge_active_requests", "Requests being decoded", registry=r).set_function(active)
        r.register(_CacheCollector(cache))
        Gauge("vzedge_process_resident_memory_bytes", "Resident set size of the server", registry=r).set_function(
            lambda: float(host_rss_bytes())
        )
        self._gpu = Gauge(
            "vzedge_accelerator_memory_bytes", "Accelerator memory (torch allocator)", ["kind"], registry=r
        )
        self._gpu_memory = gpu_memory

    def observe_image_tokens(self, tokens: int) -> None:
        self.image_tokens.observe(tokens)
        self.image_tokens_requests.labels(tokens=str(tokens)).inc()
        self.prompt_tokens.inc(tokens)  # the text part is counted when the request is queued

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        mem = self._gpu_memory()
        for kind, value in (mem or {}).items():
            self._gpu.labels(kind=kind).set(value)
        return generate_latest(self.registry)


__all__ = ["STAGES", "ServeMetrics"]
