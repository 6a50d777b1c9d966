"""Checkpoint layout for stock vLLM.

transformers 5.x saves a LLaVA's CLIP/SigLIP tower without the `vision_model.` level
(`vision_tower.embeddings.*`; vzedge's shipped `tiny` is such a folder), while vLLM 0.32's own LLaVA
only loads `vision_tower.vision_model.*`. The plugin's model class accepts both; a stock vLLM server
(`vzedge serve --engine vllm --vllm-mode stock|embeds`) gets a converted copy of the folder, made once and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")


def stock_name(name: str) -> str:
    """A weight name in the layout vLLM's LLaVA loads (the `vision_model.` level inserted where missing)."""
    for prefix in _TOWER_PREFIXES:
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + name[len(prefix) :]
    return name


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors weights; vLLM needs a safetensors checkpoint folder")
    return files


def needs_conversion(folder: str | os.PathLike[str]) -> bool:
    """True when the folder's vision tower lacks the `vision_model.` level."""
    from safetensors import safe_open

    for path in _weight_files(Path(folder)):
        with safe_open(str(path), "pt") as f:
            if any(stock_name(k) != k for k in f.keys()):  # noqa: SIM118 (safe_open has no __iter__)
                return True
    return False


def _cache_root() -> Path:
    base = os.environ.get("VZEDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vzedge")
    return Path(base) / "vllm-layout"


def stock_layout_folder(folder: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None) -> Path:
    """`folder` itself when stock vLLM loads it, else a converted copy (cached by the weights' sha256)."""
    from safetensors.torch import load_file, save_file

    from vzedge.io import atomic_dir, sha256_file

    src = Path(folder)
    if not needs_conversion(src):
        return src
    digest = hashlib.sha256()
    for path in _weight_files(src):
        digest.update(f"{path.name}:{sha256_file(path)};".encode())
    target = Path(cache_root) if cache_root is not None else _cache_root()
    target = target / f"{src.name}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    with atomic_dir(target, replace=True) as tmp:
        for item in src.iterdir():
            if item.suffix == ".safetensors":
                state = load_file(str(item))
                save_file({stock_name(k): v for k, v in state.items()}, str(tmp / item.name), metadata={"format": "pt"})
            elif item.name.endswith(".safetensors.index.json"):
                index = json.loads(item.read_text())
                index["weight_map"] = {stock_name(k): v for k, v in index.get("weight_map", {}).items()}
                (tmp / item.name).write_text(json.dumps(index, indent=2))
            elif item.is_file():
                shutil.copy2(item, tmp / item.name)
    return target
