"""The library calls behind `vzedge run`, `vzedge chat` and `vzedge bench`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vzedge.runtime.backends.llm import LLMBackend
from vzedge.runtime.backends.vision import VisionBackend, open_vision_backend
from vzedge.runtime.config import RunConfig
from vzedge.runtime.metrics import FrameRecord, MemorySampler, RunMetrics
from vzedge.runtime.scheduler import Pipeline, StageError
from vzedge.runtime.sources import open_source

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A loaded model ready to run: what `run`, `chat` and `bench` share (load once, run many)."""

    cfg: RunConfig
    loaded: Any
    vision: VisionBackend
    llm: LLMBackend
    device: str
    load_s: float


def load_session(cfg: RunConfig) -> Session:
    """Load the LLM (quantized if asked), the vision backend and the LLM backend."""
    t0 = time.perf_counter()
    device = cfg.resolved_device()
    if cfg.quant == "none":
        from vzedge.models.loading import load_model

        loaded = load_model(cfg.model)
        if loaded.vlm is None:
            raise ValueError(f"{cfg.model!r} is a bare vision encoder: the runtime needs a LLaVA model for the LLM")
        loaded.vlm.to(device)
    else:
        from vzedge.quant import QuantConfig, load_quantized

        loaded = load_quantized(cfg.model, QuantConfig(method=cfg.quant), device=device)
    if cfg.projector is not None:
        if cfg.vision is not None:
            raise ValueError(
                "--projector with --vision: an exported graph holds its own projector; export it with "
                "vzedge export --projector TUNED_DIR, or drop --vision to run the tuned projector in PyTorch"
            )
        from vzedge.models.projector import load_tuned_projector

        load_tuned_projector(cfg.projector, loaded.vlm, cfg.visionzip)
    vision = open_vision_backend(
        cfg.vision, loaded, cfg.visionzip, cfg.vision_backend, device, cfg.layout, cfg.adaptive
    )
    if cfg.adaptive is None and vision.adaptive is not None:
        cfg.adaptive = vision.adaptive  # an adaptive export's own budget: the report's config says what ran
    from vzedge.prompt import question_template

    template = cfg.template if cfg.template is not None else question_template(loaded.processor)
    llm = LLMBackend(loaded.vlm, loaded.processor.tokenizer, template)
    check_prompt_fits(llm, vision, cfg.prompt, cfg.max_new_tokens, cfg.clip)
    log.info("loaded %s: vision %s (%d tokens), LLM %s", cfg.model, vision.name, vision.num_tokens, cfg.quant)
    return Session(cfg, loaded, vision, llm, device, time.perf_counter() - t0)


def check_prompt_fits(
    llm: LLMBackend, vision: VisionBackend, question: str, max_new_tokens: int, clip: int = 1
) -> None:
    """Refuse, before the loop starts, a question whose prompt cannot fit the LLM's context with the image."""
    from vzedge.api import check_context

    check_context(llm.vlm, llm.prompt_length(question) + vision.num_tokens * clip, max_new_tokens)


def vision_dtype(vision: VisionBackend) -> str:
    """The vision graph's precision as its export's manifest records it (fp32, fp16, int8, int8-static), or
    "torch" for the PyTorch encoder (the LLM's dtype)."""
    manifest = vision.manifest
    return str(manifest["graph"]["dtype"]) if manifest else "torch"


def _report(session: Session, pipe: Pipeline, sampler: MemorySampler, title: str) -> dict[str, Any]:
    from vzedge.api import quant_label as _quant_label
    from vzedge.bench import conditions

    cfg = session.cfg
    summary = pipe.metrics.summary()
    return {
        "title": title,
        "config": cfg.to_dict(),
        "device": session.device,
        "vision_backend": session.vision.name,
        "vision_dtype": vision_dtype(session.vision),
        "image_tokens": session.vision.num_tokens,
        "quant": _quant_label(session.loaded.vlm, cfg.quant),
        "load_s": round(session.load_s, 3),
        "interrupted": pipe.interrupted,
        "conditions": conditions(),
        "summary": summary,
        "frames": pipe.metrics.records(),
        "memory_samples": list(sampler.samples),
    }


def run(
    cfg: RunConfig,
    session: Session | None = None,
    on_frame: Callable[[FrameRecord], None] | None = None,
    title: str = "vzedge run",
) -> dict[str, Any]:
    """Run the perception loop over `cfg.source`; returns the report (see vzedge.runtime.report)."""
    session = session or load_session(cfg)
    source = open_source(cfg.source, cfg.frames, cfg.image_limits)
    metrics = RunMetrics(cfg.max_records)
    sampler = MemorySampler(cfg.memory_interval_s).start()
    metrics.memory = sampler
    pipe = Pipeline(
        session.vision,
        session.llm,
        cfg.prompt,
        policy=cfg.policy,
        queue_size=cfg.queue_size,
        max_new_tokens=cfg.max_new_tokens,
        on_error=cfg.on_error,
        token_cache=cfg.token_cache,
        clip=cfg.clip,
        metrics=metrics,
        on_frame=on_frame,
    )
    try:
        if cfg.pipelined:
            pipe.run_pipelined(source)
        else:
            pipe.run_sequential(source)
    finally:
        sampler.stop()
    report = _report(session, pipe, sampler, title)
    if pipe.first_error is not None and cfg.on_error == "stop":
        report["stopped_by_error"] = f"{type(pipe.first_error).__name__}: {pipe.first_error}"
    return report


