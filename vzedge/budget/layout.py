"""A model's tensors from its config alone: shapes from a meta-device instance, bytes from the quant layout.

Nothing is downloaded or read but config.json: `tiny`, a local folder, a shipped config of a well-known
checkpoint (`vzedge/configs/`, by short id or hub id), or a hub id already in the local cache.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from vzedge.quant import BNB_4BIT_BLOCKSIZE, VISION_MODULES, layer_bytes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
VLM_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def shipped_models() -> dict[str, dict[str, Any]]:
    """The configs shipped in vzedge/configs: {short id: {hub_id, sources, folder}}."""
    from vzedge.budget.devices import _toml_loads

    root = resources.files("vzedge") / "configs"
    index = _toml_loads((root / "index.toml").read_text(encoding="utf-8"), "vzedge/configs/index.toml")
    return {m["id"]: {**m, "folder": str(root / m["id"])} for m in index["model"]}


def resolve_config(model: str) -> tuple[Any, str]:
    """(transformers config, where it came from) for `model`, offline; ValueError if its size cannot be read."""
    from transformers import AutoConfig

    from vzedge.models.loading import BUILTIN_MODELS, load_config

    if model in BUILTIN_MODELS:
        return load_config(model), f"built-in {model}"
    if os.path.isdir(model):
        try:
            return AutoConfig.from_pretrained(model, local_files_only=True), f"folder {model}"
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read a model config from folder {model!r}: {err}") from err
    shipped = shipped_models()
    for ident, entry in shipped.items():
        if model in (ident, entry["hub_id"]):
            return AutoConfig.from_pretrained(entry["folder"]), f"shipped config of {entry['hub_id']}"
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), f"cached config of {model}"
    except (OSError, ValueError) as err:
        known = ", ".join(f"{k} ({v['hub_id']})" for k, v in shipped.items())
        raise ValueError(
            f"cannot read the size of {model!r} offline: it is not 'tiny', a local folder with config.json, a "
            f"shipped config ({known}) nor in the local hub cache. Pass the folder holding its config.json"
        ) from err


@dataclass
class Linear:
    name: str
    out_features: int
    in_features: int
    bias: bool


@dataclass
class ModelShapes:
    """Everything the memory model needs, read off a meta-device instance of the config."""

    model_type: str
    llm_linears: list[Linear]  # decoder linears and lm_head, by full module name
    llm_other_params: int  # elements of LLM params outside its linears (embeddings, norms)
    llm_float_buffers: int  # elements of the LLM's float buffers (rotary inv_freq), kept in fp32
    vision_params: int  # the whole tower
    vision_params_graph: int  # what an exported graph keeps: tower up to the selected layer (no post-norm)
    projector_params: int
    other_params: int  # e.g. LLaVA-NeXT's image_newline
    vision_int_buffers_bytes: int
    # text model geometry
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    # vision geometry
    v_hidden: int
    v_intermediate: int
    v_heads: int
    v_layers: int
    v_layers_computed: int
    v_seq: int
    has_cls: bool
    image_size: int
    anyres_crops: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def llm_params(self) -> int:
        lin = sum(x.out_features * x.in_features + (x.out_features if x.bias else 0) for x in self.llm_linears)
        return lin + self.llm_other_params


def _vlm_meta(config: Any) -> torch.nn.Module:
    import transformers

    name = VLM_CLASSES.get(getattr(config, "model_type", ""))
    if name is None:
        raise ValueError(
            f"model_type {getattr(config, 'model_type', None)!r} is not supported by the memory model; "
            f"it sizes {', '.join(VLM_CLASSES)} (LLaVA-1.5 and LLaVA-NeXT) checkpoints"
        )
    with torch.device("meta"):
        return getattr(transformers, name)(config)


def read_shapes(config: Any) -> ModelShapes:
    """Shapes of every tensor that gets loaded, without allocating any."""
    meta = _vlm_meta(config)
    inner = meta.model
    tcfg, vcfg = config.text_config, config.vision_config
    linears: list[Linear] = []
    linear_params: set[str] = set()
    for name, mod in meta.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.startswith(VISION_MODULES):
            linears.append(Linear(name, mod.out_features, mod.in_features, mod.bias is not None))
            linear_params.update({f"{name}.weight", f"{name}.bias"})
    llm_other = sum(
        p.numel()
        for n, p in meta.named_parameters()
        if n not in linear_params and n.startswith(("model.language_model.", "lm_head."))
    )
    float_buffers = sum(
        b.numel() for n, b in meta.named_buffers() if n.startswith("model.language_model.") and b.is_floating_point()
    )
    tower = inner.vision_tower
    layer = int(getattr(config, "vision_feature_layer", -2))
    v_layers = int(vcfg.num_hidden_layers)
    layer_index = layer % v_layers
    vision_params = sum(p.numel() for p in tower.parameters())
    dropped = sum(p.numel() for n, p in tower.named_parameters() if _after_layer(n, layer_index))
    projector = sum(p.numel() for p in inner.multi_modal_projector.parameters())
    counted = vision_params + projector + llm_other + sum(p.numel() for p in _linear_params(meta, linear_params))
    other = sum(p.numel() for p in meta.parameters()) - counted
    int_buffers = sum(b.numel() * b.element_size() for b in tower.buffers() if not b.is_floating_point())
    has_cls = not str(vcfg.model_type).startswith("siglip")
    grid = int(vcfg.image_size) // int(vcfg.patch_size)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    crops = 1
    if pinpoints:
        crops = 1 + max((h // int(vcfg.image_size)) * (w // int(vcfg.image_size)) for h, w in pinpoints)
    heads = int(tcfg.num_attention_heads)
    return ModelShapes(
        model_type=str(config.model_type),
        llm_linears=linears,
        llm_other_params=llm_other,
        llm_float_buffers=float_buffers,
        vision_params=vision_params,
        vision_params_graph=vision_params - dropped,
        projector_params=projector,
        other_params=other,
        vision_int_buffers_bytes=int_buffers,
        layers=int(tcfg.num_hidden_layers),
        hidden=int(tcfg.hidden_size),
        intermediate=int(tcfg.intermediate_size),
        heads=heads,
        kv_heads=int(getattr(tcfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(tcfg, "head_dim", None) or int(tcfg.hidden_size) // heads),
        vocab=int(tcfg.vocab_size),
        max_positions=getattr(tcfg, "max_position_embeddings", None),
        v_hidden=int(vcfg.hidden_size),
        v_intermediate=int(vcfg.intermediate_size),
        v_heads=int(vcfg.num_attention_heads),
        v_layers=v_layers,
        v_layers_computed=layer_index + 1,
        v_seq=grid * grid + int(has_cls),
        has_cls=has_cls,
        image_size=int(vcfg.image_size),
        anyres_crops=crops,
    )


def _linear_params(meta: torch.nn.Module, names: set[str]) -> list[torch.nn.Parameter]:
    return [p for n, p in meta.named_parameters() if n in names and not n.startswith(VISION_MODULES)]


def _after_layer(name: str, layer_index: int) -> bool:
    """Parameters an exported VisionZip graph does not contain: layers after the selected one, post-norm, head."""
    if ".layers." in f".{name}":
        idx = int(name.split("layers.")[1].split(".")[0])
        return idx > layer_index
    return name.startswith(("post_layernorm", "head.", "vision_model.post_layernorm", "vision_model.head."))


def is_quantized(name: str, skip_modules: tuple[str, ...]) -> bool:
    """Same rule as vzedge.quant: a linear is quantized unless a skip name matches it."""
    skip = (*VISION_MODULES, *skip_modules)
    return not any(name.startswith(s) or name.endswith(s) or f".{s}." in f".{name}." for s in skip)


def linear_bytes(
    lin: Linear, method: str, float_bytes: int, double_quant: bool, group_size: int, cpu_packed: bool
) -> int:
    """Bytes of one linear (weight, its quant state, bias) as loaded; `cpu_packed`: bitsandbytes' avx512_bf16
    CPU layout after the first forward (absmax bf16, double quant undone)."""
    n, k = lin.out_features, lin.in_features
    bias = n * float_bytes if lin.bias else 0
    if method in ("bnb-nf4", "bnb-fp4") and cpu_packed:
        blocks = math.ceil(n * k / BNB_4BIT_BLOCKSIZE)
        offset = 4 if double_quant else 0  # the nested state's fp32 offset survives the repack
        return math.ceil(n * k / 2) + 2 * blocks + 64 + offset + bias
    return layer_bytes(n, k, method, double_quant, group_size, float_bytes) + bias


def llm_weight_bytes(
    shapes: ModelShapes,
    method: str,
    dtype: str,
    double_quant: bool = False,
    group_size: int = 128,
    skip_modules: tuple[str, ...] = ("lm_head",),
    cpu_packed: bool = False,
) -> dict[str, int]:
    """Exact bytes of the LLM's parameters and quant state: quantized linears, float linears, the rest."""
    fb = DTYPE_BYTES[dtype]
    quantized = float_linear = 0
    for lin in shapes.llm_linears:
        if method != "none" and is_quantized(lin.name, skip_modules):
            if method == "awq" and (lin.in_features % group_size or lin.out_features % 8):
                raise ValueError(
                    f"{lin.name} ({lin.out_features}x{lin.in_features}) does not fit AWQ group size {group_size}: "
                    "in_features must be a multiple of it and out_features of 8"
                )
            quantized += linear_bytes(lin, method, fb, double_quant, group_size, cpu_packed)
        else:
            float_linear += linear_bytes(lin, "none", fb, False, group_size, False)
    other = shapes.llm_other_params * fb
    buffers = shapes.llm_float_buffers * 4
    return {
        "quantized_linears": quantized,
        "float_linears": float_linear,
        "embeddings_norms": other,
        "buffers": buffers,
        "total": quantized + float_linear + other + buffers,
    }


def kv_cache_bytes(shapes: ModelShapes, seq: int, batch: int, dtype: str) -> int:
    """K and V of every layer for `seq` positions: 2 * layers * kv_heads * head_dim * seq * batch * bytes."""
    return 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * seq * batch * DTYPE_BYTES[dtype]


def measured_module_bytes(module: torch.nn.Module) -> int:
    """Bytes a loaded module really holds: parameters, buffers and bitsandbytes' quant state (which
    `get_memory_footprint()` leaves out), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in (*module.parameters(), *module.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(qs, name, None))
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(t, "SCB", None))
    for mod in module.modules():
        state = getattr(mod, "state", None)
        add(getattr(state, "SCB", None))
    return total
