"""Exporter: ONNX graphs of VisionZipEncoder checked against PyTorch, for tiny, ViT-L/14-336-sized CLIP and
SO400M-sized SigLIP, in fp32 and fp16. Each model is exported once per module (the slow part) and checked
several ways.

The large encoders keep their full width, resolution and token count (CLIP 1024 wide, 336 px, 577 tokens;
SigLIP 1152 wide, 384 px, 729 tokens) but only 3 / 2 layers, so the module runs in a few minutes on a 2-core
CPU; scripts/bench_export.py exports the full-depth ViT-L.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxslim")

from vzedge.encoder import VisionZipEncoder  # noqa: E402
from vzedge.export import ExportConfig, ParityError, export_vision  # noqa: E402
from vzedge.export.opcheck import check_tensorrt_ops, visionzip_precision  # noqa: E402
from vzedge.manifest import read_manifest, verify_files  # noqa: E402
from vzedge.models.loading import load_model  # noqa: E402
from vzedge.visionzip import VisionZipConfig  # noqa: E402

# ORT vs VisionZipEncoder (fp32), measured independently of the gate. fp32: the same arithmetic up to
# kernel order (measured ~1e-6 relative). fp16: ViT layers in half precision (measured <= 0.1% relative
# on dominant rows, cosine >= 0.9997), rare selection flips between near-tied scores.
FP32_RTOL = 1e-4
FP16_RTOL = 2e-2
FP16_MIN_AGREEMENT = 0.9


def _session(out: Path):
    return ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def _assert_matches(out: Path, model_dir: str, dtype: str, has_projector: bool = False) -> None:
    """Batch 1 and 3 through the one graph against a fresh VisionZipEncoder (fp32) on seeded inputs."""
    loaded = load_model(model_dir)
    m = read_manifest(out)
    enc = VisionZipEncoder(loaded.vision, VisionZipConfig(**m["visionzip"])).eval()
    session = _session(out)
    size = m["source"]["image_size"]
    g = torch.Generator().manual_seed(1234)
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=g)
        with torch.no_grad():
            ref = enc(x)
            ref_tokens = loaded.projector(ref.tokens) if has_projector else ref.tokens
        tokens, kept = session.run(None, {"pixel_values": x.numpy()})
        assert tokens.shape == (batch, m["visionzip"]["dominant"] + m["visionzip"]["contextual"], ref_tokens.shape[-1])
        assert kept.shape == (batch, m["visionzip"]["dominant"]) and kept.dtype == np.int64
        agree = np.mean([len(set(kept[i]) & set(ref.kept_indices[i].tolist())) / kept.shape[1] for i in range(batch)])
        scale = float(ref_tokens.abs().max())
        if dtype == "fp32":
            assert agree == 1.0
            np.testing.assert_array_equal(kept, ref.kept_indices.numpy())
            dom = np.abs(tokens[:, : kept.shape[1]] - ref_tokens[:, : kept.shape[1]].numpy()).max()
            assert dom <= FP32_RTOL * scale, (dom, scale)
        else:
            assert tokens.dtype == np.float16
            assert agree >= FP16_MIN_AGREEMENT
            for i in range(batch):
                if np.array_equal(kept[i], ref.kept_indices[i].numpy()):
                    d = np.abs(tokens[i, : kept.shape[1]].astype(np.float32) - ref_tokens[i, : kept.shape[1]].numpy())
                    assert d.max() <= FP16_RTOL * scale, (d.max(), scale)


def _assert_manifest(out: Path, dtype: str, k: int) -> dict:
    m = read_manifest(out)
    verify_files(out, m)
    assert m["graph"]["dtype"] == dtype and m["graph"]["opset"] == 18
    assert m["graph"]["inputs"][0]["shape"][0] == "batch"
    assert m["graph"]["outputs"][0]["shape"][1] == k
    assert m["parity"]["passed"] and len(m["parity"]["results"]) == 2
    assert {r["inputs"] for r in m["parity"]["results"]} == {"random_seed0", "demo_image"}
    assert m["opcheck"]["ok"], m["opcheck"]["problems"]
    assert m["slim"]["after"]["nodes"] < m["slim"]["before"]["nodes"]
    assert m["preprocess"]["mean"] and m["preprocess"]["std"]
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temp folder left beside it
    return m


def _assert_fp32_islands(out: Path) -> None:
    """VisionZip scoring, selection, key norm and merge are float32 even inside an fp16 graph; no Pow."""
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    p = visionzip_precision(proto)
    assert p["TopK"] and all(t == "float32" for t in p["TopK"]), p
    assert p["ArgMax"] == ["float32"] and p["ReduceL2"] == ["float32"], p
    assert p["merge_MatMul"] == ["float32/float32"], p
    assert p["Pow_in_norm"] == 0 and p["LayerNormalization"] > 0, p
    # The ViT layers really are fp16: the patch-embedding Conv weights are float16.
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT16


# --- tiny-random (built-in LLaVA, random weights), through the CLI, with the projector ---------------------------


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> Path:
    from vzedge.cli import run

    out = tmp_path_factory.mktemp("tiny") / "fp32"
    assert run(["export", "--model", "tiny-random", "--out", str(out), "--projector", "--max-batch", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "fp16"
    export_vision(ExportConfig(model="tiny-random", out=out, projector=True, dtype="fp16"))
    return out


def test_tiny_fp32_manifest_and_parity(tiny_fp32):
    m = _assert_manifest(tiny_fp32, "fp32", 64)
    assert m["projector"] and m["graph"]["outputs"][0]["shape"] == ["batch", 64, 128]  # tiny LLM width
    assert m["graph"]["batch"] == {"min": 1, "max": 4}
    assert m["preprocess"]["resize"] == {"mode": "shortest_edge", "size": 336, "resample": "bicubic"}
    assert m["preprocess"]["center_crop"] == [336, 336]
    for r in m["parity"]["results"]:
        assert r["index_agreement"] == 1.0 and r["min_cosine"] > 0.99999
        assert r["max_abs_diff"] < 1e-4 * r["max_abs_reference"] + 1e-6


def test_tiny_fp32_matches_encoder_batch_1_and_3(tiny_fp32):
    _assert_matches(tiny_fp32, "tiny-random", "fp32", has_projector=True)


def test_tiny_graph_has_constant_topk_and_dynamic_batch(tiny_fp32):
    proto = onnx.load(str(tiny_fp32 / "model.onnx"))
    report = check_tensorrt_ops(proto)
    assert report.ok, report.problems
    assert report.op_counts.get("TopK", 0) >= 1
    assert "ScatterElements" not in report.op_counts or all(
        not any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)
        for n in proto.graph.node
        if n.op_type == "ScatterElements"
    )
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 336, 336]
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in out_dims[1:]] == [64, 128]  # K is a constant


def test_tiny_fp16_islands_and_parity(tiny_fp16):
    m = _assert_manifest(tiny_fp16, "fp16", 64)
    assert m["graph"]["outputs"][0]["dtype"] == "float16"
    _assert_fp32_islands(tiny_fp16)
    _assert_matches(tiny_fp16, "tiny-random", "fp16", has_projector=True)


def test_folder_with_other_config_is_refused_and_kept(tiny_fp32):
    # Same folder, different config: refused without --force, and the good export stays intact.
    with pytest.raises(FileExistsError, match="different model or config"):
        export_vision(ExportConfig(model="tiny-random", out=tiny_fp32, projector=False, max_batch=4))
    verify_files(tiny_fp32, read_manifest(tiny_fp32))


def test_failed_parity_gate_leaves_nothing(tmp_path, monkeypatch):
    from vzedge.export import parity

    impossible = parity.ParityThresholds(0.0, 0.0, 1.1, 1.1, 1.1)
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", impossible)
    out = tmp_path / "gate"
    with pytest.raises(ParityError, match="parity gate failed"):
        export_vision(ExportConfig(model="tiny-random", out=out, max_batch=2))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- ViT-L/14-336-sized CLIP and SO400M-sized SigLIP, random weights, saved as local folders -----------------


@pytest.fixture(scope="module")
def clip_large_dir(tmp_path_factory) -> str:
    from transformers import CLIPVisionModel

    from vzedge.models.clip import vit_l14_336_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip_l14_336")
    CLIPVisionModel(vit_l14_336_config(num_hidden_layers=3)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def siglip_large_dir(tmp_path_factory) -> str:
    from transformers import SiglipVisionModel

    from vzedge.models.siglip import so400m_384_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip_so400m")
    SiglipVisionModel(so400m_384_config(num_hidden_layers=2)).save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_clip_vit_l_export(clip_large_dir, dtype, tmp_path):
    out = tmp_path / dtype
    export_vision(ExportConfig(model=clip_large_dir, out=out, dtype=dtype, max_batch=4))
    m = _assert_manifest(out, dtype, 64)
    assert m["source"]["seq_len"] == 577 and m["graph"]["outputs"][0]["shape"] == ["batch", 64, 1024]
    if dtype == "fp16":
        _assert_fp32_islands(out)
    _assert_matches(out, clip_large_dir, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_siglip_so400m_export(siglip_large_dir, dtype, tmp_path):
    out = tmp_path / dtype
    export_vision(ExportConfig(model=siglip_large_dir, out=out, dtype=dtype, max_batch=4))
    m = _assert_manifest(out, dtype, 64)
    assert m["source"]["family"] == "siglip" and m["source"]["seq_len"] == 729
    assert m["graph"]["outputs"][0]["shape"] == ["batch", 64, 1152]
    if dtype == "fp16":
        _assert_fp32_islands(out)
    _assert_matches(out, siglip_large_dir, dtype)


def test_import_is_lean():
    code = (
        "import sys, vzedge, vzedge.export, vzedge.export.tensorrt;"
        "bad = [m for m in ('onnx', 'onnxruntime', 'onnxslim', 'tensorrt') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert res.returncode == 0, res.stdout + res.stderr


def test_manifest_schema_is_plain_json(tiny_fp32):
    text = (tiny_fp32 / "manifest.json").read_text()
    data = json.loads(text)
    assert data["schema"] == "vzedge.vision-graph" and data["schema_version"] == 1
    assert set(data["files"]) == {"model.onnx"}
    assert data["tools"]["onnxruntime"] == ort.__version__
