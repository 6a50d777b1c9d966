"""LLaVA-NeXT (anyres) through apply_visionzip: counts per grid, the authors' arrangement, generation, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vzedge import VisionZipConfig, apply_visionzip, remove_visionzip
from vzedge.models.llava import visionzip_encoder
from vzedge.models.llava_next import (
    TINY_CROP,
    TINY_PINPOINTS,
    anyres_grid,
    arrange_anyres,
    build_tiny_next,
    check_grid,
    check_pinpoints,
    image_token_count,
    select_best_resolution,
)

IMAGE_TOKEN = 3
CFG = VisionZipConfig(dominant=10, contextual=2)  # K = 12 per crop of the tiny tower's 8 x 8 + CLS
PPS = TINY_CROP // 14  # patches per side
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 checkpoints


def by_mask(tokens, kept, rows, cols, pps, has_cls=True):
    """The authors' arrangement, re-derived their way: scatter each tile's dominant patches into its grid,
    stitch the tiles, read the kept cells row by row; then the tiles' CLS; then all contextual tokens."""
    tiles, tkept = tokens[1:], kept[1:]
    t, _, d = tiles.shape
    first = int(has_cls)
    dominant = tkept.shape[1]
    cells = torch.zeros(t, pps * pps, d, dtype=tokens.dtype)
    mask = torch.zeros(t, pps * pps, dtype=torch.bool)
    for i in range(t):
        for slot in range(first, dominant):
            p = int(tkept[i, slot]) - first
            cells[i, p] = tiles[i, slot]
            mask[i, p] = True
    cells = cells.view(rows, cols, pps, pps, d).permute(0, 2, 1, 3, 4).reshape(rows * pps, cols * pps, d)
    mask = mask.view(rows, cols, pps, pps).permute(0, 2, 1, 3).reshape(rows * pps, cols * pps)
    parts = [tokens[0], cells[mask]]
    if has_cls:
        parts.append(tiles[:, 0])
    parts.append(tiles[:, dominant:].reshape(-1, d))
    return torch.cat(parts)


def random_crops(rows, cols, pps, k, dominant, d=5, has_cls=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 1 + rows * cols
    tokens = torch.randn(n, k, d, generator=g)
    patches = torch.stack([torch.randperm(pps * pps, generator=g)[: dominant - int(has_cls)] for _ in range(n)])
    kept = torch.sort(patches + int(has_cls), dim=1).values
    if has_cls:
        kept = torch.cat([torch.zeros(n, 1, dtype=torch.long), kept], dim=1)
    return tokens, kept


@pytest.fixture(scope="module")
def next_vlm():
    return build_tiny_next()


# --------------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("hw", [(672, 672), (480, 640), (640, 480), (300, 1000), (1000, 300), (20, 20), (337, 673)])
def test_best_resolution_matches_transformers(hw):
    from transformers.image_processing_utils import select_best_resolution as hf

    assert select_best_resolution(hw, NEXT_PINPOINTS) == tuple(hf(hw, NEXT_PINPOINTS))


@pytest.mark.parametrize(
    "hw, grid, reference, newline",
    [
        # LLaVA-NeXT geometry (336-px crops, 24 x 24 patches) at the paper's 64 tokens per crop.
        ((672, 672), (2, 2), 320, 320 + 48),  # the paper's 672 x 672 image: 2,880 stock tokens -> 320
        ((336, 672), (1, 2), 192, 192 + 24),
        ((672, 336), (2, 1), 192, 192 + 48),
        ((300, 1000), (1, 3), 256, 256 + 24),
        ((1000, 300), (3, 1), 256, 256 + 72),
    ],
)
def test_token_count_per_grid_at_llava_next_geometry(hw, grid, reference, newline):
    assert anyres_grid(hw, NEXT_PINPOINTS, 336) == grid
    assert image_token_count(64, grid, 24, "reference") == reference
    assert image_token_count(64, grid, 24, "newline") == newline
    # Stock LLaVA-NeXT: 576 per crop before unpadding; the paper's 2,880 for 672 x 672.
    assert 576 * (1 + grid[0] * grid[1]) == {(2, 2): 2880, (1, 2): 1728, (2, 1): 1728}.get(grid, 2304)


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3), (3, 3)])
@pytest.mark.parametrize("has_cls", [True, False])
def test_reference_layout_matches_the_authors_scatter_and_mask(grid, has_cls):
    rows, cols = grid
    k, dominant = 12, 10
    tokens, kept = random_crops(rows, cols, PPS, k, dominant, has_cls=has_cls)
    got = arrange_anyres(tokens, kept, grid, PPS, has_cls, "reference")
    assert got.shape[0] == k * (1 + rows * cols) == image_token_count(k, grid, PPS)
    assert torch.equal(got, by_mask(tokens, kept, rows, cols, PPS, has_cls))


