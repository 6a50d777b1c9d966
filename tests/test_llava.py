"""LLaVA-1.5 end to end through apply_visionzip, and the load path for saved checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vzedge import VisionZipConfig, apply_visionzip, remove_visionzip
from vzedge.images import demo_image
from vzedge.models import clip
from vzedge.models.llava import visionzip_encoder
from vzedge.models.tiny import PROMPT_TEMPLATE, build_processor

PROMPT = PROMPT_TEMPLATE.format(question="What shape is red?")


def _capture_llm_inputs(vlm):
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    return seen, vlm.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def llava_vitl():
    """A random LLaVA-1.5 whose vision tower has the real ViT-L/14-336 sizes (304M parameters)."""
    text = LlamaConfig(
        vocab_size=288,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=clip.vit_l14_336_config().to_dict(),
        text_config=text.to_dict(),
        image_token_id=3,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(config).eval()
    vlm.generation_config.pad_token_id = 0
    return vlm, build_processor()


@pytest.mark.slow
def test_llava15_generates_on_64_image_tokens(llava_vitl):
    vlm, processor = llava_vitl
    image = demo_image()
    stock = processor(images=image, text=PROMPT, return_tensors="pt")
    assert int((stock["input_ids"] == 3).sum()) == 576

    cfg = VisionZipConfig(dominant=54, contextual=10)
    apply_visionzip(vlm, cfg, processor)
    try:
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        assert int((inputs["input_ids"] == 3).sum()) == 64
        assert inputs["input_ids"].shape[1] == stock["input_ids"].shape[1] - 576 + 64
        seen, handle = _capture_llm_inputs(vlm)
        with torch.no_grad():
            out = vlm.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle.remove()
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        # The prefill's image positions hold exactly projector(VisionZip tokens): 64 of them.
        prefill = seen[0]
        assert prefill.shape[1] == inputs["input_ids"].shape[1]
        positions = (inputs["input_ids"][0] == 3).nonzero().squeeze(1)
        with torch.no_grad():
            tokens = visionzip_encoder(vlm)(inputs["pixel_values"]).tokens
            expect = vlm.model.multi_modal_projector(tokens)[0]
        assert expect.shape == (64, 256)
        torch.testing.assert_close(prefill[0, positions], expect, atol=1e-5, rtol=0)
    finally:
        remove_visionzip(vlm, processor)
    assert int((processor(images=image, text=PROMPT, return_tensors="pt")["input_ids"] == 3).sum()) == 576


def test_apply_twice_and_remove_unapplied_are_refused(tiny_vlm):
    vlm, processor = tiny_vlm
    apply_visionzip(vlm, VisionZipConfig(), processor)
    try:
        with pytest.raises(ValueError, match="already applied"):
            apply_visionzip(vlm, VisionZipConfig(), processor)
    finally:
        remove_visionzip(vlm, processor)
    with pytest.raises(ValueError, match="not applied"):
        remove_visionzip(vlm)


def test_undo_restores_the_stock_forward(tiny_vlm):
    vlm, processor = tiny_vlm
    inputs = processor(images=demo_image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        before = vlm(**inputs).logits
        apply_visionzip(vlm, VisionZipConfig(), processor)
        remove_visionzip(vlm, processor)
        after = vlm(**inputs).logits
    assert torch.equal(before, after)
    assert "_vzedge_visionzip" not in vlm.state_dict()


def test_visionzip_state_is_not_in_the_state_dict(tiny_vlm):
    vlm, processor = tiny_vlm
    keys = set(vlm.state_dict())
    apply_visionzip(vlm, VisionZipConfig(), processor)
    try:
        assert set(vlm.state_dict()) == keys
    finally:
        remove_visionzip(vlm, processor)


def test_apply_rejects_non_llava():
    with pytest.raises(TypeError, match="is not a LLaVA model"):
        apply_visionzip(torch.nn.Linear(2, 2), VisionZipConfig())


def test_apply_rejects_budget_too_large(tiny_vlm):
    vlm, processor = tiny_vlm
    with pytest.raises(ValueError, match="contextual=100 exceeds"):
        apply_visionzip(vlm, VisionZipConfig(dominant=500, contextual=100), processor)
    # Nothing half-applied: the model still runs on all tokens.
    inputs = processor(images=demo_image(), text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == 3).sum()) == 576


def test_saved_checkpoint_loads_through_the_real_path(tmp_path, tiny_vlm):
    from vzedge.models.loading import load_config, load_model

    vlm, processor = tiny_vlm
    vlm.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.source == str(tmp_path)
    assert load_config(str(tmp_path)).model_type == "llava"
    inputs = processor(images=demo_image(), text=PROMPT, return_tensors="pt")
    reloaded_inputs = loaded.processor(images=demo_image(), text=PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reloaded_inputs["input_ids"])
    torch.testing.assert_close(inputs["pixel_values"], reloaded_inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        a = vlm(**inputs).logits
        b = loaded.vlm(**inputs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_saved_bare_vision_model_loads(tmp_path):
    from transformers import SiglipVisionModel

    from vzedge.models import siglip
    from vzedge.models.loading import load_model

    SiglipVisionModel(siglip.tiny_config()).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.vlm is None and type(loaded.vision).__name__ == "SiglipVisionModel"


@pytest.mark.parametrize(
    "name, match",
    [
        ("no such model", "neither a built-in model"),
        ("./missing/folder/x", "neither a built-in model"),
    ],
)
def test_unknown_model_names_are_refused(name, match):
    from vzedge.models.loading import load_model

    with pytest.raises(ValueError, match=match):
        load_model(name)


def test_unreachable_hub_id_names_the_fix(monkeypatch):
    import huggingface_hub.constants

    from vzedge.models.loading import load_config

    # The env var is read at import time; patch the constant the hub client consults.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="pass the local folder, or use --model tiny"):
        load_config("nobody-here/not-a-model")
