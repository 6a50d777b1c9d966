"""ONNX Runtime on a CPU for the exported fp32 graph: the levers, each one measurable on its own.

- `cpu_session`: an InferenceSession with explicit graph level, threads and spin policy (ORT's defaults are
  ORT_ENABLE_ALL and one thread per physical core).
- `transformer_fusions`: ORT's offline transformer optimizer (`onnxruntime.transformers.optimizer`, CLIP rules:
  Attention, LayerNormalization / SkipLayerNormalization, QuickGelu, BiasGelu); returns how many of each it
  fused. On graphs from the dynamo exporter its attention pattern does not match (0 Attention fused, checked by
  the test), so what it buys on top of ORT_ENABLE_ALL is what `scripts/bench_export.py --ort-variants` measures.
- `op_profile`: ORT's profiler, kernel time per op type over a few runs, so a speed claim comes with the
  profile that explains it.

Imported only by the exporter and the benchmarks; the runtime never imports this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vzedge._deps import require

log = logging.getLogger(__name__)

GRAPH_LEVELS = ("disable", "basic", "extended", "all")


def cpu_session(path: str | os.PathLike[str], threads: int | None = None, level: str = "all", spinning: bool = True,
                profile_prefix: str | None = None) -> Any:  # fmt: skip
    """An ORT CPU session on `path`. threads None: ORT's default (physical cores). spinning False: worker threads
    sleep instead of spin-waiting between ops (can matter on a machine shared with other processes)."""
    ort = require("onnxruntime", "ORT CPU sessions")
    if level not in GRAPH_LEVELS:
        raise ValueError(f"graph level {level!r} is not one of {', '.join(GRAPH_LEVELS)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for ORT's default), got {threads}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads is not None:
        so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def transformer_fusions(src: str | os.PathLike[str], dst: str | os.PathLike[str], num_heads: int,
                        hidden_size: int) -> dict[str, int]:  # fmt: skip
    """Run ORT's transformer optimizer (CLIP rules) on the fp32 graph `src`, write `dst` (weights as external data
    beside it); returns the fused-operator counts it reports."""
    require("onnxruntime", "ORT transformer fusions")
    from onnxruntime.transformers.optimizer import optimize_model

    if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads}, hidden_size={hidden_size}: need hidden_size % num_heads == 0")
    # opt_level 0: the Python fusions only; the session applies ORT's own graph optimizations at load, as it does
    # for the unfused graph, so the two differ only by what the fusions did.
    with contextlib.redirect_stdout(sys.stderr):  # it prints shape-inference notes; stdout is the caller's (JSON)
        model = optimize_model(str(src), model_type="clip", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items()}
    dst = Path(dst)
    model.save_model_to_file(str(dst), use_external_data_format=True, all_tensors_to_one_file=True)
    log.info("ORT transformer fusions on %s: %s", Path(src).name, {k: v for k, v in stats.items() if v})
    return stats


def op_profile(path: str | os.PathLike[str], feeds: dict[str, np.ndarray], runs: int = 3,
               threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Kernel time per op type (ORT's profiler) over `runs` runs after one warm-up: ms per run and share of the
    total, largest first."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    with tempfile.TemporaryDirectory(prefix="vzedge-ort-profile-") as tmp:
        sess = cpu_session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        for _ in range(runs + 1):
            sess.run(None, feeds)
        with open(sess.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    if len(model_runs) != runs + 1:
        raise RuntimeError(f"ORT's profile shows {len(model_runs)} runs, expected {runs + 1}")
    warm_end = model_runs[0][1]  # the first run is the warm-up: its kernels are left out
    by_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e["ts"] >= warm_end:
            by_op[e["args"]["op_name"]] += int(e["dur"])  # microseconds
    total = sum(by_op.values())
    if total == 0:
        raise RuntimeError("ORT's profile holds no kernel events; was the graph empty?")
    return {
        "runs": runs,
        "kernel_ms_per_run": round(total / runs / 1e3, 3),
        "ops": [
            {"op": op, "ms_per_run": round(us / runs / 1e3, 3), "share": round(us / total, 4)}
            for op, us in by_op.most_common()
        ],
    }