@pytest.mark.parametrize("grid", [(1, 2), (2, 2), (3, 1)])
def test_newline_layout_is_reference_plus_one_newline_per_stitched_row(grid):
    rows, cols = grid
    tokens, kept = random_crops(rows, cols, PPS, 12, 10)
    newline = torch.full((5,), 1e4)
    got = arrange_anyres(tokens, kept, grid, PPS, True, "newline", newline)
    assert got.shape[0] == image_token_count(12, grid, PPS, "newline") == 12 * (1 + rows * cols) + rows * PPS
    is_nl = (got == 1e4).all(dim=1)
    assert int(is_nl.sum()) == rows * PPS
    assert torch.equal(got[~is_nl], arrange_anyres(tokens, kept, grid, PPS, True, "reference"))
    # Between the base crop and the tiles' CLS, newline r follows exactly the tokens of stitched row r.
    grid_part = got[12 : 12 + rows * cols * 9 + rows * PPS]
    nl_at = is_nl[12 : 12 + grid_part.shape[0]].nonzero().squeeze(1)
    tiles_kept = kept[1:, 1:] - 1
    row_of = (torch.arange(rows * cols) // cols).unsqueeze(1) * PPS + tiles_kept // PPS
    per_row = torch.bincount(row_of.reshape(-1), minlength=rows * PPS)
    assert torch.equal(torch.diff(nl_at, prepend=torch.tensor([-1])) - 1, per_row)


# --------------------------------------------------------------------------------------------------- model, processor


@pytest.mark.parametrize(
    "size_wh, grid",
    [((300, 200), (3, 3)), ((100, 300), (3, 1)), ((200, 100), (1, 2)), ((112, 224), (2, 1)), ((224, 224), (2, 2))],
)
def test_processor_inserts_the_count_for_each_grid(next_vlm, size_wh, grid):
    vlm, processor = next_vlm
    image = Image.new("RGB", size_wh, (120, 40, 200))
    apply_visionzip(vlm, CFG, processor)
    try:
        inputs = processor(images=image, text="USER: <image>\nhi", return_tensors="pt")
        assert anyres_grid(inputs["image_sizes"][0].tolist(), TINY_PINPOINTS, TINY_CROP) == grid
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 12 * (1 + grid[0] * grid[1])
        counted = processor._get_num_multimodal_tokens(image_sizes=[(size_wh[1], size_wh[0])])
        assert counted["num_image_tokens"] == [12 * (1 + grid[0] * grid[1])]
    finally:
        remove_visionzip(vlm, processor)


def _capture_llm_inputs(vlm):
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    return seen, vlm.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("layout", ["reference", "newline"])
def test_generation_sees_the_arranged_crops_of_two_images(next_vlm, layout):
    vlm, processor = next_vlm
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (100, 300), (30, 200, 30))]
    texts = ["USER: <image>\nWhat is red?", "USER: <image>\nWhat is green?"]
    stock = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert (stock["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == [464, 280]  # stock counts, with unpadding
    apply_visionzip(vlm, CFG, processor, layout=layout)
    try:
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        newlines = [3 * PPS, 3 * PPS] if layout == "newline" else [0, 0]
        want = [12 * 10 + newlines[0], 12 * 4 + newlines[1]]  # grids 3x3 and 3x1
        assert (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == want
        seen, handle = _capture_llm_inputs(vlm)
        with torch.no_grad():
            out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle.remove()
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
        # The LLM's image positions hold projector(VisionZip tokens) arranged per image, computed independently.
        prefill = seen[0]
        with torch.no_grad():
            encoder = visionzip_encoder(vlm)
            inner = vlm.model
            for i, (n_crops, grid) in enumerate([(10, (3, 3)), (4, (3, 1))]):
                enc = encoder(inputs["pixel_values"][i, :n_crops])
                feats = inner.multi_modal_projector(enc.tokens)
                expect = by_mask(feats, enc.kept_indices, *grid, PPS)
                positions = (inputs["input_ids"][i] == IMAGE_TOKEN).nonzero().squeeze(1)
                got = prefill[i, positions]
                if layout == "newline":
                    nl = torch.isclose(got, inner.image_newline.expand_as(got), atol=0, rtol=0).all(dim=1)
                    assert int(nl.sum()) == newlines[i]
                    got = got[~nl]
                torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    finally:
        remove_visionzip(vlm, processor)


def test_remove_restores_the_stock_forward(next_vlm):
    vlm, processor = next_vlm
    inputs = processor(images=Image.new("RGB", (200, 100)), text="USER: <image>\nhi", return_tensors="pt")
    with torch.no_grad():
        before = vlm(**inputs).logits
        apply_visionzip(vlm, CFG, processor)
        remove_visionzip(vlm, processor)
        after = vlm(**inputs).logits
    assert torch.equal(before, after)
    restored = processor(images=Image.new("RGB", (200, 100)), text="<image>", return_tensors="pt")
    assert int((restored["input_ids"] == IMAGE_TOKEN).sum()) == int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 200


# --------------------------------------------------------------------------------------------------- bad input


def test_unsupported_grids_and_pinpoints_are_refused():
    with pytest.raises(ValueError, match=r"grid 3x3 .* is not one this checkpoint supports; its grids are"):
        check_grid((3, 3), NEXT_PINPOINTS, 336)
    assert check_grid((1, 3), NEXT_PINPOINTS, 336) == (1, 3)
    with pytest.raises(ValueError, match="not a whole number of 336-px crops"):
        check_pinpoints([[336, 500]], 336)
    with pytest.raises(ValueError, match="image_grid_pinpoints is empty"):
        anyres_grid((10, 10), [], 336)
    with pytest.raises(ValueError, match="image size 0x10"):
        anyres_grid((0, 10), NEXT_PINPOINTS, 336)
    tokens, kept = random_crops(2, 2, PPS, 12, 10)
    with pytest.raises(ValueError, match=r"5 crops for a 1x2 grid"):
        arrange_anyres(tokens, kept, (1, 2), PPS, True)
    with pytest.raises(ValueError, match="layout='newline' needs the model's image_newline"):
        arrange_anyres(tokens, kept, (2, 2), PPS, True, "newline")
    with pytest.raises(ValueError, match="layout='rows' is not one of"):
        image_token_count(12, (2, 2), PPS, "rows")  # type: ignore[arg-type]


def test_model_level_errors_name_the_fix(next_vlm, tiny_vlm):
    vlm, _ = next_vlm
    with pytest.raises(ValueError, match="layout='newline' applies to anyres models"):
        apply_visionzip(tiny_vlm[0], CFG, layout="newline")
    other, other_proc = build_tiny_next(pinpoints=[[112, 224], [224, 112]])
    with pytest.raises(ValueError, match="use the checkpoint's own processor"):
        apply_visionzip(vlm, CFG, other_proc)
    assert "get_image_features" not in vars(vlm.model)  # nothing half-applied
    apply_visionzip(vlm, CFG)
    try:
        pv = torch.zeros(1, 5, 3, TINY_CROP, TINY_CROP)
        with pytest.raises(ValueError, match="image 0 needs 10 crops for its grid but pixel_values holds 5"):
            vlm.model.get_image_features(pv, torch.tensor([[200, 300]]))
        with pytest.raises(ValueError, match="image_sizes is None"):
            vlm.model.get_image_features(pv, None)
        with pytest.raises(ValueError, match=r"pixel_values has shape \[3, 3, 96, 96\], expected \[B, 3, 112, 112\]"):
            vlm.model.get_image_features(torch.zeros(1, 3, 3, 96, 96), torch.tensor([[100, 200]]))
        with pytest.raises(ValueError, match="already applied"):
            apply_visionzip(vlm, CFG)
    finally:
        remove_visionzip(vlm)
    with pytest.raises(ValueError, match="contextual=100 exceeds"):
        apply_visionzip(other, VisionZipConfig(dominant=10, contextual=100))


# --------------------------------------------------------------------------------------------------- export (item 4)


@pytest.mark.slow
def test_exported_graph_runs_the_crops_as_one_batch_with_per_crop_parity(next_vlm, tmp_path):
    """The anyres crops of one image go through the exported vision graph as a batch; the arrangement runs outside
    the graph and gives what the compressed model path feeds the LLM."""
    ort = pytest.importorskip("onnxruntime")
    for module in ("onnx", "onnxscript", "onnxslim"):
        pytest.importorskip(module)
    from vzedge.encoder import VisionZipEncoder
    from vzedge.export import ExportConfig, export_vision

    vlm, processor = next_vlm
    tower_dir = tmp_path / "tower"
    vlm.model.vision_tower.save_pretrained(tower_dir)
    result = export_vision(ExportConfig(model=str(tower_dir), out=tmp_path / "out", visionzip=CFG, max_batch=10))
    assert result.manifest["graph"]["outputs"][0]["shape"][1:] == [12, 64]

    inputs = processor(images=Image.new("RGB", (300, 200), (90, 160, 20)), text="<image>", return_tensors="pt")
    crops = inputs["pixel_values"][0]
    assert crops.shape[0] == 10  # base + 3 x 3 tiles
    session = ort.InferenceSession(str(result.out / "model.onnx"), providers=["CPUExecutionProvider"])
    tokens, kept = (torch.from_numpy(a) for a in session.run(None, {"pixel_values": crops.numpy()}))
    encoder = VisionZipEncoder(vlm.model.vision_tower, CFG).eval()
    with torch.no_grad():
        for i in range(10):  # each crop alone through PyTorch vs its row of the batched graph
            ref = encoder(crops[i : i + 1])
            assert torch.equal(kept[i : i + 1], ref.kept_indices)
            scale = ref.tokens.abs().max()
            assert (tokens[i] - ref.tokens[0]).abs().max() <= 1e-4 * scale
        arranged = arrange_anyres(vlm.model.multi_modal_projector(tokens), kept, (3, 3), PPS, True)
        apply_visionzip(vlm, CFG)
        try:
            model_path = vlm.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        finally:
            remove_visionzip(vlm)
    assert arranged.shape == (120, 64)
    torch.testing.assert_close(arranged, model_path, atol=1e-4, rtol=1e-4)
