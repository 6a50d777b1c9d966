"""A text-conditioned second selection stage: CDPruner-style conditional DPP on cached image tokens.

CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs") keeps the visual tokens that maximise the determinant of a conditional DPP kernel

    L = diag(r) S diag(r),   S_ij = cos(x_i, x_j),   r_i = relevance of token i to the instruction in [0, 1],

found greedily: each step adds the token with the largest gain in log det L_Y, computed incrementally with
a Cholesky-style update (Chen et al., NeurIPS 2018, "Fast Greedy MAP Inference for DPPs"), O(k^2 N) after the
kernel. Static k, batched, deterministic (ties go to the lowest position, as argmax does).

Unlike every selector in `vzedge.select`, this one needs the question: it is *text-conditioned*
(`TextStage.text_conditioned`). It runs as stage 2, on tokens an image-only stage 1 already produced and
cached, so the image is encoded once and only this stage runs per question.

Relevance (`text_relevance`): CDPruner scores each visual token by CLIP's image embedding against CLIP's
text embedding of the instruction (mean over text tokens, negated for LLaVA's CLIP, min-max normalised).
LLaVA checkpoints ship no CLIP text tower, so here relevance is the cosine between each *projected* visual
token (the LLM's input space) and the LLM's own input embeddings of the question's tokens, averaged over
the question tokens (or their max), min-max normalised per image, not negated. Tokens at relevance 0 only
come after every token with positive gain.

When the kernel's rank runs out before k picks (duplicates, fewer distinct tokens than k), the remaining
picks have no determinant gain; they are filled with the unpicked tokens of highest relevance (then lowest
position), so exactly k distinct tokens always come out; `conditional_dpp_order` returns each pick's gain,
which is 0 for those fills.
"""

from __future__ import annotations

import torch

from vzedge.select.base import gather_rows, sort_positions, unit_rows

# A pick whose conditional variance (gain, at most r_i^2 <= 1) is below this adds nothing to log det.
GAIN_EPS = 1e-6
RELEVANCE_REDUCE = ("mean", "max")


def _check_shapes(features: torch.Tensor, relevance: torch.Tensor, k: int) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    b, n, _ = features.shape
    if tuple(relevance.shape) != (b, n):
        raise ValueError(f"relevance must be [B, N] = {(b, n)} to match the features, got {tuple(relevance.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r}: keep between 1 and the {n} cached tokens")


def dpp_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r) with S the cosine similarity of the features: [B, N, D], [B, N] -> [B, N, N].

    float64 in, float64 out; anything else is computed in float32."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = unit_rows(features).to(dtype)
    r = relevance.to(dtype).clamp(min=0)
    sim = torch.matmul(f, f.transpose(1, 2))
    return r.unsqueeze(2) * sim * r.unsqueeze(1)


