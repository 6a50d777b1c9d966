"""Exporter: ONNX graphs of VisionZipEncoder checked against PyTorch, for tiny, ViT-L/14-336-sized CLIP and
SO400M-sized SigLIP, in fp32, fp16 and int8. Each model is exported once per module (the slow part) and checked
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
from vzedge.models import adapt_vision_tower  # noqa: E402
from vzedge.models.loading import load_model  # noqa: E402
from vzedge.visionzip import VisionZipConfig  # noqa: E402

# ORT vs VisionZipEncoder (fp32), measured independently of the gate. fp32: the same arithmetic up to
# kernel order (measured ~1e-6 relative). fp16: ViT layers in half precision (measured <= 0.1% relative
# on dominant rows, cosine >= 0.9997), rare selection flips between near-tied scores.
FP32_RTOL = 1e-4
FP16_RTOL = 2e-2
FP16_MIN_AGREEMENT = 0.9
# int8 (ViT linear weights int8, activations uint8 per tensor): measured <= 1.0% relative on dominant rows and
# 0.94-0.99 kept-index agreement at ViT-L depth; the test allows 3x / 0.85.
INT8_RTOL = 3e-2
INT8_MIN_AGREEMENT = 0.85
INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger"}


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
            rtol, min_agree = (FP16_RTOL, FP16_MIN_AGREEMENT) if dtype == "fp16" else (INT8_RTOL, INT8_MIN_AGREEMENT)
            assert tokens.dtype == (np.float16 if dtype == "fp16" else np.float32)
            assert agree >= min_agree, agree
            for i in range(batch):
                if np.array_equal(kept[i], ref.kept_indices[i].numpy()):
                    d = np.abs(tokens[i, : kept.shape[1]].astype(np.float32) - ref_tokens[i, : kept.shape[1]].numpy())
                    assert d.max() <= rtol * scale, (d.max(), scale)


def _assert_manifest(out: Path, dtype: str, k: int) -> dict:
    m = read_manifest(out)
    verify_files(out, m)
    assert m["graph"]["dtype"] == dtype and m["graph"]["opset"] == 18
    assert m["graph"]["inputs"][0]["shape"][0] == "batch"
    assert m["graph"]["outputs"][0]["shape"][1] == k
    assert m["parity"]["passed"] and len(m["parity"]["results"]) == 2
    assert {r["inputs"] for r in m["parity"]["results"]} == {"random_seed0", "demo_image"}
    if dtype == "int8":  # an ORT CPU graph: TensorRT's parser would reject exactly the int8 ops, nothing else
        assert all(any(op in p for op in INT8_OPS) for p in m["opcheck"]["problems"]), m["opcheck"]["problems"]
        # int8 weights are 1/4 of fp32; the fp32 rest (embeddings, norms, kept q/k, projector) bounds the ratio:
        # measured 0.61 on tiny-random (a large projector share), 0.26 on ViT-L/14-336.
        assert m["quantization"]["after"]["bytes"] < 0.7 * m["quantization"]["before"]["bytes"]
    else:
        assert m["opcheck"]["ok"], m["opcheck"]["problems"]
        assert m["quantization"] is None
    assert m["slim"]["after"]["nodes"] < m["slim"]["before"]["nodes"]
    assert m["preprocess"]["mean"] and m["preprocess"]["std"]
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temp folder left beside it
    return m


def _assert_graph_precision(out: Path, m: dict) -> None:
    """The precision checks that fit the export's dtype: fp32 islands in fp16 graphs, the int8 layout."""
    if m["graph"]["dtype"] == "fp16":
        _assert_fp32_islands(out)
    elif m["graph"]["dtype"] == "int8":
        _assert_int8_layout(out, m)


def _assert_int8_layout(out: Path, m: dict) -> None:
    """Every ViT linear layer up to the selection layer is int8 except that layer's q/k (the VisionZip score and
    the merge keys), which stay float32 weights of plain MatMuls; VisionZip's own ops are float32."""
    proto = onnx.load(str(out / "model.onnx"))
    q = m["quantization"]
    n_layers = m["source"]["num_layers"] - 1  # layers up to the selection layer (-2) run in the graph
    sel = n_layers - 1
    assert q["int8_modules"] == 6 * n_layers - 2 and q["int8_matmuls"] >= q["int8_modules"]
    assert q["fp32_modules"] == [f"layers.{sel}.self_attn.k_proj", f"layers.{sel}.self_attn.q_proj"]
    ops = check_tensorrt_ops(proto).op_counts
    assert ops["MatMulInteger"] == q["int8_matmuls"]
    # The kept q/k weights are float32 initializers feeding MatMuls, bit-identical to the torch layer's.
    attn = adapt_vision_tower(load_model(m["source"]["model"]).vision).layers[sel].self_attn
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    fp32_b = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    for lin in (attn.q_proj, attn.k_proj):
        w = lin.weight.detach().T.numpy()
        assert any(b.dtype == np.float32 and b.shape == w.shape and np.array_equal(b, w) for b in fp32_b)
    p = visionzip_precision(proto)
    assert p["TopK"] and all(t == "float32" for t in p["TopK"]), p
    assert p["merge_MatMul"] == ["float32/float32"], p


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


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory) -> Path:
    from vzedge.cli import run

    out = tmp_path_factory.mktemp("tiny") / "int8"
    cmd = ["export", "--model", "tiny-random", "--out", str(out), "--projector", "--dtype", "int8", "--max-batch", "4"]
    assert run(cmd) == 0
    return out


