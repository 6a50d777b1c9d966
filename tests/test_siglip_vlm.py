"""LLaVA-OneVision (SigLIP tower, no CLS) through apply_visionzip: counts, generation, video, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vzedge import VisionZipConfig, apply_visionzip, remove_visionzip
from vzedge.models.llava import visionzip_encoder
from vzedge.models.llava_next import TINY_VIDEO_TOKEN_ID, arrange_anyres
from vzedge.models.llava_onevision import TINY_CROP, build_tiny_onevision, onevision_video_token_count

IMAGE_TOKEN = 3
PPS = TINY_CROP // 16  # 6 x 6 patches, no CLS
CFG = VisionZipConfig(dominant=8, contextual=2, layer=-1)  # OneVision reads its tower's last layer


@pytest.fixture(scope="module")
def onevision():
    return build_tiny_onevision()


@pytest.mark.parametrize("layout", ["reference", "newline"])
@pytest.mark.parametrize(
    "size_wh, grid", [((300, 200), (3, 3)), ((96, 288), (3, 1)), ((192, 96), (1, 2)), ((192, 192), (2, 2))]
)
def test_single_image_count_per_grid(onevision, size_wh, grid, layout):
    vlm, processor = onevision
    apply_visionzip(vlm, CFG, processor, layout=layout)
    try:
        inputs = processor(images=Image.new("RGB", size_wh, (10, 200, 90)), text="<image>\nhi", return_tensors="pt")
        want = 10 * (1 + grid[0] * grid[1]) + (grid[0] * PPS if layout == "newline" else 0)
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == want
        assert inputs["pixel_values"].shape[1] == 1 + grid[0] * grid[1]
    finally:
        remove_visionzip(vlm, processor)


def test_generation_uses_the_no_cls_score_and_the_arranged_tokens(onevision):
    vlm, processor = onevision
    image = Image.new("RGB", (300, 200), (200, 30, 30))
    stock = processor(images=image, text="USER: <image>\nWhat is red? ASSISTANT:", return_tensors="pt")
    assert (
        int((stock["input_ids"] == IMAGE_TOKEN).sum()) == 36 + 12 * 18 + 12
    )  # base + unpadded 12 x 18 grid + 12 newlines
    apply_visionzip(vlm, CFG, processor)
    try:
        inputs = processor(images=image, text="USER: <image>\nWhat is red? ASSISTANT:", return_tensors="pt")
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 100  # 10 tokens x 10 crops (3 x 3 grid)
        seen = []
        handle = vlm.model.language_model.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True
        )
        with torch.no_grad():
            out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle.remove()
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        encoder = visionzip_encoder(vlm)
        assert encoder.tower.family == "siglip" and not encoder.tower.has_cls
        with torch.no_grad():
            enc = encoder(inputs["pixel_values"][0])
            # No CLS: the 8 dominant tokens are the top-8 patches by attention received, position 0 not forced.
            top = torch.sort(torch.topk(enc.scores, 8, dim=1).indices, dim=1).values
            assert torch.equal(enc.kept_indices, top) and enc.scores.shape == (10, 36)
            expect = arrange_anyres(vlm.model.multi_modal_projector(enc.tokens), enc.kept_indices, (3, 3), PPS, False)
        positions = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(1)
        torch.testing.assert_close(seen[0][0, positions], expect, atol=1e-5, rtol=0)
    finally:
        remove_visionzip(vlm, processor)


def test_multi_image_prompt_is_one_crop_each_plus_newline(onevision):
    vlm, processor = onevision
    images = [[Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (90, 90), (0, 0, 250))]]
    apply_visionzip(vlm, CFG, processor)
    try:
        inputs = processor(images=images, text=["<image><image>\nSame?"], return_tensors="pt")
        assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 2 * (10 + 1)
        with torch.no_grad():
            feats = vlm.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
            ).pooler_output
            assert [f.shape[0] for f in feats] == [11, 11]
            torch.testing.assert_close(feats[0][-1], vlm.model.image_newline, atol=0, rtol=0)
            out = vlm.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        with pytest.raises(ValueError, match="batch_num_images sums to 3 images but image_sizes has 2"):
            vlm.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], batch_num_images=[3])
    finally:
        remove_visionzip(vlm, processor)


def test_video_is_k_per_frame_plus_one_newline(onevision):
    vlm, processor = onevision
    frames = torch.randn(1, 3, 3, TINY_CROP, TINY_CROP, generator=torch.Generator().manual_seed(1))
    apply_visionzip(vlm, CFG, processor)
    try:
        n = onevision_video_token_count(10, 3)
        assert (
            n == 31 and processor.replace_video_token({"pixel_values_videos": frames}, 0) == processor.video_token * n
        )
        ids = torch.tensor([[1] + [TINY_VIDEO_TOKEN_ID] * n + [70, 71]])
        with torch.no_grad():
            feats = vlm.model.get_video_features(frames).pooler_output
            assert feats.shape == (1, 31, 64)
            torch.testing.assert_close(feats[0, -1], vlm.model.image_newline, atol=0, rtol=0)
            out = vlm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=frames,
                               max_new_tokens=2, do_sample=False)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + 2
        with pytest.raises(ValueError, match="0 frames"):
            processor._get_num_multimodal_tokens(video_sizes=[(0, 96, 96)])
    finally:
        remove_visionzip(vlm, processor)
