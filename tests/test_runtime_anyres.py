"""The runtime on an anyres model (LLaVA-NeXT): crops as one batch through PyTorch or the exported graph,
arranged outside the graph, fed to the LLM."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vzedge._deps import onnxruntime_available
from vzedge.images import demo_image
from vzedge.models.llava_next import anyres_grid, build_tiny_next, image_token_count
from vzedge.runtime.api import load_session, run
from vzedge.runtime.config import RunConfig
from vzedge.visionzip import VisionZipConfig

VZ = VisionZipConfig(dominant=20, contextual=4)  # of 65 tokens per 112-px crop


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    model, processor = build_tiny_next()
    out = tmp_path_factory.mktemp("next") / "tiny-next"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _expected_tokens(session, image: Image.Image, layout: str) -> int:
    glue = session.vision.glue
    grid = anyres_grid((image.height, image.width), glue.pinpoints, glue.crop_size)
    return image_token_count(VZ.num_tokens, grid, glue.patches_per_side, layout)


@pytest.mark.parametrize("layout", ["reference", "newline"])
def test_run_loop_on_llava_next(next_dir, layout):
    session = load_session(RunConfig(model=str(next_dir), visionzip=VZ, layout=layout, max_new_tokens=2))
    assert session.vision.name.startswith(f"anyres-{layout}-torch")
    image = demo_image(seed=1)
    tokens = session.vision.encode_prepared(session.vision.prepare([image]))
    assert tokens.shape[1] == _expected_tokens(session, image, layout) > VZ.num_tokens
    report = run(RunConfig(source="synthetic:3", policy="all", visionzip=VZ, layout=layout, max_new_tokens=2), session)
    assert report["summary"]["frames"]["processed"] == 3


def test_runtime_tokens_equal_the_models_compressed_path(next_dir):
    """What the runtime feeds the LLM is what apply_visionzip's get_image_features gives the model itself."""
    from vzedge.models.llava import apply_visionzip, remove_visionzip

    session = load_session(RunConfig(model=str(next_dir), visionzip=VZ, max_new_tokens=2))
    image = Image.new("RGB", (200, 120), (30, 120, 200))
    prepared = session.vision.prepare([image])
    got = session.vision.encode_prepared(prepared)
    vlm = session.loaded.vlm
    apply_visionzip(vlm, VZ)
    try:
        with torch.no_grad():
            feats = vlm.model.get_image_features(pixel_values=prepared.pixels, image_sizes=prepared.image_sizes)
        expect = torch.cat(list(feats.pooler_output)).unsqueeze(0)
    finally:
        remove_visionzip(vlm)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


@pytest.mark.skipif(not onnxruntime_available(), reason="needs onnxruntime (vzedge[export])")
def test_exported_graph_runs_the_crops_and_the_runtime_arranges_them(next_dir, tmp_path):
    from vzedge.export import ExportConfig, export_vision

    out = tmp_path / "export"
    export_vision(ExportConfig(model=str(next_dir), out=out, visionzip=VZ, projector=True, max_batch=8))
    torch_s = load_session(RunConfig(model=str(next_dir), visionzip=VZ, max_new_tokens=4))
    ort_s = load_session(RunConfig(model=str(next_dir), vision=str(out), visionzip=VZ, max_new_tokens=4))
    assert ort_s.vision.name.startswith("anyres-reference-ort")
    assert ort_s.released_vision_bytes > 0  # the crops run through the graph, not the freed PyTorch tower
    for image in (demo_image(seed=2), Image.new("RGB", (300, 150), (200, 40, 40))):
        a = torch_s.vision.encode_prepared(torch_s.vision.prepare([image]))
        b = ort_s.vision.encode_prepared(ort_s.vision.prepare([image]))
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-4 * max(1.0, float(a.abs().max()))
        q = "What colour is the circle?"
        assert (
            torch_s.llm.answer(torch_s.llm.prefill_image(a), q, 4).token_ids
            == ort_s.llm.answer(ort_s.llm.prefill_image(b), q, 4).token_ids
        )
