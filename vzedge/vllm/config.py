"""The plugin's settings as they travel through vLLM: a `visionzip` key in `--hf-overrides`.

Plain Python (no vLLM import), so the launcher, the edge client and the tests use it without vLLM.
vLLM copies every `--hf-overrides` key onto the model's HF config, so
`{"architectures": ["VisionZipLlavaForConditionalGeneration"], "visionzip": {...}}` reaches every
process vLLM starts (API server, engine core, workers) without any global state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vzedge.visionzip import VisionZipConfig

ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"
OVERRIDES_KEY = "visionzip"
# vLLM releases the plugin was tested with; it touches two private methods of vLLM's LLaVA (see model.py).
TESTED_VLLM = (">=0.32", "<0.33")
_KEYS = ("dominant", "contextual", "layer", "merge", "projector")


@dataclass(frozen=True)
class PluginSettings:
    """VisionZip config and optional tuned projector folder (a `vzedge tune` output) for one served model."""

    visionzip: VisionZipConfig
    projector: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.visionzip, VisionZipConfig):
            raise TypeError(f"visionzip must be a VisionZipConfig, got {type(self.visionzip).__name__}")
        if self.projector is not None:
            folder = Path(self.projector)
            if not (folder / "tune_config.json").is_file():
                raise ValueError(
                    f"projector={self.projector!r} is not a tuned projector folder (no tune_config.json); "
                    "pass a `vzedge tune --out DIR` folder, or leave it out to use the model's own projector"
                )
            # Absolute: vLLM's processes may run from another working directory.
            object.__setattr__(self, "projector", str(folder.resolve()))

    def to_overrides(self) -> dict[str, Any]:
        """The `visionzip` entry of `--hf-overrides`."""
        entry: dict[str, Any] = dict(self.visionzip.to_dict())
        if self.projector is not None:
            entry["projector"] = self.projector
        return entry


def hf_overrides(settings: PluginSettings) -> dict[str, Any]:
    """The whole `--hf-overrides` dict (`hf_overrides=` of `vllm.LLM`) that selects the plugin's model class."""
    return {"architectures": [ARCHITECTURE], OVERRIDES_KEY: settings.to_overrides()}


def settings_from_hf_config(hf_config: Any) -> PluginSettings:
    """Read the settings back from the HF config vLLM built (a missing key means the defaults, 54 + 10)."""
    raw = getattr(hf_config, OVERRIDES_KEY, None)
    if raw is None:
        return PluginSettings(VisionZipConfig())
    return settings_from_dict(raw)


def settings_from_dict(raw: Any) -> PluginSettings:
    if not isinstance(raw, dict):
        raise TypeError(
            f"--hf-overrides '{OVERRIDES_KEY}' must be an object like "
            f'{{"dominant": 54, "contextual": 10}}, got {type(raw).__name__} {raw!r}'
        )
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"--hf-overrides '{OVERRIDES_KEY}' has unknown keys {unknown}; allowed: {list(_KEYS)}")
    vz = {k: raw[k] for k in ("dominant", "contextual", "layer", "merge") if k in raw}
    projector = raw.get("projector")
    if projector is not None and not isinstance(projector, (str, os.PathLike)):
        raise TypeError(f"'{OVERRIDES_KEY}.projector' must be a folder path, got {projector!r}")
    return PluginSettings(VisionZipConfig(**vz), None if projector is None else str(projector))
