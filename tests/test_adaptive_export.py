"""The exported adaptive budget (issue 18): one ONNX graph with every bucket's tokens and the in-graph bucket,
its parity gate, the runtime on it (`vzedge run --vision DIR`), the server with `--adaptive` (PyTorch and the
export), and the combinations that are refused."""

from __future__ import annotations

import json

import pytest
import torch

from vzedge import VisionZipConfig, VisionZipEncoder
from vzedge.select import AdaptiveBudget

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BUDGET = AdaptiveBudget((14, 28, 57), 0.5)


def assert_tokens_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """The fp32 parity gate's limits on one image's tokens [K, D]: dominant rows (gathered tokens) within 1e-4 x
    max|ref| + 1e-6, contextual rows (merge averages, where near-tied keys may move a member to another group)
    within 1e-2 x max|ref| + 1e-6 (vzedge.export.parity.FP32_THRESHOLDS)."""
    from vzedge.export.parity import FP32_THRESHOLDS as TH
    from vzedge.select.adaptive import split_budget

    assert ours.shape == ref.shape
    dominant = split_budget(len(ref))[0]
    top = float(ref.abs().max())
    diff = (ours.float() - ref.float()).abs()
    assert float(diff[:dominant].max()) <= TH.max_abs_diff_rtol * top + 1e-6
    if len(ref) > dominant:
        assert float(diff[dominant:].max()) <= TH.contextual_max_abs_diff_rtol * top + 1e-6


def _images() -> dict[str, object]:
    """Scenes that tiny puts in different buckets at mass 0.5 (measured: 28, 57 and 14 tokens)."""
    from vzedge import synth
    from vzedge.images import demo_image, load_image

    small = synth.samples("test", 1, variant="small")[0]
    return {"demo": demo_image(), "demo:3": load_image("demo:3"), "small0": synth.render(small.scene, 224)}


@pytest.fixture(scope="module")
def loaded():
    from vzedge.models.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from vzedge.export import ExportConfig, export_vision

    out = tmp_path_factory.mktemp("adaptive") / "tiny-adaptive"
    export_vision(ExportConfig(model="tiny", out=out, projector=True, max_batch=3, adaptive=BUDGET))
    return out


@pytest.fixture(scope="module")
def pixels(loaded):
    from vzedge.models import adapt_vision_tower
    from vzedge.runtime.preprocess import from_image_processor

    t = adapt_vision_tower(loaded.vision)
    pre = from_image_processor(loaded.image_processor, t.image_size, t.image_mean, t.image_std)
    return pre.batch(list(_images().values()))


def test_manifest_records_the_buckets_and_the_gate(export_dir):
    m = json.loads((export_dir / "manifest.json").read_text())
    ad = m["adaptive"]
    assert ad["buckets"] == [14, 28, 57] and ad["mass"] == 0.5
    assert [o["bucket"] for o in ad["outputs"]] == [14, 28, 57]
    names = [o["name"] for o in m["graph"]["outputs"]]
    assert names == [
        "tokens_57",
        "kept_indices_57",
        "tokens_28",
        "kept_indices_28",
        "tokens_14",
        "kept_indices_14",
        "bucket",
        "needed_tokens",
    ]
    # The largest bucket is the worst case every older reader sizes for.
    assert m["visionzip"]["dominant"] + m["visionzip"]["contextual"] == 57
    assert m["graph"]["outputs"][0]["shape"] == ["batch", 57, 128]
    assert m["opcheck"]["ok"], m["opcheck"]["problems"]
    p = m["parity"]
    assert p["passed"]
    assert sorted({r["inputs"] for r in p["results"]}) == sorted(
        f"{n}@{k}" for n in ("random_seed0", "demo_image") for k in (14, 28, 57)
    )
    for r in p["results"]:
        assert r["index_agreement"] == 1.0 and r["min_cosine"] > 0.99999, r
        assert r["max_abs_diff"] < 1e-4 * r["max_abs_reference"] + 1e-6, r
    assert [b["batch"] for b in p["buckets"]] == [3, 1]
    assert all(b["agreement"] == 1.0 and b["bucket"] == b["reference_bucket"] for b in p["buckets"])
    # `vzedge budget --vision` reads the adaptive export's manifest like any other, sized for the largest bucket.
    from vzedge.budget.estimate import BudgetConfig, estimate

    est = estimate(BudgetConfig(tokens=57, vision_export=str(export_dir)))
    graph = next(c for c in est.components if c.name == "vision_graph")
    assert graph.bytes == m["files"]["model.onnx"]["bytes"]
    with pytest.raises(ValueError, match=r"up to 57 tokens.*--tokens 57"):
        BudgetConfig(tokens=28, vision_export=str(export_dir))


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_matches_the_encoder_at_every_bucket(export_dir, loaded, pixels, batch):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    x = pixels[:batch]
    got = dict(zip(names, sess.run(None, {"pixel_values": x.numpy()}), strict=True))
    enc = VisionZipEncoder(loaded.vision, VisionZipConfig()).eval()
    ref = enc.forward_adaptive(x, BUDGET)
    assert got["bucket"].tolist() == ref.bucket.tolist()
    assert got["needed_tokens"].tolist() == ref.needed.tolist()
    if batch == 3:
        assert sorted(ref.bucket.tolist()) == [0, 1, 2]  # the images really span the buckets
    with torch.no_grad():
        for k in BUDGET.buckets:
            single = VisionZipEncoder(loaded.vision, enc.bucket_config(k)).eval()(x)
            tokens = loaded.projector(single.tokens)
            assert torch.equal(torch.from_numpy(got[f"kept_indices_{k}"]), single.kept_indices)
            for i in range(batch):
                assert_tokens_close(torch.from_numpy(got[f"tokens_{k}"][i]), tokens[i])
        for i in range(batch):  # each image's own bucket is forward_adaptive's tokens
            k = BUDGET.buckets[int(ref.bucket[i])]
            assert_tokens_close(torch.from_numpy(got[f"tokens_{k}"][i]), loaded.projector(ref.tokens[i]))


