"""A tuned projector (`vzedge tune` output): its files, the base model it belongs to, reading and loading it.

Shared by the LLaVA glue (`apply_visionzip(projector=DIR)`), the exporter, the runtime, eval and tune.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vzedge.io import sha256_file
from vzedge.models.base import llava_parts
from vzedge.visionzip import VisionZipConfig

FORMAT = "vzedge-projector/1"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "tune_config.json"


def _hash_tensor(h: Any, name: str, t: torch.Tensor, chunk: int = 1 << 22) -> None:
    # Float32 bytes whatever the dtype, so fp16/fp32 loads of one checkpoint agree; chunked for 7B embeddings.
    h.update(f"{name}:{tuple(t.shape)};".encode())
    flat = t.detach().reshape(-1)
    for i in range(0, flat.numel(), chunk):
        h.update(flat[i : i + chunk].to("cpu", torch.float32).numpy().tobytes())


def _module_sha256(module: nn.Module, prefix: str = "", h: Any = None) -> str:
    h = h or hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        _hash_tensor(h, prefix + name, t)
    return h.hexdigest()


def projector_sha256(vlm: nn.Module) -> str:
    return _module_sha256(llava_parts(vlm).multi_modal_projector)


def base_fingerprint(vlm: nn.Module) -> str:
    """sha256 over the weights a tuned projector sits between: the projector, the vision tower's
    embeddings and the LLM's input embeddings, as float32 (independent of the load dtype and of a
    4/8-bit LLM, which keeps these in float)."""
    inner = llava_parts(vlm)
    h = hashlib.sha256()
    _module_sha256(inner.multi_modal_projector, "projector.", h)
    embeddings = getattr(getattr(inner.vision_tower, "vision_model", inner.vision_tower), "embeddings", None)
    if embeddings is not None:
        _module_sha256(embeddings, "vision.embeddings.", h)
    _module_sha256(inner.get_input_embeddings(), "llm.embed_tokens.", h)
    return h.hexdigest()


def _model_label(vlm: nn.Module) -> str:
    return getattr(vlm.config, "_name_or_path", "") or type(vlm).__name__


@dataclass
class TunedProjector:
    state: dict[str, torch.Tensor]
    record: dict[str, Any]  # what the manifest / caller records: path, sha256, base, visionzip, steps, loss


def read_tune_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tune_config.json of a `vzedge tune` output folder, checked for format and completeness only."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{folder} is not a tuned projector folder (no {CONFIG_FILE}); make one with `vzedge tune --out DIR`"
        )
    try:
        tuned = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(tuned, dict) or tuned.get("format") != FORMAT:
        raise ValueError(
            f"{config_path}: format {tuned.get('format') if isinstance(tuned, dict) else None!r}, expected {FORMAT!r}"
        )
    missing = [k for k in ("base", "visionzip", "projector", "training") if not isinstance(tuned.get(k), dict)]
    if missing:
        raise ValueError(f"{config_path} lacks {missing}: an incomplete or edited file; tune again")
    return tuned


def read_tuned_projector(path: str | os.PathLike[str], vlm: nn.Module, cfg: VisionZipConfig) -> TunedProjector:
    """Read and check a `vzedge tune` output folder against `vlm` and `cfg`; nothing is modified.

    Raises ValueError naming both sides when the folder was tuned for another base model or another
    VisionZip config, or when its files do not match their recorded hashes.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    tuned = read_tune_config(folder)
    if tuned["visionzip"] != cfg.to_dict():
        raise ValueError(
            f"{folder} was tuned for VisionZip {tuned['visionzip']} but the model is set up for {cfg.to_dict()}; "
            f"use the config it was tuned for (--dominant {tuned['visionzip']['dominant']} --contextual "
            f"{tuned['visionzip']['contextual']}) or tune again for this one"
        )
    base = tuned["base"]
    have = base_fingerprint(vlm)
    if have != base["fingerprint"]:
        raise ValueError(
            f"{folder} was tuned on base model {base['source']!r} (revision {base['revision']}, fingerprint "
            f"{base['fingerprint'][:12]}) but this model, {_model_label(vlm)!r}, has other weights (fingerprint "
            f"{have[:12]}); load the base model it was tuned on, or tune again for this one"
        )
    weights = folder / PROJECTOR_FILE
    if not weights.is_file() or sha256_file(weights) != tuned["projector"]["sha256"]:
        raise ValueError(f"{weights} is missing or does not match its sha256 in {CONFIG_FILE}; tune again")
    state = load_file(str(weights))
    expected = llava_parts(vlm).multi_modal_projector.state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    if {k: tuple(v.shape) for k, v in state.items()} != shapes:
        raise ValueError(f"{weights} holds {sorted(state)} which do not fit this model's projector {shapes}")
    record = {
        "path": str(folder),
        "sha256": tuned["projector"]["sha256"],
        "base": base,
        "visionzip": tuned["visionzip"],
        "steps": tuned["training"]["steps"],
        "final_loss": tuned["training"]["final_loss"],
    }
    return TunedProjector(state, record)


def load_projector_state(projector: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `projector` in place, each tensor cast to the parameter's dtype and device."""
    own = projector.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))


def load_tuned_projector(path: str | os.PathLike[str], vlm: nn.Module, cfg: VisionZipConfig) -> dict[str, Any]:
    """Check (see `read_tuned_projector`) and load a tuned projector into `vlm` in place; returns its record."""
    tuned = read_tuned_projector(path, vlm, cfg)
    load_projector_state(llava_parts(vlm).multi_modal_projector, tuned.state)
    return tuned.record
