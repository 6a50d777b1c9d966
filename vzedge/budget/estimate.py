"""The memory model: every component of a configuration's peak, the verdict for a device, and the speed bounds.

Peak = LLM weights + vision weights + KV cache at the full context + the largest transient (vision pass,
prefill or a decode step) + TensorRT workspace + runtime (CUDA context) + allocator slack. The sum is
conservative by construction: the transients of the vision pass and of prefill happen while the KV cache
is shorter than the full context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vzedge.budget.devices import GIB, HOST, DeviceProfile, get_device
from vzedge.budget.layout import (
    DTYPE_BYTES,
    ModelShapes,
    is_quantized,
    kv_cache_bytes,
    llm_weight_bytes,
    read_shapes,
    resolve_config,
)
from vzedge.flops import transformer_flops

QUANT_METHODS = ("none", "bnb-int8", "bnb-nf4", "bnb-fp4", "awq")
QUANT_ALIASES = {"int8": "bnb-int8", "nf4": "bnb-nf4", "fp4": "bnb-fp4", "fp16": "none", "float": "none"}
VISION_BACKENDS = ("torch", "ort", "trt")
DOMINANT_SHARE = 54 / 64  # VisionZip's default split of the token budget (54 dominant + 10 contextual)
# Allocator slack on the dynamic part (KV cache + transients): PyTorch's CUDA caching allocator rounds
# blocks up and keeps freed segments, typically 5-15% on top of what is live.
CUDA_SLACK = 0.10
CPU_SLACK = 0.03  # glibc with a fixed mmap threshold returns freed tensors; what remains is page rounding


@dataclass
class BudgetConfig:
    """One configuration to size. tokens: visual tokens per image (crop) after VisionZip (576 = stock
    LLaVA-1.5); context: the longest sequence the LLM holds (image tokens + prompt + answer);
    prompt_tokens: text tokens prefilled with the image; dtype 'auto': fp16 on a GPU profile, fp32 on the host
    CPU (as vzedge.quant does); crops: images per prompt through the vision tower (None: 1, or LLaVA-NeXT's
    largest anyres grid + base); headroom_gib: memory that must stay free for the verdict 'fits';
    vision_export: an export folder (`vzedge export --out`) whose manifest gives the vision graph's dtype and its
    size on disk, instead of assuming an fp16 graph (with the default vision_backend 'torch', it means 'ort')."""

    model: str = "tiny"
    quant: str = "none"
    double_quant: bool = False
    group_size: int = 128
    skip_modules: tuple[str, ...] = ("lm_head",)
    tokens: int = 64
    context: int = 2048
    prompt_tokens: int = 64
    batch: int = 1
    crops: int | None = None
    dtype: str = "auto"
    vision_backend: str = "torch"
    attention: str = "sdpa"
    trt_workspace_mib: int = 1024
    device: str = "orin-nano-8gb"
    devices_file: str | None = None
    headroom_gib: float = 0.0
    cpu_packed: bool | None = None  # bitsandbytes' CPU 4-bit repack; None: applies on the host CPU only
    vision_export: str | None = None

    def __post_init__(self) -> None:
        self.quant = QUANT_ALIASES.get(self.quant, self.quant)
        if self.quant not in QUANT_METHODS:
            raise ValueError(f"quant {self.quant!r} is not one of {', '.join(QUANT_METHODS)} (or int8/nf4/fp4)")
        for name in ("tokens", "context", "batch", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {self.prompt_tokens}")
        if self.crops is not None and self.crops < 1:
            raise ValueError(f"crops must be >= 1 (or None for the model's default), got {self.crops}")
        if self.context <= self.prefill_tokens:
            raise ValueError(
                f"context {self.context} leaves no room to answer after {self.tokens} visual tokens x "
                f"{self.crops or 1} crop(s) + {self.prompt_tokens} prompt tokens; use --context > {self.prefill_tokens}"
            )
        if self.dtype not in ("auto", *DTYPE_BYTES):
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPE_BYTES)}")
        if self.vision_export is not None and self.vision_backend == "torch":
            self.vision_backend = "ort"  # an export folder is run by ORT unless trt was asked for
        if self.vision_export is not None:
            from vzedge.manifest import read_manifest

            adaptive = read_manifest(self.vision_export).get("adaptive")
            worst = max(int(b) for b in adaptive["buckets"]) if isinstance(adaptive, dict) else 0
            if self.tokens < worst:  # an adaptive export is sized for its largest bucket, the worst case
                raise ValueError(
                    f"{self.vision_export} is an adaptive export: an image gets up to {worst} tokens (buckets "
                    f"{adaptive['buckets']}); size for the worst case with --tokens {worst} or more"
                )
        if self.vision_backend not in VISION_BACKENDS:
            raise ValueError(f"vision backend {self.vision_backend!r} is not one of {', '.join(VISION_BACKENDS)}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention {self.attention!r}: use sdpa or eager")
        if self.trt_workspace_mib < 0:
            raise ValueError(f"--trt-workspace-mib {self.trt_workspace_mib}: pass a size >= 0")
        if not isinstance(self.headroom_gib, (int, float)) or not (0 <= self.headroom_gib < 1024**2):
            raise ValueError(
                f"--headroom {self.headroom_gib!r}: pass the GiB that must stay free, a finite number >= 0 (e.g. 0.5)"
            )
        if self.double_quant and self.quant not in ("bnb-nf4", "bnb-fp4"):
            raise ValueError(f"double_quant applies to bnb-nf4/bnb-fp4 only, not {self.quant}")

    @property
    def prefill_tokens(self) -> int:
        return self.tokens * (self.crops or 1) + self.prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        return d


@dataclass
class Component:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class Estimate:
    """Components sum to `total`; `available` is the device memory less its reserve."""

    config: BudgetConfig
    device: DeviceProfile
    source: str
    dtype: str
    components: list[Component]
    transients: dict[str, int]
    total: int
    available: int
    headroom: int
    verdict: str
    bounds: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.verdict != "does not fit"

    def component(self, name: str) -> int:
        return next(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "device": self.device.to_dict(),
            "model_source": self.source,
            "dtype": self.dtype,
            "components": [asdict(c) for c in self.components],
            "transients": self.transients,
            "total_bytes": self.total,
            "available_bytes": self.available,
            "headroom_bytes": self.headroom,
            "verdict": self.verdict,
            "fits": self.fits,
            "bounds": self.bounds,
            "facts": self.facts,
        }


def resolve_dtype(dtype: str, device: DeviceProfile) -> str:
    if dtype != "auto":
        return dtype
    return "fp32" if device.id == HOST and not device.cuda else "fp16"


def vision_transient(s: ModelShapes, images: int, fb: int, attention: str, out_tokens: int) -> int:
    """Largest live set of one ViT layer over `images` crops, plus the pixel batch and the output tokens.

    MLP: fc1 output, the activation's two temporaries (quick_gelu = x * sigmoid(1.702 x)) -> 3 N m; with the
    residual stream, its normed copy and the attention output -> 3 N d. SDPA never holds N x N maps (flash /
    memory-efficient kernels); eager holds scores and softmax, H N N each.
    """
    n, d, m = s.v_seq, s.v_hidden, s.v_intermediate
    mlp = n * (3 * m + 3 * d) * fb
    attn = (n * 6 * d + (2 * s.v_heads * n * n if attention == "eager" else 0)) * fb
    pixels = 3 * s.image_size * s.image_size * 4  # fp32 from preprocessing
    # Patch embedding: the convolution's input copy in the compute dtype and its im2col/reorder buffer.
    conv = 2 * 3 * s.image_size * s.image_size * fb + n * d * fb
    tokens = out_tokens * s.hidden * fb
    return images * (max(mlp, attn, conv) + pixels + tokens)


def prefill_transient(
    s: ModelShapes,
    seq: int,
    batch: int,
    fb: int,
    attention: str,
    quant: str,
    on_gpu: bool,
    skip_modules: tuple[str, ...] = ("lm_head",),
) -> int:
    """Largest live set of one decoder layer over `seq` prefilled positions, plus the last position's logits.

    SwiGLU: gate, up, act(gate) and their product -> 3 S m plus the residual, normed input and output
    (3 S d); attention: q, k, v and their rotary copies, the output -> 2 S (H + 2 kv) hd + S d. Eager adds
    H S S scores and softmax. 4-bit and AWQ GEMMs on CUDA dequantize the whole weight of a linear for
    prompts longer than a few tokens (the largest linear, in the compute dtype); LLM.int8 quantizes the
    input rows (int8) and accumulates in int32.
    """
    d, m, hd = s.hidden, s.intermediate, s.head_dim
    mlp = seq * (3 * m + 3 * d)
    attn = seq * (2 * (s.heads + 2 * s.kv_heads) * hd + 2 * d) + (
        2 * s.heads * seq * seq if attention == "eager" else 0
    )
    live = batch * max(mlp, attn) * fb
    quantized = [x.out_features * x.in_features for x in s.llm_linears if is_quantized(x.name, skip_modules)]
    if on_gpu and quant in ("bnb-nf4", "bnb-fp4", "awq") and quantized:
        live += max(quantized) * fb
    if quant == "bnb-int8":
        live += batch * seq * (max(d, m) + 4 * max(d, m))
    logits = batch * s.vocab * 4  # last position, upcast to fp32
    return live + logits + batch * seq * d * fb  # + the input embeddings


def decode_transient(s: ModelShapes, context: int, batch: int, fb: int) -> int:
    """One step at full context: the cache grows by concatenation, so one layer's K and V exist twice."""
    one_layer = 2 * s.kv_heads * s.head_dim * context * batch * fb
    return one_layer + batch * (s.vocab * 4 + (3 * s.intermediate + 4 * s.hidden) * fb)