def test_runtime_on_the_export_matches_the_pytorch_adaptive_path(export_dir, loaded, pixels):
    from vzedge.runtime.api import run
    from vzedge.runtime.backends.vision import open_vision_backend
    from vzedge.runtime.config import RunConfig

    ort_backend = open_vision_backend(str(export_dir), loaded, VisionZipConfig(), "ort-cpu")
    torch_backend = open_vision_backend(None, loaded, VisionZipConfig(), "torch", adaptive=BUDGET)
    assert ort_backend.adaptive == BUDGET and ort_backend.num_tokens == 57
    assert ort_backend.name == "ort-cpu-adaptive-14/28/57"
    ours, theirs = ort_backend.encode_each(pixels), torch_backend.encode_each(pixels)
    assert [len(t) for t in ours] == [len(t) for t in theirs] == [28, 57, 14]
    for a, b in zip(ours, theirs, strict=True):
        assert_tokens_close(a, b)

    common = {"source": "synthetic:4", "frames": 4, "policy": "all", "max_new_tokens": 3, "pipelined": False}
    exported = run(RunConfig(vision=str(export_dir), vision_backend="ort-cpu", **common))
    eager = run(RunConfig(adaptive=BUDGET, **common))
    assert exported["config"]["adaptive"]["buckets"] == [14, 28, 57]  # taken from the manifest
    per_frame = [f["image_tokens"] for f in exported["frames"]]
    assert per_frame == [f["image_tokens"] for f in eager["frames"]]
    assert set(per_frame) <= {14, 28, 57}
    assert exported["summary"]["image_tokens_mean"] == pytest.approx(sum(per_frame) / 4, abs=1e-3)
    assert exported["summary"]["image_tokens_mean"] == eager["summary"]["image_tokens_mean"]
    assert [f["answer"] for f in exported["frames"]] == [f["answer"] for f in eager["frames"]]
    from vzedge.runtime.api import chat

    turn = chat(RunConfig(vision=str(export_dir), source="demo", max_new_tokens=2), ["What colour is the triangle?"])
    assert turn["image_tokens"] == 28 and turn["prefix_tokens"] > 28  # the demo image's bucket, not the largest


