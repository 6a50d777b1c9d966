"""Independent, deliberately simple reference implementation of VisionZip.

This module is written only from the written spec (it does not look at, import
or share code with ``vzedge``), so that the parity tests comparing it with the
production ``VisionZipEncoder`` mean something.  It follows what the VisionZip
authors' released code does:

* run the Hugging Face vision tower with *eager* attention and
  ``output_attentions=True, output_hidden_states=True``;
* take the attention probabilities and the hidden states of the selection
  layer (``layer`` indexes ``encoder.layers`` Python-style, default ``-2``);
* capture the keys of that layer with a forward hook on its ``self_attn.k_proj``
  (so the keys are ``k_proj(layer_norm1(layer input))``, bias included);
* select the dominant tokens from the attention scores and merge the remaining
  ones into contextual tokens.

Speed is irrelevant here: the selection and the merge are written with plain
Python loops so that every step can be checked by eye against the spec.  Scores
and key similarities are computed in float64; the output tokens are returned in
the dtype of the model's hidden states.

Layer indexing (a point the spec leaves open for non-negative values): the
selection layer is ``encoder.layers[layer]``.  Its attention is
``attentions[layer]`` and its output is ``hidden_states[i + 1]`` where
``i = layer % num_layers`` (``hidden_states`` has ``num_layers + 1`` entries,
entry 0 being the embedding output).  For negative ``layer`` this is exactly
``hidden_states[layer]``, as the spec says; for a non-negative ``layer`` it is
``hidden_states[layer + 1]``, i.e. the output of the same layer whose
attention and keys are used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

__all__ = [
    "ReferenceDetails",
    "find_encoder_layers",
    "has_cls_token",
    "reference_visionzip",
    "reference_visionzip_details",
]

MERGE_MODES = ("reference", "mean")


@dataclass
class ReferenceDetails:
    """Everything the reference computed, for diagnostics and invariant checks.

    Shapes use B = batch, N = sequence length, D = hidden size,
    K = dominant, C = number of targets actually used, R = N - K.
    """

    tokens: torch.Tensor  # [B, K + C, D], model dtype
    kept_indices: torch.Tensor  # [B, K] int64, ascending
    layer_index: int  # non-negative index into encoder.layers
    hidden: torch.Tensor  # [B, N, D] output of the selection layer
    layer_input: torch.Tensor  # [B, N, D] input of the selection layer
    attentions: torch.Tensor  # [B, H, N, N] attention probs of that layer
    keys: torch.Tensor  # [B, N, H * head_dim] raw k_proj output (hooked)
    scores: torch.Tensor  # [B, N] float64; CLIP: CLS row score, CLS = +inf
    normalized_keys: torch.Tensor  # [B, N, head_dim] float64
    remaining: list[list[int]]  # per sample: sequence positions not kept
    targets: list[list[int]]  # per sample: sequence positions of targets
    members: list[list[list[int]]]  # per sample, per target: member positions
    selection_margin: float  # min over batch of score[K-th] - score[(K+1)-th]
    assignment_margin: float  # min over merged tokens of best - second sim


def find_encoder_layers(vision_model) -> torch.nn.ModuleList:
    """Return ``encoder.layers`` of a HF CLIP / SigLIP vision model."""
    module = vision_model
    if not hasattr(module, "encoder") and hasattr(module, "vision_model"):
        module = module.vision_model
    return module.encoder.layers


def has_cls_token(vision_model) -> bool:
    """CLIP vision towers prepend a CLS token; SigLIP ones do not."""
    module = vision_model
    if not hasattr(module, "embeddings") and hasattr(module, "vision_model"):
        module = module.vision_model
    return hasattr(module.embeddings, "class_embedding")


def _eager_copy(vision_model):
    """A deep copy of the model running eager attention (so that the HF model
    returns attention probabilities); the caller's model is left untouched."""
    model = copy.deepcopy(vision_model)
    model.set_attn_implementation("eager")
    model.eval()
    return model


