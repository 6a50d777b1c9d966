"""scripts/bench_e2e.py --quick: the JSON's structure and sanity (token counts, agreement, speed-up fields), never a
timing threshold (speed targets live in the benchmark's own output, not in unit tests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_e2e.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| configuration |" in done.stderr  # the Markdown table
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_rows_tokens_and_agreement(quick):
    rows = {r["name"]: r for r in quick["rows"]}
    assert not quick["errors"], quick["errors"]
    assert set(rows) == {
        "stock",
        "vzedge-torch 54+10",
        "vzedge-torch 108+20",
        "vzedge-torch 27+5",
        "vzedge-deployed ort-fp32 + none",
        "vzedge-deployed ort-int8 + bnb-int8",
        "vzedge-deployed ort-int8 + bnb-nf4",
    }
    # tiny: 224 px / patch 14 -> 256 patches, all fed by LLaVA's "default" strategy (CLS dropped)
    assert quick["stock_visual_tokens"] == 256 and rows["stock"]["visual_tokens"] == 256
    assert rows["vzedge-torch 54+10"]["visual_tokens"] == 64
    assert rows["vzedge-torch 108+20"]["visual_tokens"] == 128
    assert rows["vzedge-torch 27+5"]["visual_tokens"] == 32
    for name, r in rows.items():
        agree = r["agreement_with_stock"]
        assert agree["prompts"] == quick["prompts"] == 3
        assert 0 <= agree["exact_match"] <= 3 and agree["rate"] == pytest.approx(agree["exact_match"] / 3, abs=1e-3)
        for key in ("ttft_ms", "image_encode_ms", "prefill_ms", "answer_ms"):
            assert r[key]["n"] == quick["conditions"]["iters"] == 3
            assert 0 < r[key]["p50"] <= r[key]["p90"], (name, key)
        # TTFT holds encode and prefill; the answer holds TTFT and the decode steps
        assert r["ttft_ms"]["min"] >= r["image_encode_ms"]["min"]
        assert r["answer_ms"]["p50"] > r["ttft_ms"]["min"]
        for key in ("ttft_speedup_p50", "answer_speedup_p50", "prefill_speedup_p50", "prefill_flops_ratio",
                    "prefill_speedup_over_flops_ratio", "decode_tok_s_p50"):  # fmt: skip
            assert r[key] > 0, (name, key)
    assert rows["stock"]["agreement_with_stock"]["rate"] == 1.0  # greedy is deterministic
    assert rows["stock"]["prefill_flops_ratio"] == 1.0 and rows["stock"]["ttft_speedup_p50"] == 1.0
    # fewer visual tokens, fewer FLOPs: 32 < 64 < 128 < 256 tokens
    ratios = [
        rows[n]["prefill_flops_ratio"] for n in ("vzedge-torch 27+5", "vzedge-torch 54+10", "vzedge-torch 108+20")
    ]
    assert ratios[0] > ratios[1] > ratios[2] > 1.0
    # the targets block is evaluated from the rows (not asserted to be met: that is the benchmark's business)
    t = quick["targets"]
    assert set(t["prefill_speedup_at_least_0.9_flops_ratio"]) == set(rows) - {"stock"}
    assert t["ttft_at_least_4x_at_54+10"] == (rows["vzedge-torch 54+10"]["ttft_speedup_p50"] >= 4.0)
    assert "ttft_at_least_4x_at_54+10_projected_full_depth" not in t  # tiny runs at full depth: nothing projected
    at64 = {n for n, r in rows.items() if r["visual_tokens"] == 64 and n != "stock"}
    assert set(t["ttft_at_least_4x_at_64_tokens"]) == at64 and "vzedge-torch 54+10" in at64
    fit = quick["prefill_fit"]  # four points on one path: stock and three budgets
    assert len(fit["points"]) == 4 and fit["r2"] is not None


@pytest.mark.slow
def test_quick_memory_and_conditions(quick):
    c = quick["conditions"]
    assert c["shape"] == "tiny" and c["dtype"] == "fp32" and c["llm_layers_run"] == c["llm_layers_full"] == 4
    assert c["cpu_count"] >= 1 and c["torch"] and c["transformers"]
    mem = quick["memory"]
    base = mem["python+torch+transformers"]["peak_rss_mib"]
    for r in quick["rows"]:
        m = mem[r["name"]]
        assert "error" not in m, m
        # a configuration loads a model on top of the imports every configuration pays
        assert m["peak_rss_mib"] > base > 50


def test_helpers_refuse_bad_specs():
    mod = _load_script()
    assert mod.parse_budget("54+10") == (54, 10)
    assert mod.parse_deployed("int8:nf4") == ("int8", "bnb-nf4")
    with pytest.raises(ValueError, match="DOMINANT\\+CONTEXTUAL"):
        mod.parse_budget("64")
    with pytest.raises(ValueError, match="VISION:LLM"):
        mod.parse_deployed("fp16:nf4")
    assert mod.answer_text([5, 6, 2, 7], eos=2) == [5, 6]
    assert mod.answer_text([5, 6], eos=2) == [5, 6]


def test_projection_is_labelled_and_scales_llm_time_only():
    mod = _load_script()

    def row(name, kind, ttft, prefill, answer, encode=100.0):
        return {"name": name, "kind": kind, "ttft_ms": {"p50": ttft}, "prefill_ms": {"p50": prefill},
                "answer_ms": {"p50": answer}, "image_encode_ms": {"p50": encode}}  # fmt: skip

    # stock: 100 ms encode + 50 ms prefill; visionzip: 100 ms encode + 10 ms prefill; 2 of 32 LLM layers run
    rows = [row("stock", "stock", 150.0, 50.0, 170.0), row("vz", "torch", 110.0, 10.0, 130.0)]
    got = mod.projection(rows, 2, 32)
    assert got[0]["ttft_ms_p50"] == pytest.approx(100 + 50 * 16)
    assert got[1]["ttft_ms_p50"] == pytest.approx(100 + 10 * 16)
    assert got[0]["answer_ms_p50"] == pytest.approx(900 + 20 * 16)
    assert got[1]["ttft_speedup_p50"] == pytest.approx(900 / 260, abs=1e-3)
    # 8 of 24 vision layers run: stock computes 24 vs 8 (x3), VisionZip 23 vs 7 (its layer -2)
    got = mod.projection(rows, 2, 32, 8, 24)
    assert got[0]["ttft_ms_p50"] == pytest.approx(300 + 50 * 16)
    assert got[1]["ttft_ms_p50"] == pytest.approx(100 * 23 / 7 + 10 * 16, abs=0.1)


def test_prefill_fit_recovers_a_known_line():
    """intercept + slope x tokens, exact for points on a line, and None with fewer than three distinct lengths."""
    mod = _load_script()

    def row(kind, visual, ms):
        return {"kind": kind, "visual_tokens": visual, "prefill_ms": {"p50": ms}}

    rows = [row("stock", 576, 1400 + 22.0 * 623), row("torch", 64, 1400 + 22.0 * 111)]
    rows.append(row("torch", 32, 1400 + 22.0 * 79))
    rows.append(row("deployed", 64, 99999.0))  # another path: left out of the fit
    fit = mod.prefill_fit(rows, text_tokens=47)
    assert fit["intercept_ms"] == pytest.approx(1400, abs=0.1) and fit["ms_per_token"] == pytest.approx(22.0, abs=1e-3)
    assert fit["r2"] == pytest.approx(1.0) and len(fit["points"]) == 3
    assert mod.prefill_fit(rows[:2], text_tokens=47) is None
