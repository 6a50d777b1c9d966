"""AWQ checkpoints: calibrate and quantize a model's LLM with gptqmodel, write a checkpoint transformers loads.

Why gptqmodel: AutoAWQ is archived and cannot run on CPU without IPEX; llm-compressor fails on CPU and
writes compressed-tensors rather than AWQ; gptqmodel 7.6.0 quantizes AWQ on CPU (its torch backend) and on
CUDA, and is what transformers itself needs to load AWQ checkpoints. 7.6.0 is the last release that
supports torch 2.13 (7.7 needs a newer torch).

For a LLaVA model only the LLM is quantized: it is split out as a causal LM, quantized, and written back
beside the float16 vision tower and projector as one LLaVA checkpoint (hub key layout) whose
`quantization_config` keeps those modules unconverted. Scales and float tensors are float16: gptqmodel's
AWQ packer takes float16 or bfloat16 only, and float16 is what AWQ GEMM kernels on CUDA/Jetson consume.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vzedge._deps import require, resolve_device
from vzedge.io import atomic_dir, check_replaceable_dir, output_lock, write_json
from vzedge.models.loading import load_config, load_model
from vzedge.quant.config import AWQ_GROUP_SIZES, QuantConfig
from vzedge.quant.load import checkpoint_quant_method, stdout_to_stderr
from vzedge.quant.report import METADATA_FILE, quant_report

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
MIN_SEQ_LEN = 32
SKIP_IN_LLAVA = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
# Word lists for synthetic calibration text (one string each keeps them readable).
_NOUNS = "car tree dog person bicycle street sign table cup window door cat bus phone screen road sky".split()  # noqa: SIM905
_ADJS = "red small old bright wooden empty busy quiet tall green white dark open round".split()  # noqa: SIM905
_VERBS = "stands next to|is parked near|lies under|is behind|leans on|faces|is left of".split("|")  # noqa: SIM905


class QuantCheckError(RuntimeError):
    """A freshly written AWQ checkpoint failed its reload-and-compare check (nothing was left in --out)."""


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data for AWQ: `samples` windows of `seq_len` tokens from `data` (a UTF-8 text file, or
    'synthetic': generated scene descriptions, enough for tests, not for a real model)."""

    samples: int = 128
    seq_len: int = 256
    data: str = SYNTHETIC

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"--calib {self.samples}: AWQ needs at least one calibration sample (128 is typical)")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(
                f"--calib-len {self.seq_len} is too short to calibrate; use >= {MIN_SEQ_LEN} (256 typical)"
            )
        if self.data != SYNTHETIC and not os.path.isfile(self.data):
            raise ValueError(f"calibration data {self.data!r} not found: pass a UTF-8 text file or 'synthetic'")


def synthetic_text(chars: int, seed: int = 0) -> str:
    """Deterministic scene descriptions, at least `chars` characters."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < chars:
        s = (
            f"A {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} "
            f"{rng.choice(_NOUNS)}, and {rng.randint(2, 9)} {rng.choice(_NOUNS)}s are in the picture."
        )
        parts.append(s)
        total += len(s) + 1
    return " ".join(parts)


def calibration_samples(tokenizer: Any, calib: CalibConfig) -> list[dict[str, list[int]]]:
    """`calib.samples` consecutive, non-overlapping windows of `calib.seq_len` token ids."""
    need = calib.samples * calib.seq_len
    if calib.data == SYNTHETIC:
        text = synthetic_text(need * 6)  # >= 1 token per 6 characters for byte-level and subword tokenizers
    else:
        text = Path(calib.data).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < need:
        raise ValueError(
            f"calibration data {calib.data!r} is too short: {len(ids)} tokens, but {calib.samples} samples x "
            f"{calib.seq_len} tokens need {need}; pass more text, or lower --calib / --calib-len"
        )
    L = calib.seq_len
    return [{"input_ids": ids[i * L : (i + 1) * L], "attention_mask": [1] * L} for i in range(calib.samples)]


def _import_gptqmodel() -> Any:
    # gptqmodel sizes its CPU worker pool at import; one worker crashes quantize() on 2-core machines.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    return require("gptqmodel", "AWQ quantization (--method awq)")


def check_awq_shapes(llm: torch.nn.Module, group_size: int) -> None:
    """AWQ packs 8 outputs per int32 and groups inputs by `group_size`: refuse layers that don't divide."""
    bad = [
        f"{name} ({mod.out_features}x{mod.in_features})"
        for name, mod in llm.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and ".layers." in f".{name}"
        and (mod.in_features % group_size or mod.out_features % 8)
    ]
    if bad:
        ok = [
            g
            for g in AWQ_GROUP_SIZES
            if all(m.in_features % g == 0 for m in llm.modules() if isinstance(m, torch.nn.Linear))
        ]
        raise ValueError(
            f"AWQ needs in_features % group_size({group_size}) == 0 and out_features % 8 == 0; these layers miss "
            f"it: {', '.join(bad[:5])}. " + (f"Try --group-size {max(ok)}" if ok else "Use --method bnb-nf4")
        )


