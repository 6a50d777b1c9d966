"""Everything GPU-only, in one command: run it once on a CUDA machine and send back the two files it writes.

    pip install -c constraints.txt -e ".[gpu,trt,awq]"   # the project's extras only (awq optional)
    python scripts/gpu_check.py --out gpu-check             # -> gpu-check/gpu_check.json and gpu_check.md

Without CUDA it writes the same two files saying so and exits 0. Sections (each one reports "ok", "skipped" with
the reason, or "error" with the exception, and never stops the others; a time budget, 450 s by default, skips what
would not fit so the whole run stays under 8 minutes on one data-centre GPU):

- environment: GPU, capability, memory, driver, CUDA, versions of torch / onnxruntime-gpu / TensorRT /
  bitsandbytes / gptqmodel; Jetson (L4T release, unified memory from /proc/meminfo as tegrastats reads it).
- bandwidth: device-to-device copy GB/s (measured), and NVML's memory clock x bus width (theoretical).
- encoder: random CLIP ViT-L/14-336 with VisionZip 54+10 -> `vzedge export --dtype fp16 --trt` (ONNX, parity
  gate, TensorRT fp16 engine: build time, engine size); kept indices and tokens of every backend against torch
  fp32 on the same input; latency of torch CUDA eager (fp16), ORT CUDA EP, ORT TensorRT EP and the engine
  (`TensorRTVisionBackend`) at batch 1 and 8, round-robin (vzedge.bench, synchronised).
- llm: a random 1B Llama shape (hidden 2048, 16 layers) in fp16, bnb int8 and bnb nf4 (`vzedge.quant`), and AWQ
  (`vzedge quantize --method awq`, gptqmodel's CUDA kernels): TTFT, decode tok/s, peak allocated memory, and
  decode tok/s against the memory-bandwidth bound (weight bytes read per token / measured bandwidth).
- budget: `vzedge budget --validate` on a random LLaVA-1.5-7B (fp16, 64 tokens): the planner's prediction against
  the measured peak, plus NVML's peak device memory over the whole run (sampled).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_check")

DEFAULT_BUDGET_S = 450.0  # leaves margin under the 8 minutes the check promises
LLM_1B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16)
SECTIONS = ("environment", "bandwidth", "encoder", "llm", "budget")
# Rough cost of each section on one data-centre GPU, used to skip what would overrun the budget.
EXPECTED_S = {"environment": 2, "bandwidth": 5, "encoder": 180, "llm": 150, "budget": 90}


# ------------------------------------------------------------------------------------------------ probes


def cuda_ready() -> tuple[bool, str]:
    """(usable, why not): torch with CUDA and at least one visible device."""
    try:
        import torch
    except ImportError as err:  # the project requires torch; this is only for a broken install
        return False, f"torch is not importable: {err}"
    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        return False, f"no CUDA device visible to torch {torch.__version__} ({build}); nothing GPU-only to check"
    return True, ""


def has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def jetson_release() -> str | None:
    try:
        with open("/etc/nv_tegra_release", encoding="ascii") as f:
            return f.readline().strip()
    except OSError:
        return None


class NvmlPeak:
    """Samples the device's used memory through NVML every `interval` s (process-independent, includes the CUDA
    context and other libraries' pools, unlike torch's allocator)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self.error = interval, 0, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NvmlPeak:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception as err:  # no NVML (Jetson, containers): the figure is reported missing
            self.error = f"{type(err).__name__}: {err}"
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used))
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ---------------------------------------------------------------------------------------------- sections


def section_environment(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vzedge.bench import conditions

    props = torch.cuda.get_device_properties(0)
    out: dict[str, Any] = {
        "gpu": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "conditions": conditions(),
        "jetson": jetson_release(),
    }
    if out["jetson"]:
        from vzedge.runtime.metrics import jetson_unified_memory

        out["jetson_unified_memory"] = jetson_unified_memory()
        out["tegrastats"] = bool(subprocess.run(["which", "tegrastats"], capture_output=True).returncode == 0)
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        out["driver"] = pynvml.nvmlSystemGetDriverVersion()
    return out


def section_bandwidth(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vzedge.bench import measure

    n = 512 * 2**20  # bytes per buffer: far above any cache
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=3, iters=20, device="cuda")
    measured = 2 * n / (t["p50"] / 1e3) / 1e9  # a copy reads and writes every byte
    out: dict[str, Any] = {"copy_gb_s_measured": round(measured, 1), "copy_ms": t}
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)  # MHz
        bus = pynvml.nvmlDeviceGetMemoryBusWidth(h)  # bits
        out["theoretical_gb_s_nvml"] = round(clock * 1e6 * 2 * bus / 8 / 1e9, 1)  # double data rate
    ctx["bandwidth_gb_s"] = measured
    return out