def test_bad_combinations_are_refused(export_dir, loaded, tmp_path):
    from vzedge.export import ExportConfig, export_vision
    from vzedge.runtime.backends.vision import open_vision_backend
    from vzedge.runtime.config import RunConfig

    # --adaptive with --vision: the manifest's buckets, or none.
    def open_export(folder, adaptive=None):
        return open_vision_backend(str(folder), loaded, VisionZipConfig(), "ort-cpu", adaptive=adaptive)

    with pytest.raises(ValueError, match="does not match the export"):
        open_export(export_dir, AdaptiveBudget((8, 16)))
    with pytest.raises(ValueError, match="does not match the export"):
        open_export(export_dir, AdaptiveBudget(BUDGET.buckets, 0.6))
    assert open_export(export_dir, BUDGET).adaptive == BUDGET
    with pytest.raises(ValueError, match="drop --all-tokens"):
        RunConfig(visionzip=None, adaptive=BUDGET)
    with pytest.raises(ValueError, match="int8-static"):
        ExportConfig(model="tiny", out=tmp_path / "x", dtype="int8-static", adaptive=BUDGET)
    with pytest.raises(ValueError, match="evaluation baseline"):
        ExportConfig(model="tiny", out=tmp_path / "x", visionzip=VisionZipConfig(selector="random"), adaptive=BUDGET)
    # A bucket the tower cannot give is refused before tracing; nothing is written.
    with pytest.raises(ValueError, match="exceeds"):
        export_vision(ExportConfig(model="tiny", out=tmp_path / "big", adaptive=AdaptiveBudget((14, 400))))
    assert not (tmp_path / "big").exists()

    # A fixed-budget export with --adaptive: the error names the fix.
    fixed = tmp_path / "fixed"
    export_vision(ExportConfig(model="tiny", out=fixed, projector=True, max_batch=2))
    with pytest.raises(ValueError, match=r"fixed-budget export.*--adaptive"):
        open_export(fixed, BUDGET)
    assert open_export(fixed).adaptive is None
    # An adaptive export to a folder holding the fixed one is a different artifact.
    with pytest.raises(FileExistsError, match="adaptive"):
        export_vision(ExportConfig(model="tiny", out=fixed, projector=True, max_batch=2, adaptive=BUDGET))


def test_failed_gate_leaves_nothing(tmp_path, monkeypatch):
    import dataclasses

    from vzedge.export import ExportConfig, ParityError, export_vision, parity

    strict = dataclasses.replace(parity.FP32_THRESHOLDS, min_index_agreement=1.01)  # no graph can pass
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", strict)
    out = tmp_path / "never"
    with pytest.raises(ParityError, match="bucket index agreement"):
        export_vision(ExportConfig(model="tiny", out=out, max_batch=3, adaptive=BUDGET))
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_anyres_model_is_refused(tmp_path):
    from vzedge.export import ExportConfig, export_vision
    from vzedge.models.llava_next import build_tiny_next

    model, processor = build_tiny_next()
    src = tmp_path / "tiny-next"
    model.save_pretrained(src)
    processor.save_pretrained(src)
    vz = VisionZipConfig(dominant=20, contextual=4)
    with pytest.raises(ValueError, match="anyres"):
        export_vision(ExportConfig(model=str(src), out=tmp_path / "o", visionzip=vz, adaptive=AdaptiveBudget((8, 16))))
    assert not (tmp_path / "o").exists()


def test_tensorrt_backend_cpu_side_picks_each_images_bucket(export_dir):
    """The TensorRT backend's bucket logic, without TensorRT: the manifest's block and the picking of outputs."""
    from vzedge.runtime.backends.base import manifest_adaptive, pick_buckets

    m = json.loads((export_dir / "manifest.json").read_text())
    budget, block = manifest_adaptive(m, export_dir)
    assert budget == BUDGET
    outputs = {f"tokens_{k}": torch.full((3, k, 4), float(k)) for k in (14, 28, 57)}
    outputs["bucket"] = torch.tensor([2, 0, 1])
    picked = pick_buckets(outputs, block)
    assert [tuple(t.shape) for t in picked] == [(57, 4), (14, 4), (28, 4)]
    assert [float(t[0, 0]) for t in picked] == [57.0, 14.0, 28.0]
    outputs["bucket"] = torch.tensor([3, 0, 0])
    with pytest.raises(ValueError, match="outside"):
        pick_buckets(outputs, block)
    bad = {**m, "adaptive": {**block, "outputs": block["outputs"][::-1]}}
    with pytest.raises(ValueError, match="in order"):
        manifest_adaptive(bad, export_dir)