def vision_graph_component(cfg: BudgetConfig, shapes: ModelShapes) -> Component:
    """The exported vision graph's weights: from the export's manifest (its dtype and files on disk) where
    `cfg.vision_export` names one, else an fp16 graph of the computed layers + projector."""
    layers = f"layers 1-{shapes.v_layers_computed} of {shapes.v_layers}"
    if cfg.vision_export is None:
        graph = (shapes.vision_params_graph + shapes.projector_params) * 2
        return Component("vision_graph", graph, f"exported graph in fp16 (assumed): {layers} + projector")
    from vzedge.manifest import read_manifest

    manifest = read_manifest(cfg.vision_export)
    g = manifest["graph"]
    files = manifest.get("files", {})
    names = [g["file"], *([g["external_data"]] if g.get("external_data") else [])]
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(f"{cfg.vision_export}: the manifest lists no size for {missing}; re-export the folder")
    size = sum(int(files[n]["bytes"]) for n in names)
    scheme = (manifest.get("quantization") or {}).get("scheme")
    dtype = f"{g['dtype']} ({scheme})" if scheme else g["dtype"]
    projector = " + projector" if manifest.get("projector") else ""
    return Component(
        "vision_graph",
        size,
        f"exported graph in {dtype}, {size / 2**20:.1f} MiB on disk ({cfg.vision_export}){projector}",
    )