def _top_positions(scores: list[float], count: int) -> list[int]:
    """Positions of the ``count`` largest scores (ties: lower position first)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return order[:count]


def reference_visionzip_details(
    vision_model,
    pixel_values: torch.Tensor,
    dominant: int,
    contextual: int,
    layer: int = -2,
    merge: str = "reference",
) -> ReferenceDetails:
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
    model = _eager_copy(vision_model)
    layers = find_encoder_layers(model)
    num_layers = len(layers)
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"layer {layer} out of range for {num_layers} layers")
    layer_index = layer % num_layers
    attn_module = layers[layer_index].self_attn

    captured = {}

    def hook(module, inputs, output):
        captured["keys"] = output.detach()

    handle = attn_module.k_proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(
                pixel_values=pixel_values,
                output_attentions=True,
                output_hidden_states=True,
            )
    finally:
        handle.remove()

    assert len(out.hidden_states) == num_layers + 1
    assert len(out.attentions) == num_layers
    attentions = out.attentions[layer_index]  # same as attentions[layer]
    hidden = out.hidden_states[layer_index + 1]  # output of layers[layer_index]
    layer_input = out.hidden_states[layer_index]
    keys = captured["keys"]

    batch, seq_len, _dim = hidden.shape
    num_heads = attn_module.num_heads
    head_dim = attn_module.head_dim
    assert attentions.shape == (batch, num_heads, seq_len, seq_len)
    assert keys.shape == (batch, seq_len, num_heads * head_dim)

    cls = has_cls_token(model)
    if not 1 <= dominant <= seq_len:
        raise ValueError(f"dominant={dominant} must be in [1, {seq_len}]")
    if contextual < 0:
        raise ValueError("contextual must be >= 0")

    # ---- scores (float64) -------------------------------------------------
    attn64 = attentions.double()
    if cls:
        # Attention from the CLS query (row 0) to every key, summed over heads.
        scores = attn64[:, :, 0, :].sum(dim=1)
        scores[:, 0] = float("inf")  # CLS is always kept
    else:
        # Attention received: mean over heads, then sum over all queries.
        scores = attn64.mean(dim=1).sum(dim=1)

    # ---- per-head-averaged, L2-normalised keys (float64) -------------------
    keys_heads = keys.double().reshape(batch, seq_len, num_heads, head_dim)
    metric = keys_heads.mean(dim=2)
    normalized_keys = metric / metric.norm(dim=-1, keepdim=True)

    all_tokens = []
    all_kept = []
    all_remaining, all_targets, all_members = [], [], []
    selection_margin = float("inf")
    assignment_margin = float("inf")

    for b in range(batch):
        row = scores[b].tolist()
        if cls:
            patch_scores = row[1:]
            top = [j + 1 for j in _top_positions(patch_scores, dominant - 1)]
            kept = sorted([0, *top])
            ranked = sorted(patch_scores, reverse=True)
            if 0 < dominant - 1 < len(ranked):
                gap = ranked[dominant - 2] - ranked[dominant - 1]
                selection_margin = min(selection_margin, gap)
        else:
            kept = sorted(_top_positions(row, dominant))
            ranked = sorted(row, reverse=True)
            if dominant < len(ranked):
                gap = ranked[dominant - 1] - ranked[dominant]
                selection_margin = min(selection_margin, gap)

        kept_set = set(kept)
        remaining = [j for j in range(seq_len) if j not in kept_set]

        sample_tokens = [hidden[b, j] for j in kept]

        targets: list[int] = []
        members: list[list[int]] = []
        if contextual > 0 and remaining:
            n_rem = len(remaining)
            step = max(1, n_rem // contextual)
            target_slots = list(range(0, n_rem, step))[:contextual]
            targets = [remaining[s] for s in target_slots]
            members = [[] for _ in targets]
            target_slot_set = set(target_slots)
            for slot, pos in enumerate(remaining):
                if slot in target_slot_set:
                    continue
                sims = [float(torch.dot(normalized_keys[b, pos], normalized_keys[b, t])) for t in targets]
                best = 0
                for t_i in range(1, len(sims)):
                    if sims[t_i] > sims[best]:  # strict: first target wins ties
                        best = t_i
                members[best].append(pos)
                if len(sims) > 1:
                    second = max(s for i, s in enumerate(sims) if i != best)
                    assignment_margin = min(assignment_margin, sims[best] - second)

            for t, group in zip(targets, members, strict=True):
                h_target = hidden[b, t].double()
                if group:
                    h_members = torch.stack([hidden[b, m].double() for m in group])
                    if merge == "reference":
                        token = h_target + h_members.mean(dim=0)
                    else:
                        token = (h_target + h_members.sum(dim=0)) / (1 + len(group))
                else:
                    token = h_target
                sample_tokens.append(token.to(hidden.dtype))

        all_tokens.append(torch.stack(sample_tokens))
        all_kept.append(torch.tensor(kept, dtype=torch.long))
        all_remaining.append(remaining)
        all_targets.append(targets)
        all_members.append(members)

    return ReferenceDetails(
        tokens=torch.stack(all_tokens),
        kept_indices=torch.stack(all_kept),
        layer_index=layer_index,
        hidden=hidden,
        layer_input=layer_input,
        attentions=attentions,
        keys=keys,
        scores=scores,
        normalized_keys=normalized_keys,
        remaining=all_remaining,
        targets=all_targets,
        members=all_members,
        selection_margin=selection_margin,
        assignment_margin=assignment_margin,
    )


def reference_visionzip(
    vision_model,
    pixel_values: torch.Tensor,
    dominant: int,
    contextual: int,
    layer: int = -2,
    merge: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(tokens [B, dominant + contextual, D], kept_indices [B, dominant])``."""
    details = reference_visionzip_details(vision_model, pixel_values, dominant, contextual, layer=layer, merge=merge)
    return details.tokens, details.kept_indices
