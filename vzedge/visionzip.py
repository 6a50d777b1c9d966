"""VisionZip: the math, as static-shape batched tensor code.

Everything here works on plain tensors so that one implementation serves eager PyTorch, the exported
ONNX graph and the tests. No Python loop runs over tokens and no op produces a data-dependent shape
(`masked_select`, `nonzero`, `isin`): with the token counts fixed by the config, every shape is a
constant and the graph exports with a constant TopK K.

The selection follows the authors' released implementation, which produced the paper's numbers:
dominant tokens by attention score, the remaining tokens merged into contextual tokens by key
similarity, output ``[dominant..., contextual...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MergeMode = Literal["reference", "mean"]
_MERGE_MODES = ("reference", "mean")
# Token selectors (implemented in vzedge.select, one module each); "visionzip" is the default and the
# released algorithm. Named here, beside the config that chooses one, so the config needs no import upward.
SELECTORS = ("visionzip", "divprune", "vispruner", "random", "pool")
DEFAULT_SELECTOR = "visionzip"

# Queries per chunk for the received-attention score (SigLIP): bounds the [B, H, chunk, N] block.
SCORE_QUERY_CHUNK = 256


@dataclass(frozen=True)
class VisionZipConfig:
    """What to keep of an image's visual tokens.

    dominant: tokens kept by attention score. For encoders with a CLS token, CLS is always kept and
        counts inside this number (54 + 10 gives 64 tokens in all, as in the paper).
    contextual: tokens made by merging the rest by key similarity; 0 keeps dominant tokens only.
    layer: encoder layer whose output is selected (Python indexing into the encoder's layers;
        -2 is LLaVA's feature layer). Layers after it are not computed.
    merge: "reference" reproduces the released code (target + mean of its members); "mean" is the
        plain average over the group, target included, as the paper's text describes.
    selector: how the tokens are chosen (see `vzedge.select`): "visionzip" (the default, exactly the
        above), "divprune" (dominant + contextual patches by max-min feature diversity), "vispruner"
        (dominant patches by attention + contextual patches left after similarity de-duplication),
        "random" (CLS + the rest drawn uniformly, seeded by `seed`) or "pool" (dominant + contextual
        region averages). Every selector outputs dominant + contextual tokens.
    seed: the random selector's generator seed (unused by the others).
    """

    dominant: int = 54
    contextual: int = 10
    layer: int = -2
    merge: MergeMode = "reference"
    selector: str = DEFAULT_SELECTOR
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dominant", "contextual", "layer", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"VisionZipConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        if self.dominant < 0:
            raise ValueError(f"dominant={self.dominant} is negative; use dominant >= 1 (e.g. 54)")
        if self.contextual < 0:
            raise ValueError(
                f"contextual={self.contextual} is negative; use contextual >= 0 (0 keeps dominant tokens only)"
            )
        if self.dominant + self.contextual < 1:
            raise ValueError("dominant + contextual is 0: keep at least one token (e.g. dominant=54, contextual=10)")
        if self.merge not in _MERGE_MODES:
            raise ValueError(f"merge={self.merge!r} is not one of {_MERGE_MODES}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector={self.selector!r} is not one of {SELECTORS}; use e.g. --selector divprune")

    @property
    def num_tokens(self) -> int:
        """Tokens per image after VisionZip."""
        return self.dominant + self.contextual

    def to_dict(self) -> dict[str, int | str]:
        """The config as JSON. The default selector is left out, so tune folders, exports and manifests made
        before selectors existed still compare equal; any other selector (and random's seed) is recorded."""
        d: dict[str, int | str] = {
            "dominant": self.dominant,
            "contextual": self.contextual,
            "layer": self.layer,
            "merge": self.merge,
        }
        if self.selector != DEFAULT_SELECTOR:
            d["selector"] = self.selector
        if self.selector == "random":
            d["seed"] = self.seed
        return d


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]."""
    b, n, _ = x.shape
    return x.reshape(b, n, num_heads, -1).transpose(1, 2)


def cls_attention_scores(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """CLS-row attention to every token, summed over heads.

    q_cls: [B, H, 1, d] (the CLS query only: O(N d), not the N x N maps), k: [B, H, N, d].
    Returns [B, N] in float32; entry 0 is CLS attending to itself.
    """
    logits = torch.matmul(q_cls.float(), k.float().transpose(-1, -2)) * scale  # [B, H, 1, N]
    return logits.softmax(dim=-1).sum(dim=1).squeeze(1)


def received_attention_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = SCORE_QUERY_CHUNK
) -> torch.Tensor:
    """Attention each token receives: head-mean probabilities summed over all queries.

    q, k: [B, H, N, d]. Queries are processed in chunks so memory stays O(B H chunk N).
    The chunk loop runs over a constant number of slices, so it traces to a fixed graph.
    Returns [B, N] in float32.
    """
    q = q.float()
    kt = k.float().transpose(-1, -2)
    n = q.shape[2]
    total = None
    for start in range(0, n, chunk):
        probs = (torch.matmul(q[:, :, start : start + chunk], kt) * scale).softmax(dim=-1)  # [B, H, c, N]
        part = probs.mean(dim=1).sum(dim=1)
        total = part if total is None else total + part
    assert total is not None
    return total


def select_dominant(scores: torch.Tensor, dominant: int, has_cls: bool) -> torch.Tensor:
    """Sequence positions of the dominant tokens, ascending. scores: [B, N] -> [B, dominant] int64.

    With a CLS token, CLS (position 0) is always kept and the other dominant - 1 are the top patches.
    """
    b = scores.shape[0]
    if has_cls:
        cls_idx = torch.zeros(b, 1, dtype=torch.long, device=scores.device)
        if dominant == 1:
            return cls_idx
        top = torch.topk(scores[:, 1:], dominant - 1, dim=1).indices + 1
        idx = torch.cat([cls_idx, top], dim=1)
    else:
        idx = torch.topk(scores, dominant, dim=1).indices
    # Sorted as float: positions are exact in fp32 (< 2**24) and TensorRT's TopK takes FP32/FP16 only.
    return torch.sort(idx.float(), dim=1).values.long()


def remaining_positions(kept: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Positions not in `kept`, ascending: [B, N - K] int64, a static shape.

    Kept positions get a key offset by N, so one stable sort puts the remaining ones first, in order.
    """
    b, k = kept.shape
    pos = torch.arange(num_tokens, device=kept.device).unsqueeze(0).expand(b, num_tokens)
    flags = torch.zeros(b, num_tokens, dtype=torch.long, device=kept.device)
    flags = flags.scatter(1, kept, torch.ones_like(kept))
    # Float keys (< N*N + N, exact in fp32): TensorRT's TopK, which argsort exports to, takes FP32/FP16 only.
    order = torch.argsort((flags * num_tokens + pos).float(), dim=1)
    return order[:, : num_tokens - k]


def contextual_target_slots(remaining: int, contextual: int) -> tuple[list[int], list[int]]:
    """Which slots of the remaining list are merge targets, and which are members (constants)."""
    step = max(1, remaining // contextual)
    targets = list(range(0, remaining, step))[:contextual]
    target_set = set(targets)
    members = [i for i in range(remaining) if i not in target_set]
    return targets, members


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D], idx: [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def assign_to_targets(member_keys: torch.Tensor, target_keys: torch.Tensor) -> torch.Tensor:
    """Index of the most similar target for each member; the first target wins ties. -> [B, M]."""
    similarity = torch.matmul(member_keys, target_keys.transpose(1, 2))  # [B, M, C]
    return similarity.argmax(dim=-1)


def merge_contextual(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    remaining: torch.Tensor,
    contextual: int,
    merge: MergeMode = "reference",
) -> torch.Tensor:
    """Merge the remaining tokens into `contextual` tokens.

    hidden: [B, N, D] layer output; keys: [B, N, d] head-averaged keys (not yet normalised);
    remaining: [B, R] ascending positions of the non-dominant tokens.
    Keys, similarity and the merge run in float32 whatever the model dtype (fp16 flips assignments
    and overflows sums on some devices); the result is cast back to hidden's dtype.
    The merge is a one-hot matmul: no scatter-with-reduction, which TensorRT and ORT's fp16 CPU
    kernels do not all support.
    """
    r = remaining.shape[1]
    targets, members = contextual_target_slots(r, contextual)
    t_slots = torch.tensor(targets, dtype=torch.long, device=hidden.device)
    t_pos = remaining.index_select(1, t_slots)
    h_t = gather_tokens(hidden, t_pos).float()
    if not members:
        return h_t.to(hidden.dtype)
    m_pos = remaining.index_select(1, torch.tensor(members, dtype=torch.long, device=hidden.device))
    k = keys.float()
    k = k / k.norm(dim=-1, keepdim=True)
    assign = assign_to_targets(gather_tokens(k, m_pos), gather_tokens(k, t_pos))  # [B, M]
    one_hot = (assign.unsqueeze(-1) == torch.arange(contextual, device=hidden.device)).float()  # [B, M, C]
    summed = torch.matmul(one_hot.transpose(1, 2), gather_tokens(hidden, m_pos).float())  # [B, C, D]
    counts = one_hot.sum(dim=1).unsqueeze(-1)  # [B, C, 1]
    if merge == "reference":
        merged = h_t + summed / counts.clamp(min=1.0)
    else:
        merged = (h_t + summed) / (counts + 1.0)
    return merged.to(hidden.dtype)


def compress(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    cfg: VisionZipConfig,
    has_cls: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select and merge: hidden [B, N, D], scores [B, N], keys [B, N, d].

    Returns (tokens [B, dominant + contextual, D], kept_indices [B, dominant] ascending).
    """
    n = hidden.shape[1]
    kept = select_dominant(scores, cfg.dominant, has_cls)
    tokens = gather_tokens(hidden, kept)
    if cfg.contextual > 0:
        remaining = remaining_positions(kept, n)
        ctx = merge_contextual(hidden, keys, remaining, cfg.contextual, cfg.merge)
        tokens = torch.cat([tokens, ctx], dim=1)
    return tokens, kept


def contextual_groups(keys: torch.Tensor, kept: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For display: per sequence position, -1 for dominant, else the contextual group it joined.

    Returns (groups [B, N] int64, target positions [B, C]). Not used on the hot path.
    """
    b, n = keys.shape[:2]
    groups = torch.full((b, n), -1, dtype=torch.long, device=keys.device)
    if contextual == 0:
        return groups, torch.zeros(b, 0, dtype=torch.long, device=keys.device)
    remaining = remaining_positions(kept, n)
    targets, members = contextual_target_slots(remaining.shape[1], contextual)
    t_pos = remaining[:, targets]
    groups = groups.scatter(1, t_pos, torch.arange(contextual, device=keys.device).expand(b, -1))
    if members:
        m_pos = remaining[:, members]
        k = keys.float()
        k = k / k.norm(dim=-1, keepdim=True)
        groups = groups.scatter(1, m_pos, assign_to_targets(gather_tokens(k, m_pos), gather_tokens(k, t_pos)))
    return groups, t_pos
