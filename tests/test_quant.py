"""Quantized LLM: bitsandbytes int8/nf4/fp4 on the built-in model, for real on CPU; config, fallback, bad input.

Thresholds are for `tiny-random` (random weights: near-flat logits, so top-1 agreement is a loose sanity
signal; SQNR and bytes are the sharp checks). Figures measured on a 2-core avx512_bf16 CPU:
int8 SQNR min 42.7 dB, max|Δlogit| 0.017, top-1 0.95; nf4 20.6 dB, 0.17, 0.61; fp4 18.2 dB, 0.27, 0.62.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from vzedge import cli
from vzedge._deps import bitsandbytes_available, has_module
from vzedge.quant import (
    METHODS,
    QuantConfig,
    QuantKernelError,
    bnb_smoke_test,
    estimate_weight_bytes,
    layer_bytes,
    load_quantized,
    quant_report,
)

MODEL = "tiny-random"
needs_bnb = pytest.mark.skipif(
    not (bitsandbytes_available() and has_module("accelerate")), reason="needs vzedge[bnb] (bitsandbytes, accelerate)"
)
# method: (linear bytes ratio < , min layer SQNR dB > , max |Δlogit| < , top-1 agreement >=)
THRESHOLDS = {
    "bnb-int8": (0.6, 40.0, 0.05, 0.9),
    "bnb-nf4": (0.35, 19.5, 0.3, 0.5),
    "bnb-fp4": (0.35, 17.0, 0.4, 0.5),
}


@pytest.fixture(scope="module", params=list(THRESHOLDS))
def quantized(request):
    loaded = load_quantized(MODEL, QuantConfig(method=request.param), device="cpu")
    report = quant_report(MODEL, QuantConfig(method=request.param), loaded=loaded)  # before any other forward
    return request.param, loaded, report


@needs_bnb
def test_bnb_footprint_and_quality(quantized):
    method, _, r = quantized
    ratio, sqnr, err, top1 = THRESHOLDS[method]
    assert r["method"] == method and not r["fallback_reasons"]
    assert r["quantized_layers"] == 28  # 4 layers x (q, k, v, o, gate, up, down); lm_head kept
    # Exact byte count (quant state included) equals the layout formula the budget model uses.
    assert r["quantized_linear_bytes"] == r["quantized_linear_bytes_formula"]
    assert r["linear_bytes_ratio"] < ratio
    assert r["get_memory_footprint"] < r["reference_footprint"]
    assert r["get_memory_footprint"] <= r["total_bytes"]  # footprint misses SCB / quant_state
    q = r["quality"]
    assert q["sqnr_db_min"] > sqnr, q["sqnr_db"]
    assert q["max_abs_logit_err"] < err
    assert q["top1_agreement"] >= top1


@needs_bnb
def test_bnb_keeps_vision_projector_lm_head_float_and_generates(quantized):
    method, loaded, _ = quantized
    vlm = loaded.vlm
    for part in (loaded.vision, loaded.projector):
        assert all(type(m) is nn.Linear for m in part.modules() if isinstance(m, nn.Linear))
        assert all(p.dtype == torch.float32 for p in part.parameters())
    assert type(vlm.lm_head) is nn.Linear
    layer = vlm.model.language_model.layers[0].mlp.up_proj
    assert type(layer).__name__ == ("Linear8bitLt" if method == "bnb-int8" else "Linear4bit")
    ids = loaded.processor.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        out = vlm.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape[1] == ids.shape[1] + 6
    assert vlm.get_input_embeddings().weight.dtype == torch.float32


@needs_bnb
def test_double_quant_bytes_match_layout():
    loaded = load_quantized(MODEL, QuantConfig(method="bnb-nf4", double_quant=True), device="cpu")
    r = quant_report(MODEL, QuantConfig(method="bnb-nf4", double_quant=True), loaded=loaded, prompts=("hi there",))
    assert r["quantized_linear_bytes"] == r["quantized_linear_bytes_formula"]
    assert r["linear_bytes_ratio"] < 0.35
    assert r["bytes_by_dtype"]["uint8"] > 393216  # 4-bit weights plus the uint8 absmax


def test_layer_bytes_formulas():
    assert layer_bytes(384, 128, "bnb-int8") == 384 * 128 + 4 * 384
    assert layer_bytes(384, 128, "bnb-nf4") == 384 * 64 + 4 * 384 * 128 // 64 + 64
    assert layer_bytes(128, 384, "awq", group_size=128) == 384 * 128 // 2 + 3 * 128 // 2 + 2 * 3 * 128
    assert layer_bytes(4096, 4096, "none", float_bytes=2) == 2 * 4096 * 4096
    # 7B-sized layer: nf4 is ~0.14x and int8 ~0.25x of fp32
    assert layer_bytes(11008, 4096, "bnb-nf4") / (4 * 11008 * 4096) == pytest.approx(0.1406, abs=1e-3)


def test_estimate_from_config_matches_measured():
    est = estimate_weight_bytes(MODEL, QuantConfig(method="bnb-nf4"), device="cpu")
    per_layer = [(128, 128), (64, 128), (64, 128), (128, 128), (384, 128), (384, 128), (128, 384)]
    assert est["quantized_linear"] == 4 * sum(layer_bytes(n, k, "bnb-nf4") for n, k in per_layer) == 444160
    assert est["total"] == pytest.approx(1947016, rel=0.01)  # measured total (test above's report), buffers aside


def test_config_validation():
    with pytest.raises(ValueError, match="unknown quantization method 'int4'; choose one of"):
        QuantConfig(method="int4")
    with pytest.raises(ValueError, match="compute_dtype 'fp8'"):
        QuantConfig(method="bnb-nf4", compute_dtype="fp8")
    with pytest.raises(ValueError, match="double_quant applies to bnb-nf4/bnb-fp4 only"):
        QuantConfig(method="bnb-int8", double_quant=True)
    with pytest.raises(ValueError, match="bits=8"):
        QuantConfig(method="awq", bits=8)
    with pytest.raises(ValueError, match="group_size=100"):
        QuantConfig(method="awq", group_size=100)
    with pytest.raises(TypeError, match="tuple of module names"):
        QuantConfig(method="bnb-nf4", skip_modules="lm_head")
    with pytest.raises(ValueError, match="awq_fallback"):
        QuantConfig(method="awq", awq_fallback="x")
    assert QuantConfig(method="nf4").method == "bnb-nf4"  # the runtime's --quant names
    assert QuantConfig(method="bnb-nf4", skip_modules=["lm_head"]).skip_modules == ("lm_head",)
    assert QuantConfig().torch_dtype("cpu") == torch.float32
    assert QuantConfig(method="bnb-nf4").fallback_chain() == ("bnb-nf4", "none")
    assert QuantConfig(method="bnb-nf4", awq_fallback="d").fallback_chain() == ("bnb-nf4", "awq", "none")
    assert QuantConfig(method="bnb-nf4", fallback=False).fallback_chain() == ("bnb-nf4",)
    assert set(METHODS) == {"none", "bnb-int8", "bnb-nf4", "bnb-fp4", "awq"}


@needs_bnb
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_smoke_test_passes_on_cpu(method):
    assert bnb_smoke_test(method, torch.device("cpu"), torch.float32) < (0.05 if method == "bnb-int8" else 0.25)


def _failing_kernel(*args, **kwargs):
    # What bitsandbytes' aarch64 wheels raised at the first kernel on Jetson sm_87 (bitsandbytes #1930).
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


@needs_bnb
def test_failed_kernel_falls_back_with_a_warning(monkeypatch, caplog):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", _failing_kernel)
    with caplog.at_level(logging.WARNING, logger="vzedge.quant"):
        loaded = load_quantized(MODEL, QuantConfig(method="bnb-nf4"), device="cpu")
    info = loaded.vlm.vzedge_quant
    assert (info.requested, info.method) == ("bnb-nf4", "none")
    assert "no kernel image is available" in info.fallback_reasons[0]
    assert "falling back to none" in caplog.text and "bnb-nf4 failed its smoke test" in caplog.text
    assert type(loaded.vlm.model.language_model.layers[0].mlp.up_proj) is nn.Linear
    with pytest.raises(QuantKernelError, match="no kernel image"):
        load_quantized(MODEL, QuantConfig(method="bnb-nf4", fallback=False), device="cpu")


@needs_bnb
def test_kernel_returning_garbage_is_caught(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(
        bitsandbytes,
        "matmul_4bit",
        lambda x, w, bias=None, quant_state=None: torch.zeros(*x.shape[:-1], quant_state.shape[0], dtype=x.dtype),
    )
    with pytest.raises(QuantKernelError, match="wrong results: relative error"):
        bnb_smoke_test("bnb-nf4", torch.device("cpu"), torch.float32)


def _save(loaded, folder, quant_method=None):
    loaded.vlm.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    if quant_method:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": quant_method, "bits": 4, "group_size": 128}
        (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_checkpoint_quantized_with_another_method(tmp_path):
    from vzedge.models.loading import load_model

    loaded = load_model(MODEL)
    awq = _save(loaded, tmp_path / "awq", "awq")
    with pytest.raises(ValueError, match="already quantized with awq; load it with --method awq"):
        load_quantized(awq, QuantConfig(method="bnb-nf4"), device="cpu")
    gptq = _save(loaded, tmp_path / "gptq", "gptq")
    with pytest.raises(ValueError, match="already quantized with 'gptq', which vzedge does not load"):
        load_quantized(gptq, QuantConfig(method="none"), device="cpu")
    with pytest.raises(ValueError, match="is not an AWQ checkpoint; make one with `vzedge quantize --method awq"):
        load_quantized(MODEL, QuantConfig(method="awq"), device="cpu")


def test_bad_device():
    with pytest.raises(ValueError, match="is not a torch device"):
        load_quantized(MODEL, QuantConfig(), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            load_quantized(MODEL, QuantConfig(method="bnb-nf4"), device="cuda")


@needs_bnb
def test_out_of_memory_is_reported_with_numbers(monkeypatch):
    from transformers import LlavaForConditionalGeneration

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", oom)
    with pytest.raises(
        MemoryError,
        match=r"out of memory loading 'tiny-random' with bnb-int8 on cpu: it needs "
        r"~0\.00 GiB of weights; the device had [\d.]+ GiB free of [\d.]+ GiB",
    ):
        load_quantized(MODEL, QuantConfig(method="bnb-int8"), device="cpu")


@needs_bnb
def test_causal_lm_with_odd_shapes_warns_and_runs(tmp_path, caplog):
    """Any causal LM loads; layers that miss the avx512_bf16 4-bit constraints are switched, with a warning."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vzedge.models.tiny import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=288,
        hidden_size=128,
        intermediate_size=200,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vzedge.quant"):
        loaded = load_quantized(str(tmp_path), QuantConfig(method="bnb-nf4"), device="cpu")
    import bitsandbytes.functional as F

    if F.has_avx512bf16():
        assert "out_features % 32 == 0 and in_features % 64 == 0" in caplog.text
        assert "mlp.gate_proj (200x128)" in caplog.text and "mlp.down_proj (128x200)" in caplog.text
    assert loaded.vision is None and loaded.projector is None
    with torch.no_grad():
        logits = loaded.vlm(input_ids=torch.tensor([[1, 50, 60, 70]])).logits
    assert torch.isfinite(logits).all()