def estimate(cfg: BudgetConfig, device: DeviceProfile | None = None, shapes: ModelShapes | None = None) -> Estimate:
    """Every memory component of `cfg` on its device, the verdict, and the speed bounds."""
    if device is None:
        device = get_device(cfg.device, cfg.devices_file)
    source = ""
    if shapes is None:
        config, source = resolve_config(cfg.model)
        shapes = read_shapes(config)
    dtype = resolve_dtype(cfg.dtype, device)
    fb = DTYPE_BYTES[dtype]
    on_gpu = device.cuda
    crops = cfg.crops or shapes.anyres_crops
    cfg_tokens_total = cfg.tokens * crops
    _check_tokens(cfg, shapes)
    if shapes.max_positions and cfg.context > shapes.max_positions:
        raise ValueError(
            f"context {cfg.context} exceeds the model's max_position_embeddings {shapes.max_positions}; "
            f"use --context <= {shapes.max_positions}"
        )
    packed = cfg.cpu_packed if cfg.cpu_packed is not None else (not on_gpu and _cpu_repacks())
    w = llm_weight_bytes(shapes, cfg.quant, dtype, cfg.double_quant, cfg.group_size, cfg.skip_modules, packed)
    vision_torch = (shapes.vision_params + shapes.projector_params + shapes.other_params) * fb
    vision_torch += shapes.vision_int_buffers_bytes
    prefill = cfg_tokens_total + cfg.prompt_tokens
    kv = kv_cache_bytes(shapes, cfg.context, cfg.batch, dtype)
    transients = {
        "vision": vision_transient(shapes, cfg.batch * crops, fb, cfg.attention, cfg_tokens_total),
        "prefill": prefill_transient(
            shapes, prefill, cfg.batch, fb, cfg.attention, cfg.quant, on_gpu, cfg.skip_modules
        ),
        "decode": decode_transient(shapes, cfg.context, cfg.batch, fb),
    }
    phase = max(transients, key=lambda k: transients[k])
    comps = [
        Component("llm_weights", w["total"], _weights_detail(cfg, w, dtype, packed)),
        Component("vision_weights", vision_torch, f"CLIP/SigLIP tower + projector in {dtype} (PyTorch)"),
    ]
    if cfg.vision_backend in ("ort", "trt"):
        comps.append(vision_graph_component(cfg, shapes))
    comps.append(
        Component(
            "kv_cache",
            kv,
            f"2 x {shapes.layers} layers x {shapes.kv_heads} kv heads x {shapes.head_dim} x {cfg.context} "
            f"positions x batch {cfg.batch} x {fb} B",
        )
    )
    comps.append(Component("activations", transients[phase], f"peak transient: {phase} (see transients)"))
    if cfg.vision_backend == "trt":
        comps.append(
            Component("trt_workspace", cfg.trt_workspace_mib * 2**20, "TensorRT builder/runtime workspace limit")
        )
    runtime = int(device.cuda_context_gib * GIB)
    if runtime:
        comps.append(Component("cuda_context", runtime, "CUDA context + PyTorch/cuBLAS kernels (device profile)"))
    mapped = checkpoint_mapping_bytes(cfg, shapes, device)
    if mapped:
        comps.append(
            Component(
                "checkpoint_mmap",
                mapped,
                "CPU only: from_pretrained keeps the safetensors file mapped while its tensors live (file-backed RSS)",
            )
        )
    slack_rate = CUDA_SLACK if on_gpu or device.id != HOST else CPU_SLACK
    slack = math.ceil(slack_rate * (kv + transients[phase]))
    comps.append(Component("allocator_slack", slack, f"{slack_rate:.0%} of KV cache + activations"))
    total = sum(c.bytes for c in comps)
    available = device.available_bytes
    headroom = available - total
    need = int(cfg.headroom_gib * GIB)
    if headroom < need:
        verdict = "does not fit"
    elif headroom < max(need, 0) + 0.15 * total:
        verdict = "fits (tight: within the model's 15% error)"
    else:
        verdict = "fits"
    bounds = speed_bounds(shapes, cfg, device, w, fb, prefill, crops)
    facts = {
        "llm_params": shapes.llm_params,
        "vision_params": shapes.vision_params,
        "projector_params": shapes.projector_params,
        "crops_per_image": crops,
        "prefill_tokens": prefill,
        "llm_weight_parts": w,
        "cpu_packed_4bit": packed,
        "attention": cfg.attention,
    }
    return Estimate(cfg, device, source, dtype, comps, transients, total, available, headroom, verdict, bounds, facts)


