"""Vision backends behind one interface: pixels [B, 3, H, W] -> image tokens [B, K, D].

`open_vision_backend` picks one from an export folder's manifest (TensorRT engine, ONNX Runtime with
the TensorRT / CUDA / CPU execution provider) or falls back to PyTorch (`VisionZipEncoder`) when
nothing was exported.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from vzedge.runtime.backends.base import Prepared, VisionBackend, check_adaptive_request, manifest_adaptive
from vzedge.runtime.backends.ort import OrtVisionBackend
from vzedge.runtime.backends.trt import TensorRTVisionBackend

log = logging.getLogger(__name__)


class TorchVisionBackend(VisionBackend):
    """VisionZipEncoder + the model's projector in PyTorch (cfg None: all tokens, the stock path)."""

    def __init__(self, loaded: Any, cfg: Any | None, device: str = "cpu", adaptive: Any | None = None) -> None:
        from vzedge.encoder import VisionZipEncoder
        from vzedge.models import adapt_vision_tower
        from vzedge.runtime.preprocess import from_image_processor

        tower = adapt_vision_tower(loaded.vision)
        self.device = torch.device(device)
        self.cfg = cfg
        self.projector = loaded.projector
        self.projected = self.projector is not None
        self.vlm = loaded.vlm
        self.adaptive = adaptive
        if cfg is not None:
            self.encoder = VisionZipEncoder(loaded.vision, cfg).eval()
            self.num_tokens = cfg.num_tokens
            self.name = f"torch-{cfg.selector}-{cfg.num_tokens}"
            if adaptive is not None:
                for k in adaptive.buckets:
                    self.encoder.bucket_config(k)  # every bucket must fit the tower, before the first frame
                self.num_tokens = max(adaptive.buckets)  # the most a frame can get
                self.name = f"torch-{cfg.selector}-adaptive-{'/'.join(map(str, adaptive.buckets))}"
        else:
            self.encoder = None
            strategy = getattr(getattr(loaded.vlm, "config", None), "vision_feature_select_strategy", "full")
            self.num_tokens = tower.num_patches if (tower.has_cls and strategy == "default") else tower.seq_len
            self.name = f"torch-all-{self.num_tokens}"
        self.preprocess = from_image_processor(
            loaded.image_processor, tower.image_size, tower.image_mean, tower.image_std
        )

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device)
        if self.encoder is None:
            feats = self.vlm.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self.vlm.config.vision_feature_layer,
                vision_feature_select_strategy=self.vlm.config.vision_feature_select_strategy,
            ).pooler_output
            return torch.stack(list(feats))
        tokens = self.encoder(pixel_values).tokens
        return self.projector(tokens) if self.projector is not None else tokens

    @torch.inference_mode()
    def encode_each(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.adaptive is None or self.encoder is None:
            return super().encode_each(pixel_values)
        # Each image at its own bucket (the layers run once for the batch, the selector once per bucket present).
        out = self.encoder.forward_adaptive(pixel_values.to(self.device), self.adaptive)
        return [self.projector(t) if self.projector is not None else t for t in out.tokens]


class TokenCache:
    """Image tokens by content (sha256 of the preprocessed pixels), least recently used evicted."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixel_values: torch.Tensor) -> str:
        import hashlib

        return hashlib.sha256(pixel_values.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        if self.capacity <= 0:
            return None
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class AnyresVisionBackend(VisionBackend):
    """LLaVA-NeXT / OneVision: the model's processor tiles each image into crops (base image + anyres tiles), the
    crops run as one batch through the crop encoder — PyTorch VisionZip + projector, or an exported graph — and
    the per-crop tokens are arranged outside the graph (`vzedge.models.llava_next.arrange_anyres`, `layout`)."""

    def __init__(self, loaded: Any, cfg: Any, layout: str = "reference", graph: VisionBackend | None = None) -> None:
        from vzedge.models.llava_next import AnyresGlue

        if cfg is None:
            raise ValueError("the runtime runs anyres models on VisionZip tokens: drop --all-tokens")
        self.glue = AnyresGlue(loaded.vlm, cfg, layout)
        self.graph = graph
        self.image_processor = loaded.image_processor
        self.num_tokens = cfg.num_tokens  # per crop
        self.projected = True
        self.manifest = graph.manifest if graph is not None else None
        self.name = f"anyres-{layout}-{graph.name if graph is not None else 'torch'}-{cfg.num_tokens}"
        if graph is not None and not graph.projected:
            raise ValueError(
                "an anyres model's graph must be exported with --projector (the arrangement needs LLM-width tokens)"
            )

    def prepare(self, images: list[Any]) -> Prepared:
        out = self.image_processor(images=images, return_tensors="pt")
        return Prepared(out["pixel_values"], out["image_sizes"])

    @torch.inference_mode()
    def encode_prepared(self, prepared: Prepared) -> torch.Tensor:
        glue = self.glue
        grids = glue.grids(prepared.image_sizes)
        n_crops = [1 + r * c for r, c in grids]
        crops = glue.gather_crops(prepared.pixels, n_crops)
        if self.graph is None:
            _, feats, kept = glue.encode(crops.to(next(glue.encoder.parameters()).device))
        else:
            feats, kept = self.graph.encode_with_kept(crops)
        per_image = zip(feats.split(n_crops), kept.split(n_crops), grids, strict=True)
        return torch.cat([glue.arrange(f, k, g) for f, k, g in per_image]).unsqueeze(0)


def is_anyres(loaded: Any) -> bool:
    return type(getattr(loaded, "vlm", None)).__name__.startswith(("LlavaNext", "LlavaOnevision"))


def check_manifest_matches(manifest: dict[str, Any], loaded: Any) -> None:
    """Refuse an export made from another model than the one the LLM comes from."""
    src = manifest.get("source", {})
    if loaded is not None and src.get("source") != loaded.source:
        raise ValueError(
            f"the export was made from {src.get('source')!r} but --model is {loaded.source!r}: "
            "export this model (vzedge export --model ...) or pass the matching --model"
        )


def open_vision_backend(
    export_dir: str | None,
    loaded: Any,
    cfg: Any | None,
    backend: str = "auto",
    device: str = "cpu",
    layout: str = "reference",
    adaptive: Any | None = None,
) -> VisionBackend:
    """`backend`: auto | torch | ort | ort-cpu | ort-cuda | ort-trt | trt. Anyres models (LLaVA-NeXT/OneVision)
    get their crops arranged outside the graph with `layout`."""
    if backend not in ("auto", "torch", "ort", "ort-cpu", "ort-cuda", "ort-trt", "trt"):
        raise ValueError(f"unknown vision backend {backend!r}; use auto, torch, ort, ort-cpu, ort-cuda, ort-trt or trt")
    if export_dir is None or backend == "torch":
        if backend not in ("auto", "torch"):
            raise ValueError(f"--vision-backend {backend} needs an export folder: pass --vision DIR")
        if is_anyres(loaded):
            if adaptive is not None:
                raise ValueError("--adaptive supports LLaVA-1.5 models (one crop per image), not anyres models")
            return AnyresVisionBackend(loaded, cfg, layout)
        return TorchVisionBackend(loaded, cfg, device, adaptive)
    from vzedge.manifest import read_manifest, verify_files

    manifest = read_manifest(export_dir)
    verify_files(export_dir, manifest)
    check_manifest_matches(manifest, loaded)
    # The buckets of an adaptive export come from its manifest; --adaptive must match them or be omitted.
    found = manifest_adaptive(manifest, export_dir)
    check_adaptive_request(found[0] if found is not None else None, adaptive, export_dir)
    if found is not None and is_anyres(loaded):
        raise ValueError("an adaptive export is for LLaVA-1.5 models (one crop per image), not anyres models")
    if backend == "trt" or (backend == "auto" and manifest.get("tensorrt") and torch.cuda.is_available()):
        return TensorRTVisionBackend(Path(export_dir), manifest)
    graph = OrtVisionBackend(Path(export_dir), manifest, backend, projector=None if manifest["projector"] else loaded)
    return AnyresVisionBackend(loaded, cfg, layout, graph) if is_anyres(loaded) else graph
