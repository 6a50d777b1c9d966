"""The text-conditioned second stage (vzedge.select.textcond): the fast greedy MAP of the conditional DPP against
a slow log-det reference of the same greedy, its properties, and the relevance function."""

from __future__ import annotations

import math

import pytest
import torch

from vzedge.select.textcond import (
    GAIN_EPS,
    TextStage,
    conditional_dpp_indices,
    conditional_dpp_order,
    dpp_kernel,
    text_relevance,
)


def _slow_greedy(features: torch.Tensor, relevance: torch.Tensor, k: int) -> list[int]:
    """The greedy written out: each step, log det of L over (picked + candidate) for every candidate, take the best."""
    kernel = dpp_kernel(features.unsqueeze(0).double(), relevance.unsqueeze(0).double())[0]
    picked: list[int] = []
    for _ in range(k):
        best, best_val = None, -float("inf")
        for c in range(kernel.shape[0]):
            if c in picked:
                continue
            idx = torch.tensor([*picked, c])
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            val = float(logdet) if sign > 0 else -float("inf")
            if val > best_val:
                best, best_val = c, val
        assert best is not None
        picked.append(best)
    return picked


def _data(b: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    rel = 0.1 + 0.9 * torch.rand(b, n, generator=g, dtype=torch.float64)
    return feats, rel


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_matches_slow_logdet_reference(seed: int) -> None:
    feats, rel = _data(3, 24, 32, seed)  # D >= N: full rank, every step has a gain
    order, gains = conditional_dpp_order(feats, rel, 10)
    for i in range(3):
        assert order[i].tolist() == _slow_greedy(feats[i], rel[i], 10)
    # Each gain is the determinant ratio det(L_{Y+j}) / det(L_Y) of the reference, to 1e-9 (float64).
    kernel = dpp_kernel(feats, rel)
    for i in range(3):
        prev = 0.0
        for t in range(10):
            idx = order[i, : t + 1]
            logdet = float(torch.linalg.slogdet(kernel[i][idx][:, idx])[1])
            assert abs(float(gains[i, t]) - math.exp(logdet - prev)) < 1e-9
            prev = logdet


def test_float32_picks_agree_with_float64() -> None:
    feats, rel = _data(2, 40, 48, 5)
    assert torch.equal(conditional_dpp_indices(feats.float(), rel.float(), 12), conditional_dpp_indices(feats, rel, 12))


def test_k_distinct_ascending_and_deterministic() -> None:
    feats, rel = _data(4, 30, 8, 3)  # D < k: the kernel's rank (8) runs out before 16 picks
    idx = conditional_dpp_indices(feats, rel, 16)
    assert idx.shape == (4, 16) and idx.dtype == torch.long
    for row in idx:
        assert len(set(row.tolist())) == 16
        assert torch.all(row[1:] > row[:-1])
    assert torch.equal(idx, conditional_dpp_indices(feats, rel, 16))
    _, gains = conditional_dpp_order(feats, rel, 16)
    assert torch.all(gains[:, :8] > GAIN_EPS)  # rank 8: eight picks with a gain
    assert torch.all(gains[:, 8:] == 0)  # then relevance-ordered fills


def test_zero_relevance_never_before_positive_when_similarities_equal() -> None:
    # Orthonormal features: every pair equally (un)similar, so only relevance decides.
    n = 12
    feats = torch.eye(n, dtype=torch.float64).unsqueeze(0)
    rel = torch.tensor([[0.0, 0.5, 0.0, 0.9, 0.2, 0.0, 0.7, 0.0, 0.3, 0.0, 0.6, 0.0]], dtype=torch.float64)
    order, gains = conditional_dpp_order(feats, rel, 9)
    # orthogonal: each gain is r_j^2, so the positive ones come first by relevance, then zeros by position
    assert order[0].tolist() == [3, 6, 10, 1, 8, 4, 0, 2, 5]
    assert torch.allclose(gains[0, :6], rel[0, order[0, :6]].square())
    assert torch.all(gains[0, 6:] == 0)


def test_identical_features_collapse_to_one_pick() -> None:
    feats = torch.ones(2, 10, 6)
    rel = torch.linspace(0.1, 1.0, 10).repeat(2, 1)
    rel[1] = rel[1].flip(0)
    order, gains = conditional_dpp_order(feats, rel, 4)
    assert order[:, 0].tolist() == [9, 0]  # the most relevant copy
    assert torch.all(gains[:, 0] > 0.99) and torch.all(gains[:, 1:] == 0)  # nothing more to gain
    assert order[0].tolist() == [9, 8, 7, 6] and order[1].tolist() == [0, 1, 2, 3]  # fills by relevance


def test_batch_equals_loop_over_rows() -> None:
    feats, rel = _data(5, 36, 20, 7)
    feats, rel = feats.float(), rel.float()
    batched = conditional_dpp_indices(feats, rel, 9)
    for i in range(5):
        assert torch.equal(batched[i : i + 1], conditional_dpp_indices(feats[i : i + 1], rel[i : i + 1], 9))


def test_bad_shapes_and_k_are_refused() -> None:
    feats, rel = _data(1, 8, 4, 0)
    with pytest.raises(ValueError, match="between 1 and the 8"):
        conditional_dpp_indices(feats, rel, 9)
    with pytest.raises(ValueError, match="relevance must be"):
        conditional_dpp_indices(feats, rel[:, :5], 3)
    with pytest.raises(ValueError, match="positive token count"):
        TextStage(0)


def test_relevance_shape_and_normalisation() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 16, 8, generator=g)
    txt = torch.randn(2, 5, 8, generator=g)
    rel = text_relevance(img, txt)
    assert rel.shape == (2, 16)
    assert torch.allclose(rel.min(dim=1).values, torch.zeros(2))
    assert torch.allclose(rel.max(dim=1).values, torch.ones(2))
    # mean of cosines, then min-max, by hand
    cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).transpose(1, 2)
    mean = cos.mean(2)
    lo, hi = mean.min(1, keepdim=True).values, mean.max(1, keepdim=True).values
    ref = (mean - lo) / (hi - lo)
    assert torch.allclose(rel, ref, atol=1e-6)
    # the token equal to the (single) question token is the most relevant under max
    img2 = img.clone()
    img2[:, 3] = txt[:, 0] * 2.0
    mask = torch.tensor([[True, False, False, False, False]] * 2)
    assert text_relevance(img2, txt, mask, reduce="max").argmax(1).tolist() == [3, 3]
    # padding does not count: masking = truncating
    assert torch.allclose(text_relevance(img, txt, mask), text_relevance(img, txt[:, :1]), atol=1e-6)
    # equally relevant everywhere -> 1 (diversity alone)
    assert torch.equal(text_relevance(torch.ones(1, 4, 8), txt[:1]), torch.ones(1, 4))
    with pytest.raises(ValueError, match="D=8"):
        text_relevance(img, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="at least one question token"):
        text_relevance(img, txt, torch.zeros(2, 5, dtype=torch.bool))


def test_text_stage_select_and_describe() -> None:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 20, 8, generator=g)
    stage = TextStage(5)
    kept_tokens, kept = stage.select(tokens, torch.randn(2, 3, 8, generator=g))
    assert kept.shape == (2, 5)
    assert torch.equal(kept_tokens, torch.gather(tokens, 1, kept.unsqueeze(-1).expand(-1, -1, 8)))
    assert stage.describe()["text_conditioned"] is True
    with pytest.raises(ValueError, match="stage 1 cached only 20"):
        TextStage(21).select(tokens, torch.randn(2, 3, 8))


def test_unconditioned_ablation_is_a_plain_dpp() -> None:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 20, 8, generator=g)
    stage = TextStage(6, conditioned=False)
    _, kept = stage.select(tokens, None)
    assert torch.equal(kept, conditional_dpp_indices(tokens, torch.ones(2, 20), 6))
    assert stage.name == "dpp" and stage.describe()["text_conditioned"] is False
    with pytest.raises(ValueError, match="needs the question"):
        TextStage(6).select(tokens, None)