def checkpoint_mapping_bytes(cfg: BudgetConfig, shapes: ModelShapes, device: DeviceProfile) -> int:
    """On a CPU host, a checkpoint loaded with from_pretrained stays memory-mapped while the model lives
    (unquantized tensors are views of the file), so its pages count in RSS. On CUDA the tensors are
    copied to the device and the mapping goes. Built-in models loaded without quantization never touch a file;
    quantized built-ins are saved in fp32 first (vzedge.quant)."""
    import glob
    import os

    from vzedge.models.loading import BUILTIN_MODELS

    if device.cuda:
        return 0
    if cfg.model in BUILTIN_MODELS:
        if cfg.quant == "none":
            return 0
        params = shapes.llm_params + shapes.vision_params + shapes.projector_params + shapes.other_params
        return params * 4
    files = glob.glob(os.path.join(cfg.model, "*.safetensors")) if os.path.isdir(cfg.model) else []
    return sum(os.path.getsize(f) for f in files)


def _check_tokens(cfg: BudgetConfig, s: ModelShapes) -> None:
    stock = s.v_seq - 1 if s.has_cls else s.v_seq  # LLaVA drops CLIP's CLS ('default' strategy)
    if cfg.tokens > stock:
        raise ValueError(
            f"tokens {cfg.tokens} exceeds the {stock} visual tokens of this tower; use --tokens <= {stock}"
        )


