"""Run the built-in `tiny` through vLLM offline (`vllm.LLM`) and print JSON; run by tests/test_vllm.py.

Runs in the vLLM environment (scripts/vllm_cpu_env.sh), not in the test process: vLLM pins its own
transformers. Not collected by pytest (no test_ prefix).

    python tests/vllm_offline.py --questions '["What colour is the triangle?"]' [--stock] [--dominant 54 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def image_features(vlm, pixels):
    """Runs inside vLLM's worker (LLM.apply_model): the served model's image features for `pixels`."""
    return vlm.embed_multimodal(pixel_values=pixels.to(vlm.vision_tower.dtype)).float().cpu().tolist()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny)")
    p.add_argument("--questions", required=True, help="JSON list of questions about the demo image")
    p.add_argument("--stock", action="store_true", help="stock vLLM LLaVA (no VisionZip)")
    p.add_argument("--dominant", type=int, default=54)
    p.add_argument("--contextual", type=int, default=10)
    p.add_argument("--projector", default=None)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()

    import vzedge.vllm.launch
    from vzedge.images import load_image
    from vzedge.models.tiny import PROMPT_TEMPLATE, weights_dir
    from vzedge.visionzip import VisionZipConfig
    from vzedge.vllm.config import ARCHITECTURE, PluginSettings, hf_overrides

    lean = "vllm" not in sys.modules and vzedge.vllm.launch is not None  # vzedge's side imports no vLLM

    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what vLLM does in each process: the entry point registers the architecture
    registered = ARCHITECTURE in ModelRegistry.get_supported_archs()

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function (test only)
    model = args.model or str(weights_dir())
    overrides = None
    if not args.stock:
        settings = PluginSettings(VisionZipConfig(args.dominant, args.contextual), args.projector)
        overrides = hf_overrides(settings)
    llm = LLM(
        model=model,
        hf_overrides=overrides,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=4,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    image = load_image("demo")
    questions = json.loads(args.questions)
    requests = [{"prompt": PROMPT_TEMPLATE.format(question=q), "multi_modal_data": {"image": image}} for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = llm.generate(requests, params)
    image_token_id = llm.llm_engine.model_config.hf_config.image_token_index
    result = []
    for q, out in zip(questions, outputs, strict=True):
        ids = list(out.prompt_token_ids)
        result.append(
            {
                "question": q,
                "prompt_tokens": len(ids),
                "image_tokens": sum(1 for t in ids if t == image_token_id),
                "answer": out.outputs[0].text.strip(),
                "token_ids": list(out.outputs[0].token_ids),
            }
        )
    # The image features the served model computes (VisionZip + projector), on pixels sent back with them, so
    # the test can recompute them with vzedge's own encoder on exactly these pixels.
    from transformers import AutoProcessor

    pixels = AutoProcessor.from_pretrained(model).image_processor(images=image, return_tensors="pt")["pixel_values"]

    import functools

    import vllm_offline  # this file under its module name: the worker unpickles image_features by that name

    features = functools.partial(vllm_offline.image_features, pixels=pixels)
    summary = {
        "lean": lean,
        "registered": registered,
        "results": result,
        "pixel_values": pixels.tolist(),
        "features": llm.apply_model(features)[0],
    }
    sys.stdout.write("VZEDGE_JSON " + json.dumps(summary) + "\n")
    sys.stdout.flush()
    del llm  # shuts the engine core down before the interpreter exits


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    main()
