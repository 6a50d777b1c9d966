"""VisionZipEncoder: a ViT vision tower that outputs VisionZip tokens instead of all its tokens.

The same object runs in eager PyTorch and is what the exporter traces, so there is one
implementation of the computation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import nn

from vzedge.models import adapt_vision_tower
from vzedge.models.base import VisionTower
from vzedge.select import AdaptiveBudget, SelectionInputs, get_selector
from vzedge.select.adaptive import split_budget
from vzedge.visionzip import (
    VisionZipConfig,
    cls_attention_scores,
    compress,
    contextual_groups,
    received_attention_scores,
    select_dominant,
    split_heads,
)


class VisionZipOutput(NamedTuple):
    """tokens [B, dominant + contextual, D]; kept_indices [B, kept] ascending sequence positions of the
    output tokens that are input tokens (visionzip: the dominant ones, CLS = 0 included for CLIP; divprune,
    vispruner, random: all; pool: none); scores [B, N] float32 (CLS-row attention for CLIP, attention
    received for SigLIP; [B, 0] for selectors that need no attention)."""

    tokens: torch.Tensor
    kept_indices: torch.Tensor
    scores: torch.Tensor


class AdaptiveOutput(NamedTuple):
    """Per image: tokens [K_i, D] at its bucket's count K_i, kept_indices [kept_i]; bucket [B] index into
    the budget's buckets; needed [B] the tokens the rule asked for before rounding up."""

    tokens: list[torch.Tensor]
    kept_indices: list[torch.Tensor]
    bucket: torch.Tensor
    needed: torch.Tensor


class VisionZipExplanation(NamedTuple):
    """What `vzedge show` draws: scores [B, N], kept [B, dominant], groups [B, N] (-1 dominant,
    else the contextual group index), targets [B, contextual] positions."""

    scores: torch.Tensor
    kept_indices: torch.Tensor
    groups: torch.Tensor
    targets: torch.Tensor


