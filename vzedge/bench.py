"""Timing helpers shared by the benchmarks: warm up, synchronise, report percentiles with conditions."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99 (nearest-rank), min and mean of `samples`, in the samples' unit."""
    if not samples:
        raise ValueError("no samples to summarise")
    s = sorted(samples)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "min": s[0],
        "mean": statistics.fmean(s),
        "n": len(s),
    }


def sync(device: torch.device | str | None) -> None:
    """Wait for queued device work so that a timer read after it is honest."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], warmup: int = 2, iters: int = 10, device: torch.device | str | None = None
) -> dict[str, float]:
    """Run `fn` `warmup` times untimed, then `iters` times; latency percentiles in milliseconds."""
    return measure_side_by_side({"fn": fn}, warmup, iters, device)["fn"]


def measure_side_by_side(
    fns: dict[str, Callable[[], Any]], warmup: int = 2, iters: int = 10, device: torch.device | str | None = None
) -> dict[str, dict[str, float]]:
    """Time several variants round-robin (one call of each per round), so that load from other
    processes on a shared machine hits all of them alike and their ratios stay meaningful.

    The rounds run on a worker thread, as the runtime's stages do: on a CPU shared with other processes,
    torch ops issued from the main thread were measured up to 50x slower than from a worker thread (the main
    thread's OpenMP team spin-waits on descheduled siblings).
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    failure: list[BaseException] = []

    def rounds() -> None:
        try:
            for _ in range(warmup):
                for fn in fns.values():
                    fn()
            sync(device)
            for _ in range(iters):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        except BaseException as err:  # re-raised in the caller's thread below
            failure.append(err)

    worker = threading.Thread(target=rounds, name="vzedge-bench")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return {
        name: {k: (round(v, 3) if k != "n" else v) for k, v in percentiles(s).items()} for name, s in samples.items()
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(**extra: Any) -> dict[str, Any]:
    """Where and with what a figure was measured."""
    import transformers

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({cpu_name()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    from importlib import metadata

    # Versions from the installed metadata: importing bitsandbytes or onnxruntime here would initialise them.
    for dist in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "bitsandbytes", "gptqmodel"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info.update(extra)
    return info
