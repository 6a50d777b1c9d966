"""A LLaVA checkpoint saved in fp16 or bf16 (as real hub checkpoints are) exports: the graph and the parity
gate's reference are float32 whatever the checkpoint's dtype (it failed with a dtype mismatch before)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_exports(tmp_path, dtype):
    from vzedge.export import ExportConfig, export_vision
    from vzedge.models.tiny import build_tiny
    from vzedge.visionzip import VisionZipConfig

    vlm, processor = build_tiny()
    folder = tmp_path / "ckpt"
    vlm.to(dtype).save_pretrained(folder)
    processor.save_pretrained(folder)
    cfg = ExportConfig(
        model=str(folder), out=tmp_path / "exp", visionzip=VisionZipConfig(dominant=54, contextual=10), projector=True
    )
    result = export_vision(cfg)
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["graph"]["outputs"][0]["shape"][1:] == [64, vlm.config.text_config.hidden_size]
    for r in manifest["parity"]["results"]:
        # fp32 graph against the fp32 reference built from the half-precision weights
        assert r["index_agreement"] == 1.0 and r["min_cosine"] > 0.9999, r
