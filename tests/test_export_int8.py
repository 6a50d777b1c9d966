"""int8 exports at every batch range (1..1, 1..8) and both schemes (dynamic `int8`, static Q/DQ `int8-static`), for
the built-in trained `tiny` (with its projector), a SO400M-sized SigLIP (2 layers) and a ViT-L/14-336-sized CLIP
(3 layers); an anyres model's crops through an int8-static graph; the calibration set, the op check on Q/DQ, the
runtime and the budget planner reading the dtype from the manifest.

Each ORT result is checked here against a fresh fp32 VisionZipEncoder, independently of the export's own gate.
Calibration uses 8 scenes to keep the module fast (the CLI default is 32).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxslim")

from vzedge.encoder import VisionZipEncoder  # noqa: E402
from vzedge.export import ExportConfig, export_vision  # noqa: E402
from vzedge.export.opcheck import check_tensorrt_ops, visionzip_precision  # noqa: E402
from vzedge.manifest import read_manifest, verify_files  # noqa: E402
from vzedge.models.loading import load_model  # noqa: E402
from vzedge.visionzip import VisionZipConfig  # noqa: E402

CALIB_N = 8
# Independent check (batch 1 and 3 of seeded random pixels, plus the demo image): kept-index agreement and cosine
# of the dominant rows. int8-static: issue 19's bar (0.95, 0.995); measured 0.96-1.0 and >= 0.9989. Dynamic int8:
# the gate's 0.85 (measured 0.94-1.0).
MIN_AGREEMENT = {"int8": 0.85, "int8-static": 0.95}
MIN_COSINE = 0.995
LINEARS_PER_LAYER = 6  # q, k, v, out_proj, fc1, fc2


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    from vzedge.models.clip import vit_l14_336_config
    from vzedge.models.siglip import so400m_384_config

    root = tmp_path_factory.mktemp("int8_models")
    torch.manual_seed(0)
    # 4 layers: 3 computed, so int8-static has a whole int8 layer between its fp32 first and selection layers.
    CLIPVisionModel(vit_l14_336_config(num_hidden_layers=4)).save_pretrained(root / "clip")
    torch.manual_seed(0)
    SiglipVisionModel(so400m_384_config(num_hidden_layers=2)).save_pretrained(root / "siglip")
    return {"tiny": "tiny", "clip": str(root / "clip"), "siglip": str(root / "siglip")}


def _dominant_figures(out: Path, model: str, m: dict, batches: tuple[int, ...]) -> tuple[float, float]:
    """Worst kept-index agreement and dominant-row cosine of the graph vs a fresh fp32 encoder (+ projector)."""
    from vzedge.api import preprocess
    from vzedge.images import demo_image

    loaded = load_model(model)
    enc = VisionZipEncoder(loaded.vision, VisionZipConfig(**m["visionzip"])).eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    size = m["source"]["image_size"]
    g = torch.Generator().manual_seed(77)
    inputs = [torch.randn(b, 3, size, size, generator=g) for b in batches]
    inputs.append(preprocess(loaded, [demo_image(size=size, seed=5)]).float())
    worst_agree, worst_cos = 1.0, 1.0
    for x in inputs:
        with torch.no_grad():
            ref = enc(x)
            ref_tokens = loaded.projector(ref.tokens) if m["projector"] else ref.tokens
        tokens, kept = session.run(None, {"pixel_values": x.numpy()})
        assert tokens.shape == tuple(ref_tokens.shape) and kept.dtype == np.int64
        for i in range(len(x)):
            ours, theirs = kept[i].tolist(), ref.kept_indices[i].tolist()
            worst_agree = min(worst_agree, len(set(ours) & set(theirs)) / len(theirs))
            slot = {p: j for j, p in enumerate(theirs)}
            pairs = [(j, slot[p]) for j, p in enumerate(ours) if p in slot]
            a = torch.from_numpy(tokens[i, [j for j, _ in pairs]])
            b = ref_tokens[i, [k for _, k in pairs]]
            worst_cos = min(worst_cos, float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()))
    return worst_agree, worst_cos


def _assert_qdq_for_tensorrt(proto, q: dict) -> None:
    """int8-static: the Q/DQ graph passes the TensorRT op check; weights int8 per output channel, activations
    per tensor, zero points 0; the selection layer's q/k MatMuls read float32 (no DequantizeLinear in front)."""
    report = check_tensorrt_ops(proto)
    assert report.ok, report.problems
    ops = report.op_counts
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == q["int8_matmuls"]
    for n in weight_dq:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[1],)  # one scale per output channel
        assert not inits[n.input[2]].any()
    act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[1]].size == 1 and not inits[n.input[2]].any() for n in act_q)
    int8_mm = [
        n
        for n in proto.graph.node
        if n.op_type == "MatMul" and all(producers.get(i) is not None for i in n.input[:2])
        if all(producers[i].op_type == "DequantizeLinear" for i in n.input[:2])
    ]
    assert len(int8_mm) == q["int8_matmuls"]
    # The fp32 island: MatMuls whose weight is a float32 initializer read an input no DequantizeLinear produced.
    fp32_mm = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert fp32_mm and all(
        inits[n.input[1]].dtype == np.float32
        and getattr(producers.get(n.input[0]), "op_type", "") != "DequantizeLinear"
        for n in fp32_mm
    )