def conditional_dpp_order(features: torch.Tensor, relevance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of the conditional DPP: ([B, k] positions in pick order, [B, k] each pick's gain).

    gain = det(L_{Y+j}) / det(L_Y), the squared Cholesky pivot; 0 where the kernel had no rank left and the
    pick was a relevance-ordered fill.
    """
    _check_shapes(features, relevance, k)
    kernel = dpp_kernel(features, relevance)
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N]: d_i^2, the conditional variances
    # The fill order for picks without gain: highest relevance first (argmax then takes the lowest position).
    fill = relevance.to(kernel.dtype).clamp(min=0, max=1)
    chol = kernel.new_zeros(k, b, n)  # row t: the t-th Cholesky column of L restricted to Y, over all tokens
    taken = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
    order, picked_gain = [], []
    for t in range(k):
        live = gains > GAIN_EPS
        # Tokens with gain rank by it; the rest come after them (key <= -1), ordered by relevance.
        key = torch.where(live, gains, fill - 2.0).masked_fill(taken, float("-inf"))
        j = key.argmax(dim=1)  # [B]
        g = gains[rows, j]
        has_gain = g > GAIN_EPS
        pivot = torch.sqrt(torch.where(has_gain, g, torch.ones_like(g)))
        # e_j = (L[j, :] - sum_t c_t[j] c_t[:]) / sqrt(d_j^2): the new Cholesky column.
        proj = torch.einsum("tb,tbn->bn", chol[:t, rows, j], chol[:t]) if t else 0.0
        e = (kernel[rows, j] - proj) / pivot.unsqueeze(1)
        e = e * has_gain.unsqueeze(1)  # a pick without gain does not condition the others
        chol[t] = e
        gains = gains - e.square()
        taken[rows, j] = True
        order.append(j)
        picked_gain.append(torch.where(has_gain, g, torch.zeros_like(g)))
    return torch.stack(order, dim=1), torch.stack(picked_gain, dim=1)


def conditional_dpp_indices(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """features [B, N, D], relevance [B, N] in [0, 1], k -> [B, k] int64 positions, ascending."""
    order, _ = conditional_dpp_order(features, relevance, k)
    return sort_positions(order)


def text_relevance(
    image_tokens: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Relevance of each image token to the question, min-max normalised per image to [0, 1]: [B, N].

    image_tokens [B, N, D]: projected visual tokens (the LLM's input width); text_embeds [B, T, D]: the LLM's
    input embeddings of each image's question tokens; text_mask [B, T] (True = a question token, for padded
    batches). reduce: "mean" (CDPruner's) or "max" over the question tokens. An image whose tokens are all
    equally relevant gets relevance 1 everywhere (the DPP then selects by diversity alone).
    """
    if reduce not in RELEVANCE_REDUCE:
        raise ValueError(f"reduce={reduce!r}: use one of {RELEVANCE_REDUCE}")
    if image_tokens.dim() != 3 or text_embeds.dim() != 3:
        raise ValueError(
            f"image_tokens [B, N, D] and text_embeds [B, T, D] expected, got {tuple(image_tokens.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    b, _, d = image_tokens.shape
    if text_embeds.shape[0] != b or text_embeds.shape[2] != d:
        raise ValueError(
            f"text_embeds {tuple(text_embeds.shape)} must be [B={b}, T, D={d}] like the image tokens "
            f"{tuple(image_tokens.shape)}: embed the question with the LLM the image tokens were projected for"
        )
    t = text_embeds.shape[1]
    mask = torch.ones(b, t, dtype=torch.bool, device=text_embeds.device) if text_mask is None else text_mask.bool()
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"text_mask must be [B, T] = {(b, t)}, got {tuple(mask.shape)}")
    if t == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError("every image needs at least one question token to condition on; pass a non-empty question")
    cos = torch.matmul(unit_rows(image_tokens), unit_rows(text_embeds).transpose(1, 2))  # [B, N, T]
    m = mask.unsqueeze(1).to(cos.device)
    if reduce == "mean":
        rel = (cos * m).sum(dim=2) / m.sum(dim=2).clamp(min=1)
    else:
        rel = cos.masked_fill(~m, float("-inf")).max(dim=2).values
    lo = rel.min(dim=1, keepdim=True).values
    span = rel.max(dim=1, keepdim=True).values - lo
    flat = span <= 1e-12
    return torch.where(flat, torch.ones_like(rel), (rel - lo) / span.clamp(min=1e-12))


class TextStage:
    """Stage 2 on cached tokens: keep `k` of them by conditional DPP given the question's relevance.

    Not a `Selector`: selectors see only the image (stage 1, cached); this one also needs the question.
    conditioned=False is the ablation: relevance 1 for every token (a plain DPP, diversity alone, the question
    unused), named `dpp` and not text-conditioned.
    """

    name = "cdpruner"
    text_conditioned = True
    needs_attention = False
    exportable = False  # it runs after the (exported or PyTorch) image stage, per question, in PyTorch

    def __init__(self, k: int, reduce: str = "mean", conditioned: bool = True) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"text stage k={k!r}: pass a positive token count, e.g. --text-stage 64")
        if reduce not in RELEVANCE_REDUCE:
            raise ValueError(f"reduce={reduce!r}: use one of {RELEVANCE_REDUCE}")
        self.k = k
        self.reduce = reduce
        self.conditioned = bool(conditioned)
        if not self.conditioned:
            self.name, self.text_conditioned = "dpp", False

    def select(
        self, tokens: torch.Tensor, text_embeds: torch.Tensor | None, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, N, D] (cached), text_embeds [B, T, D] (unused when not conditioned) -> (kept tokens [B, k, D],
        positions [B, k] ascending)."""
        if self.k > tokens.shape[1]:
            raise ValueError(
                f"the text stage keeps {self.k} tokens but stage 1 cached only {tokens.shape[1]}; use --text-stage "
                f"<= {tokens.shape[1]} or cache more tokens in stage 1 (e.g. --all-tokens)"
            )
        if self.conditioned:
            if text_embeds is None:
                raise ValueError("the text-conditioned stage needs the question's embeddings (text_embeds)")
            rel = text_relevance(tokens, text_embeds, text_mask, self.reduce)
        else:
            rel = torch.ones(tokens.shape[:2], dtype=torch.float32, device=tokens.device)
        kept = conditional_dpp_indices(tokens, rel, self.k)
        return gather_rows(tokens, kept), kept

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "text_conditioned": self.text_conditioned,
            "needs_attention": self.needs_attention,
            "exportable": self.exportable,
            "tokens": self.k,
            "relevance": (
                f"cosine(projected visual token, LLM input embedding of question tokens), {self.reduce} over "
                "question tokens, min-max per image"
                if self.conditioned
                else "1 for every token (ablation: the question is not used)"
            ),
            "kernel": "diag(r) cos(x_i, x_j) diag(r)",
            "inference": "greedy MAP (fast incremental Cholesky)",
        }
