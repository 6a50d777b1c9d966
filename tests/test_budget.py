"""Memory budget: exact weight and KV bytes, predicted vs measured peaks, device data, search, CLI exit codes."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from vzedge.budget import BudgetConfig, estimate, get_device, load_devices
from vzedge.budget.layout import kv_cache_bytes, llm_weight_bytes, measured_module_bytes, read_shapes, resolve_config

TINY = "tiny-random"  # same architecture as the trained `tiny`, built offline from a seed
ISSUE_DEVICES = (
    "orin-nano-4gb",
    "orin-nano-8gb",
    "orin-nx-8gb",
    "orin-nx-16gb",
    "agx-orin-32gb",
    "agx-orin-64gb",
    "rtx-3060-12gb",
    "rtx-4090-24gb",
    "a100-80gb",
    "h100-80gb",
)


def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


BNB = pytest.mark.skipif(
    not _have("bitsandbytes", "accelerate"), reason="needs bitsandbytes + accelerate (vzedge[bnb])"
)


@pytest.fixture(scope="module")
def tiny_shapes():
    return read_shapes(resolve_config(TINY)[0])


# ---------------------------------------------------------------- device data


def test_builtin_devices_have_the_issue_fields():
    devices = load_devices()
    for ident in ISSUE_DEVICES:
        d = devices[ident]
        assert d.memory_gib > 0 and d.bandwidth_gbs > 0 and d.fp16_tflops > 0 and 0 <= d.reserve_gib < d.memory_gib
        assert d.sources and all(s.startswith("https://") for s in d.sources), ident
    assert devices["orin-nano-8gb"].unified and not devices["rtx-4090-24gb"].unified


def test_user_devices_file_adds_and_overrides(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(
        '[[device]]\nid = "orin-nano-8gb"\nname = "my nano"\nmemory_gib = 8.0\nunified = true\nbandwidth_gbs = 68.0\n'
        "fp16_tflops = 10.0\nreserve_gib = 2.0\ncuda_context_gib = 0.5\n\n"
        '[[device]]\nid = "my-board"\nname = "board"\nmemory_gib = 16\nunified = true\nbandwidth_gbs = 50\n'
        "fp16_tflops = 5\nreserve_gib = 1\ncuda_context_gib = 0.5\n"
    )
    devices = load_devices(f)
    assert devices["orin-nano-8gb"].reserve_gib == 2.0 and devices["my-board"].memory_gib == 16
    assert "agx-orin-64gb" in devices


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown device 'nano'.*orin-nano-8gb"):
        get_device("nano")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"context": 0}, "context must be a positive integer"),
        ({"tokens": -1}, "tokens must be a positive integer"),
        ({"context": 100, "tokens": 64, "prompt_tokens": 64}, "leaves no room"),
        ({"quant": "int3"}, "quant 'int3'"),
        ({"double_quant": True, "quant": "int8"}, "double_quant"),
    ],
)
def test_impossible_configs_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        BudgetConfig(model=TINY, **kw)


def test_too_many_tokens_and_unreadable_model():
    with pytest.raises(ValueError, match="exceeds the 576 visual tokens"):
        estimate(BudgetConfig(model=TINY, tokens=600, context=2048))
    with pytest.raises(ValueError, match="cannot read the size of 'nobody/no-such-model' offline"):
        estimate(BudgetConfig(model="nobody/no-such-model"))


# ---------------------------------------------------------------- exact bytes


def _llm_bytes(vlm: torch.nn.Module) -> int:
    return measured_module_bytes(vlm.model.language_model) + measured_module_bytes(vlm.lm_head)


def test_weight_bytes_exact_unquantized(tiny_shapes):
    from vzedge.models.loading import load_model

    vlm = load_model(TINY).vlm
    assert _llm_bytes(vlm) == llm_weight_bytes(tiny_shapes, "none", "fp32")["total"]
    vision = measured_module_bytes(vlm.model.vision_tower) + measured_module_bytes(vlm.model.multi_modal_projector)
    est = estimate(BudgetConfig(model=TINY, dtype="fp32", context=256), get_device("agx-orin-64gb"), tiny_shapes)
    assert vision == est.component("vision_weights")


@BNB
@pytest.mark.parametrize(
    ("method", "dq"), [("bnb-int8", False), ("bnb-nf4", False), ("bnb-fp4", False), ("bnb-nf4", True)]
)
def test_weight_bytes_exact_quantized(tiny_shapes, method, dq):
    """Every byte of the loaded quantized LLM (weights, int8 SCB, 4-bit absmax/code/nested state), before and
    after the first forward (bitsandbytes repacks 4-bit weights for avx512_bf16 CPUs there)."""
    from vzedge.budget.estimate import _cpu_repacks
    from vzedge.quant import QuantConfig, load_quantized

    vlm = load_quantized(TINY, QuantConfig(method=method, double_quant=dq, fallback=False), "cpu").vlm
    before = llm_weight_bytes(tiny_shapes, method, "fp32", double_quant=dq)["total"]
    assert _llm_bytes(vlm) == before
    with torch.inference_mode():
        vlm.model.language_model(inputs_embeds=torch.randn(1, 5, 128))
    packed = method != "bnb-int8" and _cpu_repacks()
    after = llm_weight_bytes(tiny_shapes, method, "fp32", double_quant=dq, cpu_packed=packed)["total"]
    assert _llm_bytes(vlm) == after


def test_awq_layout_bytes(tiny_shapes):
    """AWQ (GEMM, g=128): int32 qweight [K, N/8] + int32 qzeros [K/g, N/8] + fp16 scales [K/g, N] per linear.
    (Loading AWQ needs gptqmodel and a calibrated checkpoint; the layout is checked here against the formula.)"""
    w = llm_weight_bytes(tiny_shapes, "awq", "fp32", group_size=128)
    expect = 0
    for lin in tiny_shapes.llm_linears:
        if lin.name != "lm_head":
            k, n, g = lin.in_features, lin.out_features, 128
            expect += 4 * k * (n // 8) + 4 * (k // g) * (n // 8) + 2 * (k // g) * n
    assert w["quantized_linears"] == expect


def test_kv_bytes_exact_against_a_real_cache(tiny_shapes):
    from transformers import DynamicCache

    from vzedge.models.loading import load_model

    vlm = load_model(TINY).vlm
    cache = DynamicCache(config=vlm.config.text_config)
    with torch.inference_mode():
        vlm.model.language_model(inputs_embeds=torch.randn(2, 77, 128), past_key_values=cache, use_cache=True)
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert real == kv_cache_bytes(tiny_shapes, 77, 2, "fp32")


# ---------------------------------------------------------------- LLaVA-1.5-7B from its shipped config


def test_llava_7b_from_config_alone():
    shapes = read_shapes(resolve_config("llava-hf/llava-1.5-7b-hf")[0])
    assert shapes.llm_params + shapes.vision_params + shapes.projector_params == 7_063_427_072
    nano = get_device("orin-nano-8gb")
    nf4 = estimate(BudgetConfig(model="llava-1.5-7b", quant="nf4", tokens=64, context=2048), nano, shapes)
    fp16 = estimate(BudgetConfig(model="llava-1.5-7b", quant="none", tokens=576, context=2048), nano, shapes)
    assert nf4.fits and not fp16.fits
    assert fp16.component("llm_weights") == 6_738_939_904 * 2 + 2 * 64 * 4  # fp16 + fp32 rotary buffers
    assert nf4.component("kv_cache") == 2 * 32 * 32 * 128 * 2048 * 2
    b = nf4.bounds
    assert b["decode_tokens_per_s_max"] == pytest.approx(68e9 / b["bytes_read_per_decode_token"])


def test_fit_search():
    from vzedge.budget.fit import fit

    cfg = BudgetConfig(model="llava-1.5-7b", quant="none", tokens=64, context=2048, device="orin-nano-8gb")
    assert fit(cfg, "quant")["quant"] == "bnb-nf4"  # int8 weights alone are 6.5 GiB of the 6.8 available
    assert fit(replace(cfg, device="agx-orin-32gb"), "quant")["quant"] == "none"
    r = fit(replace(cfg, quant="nf4"), "context")
    c = r["context"]
    assert (
        estimate(replace(cfg, quant="nf4", context=c)).fits
        and not estimate(replace(cfg, quant="nf4", context=c + 1)).fits
    )
    t = fit(replace(cfg, quant="int8", device="orin-nx-8gb"), "tokens")
    assert t["tokens"] is None or t["dominant"] + t["contextual"] == t["tokens"]


def test_cli_exit_codes(tmp_path, capsys):
    from vzedge.cli import run

    out = tmp_path / "b.json"
    assert run(["budget", "--model", "llava-1.5-7b", "--quant", "nf4", "--tokens", "64", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["estimate"]["fits"] is True
    assert run(["budget", "--model", "llava-1.5-7b", "--quant", "none", "--tokens", "576"]) == 1
    assert run(["budget", "--model", "llava-1.5-7b", "--device", "nano"]) == 2
    assert run(["budget", "--model", "llava-1.5-7b", "--context", "0"]) == 2
    assert "orin-nano-8gb" in capsys.readouterr().err


# ---------------------------------------------------------------- predicted vs measured (CPU)


def _report(name: str, result: dict) -> None:
    from vzedge.budget.report import validation_table

    print(f"\n{name}\n{validation_table(result)}")


def _ran_the_runtime(result: dict, prompt_tokens: int, new_tokens: int) -> None:
    """The measured run went through the runtime's backends and fed what the estimate was made for."""
    m, cfg = result["measured"], result["predicted"]["config"]
    assert m["backends"] == {"vision": "TorchVisionBackend", "llm": "LLMBackend"}
    assert m["vision_backend"] == f"torch-visionzip-{cfg['tokens']}"
    # the byte-level tokenizer makes the question hit the asked prompt length exactly
    assert m["prompt_tokens"] == cfg["prompt_tokens"] == prompt_tokens
    assert m["prefill_tokens"] == cfg["tokens"] + prompt_tokens and m["decode_steps"] == new_tokens
    assert m["cache_seq"] == cfg["context"] == m["prefill_tokens"] + new_tokens


