"""`VisionZipLlavaForConditionalGeneration`: vLLM's LLaVA-1.5 with VisionZip in its vision path.

Imported by vLLM only (through the registry entry `vzedge.vllm.plugin` adds). Two things change against
vLLM's `LlavaForConditionalGeneration`, both through the narrowest hooks vLLM's LLaVA offers:

- the processing info's `get_num_image_tokens` returns `dominant + contextual`, so the prompt gets that
  many image placeholders and the KV cache holds that many image tokens (bound with
  `MULTIMODAL_REGISTRY.register_processor`, vLLM's documented way);
- `_image_pixels_to_features` (private) runs the tower up to the selection layer and keeps the VisionZip
  tokens, with the math of `vzedge.visionzip` (the same functions `VisionZipEncoder` and the ONNX
  graph use). vLLM's ViT attention fuses q/k/v (`qkv_proj`) and returns no weights, so the score is
  computed from that layer's `qkv_proj(layer_norm1(x))`, as `VisionZipEncoder` computes it from
  `q_proj`/`k_proj`.

As in `vzedge.models.llava.apply_visionzip`, LLaVA's feature strategy is bypassed: CLS is the first
dominant token and goes through the projector. Weights load from HF LLaVA checkpoints in both layouts
(`vision_tower.vision_model.*` and vzedge's saved `vision_tower.*`), and a tuned projector
(`vzedge tune` folder, `projector` in the overrides) replaces the checkpoint's after loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import vllm

from vzedge.vllm.plugin import check_vllm_version

check_vllm_version(vllm.__version__)  # before touching vLLM's private LLaVA internals

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlavaConfig, SiglipVisionConfig  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.model_loader.weight_utils import default_weight_loader  # noqa: E402
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from vzedge.visionzip import (  # noqa: E402
    VisionZipConfig,
    cls_attention_scores,
    compress,
    received_attention_scores,
    split_heads,
)
from vzedge.vllm.config import OVERRIDES_KEY, PluginSettings, settings_from_hf_config  # noqa: E402
from vzedge.vllm.layout import stock_name  # noqa: E402

log = logging.getLogger(__name__)


def check_model_config(hf_config: object, settings: PluginSettings) -> int:
    """Refuse what the plugin does not handle; return the selection layer's index in the full tower."""
    if not isinstance(hf_config, LlavaConfig):
        raise ValueError(
            f"VisionZipLlavaForConditionalGeneration serves LLaVA-1.5-style models (model_type 'llava'), not "
            f"{type(hf_config).__name__}: LLaVA-NeXT/OneVision anyres tiling is not in this plugin yet; serve them "
            "with vzedge's own runtime (apply_visionzip handles anyres) or without VisionZip"
        )
    vision = hf_config.vision_config
    if not isinstance(vision, (CLIPVisionConfig, SiglipVisionConfig)):
        raise ValueError(
            f"VisionZip needs a CLIP or SigLIP vision tower; this model has {type(vision).__name__} "
            "(Pixtral's variable-size patches have no fixed token grid to select from)"
        )
    feature_layer = hf_config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"vision_feature_layer={feature_layer!r}: multi-layer feature concatenation is not supported by VisionZip"
        )
    cfg = settings.visionzip
    n_layers = int(vision.num_hidden_layers)
    if not -n_layers <= cfg.layer < n_layers:
        raise ValueError(
            f"{OVERRIDES_KEY}.layer={cfg.layer} is out of range for a {n_layers}-layer vision tower; "
            f"use -{n_layers} <= layer <= {n_layers - 1} (-2 is LLaVA's feature layer)"
        )
    index = cfg.layer % n_layers
    built = feature_layer + n_layers + 1 if feature_layer < 0 else feature_layer  # vLLM builds only this many
    if index >= built:
        raise ValueError(
            f"{OVERRIDES_KEY}.layer={cfg.layer} is deeper than the model's vision_feature_layer={feature_layer}, "
            f"the last layer vLLM builds; select at layer <= {feature_layer}"
        )
    has_cls = isinstance(vision, CLIPVisionConfig)
    seq = (int(vision.image_size) // int(vision.patch_size)) ** 2 + int(has_cls)
    if has_cls and cfg.dominant < 1:
        raise ValueError(f"{OVERRIDES_KEY}.dominant={cfg.dominant}: a CLIP tower always keeps CLS; use dominant >= 1")
    if cfg.dominant > seq or cfg.contextual > seq - cfg.dominant:
        raise ValueError(
            f"{OVERRIDES_KEY} asks for {cfg.dominant} + {cfg.contextual} tokens but the tower has {seq}; "
            f"use dominant + contextual <= {seq}"
        )
    if cfg.layer != feature_layer:
        log.warning("VisionZip selects at layer %d while the model was trained on layer %d", cfg.layer, feature_layer)
    return index


class VisionZipLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with `dominant + contextual` image tokens per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return settings_from_hf_config(self.get_hf_config()).visionzip.num_tokens


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    # vLLM's CLIP layer returns the hidden states, its SigLIP layer (hidden states, None).
    return out[0] if isinstance(out, tuple) else out


def visionzip_features(
    vision_model: torch.nn.Module, pixel_values: torch.Tensor, cfg: VisionZipConfig, layer_index: int
) -> torch.Tensor:
    """VisionZip tokens [B, dominant + contextual, D] from a vLLM CLIP/SigLIP `vision_model` (the transformer).

    Mirrors `VisionZipEncoder.forward`: layers before `layer_index`, the score and the head-averaged keys from
    that layer's normed input, its raw output (no post-layernorm), then `vzedge.visionzip.compress`.
    """
    has_cls = hasattr(vision_model, "pre_layrnorm")
    x = vision_model.embeddings(pixel_values.to(vision_model.dtype))
    if has_cls:
        x = vision_model.pre_layrnorm(x)
    layers = vision_model.encoder.layers
    for layer in layers[:layer_index]:
        x = _first(layer(x))
    layer = layers[layer_index]
    attn = layer.self_attn
    heads = int(attn.num_heads_per_partition)
    qkv, _ = attn.qkv_proj(layer.layer_norm1(x))
    q, k, _ = qkv.chunk(3, dim=-1)
    k = split_heads(k, heads)
    if has_cls:
        scores = cls_attention_scores(split_heads(q[:, :1], heads), k, float(attn.scale))
    else:
        scores = received_attention_scores(split_heads(q, heads), k, float(attn.scale))
    hidden = _first(layer(x))
    tokens, _ = compress(hidden, scores, k.mean(dim=1), cfg, has_cls)
    return tokens


def _with_vision_model_level(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """vzedge's saved folders (transformers 5.x) store the tower without `vision_model.`; vLLM expects it."""
    for name, tensor in weights:
        yield stock_name(name), tensor


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor,
    info=VisionZipLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 on `dominant + contextual` VisionZip tokens per image (`--hf-overrides` `visionzip`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        settings = settings_from_hf_config(hf_config)
        layer_index = check_model_config(hf_config, settings)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        attn = self.vision_tower.vision_model.encoder.layers[layer_index].self_attn
        if int(attn.num_heads_per_partition) != int(attn.num_heads):
            raise ValueError(
                f"tensor parallelism splits the vision tower's {attn.num_heads} heads "
                f"({attn.num_heads_per_partition} on this rank), but the VisionZip score sums all heads; "
                "run the vision tower data-parallel: add --mm-encoder-tp-mode data"
            )
        self.vz_settings = settings
        self.vz_layer_index = layer_index
        log.info(
            "VisionZip: %d image tokens per image (%d dominant + %d contextual) at vision layer %d%s",
            settings.visionzip.num_tokens,
            settings.visionzip.dominant,
            settings.visionzip.contextual,
            settings.visionzip.layer,
            f", tuned projector {settings.projector}" if settings.projector else "",
        )

    def _image_pixels_to_features(self, vision_tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError("VisionZip expects batched pixel_values of one size (LLaVA-1.5 preprocessing)")
        cfg = self.vz_settings.visionzip
        return visionzip_features(vision_tower.vision_model, pixel_values, cfg, self.vz_layer_index)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(_with_vision_model_level(weights))
        if self.vz_settings.projector is not None:
            self._load_tuned_projector(Path(self.vz_settings.projector))
        return loaded

    def _load_tuned_projector(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from vzedge.io import sha256_file
        from vzedge.models.projector import read_tune_config

        tuned = read_tune_config(folder)
        want = self.vz_settings.visionzip.to_dict()
        if tuned["visionzip"] != want:
            raise ValueError(
                f"{folder} was tuned for VisionZip {tuned['visionzip']} but the server is set up for {want}; "
                f"serve with the config it was tuned for or tune again"
            )
        weights = folder / tuned["projector"]["file"]
        if not weights.is_file() or sha256_file(weights) != tuned["projector"]["sha256"]:
            raise ValueError(f"{weights} is missing or does not match its sha256 in tune_config.json; tune again")
        state = load_file(str(weights))
        params = dict(self.multi_modal_projector.named_parameters())
        if set(state) != set(params):
            raise ValueError(f"{weights} holds {sorted(state)}, this model's projector {sorted(params)}")
        for name, tensor in state.items():
            param = params[name]
            loader: Callable = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor)  # ColumnParallel/RowParallel loaders take this rank's shard
        log.info("tuned projector loaded from %s (base %s)", folder, tuned["base"].get("source"))