@pytest.mark.slow
@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("dtype", ["int8", "int8-static"])
@pytest.mark.parametrize("name", ["tiny", "siglip", "clip"])
def test_int8_exports_at_every_batch_range(model_dirs, name, dtype, max_batch, tmp_path):
    model = model_dirs[name]
    out = tmp_path / "out"
    projector = name == "tiny"
    cfg = ExportConfig(model=model, out=out, projector=projector, dtype=dtype, max_batch=max_batch, calib_n=CALIB_N)
    m = export_vision(cfg).manifest
    verify_files(out, m)
    assert m["graph"]["dtype"] == dtype and m["graph"]["batch"] == {"min": 1, "max": max_batch}
    assert m["parity"]["passed"]
    q = m["quantization"]
    n_layers = m["source"]["num_layers"] - 1  # layers up to the selection layer (-2)
    sel = n_layers - 1
    assert q["scheme"] == ("dynamic" if dtype == "int8" else "static-qdq")
    # fp32 islands: the selection layer's q/k (the score, the merge keys); int8-static also the first layer
    # (next to the input) unless that is the selection layer.
    fp32_layers = {0} if dtype == "int8-static" and sel > 0 else set()
    assert q["int8_modules"] == LINEARS_PER_LAYER * (n_layers - len(fp32_layers)) - 2
    islands = q["fp32_islands"]
    assert list(islands) == [f"layers.{i}" for i in range(n_layers)]
    for i in range(n_layers):
        entry = islands[f"layers.{i}"]
        if i in fp32_layers:
            assert len(entry["fp32"]) == LINEARS_PER_LAYER and not entry["int8"], entry
        elif i == sel:
            assert entry["fp32"] == ["self_attn.k_proj", "self_attn.q_proj"] and len(entry["int8"]) == 4, entry
        else:
            assert len(entry["int8"]) == LINEARS_PER_LAYER and not entry["fp32"], entry
    assert f"layers.{sel}.self_attn.q_proj" in q["fp32_modules"]
    # int8 weights are 1/4 of fp32; the fp32 rest bounds the ratio. tiny: its projector (and, int8-static, the
    # first layer) are most of the bytes, measured 0.73; ViT-L/SigLIP-sized: measured <= 0.6.
    assert q["after"]["bytes"] < (0.8 if name == "tiny" else 0.7) * q["before"]["bytes"]
    proto = onnx.load(str(out / "model.onnx"))
    p = visionzip_precision(proto)
    assert p["TopK"] and all(t == "float32" for t in p["TopK"]) and p["merge_MatMul"] == ["float32/float32"], p
    if dtype == "int8":
        assert q["calibration"] is None
        assert check_tensorrt_ops(proto).op_counts["MatMulInteger"] == q["int8_matmuls"]
        assert not m["opcheck"]["ok"]  # MatMulInteger is for ORT's CPU provider, not TensorRT
    else:
        cal = q["calibration"]
        assert cal["count"] == cal["images"] == CALIB_N and len(cal["sha256"]) == 64
        assert cal["source"].startswith("vzedge.synth:train")
        assert m["opcheck"]["ok"], m["opcheck"]["problems"]
        _assert_qdq_for_tensorrt(proto, q)
    agree, cos = _dominant_figures(out, model, m, (1, 3) if max_batch >= 3 else (1,))
    assert agree >= MIN_AGREEMENT[dtype], agree
    assert cos >= MIN_COSINE, cos