def test_server_answers_each_request_at_its_images_bucket(export_dir, loaded, tmp_path):
    """The real server (PyTorch --adaptive, then the adaptive export), spoken to with the openai client."""
    import httpx

    from tests.test_serve import KEY, Server, data_url, user  # skips without openai/fastapi/uvicorn
    from vzedge.runtime.backends.vision import open_vision_backend

    torch_backend = open_vision_backend(None, loaded, VisionZipConfig(), "torch", adaptive=BUDGET)
    images = _images()
    want = {name: len(torch_backend.encode_each(torch_backend.prepare([im]).pixels)[0]) for name, im in images.items()}
    assert sorted(want.values()) == [14, 28, 57]
    question = "What colour is the triangle?"
    answers: dict[str, dict[str, str]] = {}
    for label, args in (("torch", ["--adaptive", "14,28,57"]), ("export", ["--vision", str(export_dir)])):
        server = Server(tmp_path, "--api-key", KEY, "--model", "tiny", *args)
        try:
            client = server.client()
            card = client.models.list().data[0].model_dump()
            assert card["image_tokens"] == 57  # prompt checks allow for the largest bucket
            assert card["image_tokens_adaptive"] == {"buckets": [14, 28, 57], "mass": 0.5}
            text_tokens = set()
            answers[label] = {}
            for name, im in images.items():
                r = client.chat.completions.create(
                    model="tiny", messages=[user(data_url(im), question)], max_tokens=4, temperature=0
                )
                u = r.model_dump()["usage"]
                seen = u["images"][0]["visual_tokens"]
                assert seen == want[name], (label, name, seen, want[name])
                text_tokens.add(u["prompt_tokens"] - seen)  # the usage counts the image's own tokens
                assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
                answers[label][name] = r.choices[0].message.content
            assert len(text_tokens) == 1
            again = client.chat.completions.create(
                model="tiny", messages=[user(data_url(images["demo"]), question)], max_tokens=4, temperature=0
            ).model_dump()["usage"]
            assert again["images"][0]["cache_hit"] and again["images"][0]["visual_tokens"] == want["demo"]
            metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
            per_bucket = {k: 0.0 for k in (14, 28, 57)}
            for line in metrics.splitlines():
                if line.startswith("vzedge_image_tokens_requests_total{"):
                    per_bucket[int(line.split('"')[1])] = float(line.split()[-1])
            expected = {k: float(list(want.values()).count(k)) for k in (14, 28, 57)}
            expected[want["demo"]] += 1  # the cache hit is a request too
            assert per_bucket == expected, metrics
            assert f"vzedge_image_tokens_sum {float(sum(want.values()) + want['demo'])}" in metrics
        finally:
            server.stop()
    # Same buckets, tokens equal within the gate's limits: the same greedy answers.
    assert answers["torch"] == answers["export"]


def test_int8_adaptive_export_passes_its_gate(tmp_path):
    """--dtype int8 (ORT CPU) on the adaptive graph: the int8 gate per bucket, and the buckets agree."""
    from vzedge.export import ExportConfig, export_vision

    out = tmp_path / "int8"
    m = export_vision(ExportConfig(model="tiny", out=out, projector=True, dtype="int8", max_batch=3, adaptive=BUDGET))
    m = m.manifest
    assert m["graph"]["dtype"] == "int8" and m["quantization"]["int8_modules"] > 0
    assert m["parity"]["passed"] and len(m["parity"]["results"]) == 6
    for r in m["parity"]["results"]:  # the int8 thresholds (vzedge.export.parity.INT8_THRESHOLDS)
        assert r["min_cosine"] >= 0.995 and r["index_agreement"] >= 0.85, r
    assert all(b["agreement"] >= 0.85 for b in m["parity"]["buckets"])


def test_cli_refuses_bad_adaptive_flags(tmp_path, capsys):
    from vzedge.cli import EXIT_BAD_INPUT, run

    cases = [
        (["export", "--out", str(tmp_path / "a"), "--adaptive-mass", "0.6"], "--adaptive-mass needs --adaptive"),
        (["export", "--out", str(tmp_path / "b"), "--adaptive", "14,x"], "comma-separated token counts"),
        (["export", "--out", str(tmp_path / "c"), "--adaptive", "14,28", "--dtype", "int8-static"], "int8-static"),
        (["serve", "--engine", "vllm", "--adaptive", "14,28"], "--engine vzedge only"),
        (["run", "--adaptive", "14,28", "--all-tokens", "--frames", "1"], "drop --all-tokens"),
    ]
    for argv, message in cases:
        assert run(argv) == EXIT_BAD_INPUT, argv
        assert message in capsys.readouterr().err, argv
    assert not any(tmp_path.iterdir())
