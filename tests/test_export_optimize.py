"""vzedge.export.optimize: ORT session levers, ORT's transformer fusions on the exported graph (same outputs, same
kept indices), and the per-op profile. Timing is for scripts/bench_export.py --ort-variants, not for tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vzedge.export import ExportConfig, export_vision  # noqa: E402
from vzedge.export.optimize import cpu_session, op_profile, transformer_fusions  # noqa: E402
from vzedge.visionzip import VisionZipConfig  # noqa: E402

# Fusions and graph levels reorder float arithmetic only: measured ~1e-6 relative on tiny-random.
RTOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from vzedge.models.loading import load_model

    tmp = tmp_path_factory.mktemp("opt")
    res = export_vision(ExportConfig(model="tiny-random", out=tmp / "fp32", visionzip=VisionZipConfig(54, 10)))
    cfg = load_model("tiny-random").vision.config
    return res.out / "model.onnx", cfg, tmp


def _run(sess, x):
    return sess.run(None, {"pixel_values": x})


def test_levers_and_fusions_keep_outputs_and_indices(exported):
    path, cfg, tmp = exported
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3)).numpy()
    ref_tokens, ref_kept = _run(cpu_session(path, level="disable"), x)
    fused = tmp / "fused" / "model.onnx"
    fused.parent.mkdir()
    stats = transformer_fusions(path, fused, cfg.num_attention_heads, cfg.hidden_size)
    assert set(stats) >= {"Attention", "LayerNormalization", "QuickGelu"}
    # the dynamo exporter's attention is not ORT's pattern: nothing fused there (the bench shows what the rest buys)
    assert stats["Attention"] == 0 and stats["LayerNormalization"] > 0
    scale = float(np.abs(ref_tokens).max())
    for sess in (
        cpu_session(path, threads=1, level="basic"),
        cpu_session(path, level="all", spinning=False),
        cpu_session(fused),
    ):
        tokens, kept = _run(sess, x)
        np.testing.assert_array_equal(kept, ref_kept)
        assert np.abs(tokens - ref_tokens).max() <= RTOL * scale


def test_profile_accounts_kernel_time_by_op(exported):
    path, cfg, _ = exported
    x = np.random.default_rng(0).standard_normal((1, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    prof = op_profile(path, {"pixel_values": x}, runs=2)
    assert prof["runs"] == 2 and prof["kernel_ms_per_run"] > 0
    ops = {o["op"]: o for o in prof["ops"]}
    assert "MatMul" in ops and "TopK" in ops  # the ViT's GEMMs and VisionZip's selection
    assert sum(o["share"] for o in prof["ops"]) == pytest.approx(1.0, abs=1e-3)
    assert [o["ms_per_run"] for o in prof["ops"]] == sorted((o["ms_per_run"] for o in prof["ops"]), reverse=True)


def test_bad_arguments_are_refused(exported, tmp_path):
    path, _, _ = exported
    with pytest.raises(ValueError, match="graph level"):
        cpu_session(path, level="max")
    with pytest.raises(ValueError, match="threads"):
        cpu_session(path, threads=0)
    with pytest.raises(ValueError, match="hidden_size % num_heads"):
        transformer_fusions(path, tmp_path / "x.onnx", num_heads=5, hidden_size=64)
    with pytest.raises(ValueError, match="runs"):
        op_profile(path, {}, runs=0)
