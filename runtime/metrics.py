"""Every measured figure of a run: per-frame stage times, frame accounting, memory over time.

One owner, one format: `RunMetrics.summary()` is the JSON every report is made from.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vzedge.bench import percentiles

STAGES = ("capture", "preprocess", "vision", "text_stage", "prefill", "ttft", "decode_per_token", "end_to_end")


@dataclass
class FrameRecord:
    index: int
    status: str = "pending"  # processed | dropped | failed
    stage_ms: dict[str, float] = field(default_factory=dict)
    new_tokens: int = 0
    image_tokens: int = 0  # visual tokens this frame's question saw (varies per frame with --adaptive)
    cache_hit: bool = False
    dropped_at: str | None = None
    error: str | None = None
    answer: str | None = None
    finished_at: float | None = None


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to ru_maxrss peak elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`), so RSS shows memory just released; a no-op
    where the C library has no such call."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def gpu_memory() -> dict[str, int] | None:
    """torch allocator figures (current/peak allocated, reserved) and NVML per-process use, if CUDA is up."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    out = {
        "allocated": int(torch.cuda.memory_allocated()),
        "peak_allocated": int(torch.cuda.max_memory_allocated()),
        "reserved": int(torch.cuda.memory_reserved()),
    }
    try:
        import pynvml
    except ImportError:
        return out  # NVML figures need nvidia-ml-py; the allocator's are above
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                out["nvml_process"] = int(proc.usedGpuMemory or 0)
    except pynvml.NVMLError:
        out["nvml_process"] = -1  # NVML present but not usable here (e.g. in a container without it)
    return out


def jetson_unified_memory() -> dict[str, int] | None:
    """Used/total unified memory on a Jetson (from /proc/meminfo, which tegrastats also reads)."""
    if not os.path.exists("/etc/nv_tegra_release"):
        return None
    info = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return {"total": info["MemTotal"], "used": info["MemTotal"] - info.get("MemAvailable", 0)}


class MemorySampler:
    """Samples host RSS (and GPU memory) every `interval` seconds on a daemon thread."""

    def __init__(self, interval: float = 0.25, max_samples: int = 86_400) -> None:
        self.interval = interval
        # Bounded: a loop that runs for days keeps the most recent samples (~6 h at 4 Hz), not all of them.
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_samples)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vzedge-memory", daemon=True)
        self._t0 = time.perf_counter()

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": time.perf_counter() - self._t0, "host_rss": host_rss_bytes()}
        gpu = gpu_memory()
        if gpu:
            s["gpu"] = gpu
        unified = jetson_unified_memory()
        if unified:
            s["unified"] = unified
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def rss_slope_bytes_per_s(self, skip_fraction: float = 0.2) -> float:
        """Least-squares slope of host RSS over time, after a warm-up fraction (flat memory is ~0)."""
        pts = list(self.samples)[int(len(self.samples) * skip_fraction) :]
        if len(pts) < 3:
            return 0.0
        ts = [p["t"] for p in pts]
        ys = [p["host_rss"] for p in pts]
        mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - mt) ** 2 for t in ts)
        return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var