def _split_llm(vlm: torch.nn.Module, folder: Path, tokenizer: Any) -> torch.nn.Module:
    """Save the LLM of a LLaVA as a standalone causal LM checkpoint (what gptqmodel quantizes)."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_config(vlm.config.text_config)
    state = {f"model.{k}": v for k, v in vlm.model.language_model.state_dict().items()}
    state["lm_head.weight"] = vlm.lm_head.weight
    missing, unexpected = llm.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    llm.generation_config = vlm.generation_config
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return llm


def _assemble_llava(vlm: torch.nn.Module, processor: Any, awq_dir: Path, out: Path) -> None:
    """One LLaVA checkpoint: the AWQ LLM's tensors under the hub key layout, plus the float16 vision tower
    and projector, with a quantization_config that keeps them (and lm_head) unconverted."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(awq_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[f"language_model.{k}"] = sf.get_tensor(k)
    for k, v in vlm.model.state_dict().items():
        if k.startswith(("vision_tower.", "multi_modal_projector.")):
            tensors[k] = v.detach().to(torch.float16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    awq_cfg = json.loads((awq_dir / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    awq_cfg["modules_to_not_convert"] = SKIP_IN_LLAVA
    config = vlm.config.to_dict()
    config["dtype"] = "float16"
    config["quantization_config"] = awq_cfg
    write_json(out / "config.json", config)
    vlm.generation_config.save_pretrained(out)
    processor.save_pretrained(out)


def _keep_gptqmodel_logs_in(folder: Path) -> None:
    """gptqmodel 7.6 writes per-layer logs to ./logs of the caller's working directory; keep them in our temp
    folder instead (its module constant; a later gptqmodel without it is left alone)."""
    from gptqmodel.looper import loop_processor

    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = folder


def quantize_awq(
    model: str,
    out: str,
    qcfg: QuantConfig | None = None,
    calib: CalibConfig | None = None,
    device: str = "auto",
    force: bool = False,
) -> dict[str, Any]:
    """Quantize the LLM of `model` to 4-bit AWQ with gptqmodel and write a checkpoint to `out`.

    The written checkpoint is reloaded and compared with the float model before it is moved into place;
    its quant_report.json (and the float source in vzedge_quant.json) is written beside it.
    Returns the report.
    """
    qcfg = qcfg or QuantConfig(method="awq")
    calib = calib or CalibConfig()
    if qcfg.method != "awq":
        raise ValueError(f"quantize_awq makes AWQ checkpoints; got method {qcfg.method!r}")
    have = checkpoint_quant_method(load_config(model))
    if have is not None:
        raise ValueError(f"{model!r} is already quantized with {have}; AWQ needs the float checkpoint")
    # Up front, before the model loads: only a folder vzedge wrote (it holds vzedge_quant.json) is replaced,
    # and only with force. The lock, held to the end, makes a second quantize into `out` fail at once.
    check_replaceable_dir(out, METADATA_FILE, force)
    dev = resolve_device(device)
    with output_lock(out):
        return _quantize_awq(model, out, qcfg, calib, dev, force)


def _quantize_awq(
    model: str, out: str, qcfg: QuantConfig, calib: CalibConfig, dev: torch.device, force: bool
) -> dict[str, Any]:
    src = load_model(model, dtype=torch.float32)
    is_vlm = src.vlm is not None and hasattr(src.vlm.model, "language_model")
    if src.vlm is None:
        raise ValueError(f"{model!r} is a bare vision encoder; AWQ quantizes the LLM of a LLaVA or causal LM")
    tokenizer = getattr(src.processor, "tokenizer", src.processor)
    samples = calibration_samples(tokenizer, calib)
    if calib.data == SYNTHETIC and not model.startswith("tiny"):
        log.warning("calibrating %s on synthetic text: pass --calib-data FILE with text like your prompts", model)
    with stdout_to_stderr():
        gptqmodel = _import_gptqmodel()
    from gptqmodel.quantization.config import FORMAT, METHOD

    with tempfile.TemporaryDirectory(prefix="vzedge-awq-") as tmp, stdout_to_stderr():
        llm_dir, awq_dir = Path(tmp, "llm"), Path(tmp, "awq")
        if is_vlm:
            llm = _split_llm(src.vlm, llm_dir, tokenizer)
        else:
            llm = src.vlm
            llm.save_pretrained(llm_dir)
            tokenizer.save_pretrained(llm_dir)
        check_awq_shapes(llm, qcfg.group_size)
        del llm
        gcfg = gptqmodel.QuantizeConfig(
            bits=qcfg.bits,
            group_size=qcfg.group_size,
            method=METHOD.AWQ,
            format=FORMAT.GEMM,
            sym=False,
            # Its disk offload lost a buffer between quantize() and save() in one of our runs; the LLM is
            # held in memory anyway while it is calibrated layer by layer.
            offload_to_disk=False,
        )
        log.info(
            "AWQ: quantizing the LLM of %s on %s with %d x %d calibration tokens",
            model,
            dev,
            calib.samples,
            calib.seq_len,
        )
        _keep_gptqmodel_logs_in(Path(tmp, "gptqmodel-logs"))
        gm = gptqmodel.GPTQModel.load(str(llm_dir), gcfg, device=str(dev), dtype=torch.float16)
        backend = gptqmodel.BACKEND.AWQ_TORCH if dev.type == "cpu" else gptqmodel.BACKEND.AUTO
        gm.quantize(samples, batch_size=1, tokenizer=tokenizer, backend=backend)
        gm.save(str(awq_dir))
        del gm
        with atomic_dir(out, replace=force) as final:
            if is_vlm:
                _assemble_llava(src.vlm, src.processor, awq_dir, final)
            else:
                for f in awq_dir.iterdir():
                    if f.is_file():
                        os.replace(f, final / f.name)
            meta = {
                "source": os.path.abspath(model) if os.path.isdir(model) else model,
                "method": "awq",
                "bits": qcfg.bits,
                "group_size": qcfg.group_size,
                "calibration": asdict(calib),
                "gptqmodel": getattr(gptqmodel, "__version__", None),
                "float_dtype": "float16",
            }
            write_json(final / METADATA_FILE, meta)
            report = _verify(str(final), model, dev)
            report["model"] = out
            write_json(final / "quant_report.json", report)
    return report


def _verify(folder: str, source: str, dev: torch.device) -> dict[str, Any]:
    """Reload the written checkpoint and compare it with the float model; refuse one that is broken."""
    report = quant_report(folder, QuantConfig(method="awq"), device=str(dev), reference=source)
    q = report["quality"]
    if not (q["max_abs_logit_err"] < float("inf") and q["sqnr_db_min"] > 0):
        raise QuantCheckError(
            f"the AWQ checkpoint failed its check (max|Δlogit| {q['max_abs_logit_err']}, min layer SQNR "
            f"{q['sqnr_db_min']} dB); nothing was written"
        )
    return report


def quantize(
    model: str,
    qcfg: QuantConfig,
    out: str | None = None,
    calib: CalibConfig | None = None,
    device: str = "auto",
    force: bool = False,
) -> dict[str, Any]:
    """`vzedge quantize`: write an AWQ checkpoint (awq with --out), or report what a method costs on `model`."""
    if qcfg.method == "awq" and out is not None:
        return quantize_awq(model, out, qcfg, calib, device, force)
    if qcfg.method == "awq" and checkpoint_quant_method(load_config(model)) != "awq":
        raise ValueError(f"--method awq writes a checkpoint: pass --out DIR (and --calib N) to quantize {model!r}")
    if out is not None:
        raise ValueError(
            f"{qcfg.method} quantizes at load time, so there is no checkpoint to write: drop --out, and load the "
            f"float model with QuantConfig(method={qcfg.method!r}) (the runtime's --quant)"
        )
    return quant_report(model, qcfg, device=device)
