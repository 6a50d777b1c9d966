"""Video / multi-frame: every frame compressed independently (LLaVA-NeXT-Video, and a multi-image LLaVA-1.5 prompt)."""

from __future__ import annotations

import pytest
import torch

from vzedge import VisionZipConfig, apply_visionzip, remove_visionzip
from vzedge.images import demo_image
from vzedge.models.llava import visionzip_encoder
from vzedge.models.llava_next import TINY_CROP, TINY_VIDEO_TOKEN_ID, build_tiny_next, video_token_count

CFG17 = VisionZipConfig(dominant=14, contextual=3)  # the paper's Video-LLaVA budget: 17 tokens per frame


@pytest.fixture(scope="module")
def next_video():
    return build_tiny_next(video=True)


def _frames(n: int, size: int = TINY_CROP, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompt(tokenizer, n_video_tokens: int) -> dict[str, torch.Tensor]:
    head = tokenizer("USER: ")["input_ids"]
    tail = tokenizer("\nWhat moved? ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + [TINY_VIDEO_TOKEN_ID] * n_video_tokens + tail])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("num_frames", [1, 4])
def test_next_video_generates_on_17_tokens_per_frame(next_video, num_frames):
    vlm, processor = next_video
    frames = _frames(num_frames)
    apply_visionzip(vlm, CFG17, processor)
    try:
        placeholder = processor.replace_video_token({"pixel_values_videos": frames}, 0)
        assert placeholder == processor.video_token * (17 * num_frames)
        assert video_token_count(17, num_frames) == 17 * num_frames
        inputs = _prompt(processor.tokenizer, 17 * num_frames)
        seen = []
        handle = vlm.model.language_model.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True
        )
        with torch.no_grad():
            out = vlm.generate(**inputs, pixel_values_videos=frames, max_new_tokens=3, do_sample=False)
        handle.remove()
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        # Frame f's 17 positions hold projector(VisionZip(frame f alone)): frames are compressed independently.
        positions = (inputs["input_ids"][0] == TINY_VIDEO_TOKEN_ID).nonzero().squeeze(1)
        got = seen[0][0, positions].reshape(num_frames, 17, -1)
        with torch.no_grad():
            for f in range(num_frames):
                alone = visionzip_encoder(vlm)(frames[0, f : f + 1]).tokens
                torch.testing.assert_close(got[f], vlm.model.multi_modal_projector(alone)[0], atol=1e-5, rtol=0)
    finally:
        remove_visionzip(vlm, processor)
    assert "replace_video_token" not in vars(processor)


def test_zero_frames_and_wrong_frame_sizes_are_refused(next_video):
    vlm, processor = next_video
    apply_visionzip(vlm, CFG17, processor)
    try:
        with pytest.raises(ValueError, match="0 frames; pass at least one frame per video"):
            vlm.model.get_video_features(_frames(0))
        with pytest.raises(ValueError, match="has 0 frames; pass at least one frame"):
            processor.replace_video_token({"pixel_values_videos": _frames(0)}, 0)
        with pytest.raises(ValueError, match=r"expected \[videos, frames, C, H, W\]"):
            vlm.model.get_video_features(torch.zeros(2, 3, TINY_CROP, TINY_CROP))
        with pytest.raises(ValueError, match=r"pixel_values has shape \[2, 3, 96, 96\], expected \[B, 3, 112, 112\]"):
            vlm.model.get_video_features(_frames(2, size=96))
    finally:
        remove_visionzip(vlm, processor)


def test_multi_image_llava15_prompt_compresses_each_frame(tiny_vlm):
    vlm, processor = tiny_vlm
    frames = [demo_image(), demo_image().rotate(90), demo_image().transpose(0)]
    prompt = "USER: <image><image><image>\nWhat changed between the frames? ASSISTANT:"
    apply_visionzip(vlm, VisionZipConfig(dominant=54, contextual=10), processor)
    try:
        inputs = processor(images=frames, text=prompt, return_tensors="pt")
        assert int((inputs["input_ids"] == 3).sum()) == 3 * 64
        assert processor._get_num_multimodal_tokens(image_sizes=[(336, 336)] * 3).num_image_tokens == [64] * 3
        with torch.no_grad():
            out = vlm.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    finally:
        remove_visionzip(vlm, processor)