class VisionZipEncoder(nn.Module):
    """Runs the tower up to `cfg.layer`, scores its tokens there and keeps `cfg.num_tokens` of them.

    The selected layer's raw output (no post-layernorm) is what gets selected; layers after it are
    never computed. Only the CLS query row is projected for CLIP (O(N d)), so the encoder layers
    keep their own attention implementation (SDPA, flash) instead of materialising N x N maps.
    The layer's keys are recomputed once from its normed input for the merge: one extra d x d
    projection over N tokens, well under 1% of a ViT-L forward.
    """

    def __init__(self, vision_model: nn.Module, cfg: VisionZipConfig | None = None) -> None:
        super().__init__()
        if cfg is None:
            cfg = VisionZipConfig()
        if not isinstance(cfg, VisionZipConfig):
            raise TypeError(f"cfg must be a VisionZipConfig, got {type(cfg).__name__}")
        tower = adapt_vision_tower(vision_model)
        n_layers = tower.num_layers
        if not -n_layers <= cfg.layer < n_layers:
            raise ValueError(
                f"layer={cfg.layer} is out of range for a {n_layers}-layer encoder; "
                f"use -{n_layers} <= layer <= {n_layers - 1} (-2 is LLaVA's feature layer)"
            )
        self.selector = get_selector(cfg.selector)
        check_selector_budget(cfg, tower)
        self.cfg = cfg
        self.tower = tower
        # The random selector's draws advance with every call, reproducibly from cfg.seed.
        self.generator = torch.Generator().manual_seed(cfg.seed) if cfg.selector == "random" else None
        # Registered so .to()/.half() and export see the weights; the adapter only holds references.
        self.vision = tower.module
        self.layer_index = cfg.layer % n_layers

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise a clear error for pixel_values the tower cannot take."""
        t = self.tower
        want = f"[B, {t.num_channels}, {t.image_size}, {t.image_size}]"
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor {want}, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype}; pass normalised float pixels "
                "(run the model's image processor, e.g. processor(images=...).pixel_values)"
            )
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != t.num_channels or shape[2] != t.image_size or shape[3] != t.image_size:
            raise ValueError(
                f"pixel_values has shape {list(shape)}, expected {want}; resize/crop images to "
                f"{t.image_size}x{t.image_size} with the model's image processor"
            )
        if shape[0] < 1:
            raise ValueError("pixel_values has batch size 0; pass at least one image")

    def _layer_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tower.embed(pixel_values.to(self.dtype))
        for layer in self.tower.layers[: self.layer_index]:
            x = layer(x, None)
        return x

    def _score_and_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.tower.layers[self.layer_index]
        attn = layer.self_attn
        heads = int(attn.num_heads)
        normed = layer.layer_norm1(x)
        k = split_heads(attn.k_proj(normed), heads)  # [B, H, N, d]
        if self.tower.has_cls:
            q_cls = split_heads(attn.q_proj(normed[:, :1]), heads)
            scores = cls_attention_scores(q_cls, k, float(attn.scale))
        else:
            q = split_heads(attn.q_proj(normed), heads)
            scores = received_attention_scores(q, k, float(attn.scale))
        return scores, k.mean(dim=1)

    def forward(self, pixel_values: torch.Tensor) -> VisionZipOutput:
        if not torch.compiler.is_compiling():
            self.check_pixels(pixel_values)
        x = self._layer_inputs(pixel_values)
        if self.cfg.selector == "visionzip":  # the released algorithm, exactly as before selectors existed
            scores, keys = self._score_and_keys(x)
            hidden = self.tower.layers[self.layer_index](x, None)
            tokens, kept = compress(hidden, scores, keys, self.cfg, self.tower.has_cls)
            return VisionZipOutput(tokens, kept, scores)
        scores = keys = None
        if self.selector.needs_attention:
            scores, keys = self._score_and_keys(x)
        hidden = self.tower.layers[self.layer_index](x, None)
        inputs = SelectionInputs(hidden, scores, keys, self.tower.has_cls, self.tower.grid)
        tokens, kept = self.selector.select(inputs, self.cfg, self.generator)
        if scores is None:
            scores = hidden.new_zeros(hidden.shape[0], 0, dtype=torch.float32)
        return VisionZipOutput(tokens, kept, scores)

    def bucket_config(self, k: int) -> VisionZipConfig:
        """This encoder's config at k tokens (the paper's 54:10 split), checked against the tower."""
        dominant, contextual = split_budget(k)
        cfg = dataclasses.replace(self.cfg, dominant=dominant, contextual=contextual)
        check_selector_budget(cfg, self.tower)
        return cfg

    @torch.no_grad()
    def choose_buckets(self, pixel_values: torch.Tensor, budget: AdaptiveBudget) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket index [B], tokens asked for before rounding [B]) of the attention-mass rule, without selecting."""
        self.check_pixels(pixel_values)
        scores, _ = self._score_and_keys(self._layer_inputs(pixel_values))
        return budget.bucket_index(scores, self.tower.has_cls), budget.counts(scores, self.tower.has_cls)

    def _bucket_inputs(self, pixel_values: torch.Tensor, budget: AdaptiveBudget) -> tuple[Any, ...]:
        """What both adaptive paths select from: (one config per bucket, the selection layer's output, scores,
        keys, bucket index [B], tokens asked for before rounding [B]); the layers run once."""
        configs = [self.bucket_config(k) for k in budget.buckets]
        x = self._layer_inputs(pixel_values)
        scores, keys = self._score_and_keys(x)
        hidden = self.tower.layers[self.layer_index](x, None)
        needed = budget.counts(scores, self.tower.has_cls)
        bucket = budget.bucket_index(scores, self.tower.has_cls)
        return configs, hidden, scores, keys, bucket, needed

    @torch.no_grad()
    def forward_adaptive(self, pixel_values: torch.Tensor, budget: AdaptiveBudget) -> AdaptiveOutput:
        """Each image at its own bucket's token count (see `vzedge.select.adaptive`): the layers run once,
        the selector once per bucket present, on that bucket's images (each call static-shape)."""
        if not isinstance(budget, AdaptiveBudget):
            raise TypeError(f"budget must be an AdaptiveBudget, got {type(budget).__name__}")
        self.check_pixels(pixel_values)
        configs, hidden, scores, keys, bucket, needed = self._bucket_inputs(pixel_values, budget)
        tokens: list[torch.Tensor] = [hidden.new_zeros(0)] * hidden.shape[0]
        kept: list[torch.Tensor] = [bucket.new_zeros(0)] * hidden.shape[0]
        for i, cfg in enumerate(configs):
            rows = (bucket == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            sub = SelectionInputs(hidden[rows], scores[rows], keys[rows], self.tower.has_cls, self.tower.grid)
            t, k = self.selector.select(sub, cfg, self.generator)
            for j, r in enumerate(rows.tolist()):
                tokens[r], kept[r] = t[j], k[j]
        return AdaptiveOutput(tokens, kept, bucket, needed)

    def forward_buckets(
        self, pixel_values: torch.Tensor, budget: AdaptiveBudget
    ) -> tuple[list[VisionZipOutput], torch.Tensor, torch.Tensor]:
        """Every image at every bucket, static shapes throughout (what the adaptive export traces): the layers run
        once, the selector once per bucket on the whole batch. Returns (one VisionZipOutput per bucket, in
        `budget.buckets` order, bucket index [B], tokens asked for before rounding [B]). It costs the selector
        work of the buckets an image does not use; `forward_adaptive` skips that in eager PyTorch."""
        if not torch.compiler.is_compiling():
            self.check_pixels(pixel_values)
        configs, hidden, scores, keys, bucket, needed = self._bucket_inputs(pixel_values, budget)
        inputs = SelectionInputs(hidden, scores, keys, self.tower.has_cls, self.tower.grid)
        outs = [VisionZipOutput(*self.selector.select(inputs, cfg, self.generator), scores) for cfg in configs]
        return outs, bucket, needed

    @torch.no_grad()
    def explain(self, pixel_values: torch.Tensor) -> VisionZipExplanation:
        """Scores, kept tokens and contextual groups, for drawing (not on the hot path)."""
        self.check_pixels(pixel_values)
        x = self._layer_inputs(pixel_values)
        scores, keys = self._score_and_keys(x)
        kept = select_dominant(scores, self.cfg.dominant, self.tower.has_cls)
        groups, targets = contextual_groups(keys, kept, self.cfg.contextual)
        return VisionZipExplanation(scores, kept, groups, targets)


def check_selector_budget(cfg: VisionZipConfig, tower: VisionTower) -> None:
    """The token budget check of `cfg.selector` (VisionZip's own for the default)."""
    if cfg.selector == "visionzip":
        check_token_budget(cfg, tower)
    else:
        get_selector(cfg.selector).check(cfg, tower.seq_len, tower.has_cls)


def check_token_budget(cfg: VisionZipConfig, tower: VisionTower) -> None:
    """Raise a ValueError naming the fix when the config asks for tokens the tower does not have."""
    n = tower.seq_len
    where = (
        f"{tower.family} tower with {n} tokens ({tower.grid}x{tower.grid} patches{' + CLS' if tower.has_cls else ''})"
    )
    if tower.has_cls and cfg.dominant < 1:
        raise ValueError(f"dominant={cfg.dominant}: the {where} always keeps CLS; use dominant >= 1")
    if cfg.dominant > n:
        raise ValueError(f"dominant={cfg.dominant} exceeds the {where}; use dominant <= {n}")
    remaining = n - cfg.dominant
    if cfg.contextual > remaining:
        raise ValueError(
            f"contextual={cfg.contextual} exceeds the {remaining} tokens left after dominant={cfg.dominant} in the "
            f"{where}; use contextual <= {remaining} (dominant + contextual <= {n})"
        )
