"""scripts/gpu_check.py on a CPU machine: the skip path (no CUDA: exit 0, both files say why) and the report code,
fed a recorded sample result (tests/data/gpu_check_sample.json, a hand-written fixture in the script's format)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SAMPLE = Path(__file__).parent / "data" / "gpu_check_sample.json"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_without_cuda_it_skips_cleanly_and_says_why(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "r" / "gpu_check.json").read_text())
    assert result["status"] == "skipped" and "no CUDA device" in result["reason"]
    assert "sections" not in result  # nothing was attempted
    md = (tmp_path / "r" / "gpu_check.md").read_text()
    assert "**Skipped:**" in md and "no CUDA device" in md
    assert not list((tmp_path / "r").glob("*.tmp"))  # atomic writes leave no temp files


def test_report_renders_recorded_results(tmp_path):
    mod = _load_script()
    result = json.loads(SAMPLE.read_text())
    json_path, md_path = mod.write_report(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == result  # the JSON is written back unchanged
    md = md_path.read_text()
    assert md == mod.render_markdown(result)
    # every section gets its heading with status and time, in the fixed order
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## environment (ok, 0.4 s)", "## bandwidth (ok, 1.1 s)", "## encoder (ok, 150.0 s)",
                     "## llm (ok, 140.0 s)", "## budget (error, 3.0 s)"]  # fmt: skip
    assert "Example GPU (sm_90, 80.0 GiB, 132 SMs), driver 570.00" in md
    assert "**2500.0 GB/s** measured (theoretical from NVML: 3352.3 GB/s)" in md
    assert "TensorRT fp16 engine: build 95.0 s, 600.0 MiB" in md  # 629145600 B = 600 MiB
    assert "| 1 | tensorrt_engine | 2.25 | 2.30 | - | 0.9980 | 0.0200 |" in md  # the engine returns no indices
    assert "| 1 | ort_cuda_ep | 5.00 | 5.50 | 0.981 | 0.9995 | 0.0080 |" in md
    # decode against the bandwidth bound: 2,621,440,000 B per token at 2,500 GB/s -> 953.7 tok/s
    assert "| fp16 | 12.0 | 125.0 | 953.7 | 0.13 | 2600.0 | 2500.0 |" in md
    assert "| bnb-nf4 | 30.0 | 50.0 | - | - | 900.0 | 800.0 |" in md
    assert "| awq | skipped: gptqmodel not installed" in md
    assert "| bnb-int8 | error: RuntimeError: example kernel failure" in md
    assert "RuntimeError: the validation run failed (exit 1)" in md


def test_time_budget_skips_sections_that_would_overrun():
    mod = _load_script()
    ran = []
    real = dict(mod.RUNNERS)
    try:
        for name in mod.SECTIONS:
            mod.RUNNERS[name] = lambda ctx, name=name: ran.append(name) or {"value": 1}
        mod.RUNNERS["bandwidth"] = lambda ctx: 1 / 0  # a failing section is reported, the next still runs
        out = mod.run_sections(list(mod.SECTIONS), {}, budget_s=100.0)
    finally:
        mod.RUNNERS.update(real)
    # expected costs: environment 2, bandwidth 5, encoder 180 (> 100 s budget), llm 150, budget 90
    assert ran == ["environment", "budget"]
    assert out["bandwidth"]["status"] == "error" and "ZeroDivisionError" in out["bandwidth"]["error"]
    assert out["encoder"]["status"] == "skipped" and "time budget" in out["encoder"]["reason"]
    assert out["llm"]["status"] == "skipped"
    assert out["environment"] == {"status": "ok", "value": 1, "seconds": out["environment"]["seconds"]}


def test_kept_agreement_counts_shared_indices_per_image():
    mod = _load_script()
    assert mod.kept_agreement([[0, 1, 2, 3]], [[0, 1, 2, 3]]) == 1.0
    assert mod.kept_agreement([[0, 1, 2, 3], [0, 5, 6, 7]], [[3, 2, 1, 0], [0, 5, 8, 9]]) == pytest.approx(0.75)