def _cpu_repacks() -> bool:
    """bitsandbytes repacks 4-bit weights for avx512_bf16 CPUs at the first forward (bf16 absmax)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def _weights_detail(cfg: BudgetConfig, w: dict[str, int], dtype: str, packed: bool) -> str:
    if cfg.quant == "none":
        return f"all in {dtype}"
    layout = {
        "bnb-int8": "int8 + fp32 row absmax",
        "bnb-nf4": "nf4 packed + absmax per 64",
        "bnb-fp4": "fp4 packed + absmax per 64",
        "awq": f"int4 + zeros/scales per {cfg.group_size}",
    }[cfg.quant]
    if cfg.double_quant and not packed:
        layout += " (double quant)"
    if packed and cfg.quant in ("bnb-nf4", "bnb-fp4"):
        layout += " (CPU repack: bf16 absmax)"
    return f"decoder linears {layout}: {w['quantized_linears'] / GIB:.3f} GiB; lm_head/embeddings/norms in {dtype}"


def speed_bounds(
    s: ModelShapes, cfg: BudgetConfig, device: DeviceProfile, w: dict[str, int], fb: int, prefill: int, crops: int
) -> dict[str, Any]:
    """Ceilings no implementation beats on this device: decode is memory-bound (every weight but the
    embedding table, plus the KV cache so far, is read per token); prefill and vision are compute-bound
    (the VisionZip paper's FLOPs formula T(4nd^2 + 2n^2d + 2ndm), which counts multiply-adds, over the
    dense fp16 peak; so the time floors are conservative by up to 2x)."""
    embed_bytes = s.vocab * s.hidden * fb
    read = w["total"] - embed_bytes + kv_cache_bytes(s, prefill, cfg.batch, "fp16" if fb == 2 else "fp32")
    llm_flops = cfg.batch * transformer_flops(s.layers, prefill, s.hidden, s.intermediate)
    vis_flops = cfg.batch * crops * transformer_flops(s.v_layers_computed, s.v_seq, s.v_hidden, s.v_intermediate)
    out: dict[str, Any] = {
        "bytes_read_per_decode_token": read,
        "prefill_flops": llm_flops,
        "vision_flops": vis_flops,
        "decode_tokens_per_s_max": None,
        "prefill_ms_min": None,
        "vision_ms_min": None,
    }
    if device.bandwidth_gbs:
        out["decode_tokens_per_s_max"] = cfg.batch * device.bandwidth_gbs * 1e9 / read
    if device.fp16_tflops:
        out["prefill_ms_min"] = 1e3 * llm_flops / (device.fp16_tflops * 1e12)
        out["vision_ms_min"] = 1e3 * vis_flops / (device.fp16_tflops * 1e12)
    return out