class RunMetrics:
    """Frame accounting and stage latencies; thread-safe.

    Per-frame records are kept for the most recent `max_records` finished frames (the report's frame table
    and the latency percentiles are over that window); older ones are folded into running totals, so frame
    accounting covers the whole run while memory stays flat however long a loop runs.
    """

    def __init__(self, max_records: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.frames: dict[int, FrameRecord] = {}
        self.max_records = max_records
        self._folded: collections.Counter[str] = collections.Counter()
        self._folded_drops: collections.Counter[str] = collections.Counter()
        self._folded_tokens = 0
        self._folded_decode_s = 0.0
        self._folded_hits = 0
        self.t_start = time.perf_counter()
        self.t_end: float | None = None
        self.memory: MemorySampler | None = None

    def _fold_old(self) -> None:
        """Fold the oldest finished records into the totals once the window is full (caller holds the lock)."""
        excess = len(self.frames) - self.max_records
        if excess <= 0:
            return
        for index in [i for i, r in self.frames.items() if r.status != "pending"][:excess]:
            r = self.frames.pop(index)
            self._folded[r.status] += 1
            if r.status == "dropped" and r.dropped_at:
                self._folded_drops[r.dropped_at] += 1
            if r.status == "processed":
                self._folded_tokens += r.new_tokens
                self._folded_decode_s += r.stage_ms.get("decode_per_token", 0.0) * r.new_tokens / 1e3
                self._folded_hits += int(r.cache_hit)

    def frame(self, index: int) -> FrameRecord:
        with self._lock:
            rec = self.frames.get(index)
            if rec is None:
                rec = self.frames[index] = FrameRecord(index)
            return rec

    def stage(self, index: int, stage: str, ms: float) -> None:
        self.frame(index).stage_ms[stage] = ms

    def dropped(self, index: int, at: str) -> None:
        rec = self.frame(index)
        rec.status, rec.dropped_at, rec.finished_at = "dropped", at, time.perf_counter()
        self._finished()

    def failed(self, index: int, at: str, error: BaseException) -> None:
        rec = self.frame(index)
        rec.status, rec.dropped_at = "failed", at
        rec.error, rec.finished_at = f"{type(error).__name__}: {error}", time.perf_counter()
        self._finished()

    def processed(self, index: int) -> None:
        rec = self.frame(index)
        rec.status, rec.finished_at = "processed", time.perf_counter()
        self._finished()

    def _finished(self) -> None:
        if len(self.frames) > self.max_records:
            with self._lock:
                self._fold_old()

    def finish(self) -> None:
        self.t_end = time.perf_counter()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            recs = list(self.frames.values())
        elapsed = (self.t_end or time.perf_counter()) - self.t_start
        counts = {
            s: sum(r.status == s for r in recs) + self._folded[s] for s in ("processed", "dropped", "failed", "pending")
        }
        done = [r for r in recs if r.status == "processed"]
        stages = {}
        for stage in STAGES:
            vals = [r.stage_ms[stage] for r in done if stage in r.stage_ms]
            if vals:
                stages[stage] = {k: (round(v, 3) if k != "n" else v) for k, v in percentiles(vals).items()}
        tokens = sum(r.new_tokens for r in done) + self._folded_tokens
        decode_s = sum(r.stage_ms.get("decode_per_token", 0.0) * r.new_tokens for r in done) / 1e3
        decode_s += self._folded_decode_s
        dropped_by_stage: dict[str, int] = dict(self._folded_drops)
        for r in recs:
            if r.status == "dropped" and r.dropped_at:
                dropped_by_stage[r.dropped_at] = dropped_by_stage.get(r.dropped_at, 0) + 1
        out: dict[str, Any] = {
            "frames": {"seen": len(recs) + sum(self._folded.values()), **counts, "dropped_by_stage": dropped_by_stage},
            "stats_window_frames": len(recs),
            "elapsed_s": round(elapsed, 3),
            "frames_per_s": round(counts["processed"] / elapsed, 3) if elapsed > 0 else 0.0,
            "new_tokens": tokens,
            "decode_tokens_per_s": round(tokens / decode_s, 3) if decode_s > 0 else None,
            "cache_hits": sum(r.cache_hit for r in done) + self._folded_hits,
            "image_tokens_mean": (
                round(sum(r.image_tokens for r in done) / len(done), 3)
                if done and any(r.image_tokens for r in done)
                else None
            ),
            "stages_ms": stages,
            "errors": [{"frame": r.index, "stage": r.dropped_at, "error": r.error} for r in recs if r.error][:20],
        }
        if self.memory is not None and self.memory.samples:
            rss = [s["host_rss"] for s in self.memory.samples]
            out["memory"] = {
                "host_rss_peak": max(rss),
                "host_rss_last": rss[-1],
                "host_rss_slope_bytes_per_s": round(self.memory.rss_slope_bytes_per_s(), 1),
                "samples": len(rss),
            }
            gpus = [s["gpu"] for s in self.memory.samples if "gpu" in s]
            if gpus:
                out["memory"]["gpu_peak_allocated"] = max(g["peak_allocated"] for g in gpus)
                out["memory"]["gpu_reserved_last"] = gpus[-1]["reserved"]
            unified = [s["unified"]["used"] for s in self.memory.samples if "unified" in s]
            if unified:
                out["memory"]["unified_used_peak"] = max(unified)
        return out

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(r) for r in sorted(self.frames.values(), key=lambda r: r.index)]
