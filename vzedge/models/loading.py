"""Load a model by name: a built-in model, a local folder, or a hub id, through one code path.

Built-ins: `tiny` is the trained model shipped as a folder inside the package (loaded with
`from_pretrained` like any local folder); `tiny-random` is built in memory from a seed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from torch import nn

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny", "tiny-random")
_VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "clip", "siglip")
# model_type -> transformers class: LLaVA-1.5, and the anyres families (NeXT, NeXT-Video, OneVision).
_VLM_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


@dataclass
class LoadedModel:
    """A VLM (vlm + processor set) or a bare vision encoder (vlm and processor None)."""

    name: str
    source: str
    revision: str | None
    vision: nn.Module
    vlm: nn.Module | None = None
    processor: Any | None = None
    projector: nn.Module | None = None
    image_processor: Any | None = None


def _shipped_tiny() -> str:
    from vzedge.models.tiny import weights_dir

    path = weights_dir()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"the trained tiny model is missing from this install ({path}); reinstall vzedge, train it with "
            "`python scripts/train_tiny.py`, or use --model tiny-random (random weights)"
        )
    return str(path)


def _kind(name: str) -> str:
    if name in BUILTIN_MODELS:
        return "builtin"
    if os.path.isdir(name):
        return "local"
    if os.path.exists(name):
        raise ValueError(f"--model {name!r} is a file; pass the folder that holds config.json")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and " " not in name and not name.startswith((".", "~")):
        return "hub"
    raise ValueError(
        f"--model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a local folder, "
        "nor a hub id of the form owner/name"
    )


def load_config(name: str) -> Any:
    """The model's config only (no weights): the built-in one, or config.json of a folder/hub id."""
    kind = _kind(name)
    if name == "tiny-random":
        from vzedge.models.tiny import tiny_config

        return tiny_config()
    if name == "tiny":
        name, kind = _shipped_tiny(), "local"
    if kind == "hub":
        _check_hub_id(name)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=kind == "local")
    except OSError as err:
        raise ValueError(_unreachable(name, kind, err)) from err


def _check_hub_id(name: str) -> None:
    """Fail in a second, not after the hub client's retries, when `name` is neither local nor reachable.

    `mymodels/llava7b` is a hub id in form but usually a mistyped local path: the error says both.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if _hub_reachable():
        return
    raise ValueError(
        f"--model {name!r}: there is no local folder {name!r} (check the path, relative to {os.getcwd()}), and as "
        "a hub id it is not in the local cache and the hub cannot be reached (offline). Download it where there "
        "is internet and pass the local folder, or use --model tiny"
    )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint (HF_ENDPOINT), with a short timeout; False if offline."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _unreachable(name: str, kind: str, err: Exception) -> str:
    if kind == "local":
        return f"cannot read a model from folder {name!r}: {err}"
    return (
        f"cannot load {name!r}: not in the local cache and the hub is unreachable ({err}). "
        "Download it where there is internet and pass the local folder, or use --model tiny"
    )


def load_model(name: str, dtype: Any = None, revision: str | None = None) -> LoadedModel:
    """Load `name` (built-in, local folder or hub id) as a LLaVA VLM or a bare CLIP/SigLIP encoder."""
    kind = _kind(name)
    if name == "tiny-random":
        from vzedge.models.tiny import build_tiny

        vlm, processor = build_tiny()
        if dtype is not None:
            vlm = vlm.to(dtype)
        return from_vlm(name, "builtin:tiny-random", None, vlm, processor)
    label = name
    if name == "tiny":
        # The shipped folder goes through exactly the path a user's local folder takes.
        name, kind = _shipped_tiny(), "local"
    config = load_config(name)
    model_type = getattr(config, "model_type", "")
    local = kind == "local"
    kw: dict[str, Any] = {"local_files_only": local, "revision": revision}
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        if model_type in _VLM_CLASSES:
            import transformers
            from transformers import AutoProcessor

            log.info("loading %s model %s", model_type, name)
            vlm = getattr(transformers, _VLM_CLASSES[model_type]).from_pretrained(name, **kw).eval()
            processor = AutoProcessor.from_pretrained(name, local_files_only=local, revision=revision)
            source = "builtin:tiny" if label == "tiny" else name  # not an install-dependent path
            return from_vlm(label, source, revision, vlm, processor)
        if model_type in _VISION_TYPES:
            return _load_vision(name, model_type, kw)
    except OSError as err:
        raise ValueError(_unreachable(name, kind, err)) from err
    except SafetensorError as err:
        raise ValueError(
            f"the weights of {name!r} are truncated or corrupt ({err}); download or save the model again"
        ) from None
    raise ValueError(
        f"{name!r} is a {model_type!r} model; vzedge supports LLaVA checkpoints (model_type {sorted(_VLM_CLASSES)}) "
        "and bare CLIP/SigLIP vision encoders"
    )


def from_vlm(name: str, source: str, revision: str | None, vlm: nn.Module, processor: Any) -> LoadedModel:
    """A LoadedModel around an already-built LLaVA model (its tower, projector and image processor)."""
    inner = vlm.model
    return LoadedModel(
        name=name,
        source=source,
        revision=revision,
        vision=inner.vision_tower,
        vlm=vlm,
        processor=processor,
        projector=inner.multi_modal_projector,
        image_processor=getattr(processor, "image_processor", None),
    )


def _load_vision(name: str, model_type: str, kw: dict[str, Any]) -> LoadedModel:
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if model_type.startswith("clip") else SiglipVisionModel
    log.info("loading %s vision encoder %s", cls.__name__, name)
    vision = cls.from_pretrained(name, **kw).eval()
    try:
        image_processor = AutoImageProcessor.from_pretrained(
            name, local_files_only=kw["local_files_only"], revision=kw["revision"]
        )
    except OSError:
        log.warning("%s has no preprocessor_config.json; using the family's default normalisation", name)
        image_processor = None
    return LoadedModel(name=name, source=name, revision=kw["revision"], vision=vision, image_processor=image_processor)