def test_tiny_int8_layout_and_parity(tiny_int8):
    m = _assert_manifest(tiny_int8, "int8", 64)
    assert m["graph"]["outputs"][0]["dtype"] == "float32"
    assert m["quantization"]["target"] == "onnxruntime CPUExecutionProvider"
    _assert_int8_layout(tiny_int8, m)
    _assert_matches(tiny_int8, "tiny-random", "int8", has_projector=True)


def test_int8_with_trt_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--dtype fp16 --trt"):
        ExportConfig(model="tiny-random", out=tmp_path / "o", dtype="int8", trt=True)


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
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_clip_vit_l_export(clip_large_dir, dtype, tmp_path):
    out = tmp_path / dtype
    export_vision(ExportConfig(model=clip_large_dir, out=out, dtype=dtype, max_batch=4))
    m = _assert_manifest(out, dtype, 64)
    assert m["source"]["seq_len"] == 577 and m["graph"]["outputs"][0]["shape"] == ["batch", 64, 1024]
    _assert_graph_precision(out, m)
    _assert_matches(out, clip_large_dir, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_siglip_so400m_export(siglip_large_dir, dtype, tmp_path):
    out = tmp_path / dtype
    export_vision(ExportConfig(model=siglip_large_dir, out=out, dtype=dtype, max_batch=4))
    m = _assert_manifest(out, dtype, 64)
    assert m["source"]["family"] == "siglip" and m["source"]["seq_len"] == 729
    assert m["graph"]["outputs"][0]["shape"] == ["batch", 64, 1152]
    _assert_graph_precision(out, m)
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


@pytest.mark.parametrize("opset", [17, 20])
def test_other_opsets(tmp_path, opset):
    """--opset 17 (the newest TensorRT 8.6 parses; rewritten from 18 by downgrade_opset) and 20 (the newest
    TensorRT 10 parses; torch's converter) export and pass the fp32 gate."""
    out = tmp_path / f"o{opset}"
    export_vision(ExportConfig(model="tiny-random", out=out, opset=opset, max_batch=2))
    m = read_manifest(out)
    proto = onnx.load(str(out / "model.onnx"))
    assert m["graph"]["opset"] == opset
    assert [i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")] == [opset]
    assert m["opcheck"]["ok"] and m["opcheck"]["tensorrt_versions"] == (["8.6", "10"] if opset == 17 else ["10"])
    assert m["parity"]["passed"] and all(r["index_agreement"] == 1.0 for r in m["parity"]["results"])


def test_downgrade_refuses_what_it_cannot_rewrite():
    from onnx import TensorProto, helper

    from vzedge.export.onnx_export import downgrade_opset

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")]
    split = helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)
    model = helper.make_model(helper.make_graph([split], "g", [x], ys), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ValueError, match=r"Split .* use --opset 18"):
        downgrade_opset(model, 17)
    with pytest.raises(ValueError, match="only 17"):
        downgrade_opset(model, 16)


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int8-static"])
def test_external_data_path(tmp_path, monkeypatch, dtype):
    """Weights over protobuf's 2 GiB go to model.onnx.data: the same code path, with the limit lowered so a
    small model takes it. The data file is in the manifest with its sha256, and ORT reads it."""
    from vzedge.export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 64 * 1024**2 + 1)  # any initializer byte counts as "big"
    out = tmp_path / dtype
    # int8-static: the trained tiny, whose scores are not near-ties (tiny-random's demo image keeps 51 of 54
    # tokens under calibrated int8, below that gate's 0.95).
    model = "tiny" if dtype == "int8-static" else "tiny-random"
    export_vision(ExportConfig(model=model, out=out, dtype=dtype, max_batch=2, calib_n=8))
    m = read_manifest(out)
    verify_files(out, m)
    assert m["graph"]["external_data"] == "model.onnx.data"  # int8: ORT's quantizer writes the same name
    assert set(m["files"]) == {"model.onnx", "model.onnx.data"}
    assert (out / "model.onnx").stat().st_size < 200_000 < (out / "model.onnx.data").stat().st_size
    assert m["parity"]["passed"]
    if dtype == "int8-static":  # its accuracy is checked in test_export_int8.py; here: ORT reads the data file
        tokens, kept = _session(out).run(None, {"pixel_values": np.zeros((2, 3, 224, 224), np.float32)})
        assert tokens.shape == (2, 64, 64) and kept.shape == (2, 54)
    else:
        _assert_matches(out, model, dtype)