@needs_bnb
def test_cli_quantize_reports(capsys):
    assert cli.run(["quantize", "--model", MODEL, "--method", "nf4", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "bnb-nf4" and report["linear_bytes_ratio"] < 0.35


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "int4"], "unknown quantization method 'int4'"),
        (["--method", "bnb-nf4", "--out", "x"], "quantizes at load time, so there is no checkpoint to write"),
        (["--method", "awq"], "--method awq writes a checkpoint: pass --out DIR"),
        (["--method", "awq", "--out", "x", "--calib", "0"], "--calib 0"),
        (["--method", "awq", "--out", "x", "--calib-data", "/nonexistent.txt"], "not found"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert cli.run(["quantize", "--model", MODEL, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bnb_on_cuda(method):
    loaded = load_quantized(MODEL, QuantConfig(method=method), device="cuda")
    assert loaded.vlm.vzedge_quant.method == method
    r = quant_report(MODEL, QuantConfig(method=method), loaded=loaded)
    assert r["linear_bytes_ratio"] < THRESHOLDS[method][0]
    assert r["quality"]["sqnr_db_min"] > THRESHOLDS[method][1] - 1  # fp16 compute


def test_quantize_method_none_reports_without_sqnr(capsys):
    """`vzedge quantize --method none`: the reference itself, zero logit error, and no SQNR row to format (it
    raised a TypeError that the CLI showed as bad input before)."""
    assert cli.run(["quantize", "--model", MODEL, "--method", "none", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "max|Δlogit| 0.0000, top-1 1.000, SQNR n/a (no quantized layer)" in out
