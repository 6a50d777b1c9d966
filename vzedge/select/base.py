"""The selector interface: what every token selector takes and returns.

A selector sees one encoder layer's output (the selection layer, raw, no post-layernorm) and returns a
constant number of tokens per image: static shapes, batched, no data-dependent sizes, so the encoder that
calls it exports to one ONNX graph with a constant TopK K. Attention scores and keys are computed by the
encoder only for selectors that ask for them (`needs_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vzedge.visionzip import VisionZipConfig


@dataclass(frozen=True)
class SelectionInputs:
    """hidden [B, N, D]: the selection layer's output (CLS first when has_cls); scores [B, N] float32
    (CLS-row attention for CLIP, attention received for SigLIP) and keys [B, N, d] (head-averaged k_proj of
    the layer's normed input), or None when the selector did not ask for them; grid: patches per side."""

    hidden: torch.Tensor
    scores: torch.Tensor | None
    keys: torch.Tensor | None
    has_cls: bool
    grid: int


class Selector:
    """One token-selection rule. Subclasses set the class attributes and implement `select`.

    name: the `--selector` name. needs_attention: the encoder must compute scores and keys at the selection
    layer. exportable: the computation is a deterministic function of the pixels (random is not).
    text_conditioned: needs the question (none of the built-in ones: the image cache holds for all).
    """

    name: str = ""
    needs_attention: bool = False
    exportable: bool = True
    text_conditioned: bool = False

    def kept_count(self, cfg: VisionZipConfig) -> int:
        """Columns of `kept_indices`: how many output tokens are input tokens (in sequence positions)."""
        return cfg.num_tokens

    def check(self, cfg: VisionZipConfig, seq_len: int, has_cls: bool) -> None:
        """Raise a ValueError naming the fix when the tower cannot give `cfg.num_tokens` tokens this way."""
        patches = seq_len - int(has_cls)
        if cfg.num_tokens > patches:
            raise ValueError(
                f"selector {self.name!r} keeps dominant + contextual = {cfg.num_tokens} tokens but the tower has "
                f"{patches} patches; use dominant + contextual <= {patches}"
            )

    def select(
        self, x: SelectionInputs, cfg: VisionZipConfig, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, dominant + contextual, D], kept_indices [B, kept_count] int64 ascending positions)."""
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "needs_attention": self.needs_attention,
            "exportable": self.exportable,
            "text_conditioned": self.text_conditioned,
        }


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D], idx: [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sort_positions(idx: torch.Tensor) -> torch.Tensor:
    """Ascending, sorted as float: positions are exact in fp32 and TensorRT's TopK takes FP32/FP16 only."""
    return torch.sort(idx.float(), dim=1).values.long()


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (cosine similarity as a matmul)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