@pytest.mark.slow
@BNB
def test_tiny_nf4_peak_within_15_percent():
    from vzedge.runtime.validate import validate

    result = validate(BudgetConfig(model=TINY, quant="nf4", tokens=64, prompt_tokens=40, context=2048), new_tokens=8)
    _report("tiny-random nf4", result)
    _ran_the_runtime(result, prompt_tokens=40, new_tokens=8)
    assert result["measured"]["kv_bytes"] == result["predicted"]["components"][2]["bytes"]
    assert result["within_tolerance"], result["total_ratio"]


@pytest.mark.slow
def test_1b_random_fp32_peak_within_15_percent(tmp_path_factory):
    """A ~1.2B-parameter LLaVA (TinyLlama-shaped 1.1B LLM + ViT-B/14-336 tower), fp32, random weights."""
    from transformers import LlavaConfig

    from vzedge.runtime.validate import validate

    folder = tmp_path_factory.mktemp("llava1b")
    LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=768,
            image_size=336,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        image_token_index=31999,
        tie_word_embeddings=False,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    ).save_pretrained(folder)
    cfg = BudgetConfig(model=str(folder), tokens=64, prompt_tokens=40, context=2048)
    result = validate(cfg, new_tokens=4, random_weights=True)
    _report("~1.2B random fp32", result)
    _ran_the_runtime(result, prompt_tokens=40, new_tokens=4)
    assert result["measured"]["llm_tensor_bytes"] == result["predicted"]["components"][0]["bytes"]
    assert result["within_tolerance"], result["total_ratio"]
