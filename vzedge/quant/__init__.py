"""The language model in 4/8-bit: bitsandbytes int8/nf4/fp4 at load time, AWQ checkpoints (gptqmodel).

    config.py  QuantConfig, method names and constants
    load.py    `load_quantized(model, qcfg)`: one loading path for every source, smoke tests and fallbacks
    sizes.py   exact bytes of quantized weights without building a model (the budget planner uses them)
    awq.py     `quantize(...)`: AWQ calibration into a checkpoint (`vzedge quantize --method awq --out DIR`)
    report.py  `quant_report(...)`: what quantization cost (bytes, SQNR, logit agreement)

This package sits below the other workflows (tune, eval, budget, the runtime): they load their LLM
through it.
"""

from __future__ import annotations

from vzedge._deps import resolve_device
from vzedge.quant.awq import CalibConfig, QuantCheckError, quantize, quantize_awq
from vzedge.quant.config import (
    ALIASES,
    AWQ_GROUP_SIZES,
    BNB_4BIT_BLOCKSIZE,
    COMPUTE_DTYPES,
    METHODS,
    VISION_MODULES,
    QuantConfig,
    QuantInfo,
    QuantKernelError,
)
from vzedge.quant.load import (
    awq_smoke_test,
    bnb_config,
    bnb_smoke_test,
    check_4bit_cpu_shapes,
    checkpoint_quant_method,
    load_quantized,
    stdout_to_stderr,
)
from vzedge.quant.report import quant_report, summary_rows
from vzedge.quant.sizes import estimate_weight_bytes, layer_bytes, out_of_memory

__all__ = [
    "ALIASES",
    "AWQ_GROUP_SIZES",
    "BNB_4BIT_BLOCKSIZE",
    "COMPUTE_DTYPES",
    "METHODS",
    "VISION_MODULES",
    "CalibConfig",
    "QuantCheckError",
    "QuantConfig",
    "QuantInfo",
    "QuantKernelError",
    "awq_smoke_test",
    "bnb_config",
    "bnb_smoke_test",
    "check_4bit_cpu_shapes",
    "checkpoint_quant_method",
    "estimate_weight_bytes",
    "layer_bytes",
    "load_quantized",
    "out_of_memory",
    "quant_report",
    "quantize",
    "quantize_awq",
    "resolve_device",
    "stdout_to_stderr",
    "summary_rows",
]
