"""VisionZip core: config validation, encoder invariants, bad input, SDPA vs eager."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from tests.conftest import peaky
from vzedge import VisionZipConfig, VisionZipEncoder
from vzedge.models import clip, siglip
from vzedge.visionzip import contextual_target_slots, remaining_positions

ATOL_FP32 = 1e-5


def _clip(**kw):
    torch.manual_seed(0)
    return peaky(CLIPVisionModel(clip.tiny_config(**kw)).eval())


def _siglip(**kw):
    torch.manual_seed(0)
    return peaky(SiglipVisionModel(siglip.tiny_config(**kw)).eval())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dominant=-1), "dominant=-1 is negative"),
        (dict(contextual=-2), "contextual=-2 is negative"),
        (dict(dominant=0, contextual=0), "keep at least one token"),
        (dict(merge="avg"), "merge='avg'"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionZipConfig(**kwargs)


def test_config_rejects_non_int():
    with pytest.raises(TypeError, match="must be an int"):
        VisionZipConfig(dominant=5.0)


def test_encoder_rejects_token_budgets_that_do_not_fit():
    m = _clip()  # 577 tokens
    with pytest.raises(ValueError, match="always keeps CLS; use dominant >= 1"):
        VisionZipEncoder(m, VisionZipConfig(dominant=0, contextual=10))
    with pytest.raises(ValueError, match="dominant=600 exceeds"):
        VisionZipEncoder(m, VisionZipConfig(dominant=600, contextual=0))
    with pytest.raises(ValueError, match="contextual=100 exceeds the 77 tokens left"):
        VisionZipEncoder(m, VisionZipConfig(dominant=500, contextual=100))
    with pytest.raises(ValueError, match="layer=4 is out of range for a 4-layer encoder"):
        VisionZipEncoder(m, VisionZipConfig(layer=4))
    with pytest.raises(ValueError, match="layer=-5 is out of range"):
        VisionZipEncoder(m, VisionZipConfig(layer=-5))
    # Exactly all tokens is allowed: 500 dominant + 77 contextual targets without members.
    VisionZipEncoder(m, VisionZipConfig(dominant=500, contextual=77))


def test_encoder_rejects_models_that_are_not_vits():
    with pytest.raises(ValueError, match="not a supported ViT vision encoder"):
        VisionZipEncoder(torch.nn.Linear(4, 4), VisionZipConfig())
    with pytest.raises(TypeError, match="expected a vision model"):
        VisionZipEncoder("openai/clip", VisionZipConfig())
    m = _clip()
    del m.encoder.layers[1].self_attn.k_proj
    with pytest.raises(ValueError, match="no self_attn with q_proj/k_proj"):
        VisionZipEncoder(m, VisionZipConfig())


def test_encoder_rejects_bad_pixels():
    enc = VisionZipEncoder(_clip(), VisionZipConfig())
    with pytest.raises(ValueError, match=r"expected \[B, 3, 336, 336\]"):
        enc(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"expected \[B, 3, 336, 336\]"):
        enc(torch.randn(3, 336, 336))
    with pytest.raises(TypeError, match="pass normalised float pixels"):
        enc(torch.zeros(1, 3, 336, 336, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        enc([[0.0]])
    with pytest.raises(ValueError, match="batch size 0"):
        enc(torch.randn(0, 3, 336, 336))


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("contextual", [0, 10])
def test_invariants(family, contextual):
    model = _clip() if family == "clip" else _siglip()
    cfg = VisionZipConfig(dominant=30, contextual=contextual)
    enc = VisionZipEncoder(model, cfg)
    size = enc.tower.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = enc(x)
        hidden = model(x, output_hidden_states=True).hidden_states[cfg.layer]
    n = enc.tower.seq_len
    assert out.tokens.shape == (3, cfg.num_tokens, enc.tower.hidden_size)
    assert out.kept_indices.shape == (3, cfg.dominant)
    assert out.scores.shape == (3, n)
    assert bool((out.kept_indices.diff(dim=1) > 0).all()), "kept indices must be strictly ascending"
    if family == "clip":
        assert bool((out.kept_indices[:, 0] == 0).all()), "CLS is always kept"
    # Dominant tokens are the layer's own hidden states at the kept positions.
    expect = torch.stack([hidden[b, out.kept_indices[b]] for b in range(3)])
    torch.testing.assert_close(out.tokens[:, : cfg.dominant], expect, atol=ATOL_FP32, rtol=0)
    # The dominant set is the top of the score (CLS forced for CLIP).
    offset = 1 if family == "clip" else 0
    k = cfg.dominant - offset
    for b in range(3):
        top = set((torch.topk(out.scores[b, offset:], k).indices + offset).tolist())
        assert top == set(out.kept_indices[b, offset:].tolist())


def test_merge_modes_are_reference_sum_and_plain_mean():
    model = _clip()
    x = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    ref = VisionZipEncoder(model, VisionZipConfig(dominant=20, contextual=4, merge="reference"))
    mean = VisionZipEncoder(model, VisionZipConfig(dominant=20, contextual=4, merge="mean"))
    with torch.no_grad():
        a, b = ref(x), mean(x)
        groups = ref.explain(x).groups
        hidden = model(x, output_hidden_states=True).hidden_states[-2]
    targets, _ = contextual_target_slots(577 - 20, 4)
    remaining = remaining_positions(a.kept_indices, 577)
    for batch in range(2):
        for c, slot in enumerate(targets):
            t = int(remaining[batch, slot])
            members = [p for p in range(577) if int(groups[batch, p]) == c and p != t]
            h_t, h_m = hidden[batch, t], hidden[batch, members]
            expect_ref = h_t + (h_m.mean(0) if members else 0)
            expect_mean = torch.cat([h_t[None], h_m]).mean(0)
            torch.testing.assert_close(a.tokens[batch, 20 + c], expect_ref, atol=ATOL_FP32, rtol=0)
            torch.testing.assert_close(b.tokens[batch, 20 + c], expect_mean, atol=ATOL_FP32, rtol=0)
        # Every remaining token joined exactly one group.
        assert int((groups[batch] >= 0).sum()) == 577 - 20


def test_layers_after_the_selected_one_are_not_run():
    model = _clip()
    calls = []
    layers = model.encoder.layers
    hooks = [layer.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        VisionZipEncoder(model, VisionZipConfig())(torch.randn(1, 3, 336, 336))
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2], calls


def test_cls_score_does_not_materialise_attention_maps():
    """The CLIP score is one query row: an eager-attention tower is never asked for N x N maps."""
    model = _clip()
    enc = VisionZipEncoder(model, VisionZipConfig())
    seen = []
    h = model.encoder.layers[2].self_attn.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    with torch.no_grad():
        enc(torch.randn(1, 3, 336, 336))
    h.remove()
    assert seen == [None]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_sdpa_and_eager_towers_agree(family):
    """Same selection whatever attention kernel the rest of the tower uses.

    SDPA and eager attention differ by float rounding in the stock tower itself (~1e-5 at these
    sizes, before VisionZip runs), so the bound is that deviation, doubled because a reference
    contextual token sums two hidden states, plus ATOL_FP32: VisionZip adds no error of its own.
    """
    base = _clip() if family == "clip" else _siglip()
    cls = CLIPVisionModel if family == "clip" else SiglipVisionModel
    cfg = VisionZipConfig(dominant=40, contextual=8)
    outs, hidden = {}, {}
    for impl in ("sdpa", "eager"):
        m = cls._from_config(base.config, attn_implementation=impl).eval()
        m.load_state_dict(base.state_dict())
        enc = VisionZipEncoder(m, cfg)
        size = enc.tower.image_size
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            outs[impl] = enc(x)
            hidden[impl] = m(x, output_hidden_states=True).hidden_states[cfg.layer]
    tower_dev = float((hidden["sdpa"] - hidden["eager"]).abs().max())
    assert tower_dev < 1e-4, f"the stock tower's SDPA/eager deviation is {tower_dev}"
    assert torch.equal(outs["sdpa"].kept_indices, outs["eager"].kept_indices)
    dev = float((outs["sdpa"].tokens - outs["eager"].tokens).abs().max())
    assert dev <= 2 * tower_dev + ATOL_FP32, (dev, tower_dev)


def test_accepts_wrapped_vision_model():
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    wrapped = peaky(CLIPVisionModelWithProjection(clip.tiny_config()).eval())
    enc = VisionZipEncoder(wrapped, VisionZipConfig())
    assert enc.tower.module is wrapped.vision_model
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 336, 336)).tokens.shape == (1, 64, 64)


def test_siglip_score_chunking_matches_unchunked():
    from vzedge.visionzip import received_attention_scores

    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, 300, 16, generator=g), torch.randn(2, 4, 300, 16, generator=g)
    full = (q @ k.transpose(-1, -2) * 0.25).softmax(-1).mean(1).sum(1)
    torch.testing.assert_close(received_attention_scores(q, k, 0.25, chunk=64), full, atol=1e-5, rtol=1e-5)
    # Each query's probabilities sum to one, so the scores sum to N.
    torch.testing.assert_close(full.sum(-1), torch.full((2,), 300.0), atol=1e-3, rtol=0)
