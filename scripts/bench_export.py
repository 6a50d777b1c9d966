"""Benchmark the exported vision graph against PyTorch, side by side on the same input, and print JSON.

    python scripts/bench_export.py                 # ViT-L/14-336 (LLaVA-1.5's tower), random weights, 24 layers
    python scripts/bench_export.py --layers 4 --iters 3 --batches 1

Rows, batch 1 and 8: the stock HF encoder (all layers, 577 tokens out), VisionZipEncoder in torch eager
(fp32, and under CPU bf16 autocast for context: it uses AMX/AVX512-BF16 where the CPU has them), ORT CPU on
the fp32, fp16, int8 (dynamic) and int8-static (Q/DQ, calibrated on --calib-n synthetic scenes) exports,
TensorRT (through ORT's TensorRT EP) where present. Each export's size on disk and parity figures against the
fp32 encoder come with it ("exports"), and each ORT row's kept-index agreement and dominant-row cosine against
the fp32 encoder on the timed input ("fidelity"). An export that fails its parity gate is recorded, not timed.
Also the merge alone, one-hot MatMul vs ScatterElements(add),
both in ORT. JSON on stdout, a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzedge.bench import cpu_name, measure, measure_side_by_side


def _ort_session(path: Path, threads: int, providers: list[Any] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def _bf16(encoder: Any, x: torch.Tensor) -> Any:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return encoder(x)


def _bf16_parity(encoder: Any, batch: int) -> dict[str, Any]:
    """The bf16 context row's accuracy, by the exporter's own parity figures (vs the fp32 encoder)."""
    from dataclasses import asdict

    from vzedge.export.parity import compare

    x = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = encoder(x)
        got = _bf16(encoder, x)
    tokens, kept = got.tokens.float().numpy(), got.kept_indices.numpy()
    return asdict(compare("random_seed1", tokens, kept, ref.tokens, ref.kept_indices))


def bench_merge(threads: int, warmup: int, iters: int, tmp: Path) -> dict[str, Any]:
    """The contextual merge alone at ViT-L shapes: one-hot MatMul (what vzedge exports) vs ScatterElements add."""
    from torch import nn

    m, c, d = 577 - 54 - 10, 10, 1024

    class OneHot(nn.Module):
        def forward(self, h: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
            one_hot = (assign.unsqueeze(-1) == torch.arange(c)).float()
            return torch.matmul(one_hot.transpose(1, 2), h)

    class Scatter(nn.Module):
        def forward(self, h: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(h.shape[0], c, h.shape[2], dtype=h.dtype)
            return out.scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, h.shape[2]), h)

    h = torch.randn(8, m, d)
    assign = torch.randint(0, c, (8, m))
    out: dict[str, Any] = {"shape": {"members": m, "contextual": c, "dim": d, "batch": 8}}
    ref = OneHot()(h, assign)
    for name, mod in (("onehot_matmul", OneHot().eval()), ("scatter_elements_add", Scatter().eval())):
        path = tmp / f"merge_{name}.onnx"
        with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout is for the JSON
            prog = torch.onnx.export(
                mod, (h, assign), dynamo=True, opset_version=18, input_names=["h", "assign"], verbose=False
            )
        prog.save(str(path))
        s = _ort_session(path, threads)
        feeds = {"h": h.numpy(), "assign": assign.numpy()}
        got = s.run(None, feeds)[0]
        out[name] = {
            **measure(lambda s=s, feeds=feeds: s.run(None, feeds), warmup, iters * 10),
            "max_abs_diff_vs_onehot_torch": float(np.abs(got - ref.numpy()).max()),
        }
    return out


ORT_VARIANTS = ("level_basic", "no_spinning", "transformer_fusions", "iobinding")


def _ort_variants(fp32: Path, tmp: Path, threads: int, config: Any, result: dict[str, Any],
                  chosen: list[str]) -> dict[str, Any]:  # fmt: skip
    """Row name -> (pixels -> run callable) for the fp32 graph under one ORT lever each (vzedge.export.optimize)."""
    from vzedge.export.optimize import cpu_session, transformer_fusions

    def plain(sess: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
        return lambda xn: lambda: sess.run(None, {"pixel_values": xn})

    out: dict[str, Any] = {}
    if "level_basic" in chosen:
        out["ort_cpu_fp32_level_basic"] = plain(cpu_session(fp32, threads, level="basic"))
    if "no_spinning" in chosen:
        out["ort_cpu_fp32_no_spinning"] = plain(cpu_session(fp32, threads, spinning=False))
    if "transformer_fusions" in chosen:
        fused = tmp / "fp32-fused" / "model.onnx"
        fused.parent.mkdir()
        t0 = time.perf_counter()
        stats = transformer_fusions(fp32, fused, config.num_attention_heads, config.hidden_size)
        result["ort_transformer_fusions"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "fused": {k: v for k, v in stats.items() if v},
        }
        out["ort_cpu_fp32_transformer_fusions"] = plain(cpu_session(fused, threads))
    if "iobinding" in chosen:
        bound = _ort_session(fp32, threads)

        def iobinding(xn: np.ndarray) -> Callable[[], Any]:
            binding = bound.io_binding()
            binding.bind_cpu_input("pixel_values", xn)
            for o in bound.get_outputs():
                binding.bind_output(o.name, "cpu")

            def run() -> Any:
                bound.run_with_iobinding(binding)
                return binding.copy_outputs_to_cpu()

            return run

        out["ort_cpu_fp32_iobinding"] = iobinding
    return out


def _kept_vs_torch(encoder: Any, x: torch.Tensor, runs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Share of kept indices each ORT row has in common with torch eager on the timed input (1.0: the same)."""
    with torch.no_grad():
        ref = encoder(x).kept_indices.numpy()
    out = {}
    for name, fn in runs.items():
        got = np.asarray(fn()[1])
        out[name] = round(float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(got, ref, strict=True)])), 4)
    return out


