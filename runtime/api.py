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
from vzedge.runtime.textstage import RuntimeTextStage

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
    released_vision_bytes: int = 0  # the PyTorch vision tower + projector freed because the graph replaces them
    text_stage: RuntimeTextStage | None = None  # stage 2 per question on the vision stage's cached tokens


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
    # Before the graph opens, so the tower and the graph are never in memory together.
    released = release_torch_vision(loaded.vlm) if graph_replaces_torch_vision(cfg) else 0
    vision = open_vision_backend(
        cfg.vision, loaded, cfg.visionzip, cfg.vision_backend, device, cfg.layout, cfg.adaptive
    )
    if cfg.adaptive is None and vision.adaptive is not None:
        cfg.adaptive = vision.adaptive  # an adaptive export's own budget: the report's config says what ran
    from vzedge.prompt import question_template

    template = cfg.template if cfg.template is not None else question_template(loaded.processor)
    llm = LLMBackend(loaded.vlm, loaded.processor.tokenizer, template)
    text_stage = RuntimeTextStage(cfg.text_stage, vision, llm) if cfg.text_stage is not None else None
    check_prompt_fits(llm, vision, cfg.prompt, cfg.max_new_tokens, cfg.clip, text_stage)
    log.info("loaded %s: vision %s (%d tokens), LLM %s", cfg.model, vision.name, vision.num_tokens, cfg.quant)
    if text_stage is not None:
        log.info("text-conditioned stage 2: %d of %d cached tokens per question", text_stage.k, vision.num_tokens)
    return Session(cfg, loaded, vision, llm, device, time.perf_counter() - t0, released, text_stage)


def graph_replaces_torch_vision(cfg: RunConfig) -> bool:
    """True when the run encodes images with an exported graph that holds the projector: the PyTorch vision
    tower and projector are then never called (`--vision-backend torch` still runs the PyTorch encoder)."""
    if cfg.vision is None or cfg.vision_backend == "torch":
        return False
    from vzedge.manifest import read_manifest

    return bool(read_manifest(cfg.vision).get("projector"))


def release_torch_vision(vlm: Any) -> int:
    """Free the weights of `vlm`'s vision tower and projector; return the bytes freed.

    The modules stay in place with their configs (code that reads shapes or configs keeps working); their
    parameters and buffers move to the meta device, so they hold no memory and any forward through them fails.
    The LLM's device and dtype come from its embeddings, which stay where they are."""
    import gc

    from vzedge.runtime.metrics import trim_heap

    freed = 0
    for name in ("vision_tower", "multi_modal_projector"):
        module = getattr(vlm.model, name, None)
        if module is not None:
            held = (t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta")
            freed += sum(t.numel() * t.element_size() for t in held)
            module.to("meta")
    gc.collect()
    trim_heap()
    log.info("freed the PyTorch vision tower and projector (%.1f MiB): the graph replaces them", freed / 2**20)
    return freed


def check_prompt_fits(
    llm: LLMBackend,
    vision: VisionBackend,
    question: str,
    max_new_tokens: int,
    clip: int = 1,
    text_stage: RuntimeTextStage | None = None,
) -> None:
    """Refuse, before the loop starts, a question whose prompt cannot fit the LLM's context with the image."""
    from vzedge.api import check_context

    per_frame = text_stage.k if text_stage is not None else vision.num_tokens
    check_context(llm.vlm, llm.prompt_length(question) + per_frame * clip, max_new_tokens)


def selection_record(session: Session) -> dict[str, Any]:
    """How the image tokens the LLM saw were chosen: text-agnostic (stage 1 only) or text-conditioned."""
    cfg, stage = session.cfg, session.text_stage
    record: dict[str, Any] = {
        "text_conditioned": stage is not None,
        "stage1": {
            "vision_backend": session.vision.name,
            "selector": cfg.visionzip.selector if cfg.visionzip is not None else "all tokens",
            "tokens": session.vision.num_tokens,
        },
    }
    if stage is not None:
        record["stage2"] = stage.describe()
    return record


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
        "image_tokens": session.text_stage.k if session.text_stage is not None else session.vision.num_tokens,
        "selection": selection_record(session),
        "quant": _quant_label(session.loaded.vlm, cfg.quant),
        "load_s": round(session.load_s, 3),
        "torch_vision_released_mib": round(session.released_vision_bytes / 2**20, 1),
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
        text_stage=session.text_stage,
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
    """Several questions about one image: the image's tokens and KV prefix are computed once. With the text
    stage, the image's (stage-1) tokens are computed once and each question selects its own K and prefills them."""
    from PIL import Image

    from vzedge.images import load_image

    if not questions:
        raise ValueError("chat needs at least one question")
    image: Image.Image = load_image(cfg.source, cfg.image_limits)  # before the model loads
    session = session or load_session(cfg)
    for q in questions:
        check_prompt_fits(session.llm, session.vision, q, cfg.max_new_tokens, 1, session.text_stage)
    t0 = time.perf_counter()
    prepared = session.vision.prepare([image])
    t1 = time.perf_counter()
    tokens = session.vision.encode_prepared(prepared)
    t2 = time.perf_counter()
    stage = session.text_stage
    # eager: the report gives the prefix its own time
    prefix = session.llm.prefill_image(tokens[:1]) if stage is None else None
    turns = []
    for i, q in enumerate(questions):
        extra: dict[str, Any] = {}
        if stage is None:
            assert prefix is not None
            image_ms = prefix.prefill_ms if i == 0 else 0.0
            ans = session.llm.answer(prefix, q, cfg.max_new_tokens)
        else:  # stage 2 per question on the cached tokens, then its own prefix
            selected, select_ms = stage.select(tokens[:1], q)
            own = session.llm.prefill_image(selected)
            image_ms = select_ms + own.prefill_ms
            ans = session.llm.answer(own, q, cfg.max_new_tokens)
            extra = {
                "text_stage_ms": round(select_ms, 3),
                "image_prefill_ms": round(own.prefill_ms, 3),
                "prefix_tokens": own.length,
            }
        turns.append(
            {
                "question": q,
                "answer": ans.text,
                "ttft_ms": round(ans.ttft_ms + image_ms, 3),
                "question_prefill_ms": round(ans.prefill_ms, 3),
                "decode_ms_per_token": round(ans.decode_ms_per_token, 3),
                "new_tokens": len(ans.token_ids),
                **extra,
            }
        )
    return {
        "image": cfg.source,
        "vision_backend": session.vision.name,
        "vision_dtype": vision_dtype(session.vision),
        # With an adaptive budget, the tokens this image got (its bucket), not the most an image can get.
        "image_tokens": (
            stage.k
            if stage is not None
            else int(tokens.shape[1])
            if session.vision.adaptive is not None
            else session.vision.num_tokens
        ),
        "selection": selection_record(session),
        "preprocess_ms": round((t1 - t0) * 1e3, 3),
        "vision_ms": round((t2 - t1) * 1e3, 3),
        # With the text stage every question has its own prefix (in its turn); this is the first one's.
        "image_prefill_ms": round(prefix.prefill_ms if prefix is not None else turns[0]["image_prefill_ms"], 3),
        "prefix_tokens": prefix.length if prefix is not None else turns[0]["prefix_tokens"],
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