def kept_agreement(a: Any, b: Any) -> float:
    """Mean fraction of kept indices shared per image (order-free, as the exporter's parity gate counts)."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b, strict=True)]))


def section_encoder(ctx: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import CLIPVisionModel

    from vzedge.bench import measure_side_by_side
    from vzedge.encoder import VisionZipEncoder
    from vzedge.export import ExportConfig, export_vision
    from vzedge.manifest import read_manifest
    from vzedge.models.clip import vit_l14_336_config
    from vzedge.visionzip import VisionZipConfig

    tmp: Path = ctx["tmp"]
    vz = VisionZipConfig(54, 10)
    torch.manual_seed(0)
    model = CLIPVisionModel(vit_l14_336_config()).eval()
    model.save_pretrained(tmp / "clip")
    trt = has("tensorrt")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        res = export_vision(ExportConfig(model=str(tmp / "clip"), out=tmp / "clip-fp16", visionzip=vz, dtype="fp16",
                                         max_batch=8, trt=trt))  # fmt: skip
    out: dict[str, Any] = {"export_s": round(time.perf_counter() - t0, 1), "visionzip": vz.to_dict()}
    manifest = read_manifest(res.out)
    out["export_parity"] = manifest["parity"]["results"]
    if trt:
        rec = manifest.get("tensorrt") or {}
        engine = res.out / str(rec.get("engine", ""))
        if not engine.is_file():
            engine = res.out / "tensorrt" / str(rec.get("engine", ""))
        out["tensorrt_engine"] = {
            "build_s": rec.get("build_seconds"),
            "bytes": engine.stat().st_size if engine.is_file() else None,
            "record": rec,
        }
    else:
        out["tensorrt_engine"] = {"skipped": "tensorrt not installed: pip install 'vzedge[trt]'"}

    ref_enc = VisionZipEncoder(model, vz).eval()  # fp32 CPU reference
    enc = VisionZipEncoder(copy.deepcopy(model).half().cuda(), vz).eval()  # a copy: .half() works in place
    onnx_path = str(res.out / manifest["graph"]["file"])
    import onnxruntime as ort

    available = ort.get_available_providers()
    sessions: dict[str, Any] = {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if "CUDAExecutionProvider" in available:
        sessions["ort_cuda_ep"] = ort.InferenceSession(onnx_path, so, providers=["CUDAExecutionProvider"])
    if "TensorrtExecutionProvider" in available:
        from vzedge.ort_providers import ort_tensorrt_providers

        providers = ort_tensorrt_providers(tmp / "ort-trt-cache", "pixel_values", (3, 336, 336), 8)
        sessions["ort_tensorrt_ep"] = ort.InferenceSession(onnx_path, so, providers=providers)
    engine_backend = None
    if trt and manifest.get("tensorrt"):
        from vzedge.runtime.backends.trt import TensorRTVisionBackend

        engine_backend = TensorRTVisionBackend(res.out, manifest)
    out["backends_missing"] = [
        name
        for name, ok in (("ort_cuda_ep", "ort_cuda_ep" in sessions), ("ort_tensorrt_ep", "ort_tensorrt_ep" in sessions),
                         ("tensorrt_engine", engine_backend is not None))
        if not ok
    ]  # fmt: skip
    out["ort_providers_available"] = available
    g = torch.Generator().manual_seed(0)
    out["batches"] = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 336, 336, generator=g)
        xc, xh, xn = x.cuda(), x.cuda().half(), x.numpy()
        with torch.inference_mode():
            ref = ref_enc(x)
        runs: dict[str, Callable[[], Any]] = {"torch_cuda_eager_fp16": lambda xh=xh: enc(xh)}
        for name, s in sessions.items():
            runs[name] = lambda s=s, xn=xn: s.run(None, {"pixel_values": xn})
        if engine_backend is not None:
            runs["tensorrt_engine"] = lambda xc=xc: engine_backend.encode(xc)
        parity: dict[str, Any] = {}
        with torch.inference_mode():
            for name, fn in runs.items():
                got = fn()
                if name.startswith("torch"):
                    tokens, kept = got.tokens.float().cpu().numpy(), got.kept_indices.cpu().numpy()
                elif name == "tensorrt_engine":
                    tokens, kept = got.cpu().numpy(), None  # encode() returns the tokens only
                else:
                    tokens, kept = np.asarray(got[0], dtype=np.float32), got[1]
                ref_t = ref.tokens.numpy()
                cos = (tokens * ref_t).sum(-1) / (np.linalg.norm(tokens, axis=-1) * np.linalg.norm(ref_t, axis=-1))
                parity[name] = {
                    "kept_agreement_vs_torch_fp32": None if kept is None else kept_agreement(kept, ref.kept_indices),
                    "tokens_max_abs_diff": float(np.abs(tokens - ref_t).max()),
                    "tokens_cosine_min": float(cos.min()),
                }
            timings = measure_side_by_side(runs, warmup=3, iters=20, device="cuda")
        out["batches"].append({"batch": batch, "latency_ms": timings, "parity_vs_torch_fp32_cpu": parity})
    return out


def _causal_lm_folder(tmp: Path) -> str:
    """A random 1B Llama shape in fp16 with the built-in byte-level tokenizer, saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vzedge.models.tiny import build_tokenizer

    folder = tmp / "llama-1b"
    if folder.is_dir():
        return str(folder)
    config = LlamaConfig(**LLM_1B, num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


def _generate(model: Any, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    import torch

    from vzedge.bench import percentiles

    ids = torch.randint(4, 280, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).cuda()
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # exactly new_tokens steps

    class Clock:
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, _: Any) -> None:
            torch.cuda.synchronize()
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    ttft, decode = [], []
    try:
        for i in range(4):  # the first is the warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            clock = Clock()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
            torch.cuda.synchronize()
            t_end = time.perf_counter()
            if i:
                ttft.append((clock.t[1] - t0) * 1e3)
                decode.append((t_end - clock.t[1]) * 1e3 / (new_tokens - 1))
    finally:
        model.generation_config.eos_token_id = eos
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "ttft_ms": percentiles(ttft),
        "decode_ms_per_token": percentiles(decode),
        "decode_tok_s_p50": round(1e3 / percentiles(decode)["p50"], 1),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def _weight_bytes(model: Any) -> int:
    """Bytes of everything a decode step reads: parameters and buffers (packed 4-bit weights, scales, absmax)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def section_llm(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vzedge.quant import QuantConfig, load_quantized

    folder = _causal_lm_folder(ctx["tmp"])
    out: dict[str, Any] = {"model": f"random Llama, {LLM_1B}, fp16 compute", "methods": {}}
    methods: list[tuple[str, str]] = [("fp16", "none"), ("bnb-int8", "bnb-int8"), ("bnb-nf4", "bnb-nf4")]
    awq_dir = None
    if has("gptqmodel"):
        awq_dir = ctx["tmp"] / "llama-1b-awq"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "vzedge", "quantize", "--model", folder, "--method", "awq", "--out", str(awq_dir),
               "--calib", "16", "--calib-len", "128", "--device", "cuda"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        out["awq_quantize_s"] = round(time.perf_counter() - t0, 1)
        if done.returncode != 0:
            out["methods"]["awq"] = {"status": "error", "error": done.stderr.strip()[-1500:]}
        else:
            methods.append(("awq", "awq"))
    else:
        out["methods"]["awq"] = {"status": "skipped", "reason": "gptqmodel not installed: pip install 'vzedge[awq]'"}
    bandwidth = ctx.get("bandwidth_gb_s")
    for label, method in methods:
        try:
            src = str(awq_dir) if method == "awq" else folder
            qcfg = QuantConfig(method=method, compute_dtype="fp16", fallback=False)
            loaded = load_quantized(src, qcfg, device="cuda")
            model = loaded.vlm
            row: dict[str, Any] = {"status": "ok", "weight_bytes": _weight_bytes(model)}
            row.update(_generate(model, prompt_tokens=128, new_tokens=32))
            if bandwidth:
                bound = bandwidth * 1e9 / row["weight_bytes"]
                row["decode_tok_s_bandwidth_bound"] = round(bound, 1)
                row["decode_fraction_of_bound"] = round(row["decode_tok_s_p50"] / bound, 3)
            out["methods"][label] = row
        except Exception as err:  # one method failing (e.g. a missing kernel) must not hide the others
            out["methods"][label] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        finally:
            model = loaded = None
            torch.cuda.empty_cache()
    return out


def section_budget(ctx: dict[str, Any]) -> dict[str, Any]:
    from vzedge.budget import BudgetConfig
    from vzedge.runtime.validate import validate

    cfg = BudgetConfig(model="llava-1.5-7b", quant="none", tokens=64, context=512, prompt_tokens=64, dtype="fp16")
    with NvmlPeak() as nvml:
        report = validate(cfg, new_tokens=16, random_weights=True, device="cuda", timeout=ctx["left_s"]())
    out = {
        "config": cfg.to_dict(),
        "rows": report["rows"],
        "total_ratio_predicted_over_measured": report["total_ratio"],
        "tolerance": report["tolerance"],
        "within_tolerance": report["within_tolerance"],
        "nvml_peak_used_mib": round(nvml.peak / 2**20, 1) if nvml.peak else None,
    }
    if nvml.error:
        out["nvml_error"] = nvml.error
    return out


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "environment": section_environment,
    "bandwidth": section_bandwidth,
    "encoder": section_encoder,
    "llm": section_llm,
    "budget": section_budget,
}


def run_sections(names: list[str], ctx: dict[str, Any], budget_s: float) -> dict[str, Any]:
    t_start = time.perf_counter()
    ctx["left_s"] = lambda: max(30.0, budget_s - (time.perf_counter() - t_start))
    out: dict[str, Any] = {}
    for name in names:
        elapsed = time.perf_counter() - t_start
        if elapsed + EXPECTED_S[name] > budget_s:
            out[name] = {"status": "skipped", "reason": f"time budget: {elapsed:.0f} s used of {budget_s:.0f} s"}
            continue
        log.info("section %s", name)
        t0 = time.perf_counter()
        try:
            out[name] = {"status": "ok", **RUNNERS[name](ctx)}
        except Exception as err:  # reported, and the next section still runs
            log.exception("section %s failed", name)
            out[name] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------ report


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render_markdown(result: dict[str, Any]) -> str:
    """The report for people, from the JSON alone (so recorded results render the same)."""
    lines = [f"# vzedge GPU check ({result.get('finished', '?')})", ""]
    if result.get("status") == "skipped":
        lines += [f"**Skipped:** {result['reason']}", "", f"host: {result.get('host', '?')}"]
        return "\n".join(lines) + "\n"
    sections = result.get("sections", {})
    for name in SECTIONS:
        sec = sections.get(name)
        if sec is None:
            continue
        lines.append(f"## {name} ({sec.get('status')}, {_fmt(sec.get('seconds'))} s)")
        lines.append("")
        if sec.get("status") == "skipped":
            lines += [f"skipped: {sec.get('reason')}", ""]
            continue
        if sec.get("status") == "error":
            lines += ["```", str(sec.get("error"))[-1500:], "```", ""]
            continue
        lines += _SECTION_MD[name](sec)
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_environment(s: dict[str, Any]) -> list[str]:
    c = s.get("conditions", {})
    out = [
        f"- GPU: {s['gpu']} ({s['capability']}, {s['memory_gib']} GiB, {s.get('multiprocessors')} SMs), "
        f"driver {s.get('driver', '-')}, CUDA {s.get('cuda')}",
        f"- torch {c.get('torch')}, transformers {c.get('transformers')}, onnxruntime-gpu {c.get('onnxruntime-gpu')}, "
        f"tensorrt {c.get('tensorrt')}, bitsandbytes {c.get('bitsandbytes')}, gptqmodel {c.get('gptqmodel')}",
    ]
    if s.get("jetson"):
        out.append(f"- Jetson: {s['jetson']}; unified memory {s.get('jetson_unified_memory')}")
    return out


def _md_bandwidth(s: dict[str, Any]) -> list[str]:
    return [
        f"- device copy: **{_fmt(s['copy_gb_s_measured'])} GB/s** measured "
        f"(theoretical from NVML: {_fmt(s.get('theoretical_gb_s_nvml'))} GB/s)"
    ]


def _md_encoder(s: dict[str, Any]) -> list[str]:
    eng = s.get("tensorrt_engine", {})
    out = [f"- export (ONNX fp16 + parity gate + engine): {_fmt(s.get('export_s'))} s"]
    if "skipped" in eng:
        out.append(f"- TensorRT engine: skipped ({eng['skipped']})")
    else:
        size = eng.get("bytes")
        out.append(f"- TensorRT fp16 engine: build {_fmt(eng.get('build_s'))} s, "
                   f"{_fmt(size / 2**20 if size else None)} MiB")  # fmt: skip
    if s.get("backends_missing"):
        out.append(f"- not available here: {', '.join(s['backends_missing'])}")
    out += ["", "| batch | backend | p50 ms | p90 ms | kept idx vs torch fp32 | tokens cosine min | max abs diff |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for b in s.get("batches", []):
        for name, t in b["latency_ms"].items():
            p = b["parity_vs_torch_fp32_cpu"].get(name, {})
            kept = p.get("kept_agreement_vs_torch_fp32")
            out.append(
                f"| {b['batch']} | {name} | {_fmt(t['p50'], 2)} | {_fmt(t['p90'], 2)} | "
                f"{'-' if kept is None else f'{kept:.3f}'} | {_fmt(p.get('tokens_cosine_min'), 4)} | "
                f"{_fmt(p.get('tokens_max_abs_diff'), 4)} |"
            )
    return out


def _md_llm(s: dict[str, Any]) -> list[str]:
    out = [f"- {s['model']}", "",
           "| method | TTFT p50 ms | decode tok/s | bandwidth bound tok/s | of bound | peak alloc MiB | weights MiB |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in s.get("methods", {}).items():
        if r.get("status") != "ok":
            out.append(f"| {name} | {r.get('status')}: {str(r.get('reason') or r.get('error'))[:100]} |||||")
            continue
        out.append(
            f"| {name} | {_fmt(r['ttft_ms']['p50'])} | {_fmt(r['decode_tok_s_p50'])} | "
            f"{_fmt(r.get('decode_tok_s_bandwidth_bound'))} | {_fmt(r.get('decode_fraction_of_bound'), 2)} | "
            f"{_fmt(r['peak_allocated_mib'])} | {_fmt(r['weight_bytes'] / 2**20)} |"
        )
    return out


def _md_budget(s: dict[str, Any]) -> list[str]:
    out = [
        f"- predicted / measured total peak: **{_fmt(s['total_ratio_predicted_over_measured'], 3)}** "
        f"(tolerance {s['tolerance']}, within: {s['within_tolerance']}); NVML peak used "
        f"{_fmt(s.get('nvml_peak_used_mib'))} MiB",
        "",
        "| component | predicted MiB | measured MiB | ratio |",
        "|---|---|---|---|",
    ]
    for r in s["rows"]:
        out.append(f"| {r['component']} | {r['predicted'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
                   f"{_fmt(r['ratio'], 3)} |")  # fmt: skip
    return out


_SECTION_MD = {"environment": _md_environment, "bandwidth": _md_bandwidth, "encoder": _md_encoder,
               "llm": _md_llm, "budget": _md_budget}  # fmt: skip


def write_report(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """gpu_check.json and gpu_check.md in `out_dir`, each written atomically."""
    from vzedge.io import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    write_json(json_path, result)
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(result), encoding="utf-8")
    os.replace(tmp, md_path)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="skip sections that would overrun")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        raise SystemExit("--budget-s must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result: dict[str, Any] = {"check": "vzedge gpu_check", "host": platform.node(), "argv": sys.argv[1:]}
    ok, why = cuda_ready()
    if not ok:
        result.update(status="skipped", reason=why, finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    else:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="vzedge-gpu-check-") as tmp:
            result["sections"] = run_sections(args.sections, {"tmp": Path(tmp)}, args.budget_s)
        result.update(status="ran", wall_s=round(time.perf_counter() - t0, 1),
                      finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))  # fmt: skip
    json_path, md_path = write_report(result, Path(args.out))
    print(f"wrote {json_path} and {md_path}" + (f" (skipped: {result['reason']})" if not ok else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