def _profiles(fp32: Path, encoder: Any, threads: int) -> dict[str, Any]:
    """Where the time goes at batch 1: ORT's per-op kernel time on the fp32 graph, torch's profiler on eager."""
    from torch.profiler import ProfilerActivity, profile

    from vzedge.export.optimize import op_profile

    x = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    ort_prof = op_profile(fp32, {"pixel_values": x.numpy()}, runs=3, threads=threads)
    with torch.no_grad():
        encoder(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                encoder(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    torch_prof = {
        "runs": 3,
        "self_cpu_ms_per_run": round(total / 3 / 1e3, 3),
        "ops": [
            {
                "op": e.key,
                "ms_per_run": round(e.self_cpu_time_total / 3 / 1e3, 3),
                "share": round(e.self_cpu_time_total / total, 4),
            }
            for e in events[:12]
        ],
    }
    return {"ort_cpu_fp32": ort_prof, "torch_eager_fp32": torch_prof, "one_gemm": _one_gemm(threads)}


def _one_gemm(threads: int) -> dict[str, Any]:
    """The ViT-L MLP's first GEMM alone (577 x 1024 @ 1024 x 4096 + bias): torch's linear (its BLAS) vs ORT's
    MatMul + Add (MLAS), round-robin. Separates "whose GEMM is faster" from graph-level effects."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vzedge.export.optimize import cpu_session

    n, k, m = 577, 1024, 4096
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, generator=g)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "one_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, m])],
        [numpy_helper.from_array(w.numpy().T.copy(), "w"), numpy_helper.from_array(b.numpy(), "b")],
    )
    with tempfile.TemporaryDirectory(prefix="vzedge-gemm-") as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        sess = cpu_session(path, threads)
    xn = x.numpy()
    with torch.no_grad():
        t = measure_side_by_side(
            {
                "torch_linear": lambda: torch.nn.functional.linear(x, w, b),
                "ort_matmul_add": lambda: sess.run(None, {"x": xn}),
            },
            5,
            30,
        )
    flop = 2 * n * k * m
    return {
        "shape": [n, k, m],
        "torch_blas": torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0],
        **{name: {**v, "gflop_s_p50": round(flop / v["p50"] / 1e6, 1)} for name, v in t.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="encoder depth (24 = ViT-L/14-336)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dominant", type=int, default=54)
    ap.add_argument("--contextual", type=int, default=10)
    ap.add_argument("--no-merge-bench", action="store_true")
    dtypes = ["fp32", "fp16", "int8", "int8-static"]
    ap.add_argument("--dtypes", nargs="+", default=dtypes, choices=dtypes)
    ap.add_argument("--calib-n", type=int, default=32, help="int8-static: synthetic scenes to calibrate on")
    ap.add_argument("--no-bf16", action="store_true", help="skip the torch bf16-autocast context row")
    ap.add_argument("--ort-variants", nargs="*", default=None, choices=ORT_VARIANTS, help="fp32 graph under ORT "
                    "levers, each alone (what it buys vs ort_cpu_fp32); no names: all. Each holds its own session and "
                    "arena: at batch 8 on ViT-L pick a few")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="per-op profile of ORT fp32 and torch eager at batch 1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    from transformers import CLIPVisionModel

    from vzedge._deps import cuda_available, tensorrt_available
    from vzedge.encoder import VisionZipEncoder
    from vzedge.export import ExportConfig, ParityError, export_vision
    from vzedge.export.manifest import tool_versions
    from vzedge.models.clip import vit_l14_336_config
    from vzedge.visionzip import VisionZipConfig

    threads = torch.get_num_threads()
    vz = VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
    max_batch = max(args.batches)
    torch.manual_seed(0)
    model = CLIPVisionModel(vit_l14_336_config(num_hidden_layers=args.layers)).eval()
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "conditions": {
            "device": cpu_name(),
            "torch_threads": threads,
            "model": f"random CLIP ViT-L/14-336, {args.layers} layers, {params / 1e6:.0f}M params",
            "visionzip": vz.to_dict(),
            "tokens": {"stock": 577, "visionzip": vz.num_tokens},
            "warmup": args.warmup,
            "iters": args.iters,
            **tool_versions(),
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="vzedge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model.save_pretrained(tmp / "model")
        exports = {}
        result["exports"] = {}
        for dtype in args.dtypes:
            t0 = time.perf_counter()
            cfg = ExportConfig(
                model=str(tmp / "model"),
                out=tmp / dtype,
                visionzip=vz,
                dtype=dtype,
                max_batch=max_batch,
                calib_n=args.calib_n,
            )
            try:
                res = export_vision(cfg)
            except ParityError as err:  # recorded, so one failing dtype does not hide the others' figures
                result["exports"][dtype] = {"failed": str(err), "seconds": round(time.perf_counter() - t0, 1)}
                continue
            exports[dtype] = res.out
            result["exports"][dtype] = _export_record(res.manifest, time.perf_counter() - t0)
        encoder = VisionZipEncoder(model, vz).eval()
        sessions = {dtype: _ort_session(out / "model.onnx", threads) for dtype, out in exports.items()}
        variants: dict[str, Any] = {}
        if args.ort_variants is not None and "fp32" in exports:
            chosen = args.ort_variants or list(ORT_VARIANTS)
            variants = _ort_variants(exports["fp32"] / "model.onnx", tmp, threads, model.config, result, chosen)
        trt_session = None
        trt_note = "tensorrt not installed" if not tensorrt_available() else None
        if trt_note is None and not cuda_available():
            trt_note = "no CUDA GPU"
        if trt_note is None:
            from vzedge.export.tensorrt import ort_tensorrt_providers

            providers = ort_tensorrt_providers(tmp / "trt-cache", "pixel_values", (3, 336, 336), max_batch)
            fp16 = exports.get("fp16") or exports.get("fp32")
            trt_session = _ort_session(fp16 / "model.onnx", threads, providers) if fp16 is not None else None
            trt_note = None if trt_session is not None else "no fp16/fp32 export in --dtypes"
        if not args.no_bf16:
            result["torch_bf16_autocast_parity"] = _bf16_parity(encoder, max_batch)
        g = torch.Generator().manual_seed(0)
        for batch in args.batches:
            x = torch.randn(batch, 3, 336, 336, generator=g)
            xn = x.numpy()
            runs: dict[str, Callable[[], Any]] = {
                "hf_stock_all_layers_577_tokens": lambda x=x: model(pixel_values=x),
                "visionzip_torch_eager": lambda x=x: encoder(x),
            }
            if not args.no_bf16:
                runs["visionzip_torch_bf16_autocast"] = lambda x=x: _bf16(encoder, x)
            for dtype, sess in sessions.items():
                runs[f"ort_cpu_{dtype}"] = lambda xn=xn, sess=sess: sess.run(None, {"pixel_values": xn})
            if trt_session is not None:
                runs["ort_tensorrt_fp16"] = lambda xn=xn: trt_session.run(None, {"pixel_values": xn})
            for name, make in variants.items():
                runs[name] = make(xn)
            row: dict[str, Any] = {"batch": batch}
            with torch.no_grad():
                logging.info("timing %s round-robin, batch %d", ", ".join(runs), batch)
                # Round-robin: load from other processes on a shared machine hits every path alike.
                row.update(measure_side_by_side(runs, args.warmup, args.iters))
                row["fidelity"] = _fidelity(encoder, x, sessions)
            if trt_session is None:
                row["tensorrt"] = {"skipped": trt_note}
            if variants:
                row["kept_vs_torch_eager"] = _kept_vs_torch(encoder, x, {k: v for k, v in runs.items() if "ort" in k})
            eager = row["visionzip_torch_eager"]["p50"]
            row["speedup_vs_visionzip_torch_p50"] = {
                k: round(eager / v["p50"], 2) for k, v in row.items() if isinstance(v, dict) and "p50" in v
            }
            result["rows"].append(row)
        if args.profile and "fp32" in exports:
            result["profile_batch1"] = _profiles(exports["fp32"] / "model.onnx", encoder, threads)
        if not args.no_merge_bench:
            result["merge_only_ort"] = bench_merge(threads, args.warmup, args.iters, tmp)
    print(json.dumps(result, indent=2))
    _markdown(result)
    return 0


def _export_record(manifest: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Size on disk, the parity gate's figures and the quantization record of one export."""
    results = manifest["parity"]["results"]
    graph = manifest["graph"]
    files = [graph["file"], *([graph["external_data"]] if graph.get("external_data") else [])]
    q = manifest["quantization"]
    return {
        "seconds": round(seconds, 1),
        "bytes": sum(manifest["files"][f]["bytes"] for f in files),
        "kept_agreement_min": min(r["index_agreement"] for r in results),
        "cosine_min": min(r["dominant_min_cosine"] for r in results),  # dominant rows; all rows in "parity"
        "tensorrt_op_check": manifest["opcheck"]["ok"],
        "slim": manifest["slim"],
        "parity": results,
        "quantization": {k: v for k, v in q.items() if k != "fp32_islands"} if q else None,
    }


def _fidelity(encoder: Any, x: torch.Tensor, sessions: dict[str, Any]) -> dict[str, Any]:
    """Each ORT graph against the fp32 encoder on the timed input: kept-index agreement, dominant-row cosine."""
    from vzedge.export.parity import compare

    ref = encoder(x)
    out = {}
    for dtype, sess in sessions.items():
        tokens, kept = sess.run(None, {"pixel_values": x.numpy()})
        fig = compare("timed", np.asarray(tokens, dtype=np.float32), kept, ref.tokens, ref.kept_indices)
        out[f"ort_cpu_{dtype}"] = {
            "kept_agreement": round(fig.index_agreement, 4),
            "dominant_cosine_min": fig.dominant_min_cosine,
            "cosine_min": fig.min_cosine,
        }
    return out


def _markdown(result: dict[str, Any]) -> None:
    lines = ["| batch | path | p50 ms | p90 ms | x vs VisionZip torch |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        for name, v in row.items():
            if isinstance(v, dict) and "p50" in v:
                speed = row["speedup_vs_visionzip_torch_p50"][name]
                lines.append(f"| {row['batch']} | {name} | {v['p50']} | {v['p90']} | {speed} |")
    # One line per export: latency at each batch, size on disk, the gate's worst kept-index agreement and cosine.
    batches = [row["batch"] for row in result["rows"]]
    head = " | ".join(f"batch {b} p50 (p90) ms" for b in batches)
    lines += ["", f"| ORT CPU graph | {head} | MB on disk | kept indices (gate) | dominant cosine min (gate) |"]
    lines.append("|---" * (4 + len(batches)) + "|")
    for dtype, rec in result.get("exports", {}).items():
        if "failed" in rec:
            lines.append(f"| {dtype} | failed its parity gate: {rec['failed']} |")
            continue
        cells = []
        for row in result["rows"]:
            v = row.get(f"ort_cpu_{dtype}")
            cells.append(f"{v['p50']} ({v['p90']})" if v else "-")
        lines.append(
            f"| {dtype} | {' | '.join(cells)} | {rec['bytes'] / 1e6:.0f} | {rec['kept_agreement_min']:.3f} | "
            f"{rec['cosine_min']:.4f} |"
        )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
