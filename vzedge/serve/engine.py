"""The engine: one worker thread that owns the model (the runtime's vision and LLM backends).

Requests wait in a bounded FIFO. Each turn of the worker admits waiting requests up to `max_active`: image-cache
hits take the cached KV prefix; misses are encoded together in one vision pass (VisionZip selection is batched)
and prefilled; then every active request decodes one token, round-robin, so a long answer cannot hold back a
short one and streams stay fair. Each request decodes on its own copy of the prefix KV, so answers do not depend
on what else is running.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vzedge.serve.cache import CacheEntry, ImageCache, entry_bytes
from vzedge.serve.config import ServeConfig
from vzedge.serve.errors import RequestError
from vzedge.serve.images import DecodedImage

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One chat request as the engine sees it. Events go to `emit`: ("delta", text), ("done", info),
    ("error", RequestError); exactly one of done/error ends the stream."""

    prefix_text: str  # the prompt before the image
    text: str  # the prompt after the image
    image: DecodedImage
    max_tokens: int
    emit: Callable[[tuple[str, Any]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    question: str = ""  # what the text-conditioned stage reads (the last user message's text)
    ignore_eos: bool = False
    timeout_s: float = 120.0
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the engine.
    entry: CacheEntry | None = None
    cache_hit: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    first_token_at: float | None = None
    stream: Any = None

    @property
    def deadline(self) -> float:
        return self.arrived + self.timeout_s


def answer_text(raw: str, stops: list[str], done: bool) -> tuple[str, int, bool]:
    """The answer so far from the decoded tokens: (text, how much of it may be sent now, whether a stop string
    ended it). Leading and, at the end, trailing whitespace are dropped (as `vzedge generate` strips); while
    decoding, text that may be the start of a stop string, trailing whitespace and partial UTF-8 characters wait."""
    text = raw.lstrip()
    stopped = False
    for stop in stops:  # each cut shortens the text, so the earliest stop wins
        at = text.find(stop)
        if at >= 0:
            text, stopped = text[:at], True
    if done or stopped:
        text = text.rstrip()
        return text, len(text), stopped
    hold = max((len(s) - 1 for s in stops), default=0)
    end = min(len(text.rstrip()), len(text) - hold)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return text, end, False


class Engine:
    """Load the model (in the background), then serve Jobs. `ready` is set once loaded and warmed."""

    def __init__(self, cfg: ServeConfig, metrics_factory: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.cache = ImageCache(int(cfg.image_cache_mb * 2**20))
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.session: Any = None
        self.text_stage: Any = None  # vzedge.runtime.textstage.RuntimeTextStage once loaded, when configured
        self.stage1_encoded = 0  # images the text stage's stage 1 encoded (each once while cached)
        self.stock_tokens = 0
        self.context = 0
        self._inbox: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.on_load_error: Callable[[], None] | None = None  # e.g. stop the HTTP server: nothing to serve
        self.metrics = metrics_factory(self.cache, self.queue_depth, self.active_count) if metrics_factory else None
        budget = cfg.visionzip
        self._budget_key = "all" if budget is None else f"{budget.dominant}+{budget.contextual}@{budget.layer}"
        if cfg.adaptive is not None:
            self._budget_key = self._adaptive_key(cfg.adaptive)

    # --- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="vzedge-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was admitted or queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        # A thread still loading the model holds no request; it is a daemon and ends with the process.
        if self._thread is not None and self.ready.is_set():
            self._thread.join(timeout)

    def queue_depth(self) -> float:
        return float(len(self._inbox))

    def active_count(self) -> float:
        return float(len(self._active))

    def _main(self) -> None:
        try:
            if self.cfg.threads is not None:
                torch.set_num_threads(self.cfg.threads)
            self._load()
        except BaseException as err:  # reported by /health and every request; the thread ends
            log.debug("loading %s failed", self.cfg.model, exc_info=True)
            self.load_error = err
            if self.on_load_error is not None:
                self.on_load_error()
            return
        self.ready.set()
        self._loop()

    def _load(self) -> None:
        from vzedge.api import resolve_projector
        from vzedge.models import adapt_vision_tower
        from vzedge.runtime.api import load_session

        cfg = self.cfg
        run_cfg = cfg.run_config()
        session = load_session(run_cfg)
        adaptive = cfg.adaptive is not None or session.vision.adaptive is not None
        # The shipped tuned projector ("auto") was tuned at one budget (54+10), not for a bucket's token counts.
        projector = None if adaptive and cfg.projector == "auto" else cfg.projector
        projector = resolve_projector(session.loaded.source, cfg.visionzip, projector)
        if projector is not None:
            if cfg.vision is not None:
                if cfg.projector != "auto":
                    raise ValueError(
                        "--projector with --vision: an exported graph holds its own projector; export it with "
                        "vzedge export --projector TUNED_DIR"
                    )
            else:
                from vzedge.models.projector import load_tuned_projector

                load_tuned_projector(projector, session.loaded.vlm, cfg.visionzip)
        self.projector = projector if cfg.vision is None else None
        self.session = session
        self.text_stage = session.text_stage
        if session.vision.adaptive is not None:  # an adaptive export's own budget when --adaptive was omitted
            self._budget_key = self._adaptive_key(session.vision.adaptive)
        # The HTTP side counts prompt tokens on its own copy of the tokenizer: a fast (Rust) tokenizer shared
        # between threads can fail with "RuntimeError: Already borrowed" (transformers #47085).
        self._counter = copy.copy(session.llm)
        self._counter.tokenizer = copy.deepcopy(session.llm.tokenizer)
        tower = adapt_vision_tower(session.loaded.vision)
        strategy = getattr(session.loaded.vlm.config, "vision_feature_select_strategy", "full")
        self.stock_tokens = tower.num_patches if (tower.has_cls and strategy == "default") else tower.seq_len
        text_cfg = session.loaded.vlm.config.text_config
        self.context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        if cfg.warmup:
            self._warmup()
        log.info("serving %s: %s, %d image tokens", cfg.model, session.vision.name, session.vision.num_tokens)

    @torch.inference_mode()
    def _warmup(self) -> None:
        """One vision pass, image prefill and two decode steps, so the first request pays no one-off costs."""
        from vzedge.images import demo_image
        from vzedge.prompt import IMAGE_TOKEN, single_turn

        llm = self.session.llm
        before, after = single_turn(self.session.loaded.processor, "What is in the image?").split(IMAGE_TOKEN)
        tokens = self._encode([demo_image()])[0].unsqueeze(0)
        if self.text_stage is not None:
            tokens, _ = self.text_stage.select(tokens, "What is in the image?")
        prefix = llm.prefill_image(tokens, before)
        for _ in llm.stream(prefix, after, 2, ignore_eos=True):
            pass

    # --- sizes the HTTP layer checks before queueing -------------------------------------------------------

    @staticmethod
    def _adaptive_key(budget: Any) -> str:
        """An image's bucket is a function of the image and the budget, so one key per budget keeps entries of
        different buckets (and of fixed budgets) apart."""
        return f"adaptive:{'/'.join(map(str, budget.buckets))}@{budget.mass:g}"

    @property
    def image_tokens(self) -> int:
        """Image tokens of a request, at most (the text stage's K when it is on, else an adaptive budget's largest
        bucket): what prompt checks allow for."""
        if self.text_stage is not None:
            return int(self.text_stage.k)
        return int(self.session.vision.num_tokens)

    @property
    def adaptive(self) -> Any:
        return self.session.vision.adaptive

    def prompt_tokens(self, prefix_text: str, text: str) -> int:
        """BOS + prefix + image tokens + the rest, as the LLM will see them. Call from one thread only (the
        event loop's): it uses the HTTP side's copy of the tokenizer."""
        llm = self._counter
        return llm.count_tokens(prefix_text, bos=True) + self.image_tokens + llm.count_tokens(text)

    # --- queue ------------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RequestError("the server is shutting down; retry on another instance", 503, code="shutdown")
            if len(self._inbox) + len(self._active) >= self.cfg.max_queue:
                raise RequestError(
                    f"the server is busy ({self.cfg.max_queue} requests queued or running); retry after a second",
                    503,
                    code="server_overloaded",
                    headers={"Retry-After": "1"},
                )
            self._inbox.append(job)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._active and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping and not self._inbox and not self._active:
                    return
                room = min(len(self._inbox), self.cfg.max_active - len(self._active))
                new = [self._inbox.popleft() for _ in range(room)]
            with torch.inference_mode():
                try:
                    if new:
                        self._admit(new)
                    for job in list(self._active):
                        self._step(job)
                except Exception as err:  # a bug must not take the worker down with every later request
                    log.exception("engine turn failed")
                    for job in {id(j): j for j in [*new, *self._active]}.values():
                        self._fail(job, RequestError(f"internal error: {type(err).__name__}: {err}", 500))

    # --- work -------------------------------------------------------------------------------------------------

    def _fail(self, job: Job, err: RequestError) -> None:
        if job.stream is not None:
            job.stream.close()  # crops the job's private KV copy; frees it
            job.stream = None
        if job in self._active:
            self._active.remove(job)
        job.emit(("error", err))

    def _timeout(self, job: Job) -> RequestError:
        return RequestError(
            f"the request took longer than the server's timeout of {self.cfg.timeout_s:g} s; ask for fewer "
            "max_tokens, retry when the server is less busy, or start it with a larger --timeout",
            504,
            code="timeout",
        )

    def _encode(self, images: list[Any]) -> list[torch.Tensor]:
        """Images -> each one's tokens [K_i, D_llm], batched through the vision backend (anyres: one image at a
        time); K_i is the image's own bucket with an adaptive budget."""
        from vzedge.runtime.backends.vision import AnyresVisionBackend

        vision = self.session.vision
        if isinstance(vision, AnyresVisionBackend):
            return [vision.encode_prepared(vision.prepare([im]))[0] for im in images]
        px = vision.prepare(images).pixels
        step = min(vision.max_batch, self.cfg.max_vision_batch)
        return [t for i in range(0, len(px), step) for t in vision.encode_each(px[i : i + step])]

    def _observe(self, stage: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_stage(stage, seconds)

    def _admit(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                continue
            if now > job.deadline:
                job.emit(("error", self._timeout(job)))
                continue
            if self.metrics is not None:
                self.metrics.queue_wait.observe(now - job.arrived)
            live.append(job)
        misses: dict[tuple, list[Job]] = {}
        for job in live:
            # With the text stage the selected tokens, hence the KV prefix, depend on the question too.
            question = job.question if self.text_stage is not None else None
            key = (job.image.sha256, self._budget_key, self.cfg.model, self.projector, job.prefix_text, question)
            entry = self.cache.get(key) if self.cache.capacity_bytes else None
            if entry is not None:
                job.entry, job.cache_hit = entry, True
            else:
                misses.setdefault(key, []).append(job)
        if misses:
            try:
                self._fill(misses)
            except Exception as err:  # a failing pass fails its requests, not the server
                log.exception("vision pass failed")
                for group in misses.values():
                    for job in group:
                        if job.entry is None:  # images prefilled before the failure go on
                            self._fail(job, RequestError(f"the vision pass failed: {err}", 500, code="internal_error"))
        llm = self.session.llm
        for job in live:
            if job.entry is None:
                continue
            if self.metrics is not None:
                self.metrics.observe_image_tokens(int(job.entry.tokens.shape[1]))
            generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
            if generator is None and job.temperature > 0:
                generator = torch.Generator()
                generator.seed()
            job.stream = llm.stream(
                llm.copy_prefix(job.entry.prefix),
                job.text,
                job.max_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                generator=generator,
                ignore_eos=job.ignore_eos,
            )
            self._active.append(job)

    def _fill(self, misses: dict[tuple, list[Job]]) -> None:
        """One vision pass over the missed images, then each one's image prefill; cache the results."""
        llm = self.session.llm
        keys = list(misses)
        t0 = time.perf_counter()
        if self.text_stage is None:
            tokens = self._encode([misses[k][0].image.image for k in keys])
            per_key = [t.unsqueeze(0) for t in tokens]
            if self.metrics is not None:
                self.metrics.vision_batch.observe(len(keys))
        else:
            per_key = self._stage1([misses[k][0].image for k in keys])
        t_vision = time.perf_counter() - t0
        for i, key in enumerate(keys):
            t1 = time.perf_counter()
            image_tokens = per_key[i]
            if self.text_stage is not None:
                image_tokens, select_ms = self.text_stage.select(image_tokens, misses[key][0].question)
                self._observe("text_stage", select_ms / 1e3)
                t1 = time.perf_counter()
            prefix = llm.prefill_image(image_tokens, misses[key][0].prefix_text)
            t_prefill = time.perf_counter() - t1
            entry = CacheEntry(image_tokens, prefix, 0)
            entry.nbytes = entry_bytes(entry.tokens, prefix)
            if self.cache.capacity_bytes:
                self.cache.put(key, entry)
            for job in misses[key]:
                job.entry = entry
                self._observe("vision", t_vision)
                self._observe("image_prefill", t_prefill)

    def _stage1(self, images: list[DecodedImage]) -> list[torch.Tensor]:
        """The text stage's input: each image's stage-1 tokens [1, N1, D_llm], from the cache (its own entry, no KV)
        or one vision pass over the images not in it; an image is encoded once whatever is asked about it."""
        keys = [(im.sha256, "stage1", self._budget_key, self.cfg.model, self.projector) for im in images]
        found: dict[tuple, torch.Tensor] = {}
        for key in dict.fromkeys(keys):
            entry = self.cache.get(key) if self.cache.capacity_bytes else None
            if entry is not None:
                found[key] = entry.tokens
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            first = {k: im for k, im in zip(keys, images, strict=True)}
            tokens = self._encode([first[k].image for k in todo])
            if self.metrics is not None:
                self.metrics.vision_batch.observe(len(todo))
            for i, key in enumerate(todo):
                found[key] = tokens[i].unsqueeze(0)
                if self.cache.capacity_bytes:
                    t = found[key]
                    self.cache.put(key, CacheEntry(t, None, t.numel() * t.element_size()))
        self.stage1_encoded += len(todo)
        return [found[k] for k in keys]

    def _step(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._fail(job, RequestError("the client went away", 499, code="cancelled"))
            return
        if time.perf_counter() > job.deadline:
            self._fail(job, self._timeout(job))
            return
        t0 = time.perf_counter()
        try:
            token = next(job.stream, None)
        except Exception as err:
            log.exception("decoding %s failed", job.id)
            self._fail(job, RequestError(f"decoding failed: {type(err).__name__}: {err}", 500, code="internal_error"))
            return
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self._observe("text_prefill", now - t0)
            if self.metrics is not None:
                self.metrics.ttft.observe(now - job.arrived)
        eos = self.session.llm.eos_id
        finished = None
        if token is None:
            finished = "stop"
        else:
            job.tokens.append(token)
            if token == eos and not job.ignore_eos:
                finished = "stop"
            elif len(job.tokens) >= job.max_tokens:
                finished = "length"
        raw = self.session.llm.tokenizer.decode([t for t in job.tokens if t != eos], skip_special_tokens=True)
        text, end, stopped = answer_text(raw, job.stops, finished is not None)
        if stopped:
            finished = "stop"
        if end > job.sent:
            job.emit(("delta", text[job.sent : end]))
            job.sent = end
        if finished is not None:
            self._finish(job, finished, text)

    def _finish(self, job: Job, reason: str, text: str) -> None:
        if job.stream is not None:
            job.stream.close()
            job.stream = None
        self._active.remove(job)
        now = time.perf_counter()
        n = len(job.tokens)
        decode_s = now - (job.first_token_at or now)
        self._observe("decode", decode_s)
        if self.metrics is not None:
            self.metrics.e2e.observe(now - job.arrived)
            self.metrics.completion_tokens.inc(n)
            if n > 1 and decode_s > 0:
                self.metrics.tokens_per_s.observe((n - 1) / decode_s)
        entry = job.entry
        assert entry is not None
        job.emit(
            (
                "done",
                {
                    "finish_reason": reason,
                    "text": text,
                    "completion_tokens": n,
                    "visual_tokens": int(entry.tokens.shape[1]),
                    "cache_hit": job.cache_hit,
                    "cached_tokens": entry.prefix.length if job.cache_hit else 0,
                    "ttft_s": (job.first_token_at or now) - job.arrived,
                    "seconds": now - job.arrived,
                },
            )
        )


__all__ = ["Engine", "Job"]