def test_static_batch_graph_is_what_broke_int8(tmp_path):
    """The regression of issue 19: at --max-batch 1 onnxslim fuses each linear layer into a Gemm with a renamed,
    transposed weight. The fp32 export keeps that; the int8 paths slim without the Gemm fusion and find all layers."""
    from vzedge.export.onnx_export import VisionGraph, export_onnx, slim_onnx
    from vzedge.export.quantize import plan_linear_layers

    loaded = load_model("tiny-random")
    enc = VisionZipEncoder(loaded.vision, VisionZipConfig()).eval()
    for keep in (False, True):
        path = tmp_path / f"keep{keep}" / "model.onnx"
        path.parent.mkdir()
        export_onnx(VisionGraph(enc, None).eval(), path, 18, 1)
        slim_onnx(path, keep_matmul=keep)
        proto = onnx.load(str(path))
        ops = check_tensorrt_ops(proto).op_counts
        plan = plan_linear_layers(proto, enc)  # found in both graphs: by structure and content, not names
        assert len(plan.int8_modules) == LINEARS_PER_LAYER * (enc.layer_index + 1) - 2
        gemm = ops.get("Gemm", 0)
        assert (gemm == 0) if keep else (gemm >= len(plan.int8_modules)), ops


def _scene_folder(folder: Path, n: int) -> Path:
    from vzedge.synth import make_scene, render, scene_seed

    folder.mkdir()
    for i in range(n):
        render(make_scene(scene_seed(3, "train", i)), size=336).save(folder / f"img{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_calib_folder_is_recorded_and_reproducible(tmp_path):
    """--calib DIR: the first calib_n images by name, preprocessed by the model's processor; the manifest records
    the count and a hash that is the same for the same images and differs for others."""
    calib = _scene_folder(tmp_path / "calib", 10)
    records = []
    for i, n in enumerate((9, 9, 8)):
        out = tmp_path / f"o{i}"
        cfg = ExportConfig(model="tiny", out=out, dtype="int8-static", max_batch=2, calib=calib, calib_n=n)
        records.append(export_vision(cfg).manifest["quantization"]["calibration"])
    assert records[0]["count"] == 9 and records[0]["source"] == str(calib.resolve())
    assert records[0]["sha256"] == records[1]["sha256"] != records[2]["sha256"]
    assert records[2]["count"] == 8


def test_anyres_crops_through_an_int8_static_graph(tmp_path):
    """LLaVA-NeXT: calibration feeds the processor's crops (base + tiles) as the graph's batch; the runtime runs
    the crops through the int8-static graph at --max-batch 1, one crop per call, and arranges them."""
    from vzedge.images import demo_image
    from vzedge.models.llava_next import build_tiny_next
    from vzedge.runtime.api import load_session
    from vzedge.runtime.config import RunConfig

    model, processor = build_tiny_next()
    src = tmp_path / "tiny-next"
    model.save_pretrained(src)
    processor.save_pretrained(src)
    vz = VisionZipConfig(dominant=20, contextual=4)
    out = tmp_path / "export"
    cfg = ExportConfig(
        model=str(src), out=out, visionzip=vz, projector=True, dtype="int8-static", max_batch=1, calib_n=4
    )
    m = export_vision(cfg).manifest
    cal = m["quantization"]["calibration"]
    assert cal["images"] == 4 and cal["count"] > 4  # several crops per image
    torch_s = load_session(RunConfig(model=str(src), visionzip=vz, max_new_tokens=2))
    ort_s = load_session(RunConfig(model=str(src), vision=str(out), visionzip=vz, max_new_tokens=2))
    image = demo_image(seed=2)
    a = torch_s.vision.encode_prepared(torch_s.vision.prepare([image]))
    b = ort_s.vision.encode_prepared(ort_s.vision.prepare([image]))
    assert a.shape == b.shape
    cos = torch.nn.functional.cosine_similarity(a[0], b[0], dim=-1)
    # Rows of crops whose selection flipped differ, the rest match: measured median cosine > 0.99.
    assert float(cos.median()) > 0.99, cos


def test_runtime_and_budget_read_the_dtype_from_the_manifest(tmp_path):
    from vzedge.budget import BudgetConfig
    from vzedge.budget.estimate import estimate
    from vzedge.runtime.api import load_session, vision_dtype
    from vzedge.runtime.config import RunConfig

    out = tmp_path / "int8"
    export_vision(ExportConfig(model="tiny", out=out, projector=True, dtype="int8", max_batch=2))
    m = read_manifest(out)
    s = load_session(RunConfig(model="tiny", vision=str(out), vision_backend="ort-cpu", max_new_tokens=2))
    assert vision_dtype(s.vision) == "int8" and s.vision.dtype == "int8"
    with pytest.raises(ValueError, match=r"dynamic int8 export .* int8-static"):
        load_session(RunConfig(model="tiny", vision=str(out), vision_backend="ort-trt", max_new_tokens=2))
    est = estimate(BudgetConfig(model="tiny", vision_export=str(out)))
    comp = next(c for c in est.components if c.name == "vision_graph")
    assert comp.bytes == m["files"]["model.onnx"]["bytes"]
    assert "int8 (dynamic)" in comp.detail
    assert est.config.vision_backend == "ort"
    fp16 = next(
        c for c in estimate(BudgetConfig(model="tiny", vision_backend="ort")).components if c.name == "vision_graph"
    )
    assert "fp16 (assumed)" in fp16.detail  # tiny: its fp32 projector outweighs the int8 layers, so no size order


def test_bad_int8_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="add --dtype int8-static"):
        ExportConfig(model="tiny", out=tmp_path / "o", dtype="int8", calib=tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        ExportConfig(model="tiny", out=tmp_path / "o", dtype="int8-static", calib=tmp_path / "missing")
    with pytest.raises(ValueError, match="--calib-n"):
        ExportConfig(model="tiny", out=tmp_path / "o", dtype="int8-static", calib_n=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        export_vision(ExportConfig(model="tiny", out=tmp_path / "o", dtype="int8-static", calib=empty))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    # int8-static may go to TensorRT; dynamic int8 may not
    ExportConfig(model="tiny", out=tmp_path / "o", dtype="int8-static", trt=True)
    with pytest.raises(ValueError, match="int8-static --trt"):
        ExportConfig(model="tiny", out=tmp_path / "o", dtype="int8", trt=True)


def test_opcheck_refuses_qdq_tensorrt_cannot_build():
    """The Q/DQ rules of the op check: a computed scale, a non-zero zero point, a per-channel activation scale."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np.int8), "zp_bad"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "s4"),
        numpy_helper.from_array(np.zeros(4, np.int8), "zp4"),
    ]
    nodes = [
        helper.make_node("Abs", ["x"], ["s_run"]),
        helper.make_node("QuantizeLinear", ["x", "s_run", "zp"], ["q1"], name="computed"),
        helper.make_node("QuantizeLinear", ["x", "s", "zp_bad"], ["q2"], name="offset"),
        helper.make_node("QuantizeLinear", ["x", "s4", "zp4"], ["q3"], name="perchannel", axis=1),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q4"], name="good"),
        helper.make_node("DequantizeLinear", ["q4", "s", "zp"], ["y"], name="good_dq"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    problems = check_tensorrt_ops(model).problems
    assert any(p.startswith("computed:") and "constant scale" in p for p in problems), problems
    assert any(p.startswith("offset:") and "zero point" in p for p in problems), problems
    assert any(p.startswith("perchannel:") and "activation" in p for p in problems), problems
    assert not any(p.startswith("good") for p in problems), problems


def test_calibration_hash_is_of_the_pixels():
    from vzedge.export.calibration import CalibrationSet

    px = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    rec = CalibrationSet(px, "x", 1).record()
    want = hashlib.sha256(str([1, 3, 2, 2]).encode() + px.numpy().tobytes()).hexdigest()
    assert rec["sha256"] == want and rec["count"] == 1