@torch.inference_mode()
def chat(cfg: RunConfig, questions: list[str], session: Session | None = None) -> dict[str, Any]:
    """Several questions about one image: the image's tokens and KV prefix are computed once."""
    from PIL import Image

    from vzedge.images import load_image

    if not questions:
        raise ValueError("chat needs at least one question")
    image: Image.Image = load_image(cfg.source, cfg.image_limits)  # before the model loads
    session = session or load_session(cfg)
    for q in questions:
        check_prompt_fits(session.llm, session.vision, q, cfg.max_new_tokens)
    t0 = time.perf_counter()
    prepared = session.vision.prepare([image])
    t1 = time.perf_counter()
    tokens = session.vision.encode_prepared(prepared)
    t2 = time.perf_counter()
    prefix = session.llm.prefill_image(tokens[:1])
    turns = []
    for i, q in enumerate(questions):
        ans = session.llm.answer(prefix, q, cfg.max_new_tokens)
        turns.append(
            {
                "question": q,
                "answer": ans.text,
                "ttft_ms": round(ans.ttft_ms + (prefix.prefill_ms if i == 0 else 0.0), 3),
                "question_prefill_ms": round(ans.prefill_ms, 3),
                "decode_ms_per_token": round(ans.decode_ms_per_token, 3),
                "new_tokens": len(ans.token_ids),
            }
        )
    return {
        "image": cfg.source,
        "vision_backend": session.vision.name,
        "vision_dtype": vision_dtype(session.vision),
        # With an adaptive budget, the tokens this image got (its bucket), not the most an image can get.
        "image_tokens": int(tokens.shape[1]) if session.vision.adaptive is not None else session.vision.num_tokens,
        "preprocess_ms": round((t1 - t0) * 1e3, 3),
        "vision_ms": round((t2 - t1) * 1e3, 3),
        "image_prefill_ms": round(prefix.prefill_ms, 3),
        "prefix_tokens": prefix.length,
        "turns": turns,
    }


def bench(cfg: RunConfig, session: Session | None = None, rounds: int = 3) -> dict[str, Any]:
    """The loop on `cfg.frames` frames of `cfg.source` (synthetic scenes unless another source is given),
    sequential vs pipelined, alternated for `rounds`
    rounds so that load from other processes hits both alike; frames/s are the medians over the rounds."""
    import statistics

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    frames = cfg.frames or 50
    # Synthetic frames by default; any other --source (a folder, a video, an image) is benchmarked as given.
    synthetic = cfg.source == "synthetic" or cfg.source.startswith("synthetic:")
    source = f"synthetic:{frames}" if synthetic else cfg.source
    if not synthetic:
        open_source(source, frames, cfg.image_limits).close()  # a bad --source fails before the model loads
    session = session or load_session(cfg)
    out: dict[str, Any] = {"frames": frames, "rounds": rounds, "source": source}
    fps: dict[str, list[float]] = {"sequential": [], "pipelined": []}
    for _ in range(rounds):
        for mode in fps:
            mode_cfg = RunConfig(
                **{**cfg.__dict__, "source": source, "frames": frames, "pipelined": mode == "pipelined"}
            )
            out[mode] = run(mode_cfg, session, title=f"vzedge bench ({mode})")
            fps[mode].append(out[mode]["summary"]["frames_per_s"])
    stages = out["sequential"]["summary"]["stages_ms"]

    def p50(stage: str) -> float:
        return stages.get(stage, {}).get("p50", 0.0)

    vision_stage = p50("preprocess") + p50("vision")
    llm_stage = p50("end_to_end") - vision_stage - p50("capture")
    slowest = max(vision_stage, llm_stage)
    seq, pipe = statistics.median(fps["sequential"]), statistics.median(fps["pipelined"])
    out["comparison"] = {
        "sequential_fps": round(seq, 3),
        "pipelined_fps": round(pipe, 3),
        "pipelined_over_sequential": round(pipe / seq, 3) if seq else None,
        "bound_fps_1_over_slowest_stage": round(1e3 / slowest, 3) if slowest > 0 else None,
        "stage_p50_ms": {"vision": round(vision_stage, 3), "llm": round(llm_stage, 3)},
        "fps_per_round": fps,
    }
    return out


__all__ = ["RunConfig", "Session", "StageError", "bench", "chat", "load_session", "run"]
