"""AWQ: a checkpoint of the built-in model is produced with gptqmodel on CPU, reloaded and run; calibration
input is checked. Tests that need gptqmodel skip cleanly without it (pip install 'vzedge[awq]').

Figures measured on a 2-core CPU (tiny-random, 16 x 64 calibration tokens, g128): linear bytes 0.13x of
fp32, min layer SQNR 19.3 dB (after unfolding AWQ's scales), max|Δlogit| 0.19, top-1 0.64; ~45 s.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vzedge import cli
from vzedge._deps import has_module
from vzedge.quant import QuantConfig, load_quantized
from vzedge.quant.awq import CalibConfig, calibration_samples, quantize_awq, synthetic_text

MODEL = "tiny-random"
needs_awq = pytest.mark.skipif(
    not (has_module("gptqmodel") and has_module("accelerate")), reason="needs vzedge[awq] (gptqmodel)"
)


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("awq") / "tiny-awq"
    code = cli.run(
        [
            "quantize",
            "--model",
            MODEL,
            "--method",
            "awq",
            "--calib",
            "16",
            "--calib-len",
            "64",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return out


@pytest.mark.slow
@needs_awq
def test_awq_checkpoint_report(awq_dir):
    names = {p.name for p in awq_dir.iterdir()}
    assert {"config.json", "model.safetensors", "quant_report.json", "vzedge_quant.json"} <= names
    assert not list(awq_dir.parent.glob(".*partial"))  # nothing left from the atomic write
    cfg = json.loads((awq_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("awq", 4, 128)
    assert "model.vision_tower" in qc["modules_to_not_convert"]
    r = json.loads((awq_dir / "quant_report.json").read_text())
    assert r["method"] == "awq" and r["quantized_layers"] == 28
    assert r["linear_bytes_ratio"] < 0.2
    # The ATen kernel repacks qweight; its bytes stay within 1% of the stored GEMM layout.
    assert r["quantized_linear_bytes"] == pytest.approx(r["quantized_linear_bytes_formula"], rel=0.01)
    q = r["quality"]
    assert q["sqnr_db_min"] > 17.0, q["sqnr_db"]
    assert q["max_abs_logit_err"] < 0.35
    assert q["top1_agreement"] >= 0.5


@pytest.mark.slow
@needs_awq
def test_awq_reload_and_generate(awq_dir):
    loaded = load_quantized(str(awq_dir), QuantConfig(method="awq"), device="cpu")
    assert loaded.vlm.vzedge_quant.method == "awq"
    layer = loaded.vlm.model.language_model.layers[0].self_attn.q_proj
    assert hasattr(layer, "qweight")
    for part in (loaded.vision, loaded.projector):
        assert all(type(m) is nn.Linear for m in part.modules() if isinstance(m, nn.Linear))
    assert type(loaded.vlm.lm_head) is nn.Linear
    ids = loaded.processor.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.vlm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    with pytest.raises(ValueError, match="already quantized with awq; load it with --method awq"):
        load_quantized(str(awq_dir), QuantConfig(method="bnb-nf4"), device="cpu")
    with pytest.raises(ValueError, match="already quantized with awq; AWQ needs the float checkpoint"):
        quantize_awq(str(awq_dir), str(awq_dir.parent / "again"))
    # An earlier vzedge output is replaced only with force; it is refused before the model loads.
    with pytest.raises(FileExistsError, match="holds an earlier output; pass --force to replace it"):
        quantize_awq(MODEL, str(awq_dir))
    stranger = awq_dir.parent / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force will not delete them"):
        quantize_awq(MODEL, str(stranger), force=True)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_calibration_samples_and_errors(tmp_path):
    from vzedge.models.tiny import build_tokenizer

    tok = build_tokenizer()
    samples = calibration_samples(tok, CalibConfig(samples=4, seq_len=32))
    assert len(samples) == 4 and all(len(s["input_ids"]) == 32 == sum(s["attention_mask"]) for s in samples)
    assert synthetic_text(500) == synthetic_text(500)  # deterministic
    short = tmp_path / "short.txt"
    short.write_text("a few words only", encoding="utf-8")
    with pytest.raises(ValueError, match=r"too short: 16 tokens, but 2 samples x 32 tokens need 64"):
        calibration_samples(tok, CalibConfig(samples=2, seq_len=32, data=str(short)))
    with pytest.raises(ValueError, match="not found"):
        CalibConfig(data=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--calib-len 8 is too short"):
        CalibConfig(seq_len=8)
    with pytest.raises(ValueError, match="--calib 0"):
        CalibConfig(samples=0)


def test_awq_without_gptqmodel_names_the_extra(monkeypatch):
    import vzedge._deps as deps

    real = deps.importlib.import_module

    def no_gptqmodel(name, *a, **k):
        if name.startswith("gptqmodel"):
            raise ImportError("No module named 'gptqmodel'")
        return real(name, *a, **k)

    monkeypatch.setattr(deps.importlib, "import_module", no_gptqmodel)
    from vzedge.quant.awq import _import_gptqmodel

    with pytest.raises(ImportError, match=r"gptqmodel is needed for AWQ quantization .*pip install 'vzedge\[awq\]'"):
        _import_gptqmodel()


@pytest.mark.slow
@needs_awq
def test_failed_bnb_kernel_falls_back_to_awq(awq_dir, monkeypatch):
    import bitsandbytes

    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_kernel)
    loaded = load_quantized(MODEL, QuantConfig(method="bnb-nf4", awq_fallback=str(awq_dir)), device="cpu")
    info = loaded.vlm.vzedge_quant
    assert (info.requested, info.method, info.source) == ("bnb-nf4", "awq", str(awq_dir))
    assert "no kernel image" in info.fallback_reasons[0]
    assert hasattr(loaded.vlm.model.language_model.layers[0].mlp.up_proj, "qweight")
